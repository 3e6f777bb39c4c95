"""Displacement fields in files: ITK's LPS frame and the atomic writers of ran-bundle.

The field algebra (voxel DDFs, world fields in mm, RAS affines, warping) is :mod:`ran_bundle.flow`'s; this
module carries it into the files that other tools read:

* :func:`to_itk_displacement` converts a world field ``v`` (RAS, :func:`ran_bundle.flow.ddf_voxel_to_mm`) to
  ITK's **LPS** frame (``x`` and ``y`` negated: :data:`RAS_TO_LPS`, the one definition of that change of frame,
  which :mod:`ran_bundle.spatial` and :mod:`ran_bundle.apply` use too) and builds the ITK displacement field
  image that ``sitk.DisplacementFieldTransform`` (ITK, ANTs, 3D Slicer) reads: a point ``p`` of fixed physical
  space maps to ``p + v(p)`` of moving physical space, so
  ``sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field))`` reproduces
  :func:`ran_bundle.flow.warp_image`.
* Files: :func:`write_displacement_nifti` writes that ITK field with SimpleITK as a 5-D NIfTI vector
  image (``dim[5] = d``, intent vector, LPS vectors as ITK stores them), which ITK, ANTs, SimpleITK
  and Slicer read back as a displacement field. :func:`write_image_atomic` writes scalar images.
  Both write to a temporary file in the target folder and ``os.replace`` it, so a reader never
  sees a half-written file.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ran_bundle.flow import ArrayLike, as_affine, ddf_voxel_to_mm, spatial_dims_of

__all__ = [
    "RAS_TO_LPS",
    "to_itk_displacement",
    "write_displacement_nifti",
    "write_image_atomic",
    "atomic_write",
]

#: ``diag(-1, -1, 1, 1)``: RAS <-> LPS for homogeneous points (its own inverse); its top-left ``d x d`` block
#: converts vectors (and the points of ``d`` <= 3 dimensions)
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
RAS_TO_LPS.setflags(write=False)


def _to_numpy(x: ArrayLike | Sequence) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def to_itk_displacement(
    ddf_voxel: ArrayLike,
    affine: ArrayLike | Sequence,
    moving_affine: ArrayLike | Sequence | None = None,
    dtype: str = "float64",
):
    """Build the ITK displacement field image of a voxel DDF (LPS frame, vectors in mm).

    The result is defined on the fixed grid (origin, spacing and direction from ``affine``,
    converted to LPS) and holds ``v_LPS(p)``, so that ``sitk.DisplacementFieldTransform(field)``
    maps fixed point ``p`` to moving point ``p + v(p)`` and
    ``sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field), sitk.sitkLinear)``
    equals :func:`ran_bundle.flow.warp_image` (see the module docstring).

    Args:
        ddf_voxel: ``(1, d, *spatial)`` or ``(d, *spatial)`` voxel DDF on the fixed grid.
        affine: ``(d+1, d+1)`` RAS voxel-to-world affine of the fixed grid (``MetaTensor.affine``).
        moving_affine: affine of the moving array when it differs from the fixed one.
        dtype: ``"float64"`` (what ``DisplacementFieldTransform`` needs) or ``"float32"`` (smaller files).

    Returns:
        ``SimpleITK.Image`` of pixel type ``sitkVectorFloat64`` (or ``sitkVectorFloat32``), size
        ``spatial`` (ITK index order = our array axis order), ``d`` components.
    """
    import SimpleITK as sitk

    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}.")
    if ddf_voxel.ndim >= 2 and ddf_voxel.ndim == ddf_voxel.shape[0] + 1:  # (d, *spatial)
        ddf_voxel = ddf_voxel[None]
    d = spatial_dims_of(ddf_voxel)
    if ddf_voxel.shape[0] != 1:
        raise ValueError(f"to_itk_displacement takes one field (batch size 1), got shape {tuple(ddf_voxel.shape)}.")
    a = as_affine(affine, d)
    mm_ras = _to_numpy(ddf_voxel_to_mm(ddf_voxel, a, moving_affine))[0]  # (d, *spatial)
    flip = RAS_TO_LPS[:d, :d]
    # SimpleITK's array view is (z, y, x[, comp]) = reversed ITK index order: one copy into (*reversed, d)
    arr = np.ascontiguousarray(np.transpose(mm_ras, tuple(range(d, 0, -1)) + (0,)), dtype=dtype)
    arr *= np.diag(flip).astype(dtype)  # RAS -> LPS (negate x and y: exact)
    img = sitk.GetImageFromArray(arr, isVector=True)
    lin_lps = flip @ a[:d, :d]
    spacing = np.linalg.norm(lin_lps, axis=0)
    direction = lin_lps / spacing
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in flip @ a[:d, d]])
    img.SetDirection([float(v) for v in direction.ravel()])
    return img


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], object]) -> Path:
    """Call ``write_fn(tmp_path)`` on a temporary file next to ``path``, then ``os.replace`` it into place.

    A reader sees the old file or the complete new one, never a partial one; on any error the
    temporary file is removed and ``path`` is untouched. The temporary name keeps ``path``'s suffix
    (``.nii.gz`` included) so writers that choose the format by suffix work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    suffix = "".join(path.suffixes[-2:]) if name.endswith(".gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


#: gzip level of displacement fields: stored (0). A float vector field compresses by 14% at level 1 (a 1 mm brain's
#: 126 MB field to 108 MB) for 5 s of one core, while a stored ``.nii.gz`` costs 0.3 s and every NIfTI reader
#: (ITK, ANTs, nibabel, FSL) reads it; SimpleITK's own NIfTI writer ignores the level it is given.
FIELD_GZIP_LEVEL = 0


def _write_gzip_level(img, path: str, level: int) -> None:
    """Write a SimpleITK image as ``.nii`` next to ``path`` (a ``.nii.gz``), then gzip it at ``level`` into
    ``path``: the same header and data as ``sitk.WriteImage(img, path, True)``, and the same bytes for the same
    image."""
    import SimpleITK as sitk

    raw = path[: -len(".gz")]
    sitk.WriteImage(img, raw, False)
    try:
        # no name and mtime 0 in the gzip header: the same field gives the same bytes (resumed batches compare them)
        with open(raw, "rb") as src, open(path, "wb") as out:
            with gzip.GzipFile(filename="", mode="wb", compresslevel=level, fileobj=out, mtime=0) as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
    finally:
        os.remove(raw)


def write_displacement_nifti(
    ddf_voxel: ArrayLike,
    affine: ArrayLike | Sequence,
    path: str | os.PathLike,
    moving_affine: ArrayLike | Sequence | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a voxel DDF as an ITK/ANTs/Slicer displacement field (NIfTI vector image), atomically.

    The file is what SimpleITK writes for :func:`to_itk_displacement`: a 5-D NIfTI
    (``dim = [5, X, Y, Z, 1, d]``, intent vector) on the fixed grid, vectors in mm in ITK's LPS frame.
    Read it back with ``sitk.ReadImage(path, sitk.sitkVectorFloat64)`` and wrap it in
    ``sitk.DisplacementFieldTransform``; ANTs (``antsApplyTransforms -t path``) and Slicer
    (load as a transform) read it the same way.

    Args:
        ddf_voxel: ``(1, d, *spatial)`` or ``(d, *spatial)`` voxel DDF on the fixed grid.
        affine: RAS voxel-to-world affine of the fixed grid.
        path: output file, ``.nii`` or ``.nii.gz``.
        moving_affine: affine of the moving array when it differs from the fixed one.
        dtype: stored component type, ``"float32"`` (default) or ``"float64"``.

    Returns:
        The path written.
    """
    import SimpleITK as sitk

    if not str(path).endswith((".nii", ".nii.gz")):
        raise ValueError(f"displacement field path must end with .nii or .nii.gz: {path}")
    img = to_itk_displacement(ddf_voxel, affine, moving_affine=moving_affine, dtype=dtype)
    if str(path).endswith(".gz"):
        return atomic_write(path, lambda tmp: _write_gzip_level(img, tmp, FIELD_GZIP_LEVEL))
    return atomic_write(path, lambda tmp: sitk.WriteImage(img, tmp, False))


def write_image_atomic(
    array: ArrayLike,
    affine: ArrayLike | Sequence,
    path: str | os.PathLike,
    dtype: np.dtype | str | None = None,
) -> Path:
    """Write a scalar image as NIfTI (via nibabel, RAS affine as given), atomically.

    Args:
        array: ``(*spatial)`` or ``(1, *spatial)`` (a channel dim of size 1 is dropped; other
            leading dims are kept as NIfTI's 4th+ dims after the spatial ones are moved first).
        affine: ``(4, 4)`` RAS voxel-to-world affine (``MetaTensor.affine``).
        path: output file, ``.nii`` or ``.nii.gz``.
        dtype: on-disk dtype (default: the array's; bool is stored as uint8).

    Returns:
        The path written.
    """
    import nibabel as nib

    if not str(path).endswith((".nii", ".nii.gz")):
        raise ValueError(f"image path must end with .nii or .nii.gz: {path}")
    arr = _to_numpy(array)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if dtype is not None:
        arr = arr.astype(dtype)
    a = _to_numpy(affine).astype(np.float64)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {a.shape} (writing {path}).")
    img = nib.Nifti1Image(arr, a)
    img.set_qform(a, code=1)
    img.set_sform(a, code=1)
    return atomic_write(path, lambda tmp: nib.save(img, tmp))
