"""Bad input to the bundle's workflows: one clear error each, before any work, and nothing written.

Each case runs the real CLI (``python -m monai.bundle run ...``) on a datalist or checkpoint made
bad in one way, from the embedded tiny_ct files, and checks the exit status, that the message names
the file and the problem, and that neither the checkpoint folder nor the output folder was created.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow  # subprocesses or training runs: not in `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def subject(tiny_ct: Path, k: int) -> dict[str, str]:
    return {
        "image": str(tiny_ct / f"images/subject_{k:02d}.nii.gz"),
        "label": str(tiny_ct / f"labels/subject_{k:02d}.nii.gz"),
    }


def write_nifti(array: np.ndarray, path: Path, like: str | None = None) -> str:
    affine = nib.load(like).affine if like else np.diag([3.0, 3.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def base_datalist(tiny_ct: Path) -> dict:
    return {"training": [subject(tiny_ct, k) for k in (0, 1)], "validation": [subject(tiny_ct, k) for k in (4, 5)]}


def missing_file(tiny_ct: Path, tmp: Path) -> dict:
    dl = base_datalist(tiny_ct)
    dl["training"][1]["image"] = str(tmp / "absent.nii.gz")
    return dl


def unreadable_file(tiny_ct: Path, tmp: Path) -> dict:
    bad = tmp / "corrupt.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    dl = base_datalist(tiny_ct)
    dl["training"][1] = {"image": str(bad)}
    return dl


def image_2d(tiny_ct: Path, tmp: Path) -> dict:
    dl = base_datalist(tiny_ct)
    slice_2d = np.asarray(nib.load(dl["training"][1]["image"]).dataobj)[:, :, 10]
    dl["training"][1] = {"image": write_nifti(slice_2d.astype(np.float32), tmp / "slice.nii.gz")}
    return dl


def label_other_grid(tiny_ct: Path, tmp: Path) -> dict:
    dl = base_datalist(tiny_ct)
    label = np.asarray(nib.load(dl["validation"][0]["label"]).dataobj)[:-8]
    dl["validation"][0]["label"] = write_nifti(label.astype(np.int16), tmp / "cropped_label.nii.gz")
    return dl


def empty_label(tiny_ct: Path, tmp: Path) -> dict:
    dl = base_datalist(tiny_ct)
    like = dl["validation"][0]["label"]
    zeros = np.zeros(nib.load(like).shape, np.int16)
    dl["validation"][0]["label"] = write_nifti(zeros, tmp / "empty_label.nii.gz", like=like)
    return dl


def nan_image(tiny_ct: Path, tmp: Path) -> dict:
    dl = base_datalist(tiny_ct)
    like = dl["training"][0]["image"]
    image = np.asarray(nib.load(like).dataobj, dtype=np.float32).copy()
    image[5, 5, 5] = np.nan
    dl["training"][0]["image"] = write_nifti(image, tmp / "nan.nii.gz", like=like)
    return dl


def one_subject(tiny_ct: Path, tmp: Path) -> dict:
    dl = base_datalist(tiny_ct)
    dl["training"] = dl["training"][:1]
    return dl


DATALIST_CASES: dict[str, tuple[Callable[[Path, Path], dict], tuple[str, ...]]] = {
    "missing file": (missing_file, ("absent.nii.gz", "file not found")),
    "unreadable file": (unreadable_file, ("corrupt.nii.gz", "cannot read the image")),
    "2D image to a 3D config": (image_2d, ("slice.nii.gz", "not a 3D image")),
    "label on another grid": (label_other_grid, ("cropped_label.nii.gz", "must be on its image's voxel grid")),
    "empty label map": (empty_label, ("empty_label.nii.gz", "the label map is empty")),
    "NaN in an image": (nan_image, ("nan.nii.gz", "1 NaN")),
    "one training subject": (one_subject, ("'training' has 1 subject", "need at least 2")),
}


def run_training(datalist: Path, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
         "--datalist", str(datalist), "--ckpt_dir", str(root / "models"), "--output_dir", str(root / "out"),
         "--progress_bar", "False"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV,
    )  # fmt: skip


@pytest.mark.parametrize("case", list(DATALIST_CASES))
def test_bad_datalist_input_stops_training_before_any_work(case, tiny_ct, tmp_path):
    make, expected = DATALIST_CASES[case]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(make(tiny_ct, tmp_path)))
    proc = run_training(datalist, tmp_path / "run")
    assert proc.returncode != 0
    for text in expected:
        assert text in proc.stderr, f"{case}: {text!r} not in the error output:\n{proc.stderr[-3000:]}"
    assert "Epoch" not in proc.stdout + proc.stderr, "training started before the input was checked"
    assert not (tmp_path / "run").exists(), "a workflow folder was created for a run that could not start"


def bad_weights_for_another_preset(path: Path) -> None:
    from ran_bundle.networks import ResidualAlignerNetwork

    torch.save({"model": ResidualAlignerNetwork(spatial_dims=3, preset="RAn0").state_dict()}, path)


def bad_weights_not_a_checkpoint(path: Path) -> None:
    path.write_bytes(b"\x00not a checkpoint")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (bad_weights_for_another_preset, "do not fit the network"),
        (bad_weights_not_a_checkpoint, "cannot read it as a PyTorch checkpoint"),
    ],
    ids=["weights of another preset", "not a checkpoint"],
)
def test_wrong_weight_file_stops_inference_before_any_work(make, expected, tmp_path):
    weights = tmp_path / "weights.pt"
    make(weights)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--ckpt_path", str(weights), "--output_dir", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV,
    )  # fmt: skip
    assert proc.returncode != 0
    assert expected in proc.stderr and str(weights) in proc.stderr, proc.stderr[-3000:]
    assert not out.exists(), "an output folder was created for a run that could not start"
