"""Field conventions: voxel -> mm, ITK (LPS) displacement fields, NIfTI writing, warping."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from ran_bundle.fields import to_itk_displacement, write_displacement_nifti, write_image_atomic
from ran_bundle.flow import ddf_voxel_to_mm, warp_image

AFFINE = np.array(
    [
        [2.0, 0.0, 0.0, -10.0],
        [0.0, 3.0, 0.0, 20.0],
        [0.0, 0.0, 4.0, 30.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _const_field(shape, axis, value=1.0):
    u = torch.zeros((1, 3, *shape))
    u[:, axis] = value
    return u


def _smooth_field(shape, seed=0, amp=(2.5, 2.5, 1.0)):
    rng = np.random.default_rng(seed)
    u = np.stack([gaussian_filter(rng.standard_normal(shape), 5.0) for _ in range(3)])
    u /= np.abs(u).reshape(3, -1).max(1)[:, None, None, None]
    u *= np.asarray(amp)[:, None, None, None]
    return torch.tensor(u[None], dtype=torch.float32)


def _itk_array(img: sitk.Image) -> np.ndarray:
    """SimpleITK image -> array in ITK index order (i, j, k[, comp])."""
    a = sitk.GetArrayFromImage(img)
    nd = img.GetDimension()
    return np.transpose(a, tuple(range(nd - 1, -1, -1)) + tuple(range(nd, a.ndim)))


def test_voxel_shift_to_mm_ras_and_lps():
    u = _const_field((4, 5, 6), axis=0)
    mm = ddf_voxel_to_mm(u, AFFINE)
    assert isinstance(mm, torch.Tensor) and mm.shape == u.shape
    np.testing.assert_allclose(mm[0, :, 1, 2, 3].numpy(), [2.0, 0.0, 0.0])  # +2 mm towards R (RAS +x)
    field = to_itk_displacement(u, AFFINE)
    vec = _itk_array(field)
    assert vec.shape == (4, 5, 6, 3)
    np.testing.assert_allclose(vec[1, 2, 3], [-2.0, 0.0, 0.0])  # LPS: x negated
    # axis 1 (A in RAS) -> LPS y negated, axis 2 (S) unchanged
    np.testing.assert_allclose(_itk_array(to_itk_displacement(_const_field((4, 5, 6), 1), AFFINE))[0, 0, 0], [0, -3, 0])
    np.testing.assert_allclose(_itk_array(to_itk_displacement(_const_field((4, 5, 6), 2), AFFINE))[0, 0, 0], [0, 0, 4])


def test_voxel_shift_on_permuted_flipped_affine():
    # array axis 0 runs towards posterior (-A) at 1.5 mm, axis 1 towards S, axis 2 towards L (-R)
    aff = np.array([[0, 0, -2.0, 5], [-1.5, 0, 0, 6], [0, 2.5, 0, 7], [0, 0, 0, 1]])
    u = _const_field((3, 4, 5), axis=0)
    np.testing.assert_allclose(ddf_voxel_to_mm(u.numpy(), aff)[0, :, 0, 0, 0], [0.0, -1.5, 0.0])
    field = to_itk_displacement(u, aff)
    np.testing.assert_allclose(_itk_array(field)[2, 1, 0], [0.0, 1.5, 0.0])  # LPS y = -A
    # geometry is ITK's reading of the same affine
    ref = nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), aff)
    ref_itk = sitk.GetImageFromArray(np.zeros((5, 4, 3), np.float32))
    lps = np.diag([-1, -1, 1]) @ aff[:3, :3]
    assert ref.shape == field.GetSize()
    np.testing.assert_allclose(field.GetSpacing(), [1.5, 2.5, 2.0])
    np.testing.assert_allclose(np.reshape(field.GetDirection(), (3, 3)) * field.GetSpacing(), lps, atol=1e-12)
    np.testing.assert_allclose(field.GetOrigin(), [-5, -6, 7])
    assert ref_itk.GetDimension() == field.GetDimension() == 3


def test_moving_affine_adds_grid_offset():
    u = torch.zeros((1, 3, 2, 3, 4))
    mov = AFFINE.copy()
    mov[:3, 3] += [1.0, -2.0, 0.5]
    np.testing.assert_allclose(ddf_voxel_to_mm(u, AFFINE, moving_affine=mov)[0, :, 1, 2, 3].numpy(), [1, -2, 0.5])


def test_field_geometry_matches_itk_reading_of_the_image(tiny_ct: Path):
    path = tiny_ct / "images" / "subject_00.nii.gz"
    nimg = nib.load(str(path))
    field = to_itk_displacement(torch.zeros((1, 3, *nimg.shape)), nimg.affine)
    ref = sitk.ReadImage(str(path))
    assert field.GetSize() == ref.GetSize()
    np.testing.assert_allclose(field.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(field.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(field.GetDirection(), ref.GetDirection(), atol=1e-6)


def test_written_field_reproduces_warp_image_in_simpleitk(tiny_ct: Path, tmp_path: Path):
    """The key convention test: our DDF + warp == ITK DisplacementFieldTransform + Resample."""
    path = tiny_ct / "images" / "subject_00.nii.gz"
    nimg = nib.load(str(path))
    arr = np.asarray(nimg.dataobj).astype(np.float32)
    u = _smooth_field(arr.shape, seed=1)
    ours = warp_image(torch.from_numpy(arr)[None, None], u)[0, 0].numpy()
    out = write_displacement_nifti(u, nimg.affine, tmp_path / "ddf.nii.gz")
    assert out == tmp_path / "ddf.nii.gz" and out.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ddf.nii.gz"]  # no temp file left behind

    hdr = nib.load(str(out)).header
    assert int(hdr["dim"][0]) == 5 and tuple(hdr["dim"][1:6]) == (*arr.shape, 1, 3)
    assert int(hdr["intent_code"]) == 1007  # NIFTI_INTENT_VECTOR

    field = sitk.ReadImage(str(out), sitk.sitkVectorFloat64)
    moving = sitk.ReadImage(str(path), sitk.sitkFloat32)
    res = sitk.Resample(moving, moving, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0)
    itk = _itk_array(res)
    inner = (slice(5, -5), slice(5, -5), slice(3, -3))
    err = np.abs(itk[inner] - ours[inner])
    assert err.max() < 0.05  # HU; float32 storage of the field
    assert np.abs(ours[inner] - arr[inner]).mean() > 20  # the field really moves the image

    # sensitivity: the opposite sign convention would be far off
    bad = sitk.Resample(
        moving, moving, sitk.DisplacementFieldTransform(to_itk_displacement(-u, nimg.affine)), sitk.sitkLinear, 0.0
    )
    assert np.abs(_itk_array(bad)[inner] - ours[inner]).mean() > 10


def test_warp_image_identity_shift_and_nearest():
    img = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 1, 4, 5, 6)
    assert torch.allclose(warp_image(img, torch.zeros(1, 3, 4, 5, 6)), img, atol=1e-4)
    shifted = warp_image(img, _const_field((4, 5, 6), axis=1))  # warped(x) = img(x + e1)
    assert torch.allclose(shifted[..., :, :4, :], img[..., :, 1:, :], atol=1e-4)
    assert torch.all(shifted[..., :, 4, :] == 0)  # zero padding outside
    lab = torch.randint(0, 4, (2, 1, 4, 5, 6), dtype=torch.int64)
    warped = warp_image(lab, _const_field((4, 5, 6), 0, 0.4).repeat(2, 1, 1, 1, 1), mode="nearest")
    assert warped.dtype == torch.int64 and torch.equal(warped, lab)
    with pytest.raises(ValueError, match="ddf shape"):
        warp_image(img, torch.zeros(1, 3, 4, 5, 7))
    with pytest.raises(ValueError, match="mode"):
        warp_image(img, torch.zeros(1, 3, 4, 5, 6), mode="bicubic")


def test_write_image_atomic_roundtrip(tmp_path: Path):
    arr = np.random.default_rng(0).integers(0, 5, (1, 3, 4, 5)).astype(np.uint8)
    p = write_image_atomic(torch.from_numpy(arr), AFFINE, tmp_path / "sub" / "lab.nii.gz")
    back = nib.load(str(p))
    np.testing.assert_array_equal(np.asarray(back.dataobj), arr[0])
    np.testing.assert_allclose(back.affine, AFFINE)
    assert back.get_data_dtype() == np.uint8
    assert sorted(x.name for x in p.parent.iterdir()) == ["lab.nii.gz"]
    with pytest.raises(ValueError, match=r"\.nii"):
        write_image_atomic(arr, AFFINE, tmp_path / "x.png")
    with pytest.raises(ValueError, match="affine"):
        ddf_voxel_to_mm(torch.zeros(1, 3, 2, 2, 2), np.eye(3))
