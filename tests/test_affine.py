"""The affine stage (ran_bundle.affine) and its data-pipeline form (AlignToReferenced), on real brains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ran_bundle.affine import read_transform, register_affine, write_transform
from ran_bundle.inputs import InputError
from ran_bundle.spatial import ras_matrix, sitk_affine

MINDBOGGLE = "mindboggle_oasis_trt20/oasis_trt_{:02d}"


def _brain(shared_data: Path, subject: int) -> tuple[sitk.Image, Path]:
    folder = shared_data / MINDBOGGLE.format(subject)
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (Mindboggle OASIS-TRT-20 in the shared data)")
    return sitk.ReadImage(str(folder / "image.nii.gz"), sitk.sitkFloat32), folder


def _known_affine(image: sitk.Image) -> sitk.AffineTransform:
    """8 deg / -5 deg / 6 deg rotations, anisotropic scaling 0.93-1.07, a shear and 7 mm translation about the
    image centre: a fixed point p maps to the moving point T(p)."""
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(*np.deg2rad([8.0, -5.0, 6.0]))
    matrix = np.reshape(rotation.GetMatrix(), (3, 3)) @ np.diag([1.07, 0.93, 1.04])
    matrix[0, 1] += 0.05
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(matrix.ravel()))
    transform.SetTranslation((6.0, -7.0, 4.0))
    transform.SetCenter(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    return transform


@pytest.mark.slow
def test_affine_stage_recovers_a_known_affine_of_a_real_brain(shared_data: Path):
    """A real T1 brain and its copy moved by a known affine: the stage finds it to < 1 mm RMS over the brain."""
    fixed, _ = _brain(shared_data, 13)
    true = _known_affine(fixed)
    # the moving image shows the fixed anatomy at T(p): moving(T(p)) = fixed(p)
    moving = sitk.Resample(fixed, fixed, true.GetInverse(), sitk.sitkLinear, 0.0)
    result = register_affine(fixed, moving)
    brain = np.argwhere(sitk.GetArrayViewFromImage(fixed) > 0)[::20, ::-1]  # (N, 3) ITK index order
    points = [fixed.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in brain]
    found = np.array([result.transform.TransformPoint(p) for p in points])
    expected = np.array([true.TransformPoint(p) for p in points])
    rms = float(np.sqrt(((found - expected) ** 2).sum(1).mean()))
    identity_rms = float(np.sqrt(((np.asarray(points) - expected) ** 2).sum(1).mean()))
    assert identity_rms > 10.0  # the known affine moves the brain a lot
    assert rms < 1.0, f"affine stage error {rms:.2f} mm RMS over the brain"
    assert result.stage == "affine" and set(result.metric) == {"rigid", "affine"}


@pytest.mark.slow
def test_rigid_stage_keeps_a_rotation_and_improves_the_metric(shared_data: Path):
    fixed, _ = _brain(shared_data, 13)
    moving, _ = _brain(shared_data, 14)
    result = register_affine(fixed, moving, stage="rigid")
    linear = result.matrix[:3, :3]
    np.testing.assert_allclose(linear @ linear.T, np.eye(3), atol=1e-6)  # a rotation: no scaling or shear
    assert np.linalg.det(linear) > 0
    none = register_affine(fixed, moving, stage="none")
    np.testing.assert_allclose(none.matrix, np.eye(4))


def test_transform_files_round_trip_and_itk_reads_them(tmp_path: Path):
    matrix = np.eye(4)
    matrix[:3, :3] = [[1.05, 0.02, 0.0], [-0.03, 0.97, 0.01], [0.0, 0.04, 1.1]]
    matrix[:3, 3] = [3.0, -2.0, 5.0]
    path = tmp_path / "affine.tfm"
    write_transform(matrix, path)
    np.testing.assert_allclose(read_transform(path), matrix, atol=1e-9)
    # ITK reads it as the LPS map of the same points
    itk = sitk.ReadTransform(str(path))
    p_ras = np.array([10.0, -20.0, 30.0])
    q_lps = np.asarray(itk.TransformPoint(tuple(p_ras * [-1, -1, 1])))
    np.testing.assert_allclose(q_lps * [-1, -1, 1], matrix[:3, :3] @ p_ras + matrix[:3, 3], atol=1e-9)
    np.testing.assert_allclose(ras_matrix(sitk_affine(matrix)), matrix, atol=1e-12)


def test_bad_transform_files_are_refused(tmp_path: Path):
    with pytest.raises(InputError, match="not found"):
        read_transform(tmp_path / "missing.tfm")
    junk = tmp_path / "junk.tfm"
    junk.write_text("not a transform\n")
    with pytest.raises(InputError, match="cannot read"):
        read_transform(junk)
    field = sitk.Image([4, 4, 4], sitk.sitkVectorFloat64, 3)
    sitk.WriteTransform(sitk.DisplacementFieldTransform(field), str(tmp_path / "field.h5"))
    with pytest.raises(InputError, match="not linear"):
        read_transform(tmp_path / "field.h5")


@pytest.mark.slow
def test_align_to_reference_computes_each_subject_once_and_caches_it(shared_data: Path, tmp_path: Path, monkeypatch):
    from ran_bundle import transforms

    _, ref = _brain(shared_data, 13)
    _, other = _brain(shared_data, 14)
    calls = []
    real = transforms.register_affine

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(transforms, "register_affine", counting)
    align = transforms.AlignToReferenced(str(ref / "image.nii.gz"), cache_dir=tmp_path / "cache")
    pair = {
        "moving_image": str(other / "image.nii.gz"),
        "fixed_image": str(ref / "image.nii.gz"),
        "moving_label": str(other / "label.nii.gz"),
        "fixed_label": str(ref / "label.nii.gz"),
    }
    first = align(dict(pair))
    align(dict(pair))
    assert len(calls) == 2  # one per subject, not per call
    again = transforms.AlignToReferenced(str(ref / "image.nii.gz"), cache_dir=tmp_path / "cache")
    again(dict(pair))
    assert len(calls) == 2  # a new run reads the transform files
    assert len(list((tmp_path / "cache").glob("*.tfm"))) == 2
    shape = tuple(first["fixed_image"].shape)
    assert shape[0] == 1 and all(s % 16 == 0 for s in shape[1:])
    assert first["moving_image"].shape == first["fixed_label"].shape
    np.testing.assert_allclose(np.diag(first["moving_image"].affine.numpy())[:3], [2.0, 2.0, 2.0])
    # labels keep their values; after the affine stage the two brains overlap well
    moving_brain = first["moving_image"][0].numpy() > 0
    fixed_brain = first["fixed_image"][0].numpy() > 0
    overlap = 2 * (moving_brain & fixed_brain).sum() / (moving_brain.sum() + fixed_brain.sum())
    assert overlap > 0.85
    values = np.unique(first["moving_label"].numpy())
    assert np.allclose(values, np.rint(values)) and values.max() > 1000
