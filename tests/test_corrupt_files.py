"""Truncated and damaged input files are refused with one line naming the file (:func:`ran_bundle.inputs.
check_complete_file`), where the readers would not notice: SimpleITK reads a cut-off ``.nii.gz`` without an
error (the missing voxels become zeros), ``torch.load`` a checkpoint with damaged tensor bytes."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ran_bundle.fields import write_displacement_nifti
from ran_bundle.inputs import InputError, check_complete_file, load_volume, read_state_dict
from ran_bundle.spatial import read_displacement_field

REPO = Path(__file__).resolve().parents[1]
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def flip_byte(path: Path, where: float = 0.5) -> Path:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def field_file(path: Path) -> Path:
    rng = np.random.default_rng(0)
    write_displacement_nifti(rng.normal(size=(1, 3, 20, 18, 16)).astype(np.float32), AFFINE, path)
    return path


def image_file(path: Path) -> Path:
    rng = np.random.default_rng(1)
    nib.save(nib.Nifti1Image(rng.normal(size=(24, 20, 16)).astype(np.float32), AFFINE), str(path))
    return path


def test_truncated_field_is_refused(tmp_path):
    path = truncate(field_file(tmp_path / "ddf.nii.gz"))
    assert sitk.ReadImage(str(path)).GetSize() == (20, 18, 16), "premise: SimpleITK reads the cut-off file"
    with pytest.raises(InputError) as err:
        read_displacement_field(path)
    message = str(err.value)
    assert message.startswith(f"field {path}: truncated or corrupt file (gzip stream: ") and "\n" not in message


def test_intact_field_is_read(tmp_path):
    field, affine = read_displacement_field(field_file(tmp_path / "ddf.nii.gz"))
    assert field.shape == (1, 3, 20, 18, 16)
    np.testing.assert_allclose(np.diag(affine), np.diag(AFFINE))


def test_damaged_gzip_data_is_refused(tmp_path):
    path = flip_byte(field_file(tmp_path / "ddf.nii.gz"), 0.6)
    with pytest.raises(InputError, match=r"truncated or corrupt file \(gzip stream"):
        read_displacement_field(path)


def test_truncated_uncompressed_field_is_refused(tmp_path):
    path = truncate(field_file(tmp_path / "ddf.nii"), 0.7)
    with pytest.raises(InputError, match=rf"field {path}: truncated or corrupt file \(\d+ of the \d+ bytes"):
        read_displacement_field(path)


def test_gzip_of_a_truncated_nifti_is_refused(tmp_path):
    """A complete gzip stream around a cut-off NIfTI: the decompressed size is compared with the header."""
    raw = truncate(image_file(tmp_path / "image.nii"), 0.8).read_bytes()
    path = tmp_path / "image.nii.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(InputError, match=r"\(\d+ of the \d+ decompressed bytes its NIfTI header announces\)"):
        check_complete_file(path, "moving image")


def test_nifti_shorter_than_its_header_is_refused(tmp_path):
    path = truncate(image_file(tmp_path / "image.nii"), 0.1)  # 1.5 kB: the 352-byte header survives
    with pytest.raises(InputError, match="NIfTI header announces"):
        check_complete_file(path, "fixed image")
    path.write_bytes(path.read_bytes()[:100])  # the header itself is cut
    with pytest.raises(InputError, match=r"fixed image .*: truncated or corrupt file \(NIfTI header: "):
        check_complete_file(path, "fixed image")
    path.write_bytes(b"")
    with pytest.raises(InputError, match=r"truncated or corrupt file \(empty file\)"):
        check_complete_file(path, "fixed image")


def test_load_volume_refuses_a_truncated_image(tmp_path):
    path = image_file(tmp_path / "image.nii.gz")
    assert load_volume(path, "fixed image").array.shape == (24, 20, 16)
    truncate(path)
    with pytest.raises(InputError, match=rf"fixed image {path}: truncated or corrupt file \(gzip stream"):
        load_volume(path, "fixed image")


def test_intact_files_pass(tmp_path):
    for path in (
        image_file(tmp_path / "a.nii"),
        image_file(tmp_path / "a.nii.gz"),
        field_file(tmp_path / "f.nii"),
        field_file(tmp_path / "f.nii.gz"),
    ):
        check_complete_file(path, "image")
    mha = tmp_path / "a.mha"
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkFloat32), str(mha))
    check_complete_file(mha, "image")  # other formats: left to their readers


def checkpoint(path: Path, **kwargs) -> tuple[Path, dict[str, torch.Tensor]]:
    state = {"layer.weight": torch.randn(64, 64), "layer.bias": torch.randn(64)}
    torch.save({"model": state}, path, **kwargs)
    return path, state


def test_truncated_checkpoint_is_refused(tmp_path):
    path, _ = checkpoint(tmp_path / "model.pt")
    truncate(path)
    with pytest.raises(InputError) as err:
        read_state_dict(path)
    assert str(err.value).startswith(f"weights {path}: truncated or corrupt file (") and "\n" not in str(err.value)


def test_damaged_tensor_bytes_are_refused(tmp_path):
    path, state = checkpoint(tmp_path / "model.pt")
    flip_byte(path, 0.5)  # inside the weight tensor's bytes: torch.load reads wrong weights without an error
    loaded = torch.load(path, weights_only=True)["model"]
    assert not torch.equal(loaded["layer.weight"], state["layer.weight"]), "premise: torch.load does not notice"
    with pytest.raises(InputError, match=rf"weights {path}: truncated or corrupt file \(zip member .*CRC"):
        read_state_dict(path)


def test_truncated_legacy_checkpoint_is_refused(tmp_path):
    path, _ = checkpoint(tmp_path / "model.pt", _use_new_zipfile_serialization=False)
    truncate(path)
    with pytest.raises(InputError, match=rf"weights {path}: truncated or corrupt file"):
        read_state_dict(path)


def test_intact_checkpoints_are_read(tmp_path):
    path, state = checkpoint(tmp_path / "model.pt")
    assert torch.equal(read_state_dict(path)["layer.weight"], state["layer.weight"])
    path, state = checkpoint(tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(path)["layer.bias"], state["layer.bias"])
    shipped = REPO / "models" / "model.pt"
    if shipped.is_file():
        check_complete_file(shipped, "weights")


@pytest.mark.skipif(not hasattr(torch.serialization, "set_crc32_options"), reason="torch without CRC options")
def test_checkpoint_saved_without_crc_is_not_refused(tmp_path):
    torch.serialization.set_crc32_options(False)
    try:
        path, state = checkpoint(tmp_path / "model.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(read_state_dict(path)["layer.weight"], state["layer.weight"])


def test_ran_warp_refuses_a_truncated_field(tmp_path, capsys):
    """The user-visible fault: ``ran-warp`` exited 0 and wrote a wrong image."""
    from ran_bundle.cli import warp_main

    field = truncate(field_file(tmp_path / "ddf.nii.gz"))
    image = image_file(tmp_path / "moving.nii.gz")
    out = tmp_path / "warped.nii.gz"
    with pytest.raises(SystemExit) as exit_info:
        warp_main(["--field", str(field), "--image", str(image), "--out", str(out), "--quiet"])
    assert exit_info.value.code not in (0, None)
    assert f"field {field}: truncated or corrupt file" in capsys.readouterr().err
    assert not out.exists()
