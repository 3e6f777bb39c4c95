"""Displacement-field conventions of ran-bundle: the one place where they are defined.

Convention (used by the network, the losses, the metrics and every reader and writer):

* A dense displacement field (DDF) is a tensor of shape ``(B, d, *spatial)`` (``d`` = number of
  spatial dims) that lives on the **fixed** image grid (after our preprocessing). It is given in
  **voxel units** of that grid: channel ``i`` is the displacement along array axis ``i``.
* Warping pulls the moving image onto the fixed grid:
  ``warped(x) = moving(x + u(x))`` for every fixed voxel index ``x`` (trilinear or nearest
  interpolation, zero outside the moving image), exactly as :class:`monai.networks.blocks.Warp`
  does (``grid_sample(..., align_corners=True)``): see :func:`warp_image`.
  The network aligns voxel arrays, so ``x + u(x)`` is a voxel index of the moving array. When the
  moving image sits on the same grid as the fixed one (same affine, the usual case after
  preprocessing), this is also the world-space relation; otherwise pass ``moving_affine``.
* Affines are 4x4 voxel-to-world matrices in the **RAS** world frame, as MONAI's ``MetaTensor.affine``
  and nibabel give them (first array axis = first affine column).
* World-space displacements: ``v(p) = A_m (x + u(x)) - A_f x`` with ``p = A_f x`` (homogeneous
  coordinates; ``A_m = A_f`` unless ``moving_affine`` is given), in mm. :func:`ddf_voxel_to_mm`
  returns ``v`` in RAS; :func:`to_itk_displacement` converts it to ITK's **LPS** frame
  (``x`` and ``y`` negated: :data:`RAS_TO_LPS`, the one definition of that change of frame, which
  :mod:`ran_bundle.spatial` and :mod:`ran_bundle.apply` use too) and builds the ITK displacement field
  image that ``sitk.DisplacementFieldTransform`` (ITK, ANTs, 3D Slicer) reads: a point ``p`` of fixed physical
  space maps to ``p + v(p)`` of moving physical space, so
  ``sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field))`` reproduces
  :func:`warp_image`.
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

from ran_bundle.networks.blocks import warp
from ran_bundle.tensors import as_plain_tensor

__all__ = [
    "RAS_TO_LPS",
    "as_affine",
    "spacing_of",
    "ddf_voxel_to_mm",
    "to_itk_displacement",
    "write_displacement_nifti",
    "write_image_atomic",
    "atomic_write",
    "warp_image",
]

ArrayLike = torch.Tensor | np.ndarray

#: ``diag(-1, -1, 1, 1)``: RAS <-> LPS for homogeneous points (its own inverse); its top-left ``d x d`` block
#: converts vectors (and the points of ``d`` <= 3 dimensions)
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
RAS_TO_LPS.setflags(write=False)


def _to_numpy(x: ArrayLike | Sequence) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def as_affine(affine: ArrayLike | Sequence, spatial_dims: int = 3) -> np.ndarray:
    """Return ``affine`` as a float64 ``(d+1, d+1)`` numpy array, checking its shape.

    Args:
        affine: voxel-to-world (RAS) matrix, ``(d+1, d+1)``; a batch ``(1, d+1, d+1)`` is squeezed.
        spatial_dims: ``d``.

    Raises:
        ValueError: when the shape is wrong or the linear part is singular.
    """
    a = _to_numpy(affine).astype(np.float64)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    n = spatial_dims + 1
    if a.shape != (n, n):
        raise ValueError(f"affine must have shape ({n}, {n}) for a {spatial_dims}-D field, got {a.shape}.")
    if abs(np.linalg.det(a[:spatial_dims, :spatial_dims])) < 1e-12:
        raise ValueError(f"affine has a singular linear part: {a.tolist()}.")
    return a


def spacing_of(affine: ArrayLike | Sequence) -> tuple[float, ...]:
    """Voxel size in mm per array axis of a ``(d + 1, d + 1)`` voxel-to-world affine: the column norms of its
    linear part."""
    a = _to_numpy(affine).astype(np.float64)
    d = a.shape[0] - 1
    return tuple(float(v) for v in np.linalg.norm(a[:d, :d], axis=0))


def _check_ddf(ddf: ArrayLike) -> int:
    if ddf.ndim < 3 or ddf.shape[1] != ddf.ndim - 2:
        raise ValueError(
            f"ddf must have shape (B, d, *spatial) with d = number of spatial dims, got {tuple(ddf.shape)}."
        )
    return ddf.ndim - 2


def ddf_voxel_to_mm(
    ddf: ArrayLike,
    affine: ArrayLike | Sequence,
    moving_affine: ArrayLike | Sequence | None = None,
) -> ArrayLike:
    """Convert a voxel DDF on the fixed grid to world displacements in mm (RAS frame).

    ``v(x) = A_m[:d, :d] (x + u(x)) + t_m - (A_f[:d, :d] x + t_f)``; with ``moving_affine=None``
    (moving on the fixed grid) this is simply ``A_f[:d, :d] u(x)``.

    Args:
        ddf: ``(B, d, *spatial)`` displacement in voxels along the array axes (torch or numpy).
        affine: ``(d+1, d+1)`` voxel-to-world RAS affine of the fixed grid.
        moving_affine: affine of the moving array when it differs from the fixed one.

    Returns:
        ``(B, d, *spatial)`` displacement in mm along the RAS world axes (x, y, z), same type
        (torch tensor or numpy array) as ``ddf``; torch output keeps ``ddf``'s dtype and device.
    """
    d = _check_ddf(ddf)
    a_f = as_affine(affine, d)
    a_m = a_f if moving_affine is None else as_affine(moving_affine, d)
    is_torch = isinstance(ddf, torch.Tensor)
    u = ddf if is_torch else torch.as_tensor(np.asarray(ddf))
    dtype = u.dtype if u.is_floating_point() else torch.float32
    lin_m = torch.as_tensor(a_m[:d, :d], dtype=torch.float64, device=u.device)
    out = torch.einsum("ij,bj...->bi...", lin_m, u.to(torch.float64))
    if moving_affine is not None:
        grids = torch.meshgrid(
            *[torch.arange(s, dtype=torch.float64, device=u.device) for s in u.shape[2:]], indexing="ij"
        )
        x = torch.stack(grids, 0)  # (d, *spatial)
        lin_diff = torch.as_tensor(a_m[:d, :d] - a_f[:d, :d], dtype=torch.float64, device=u.device)
        shift = torch.as_tensor(a_m[:d, d] - a_f[:d, d], dtype=torch.float64, device=u.device)
        extra = torch.einsum("ij,j...->i...", lin_diff, x) + shift.reshape((d,) + (1,) * d)
        out = out + extra.unsqueeze(0)
    out = out.to(dtype)
    return out if is_torch else out.numpy()


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
    equals :func:`warp_image` (see the module docstring).

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
    d = _check_ddf(ddf_voxel)
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


def warp_image(moving: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Warp ``moving`` onto the fixed grid with a voxel DDF: ``warped(x) = moving(x + u(x))``.

    Thin wrapper over :func:`ran_bundle.networks.blocks.warp` (the network's own warp, same
    convention as :class:`monai.networks.blocks.Warp`, zero padding) that accepts MetaTensors and
    integer label maps.

    Args:
        moving: ``(B, C, *spatial)`` image; integer/bool dtypes are accepted (warped as float,
            with ``mode="nearest"`` cast back to the input dtype).
        ddf: ``(B, d, *spatial)`` voxel DDF on the fixed grid, same batch and spatial size.
        mode: ``"bilinear"`` (trilinear in 3-D) for images, ``"nearest"`` for labels.

    Returns:
        ``(B, C, *spatial)`` plain ``torch.Tensor`` (metadata is dropped: the result lives on the
        fixed grid, not the moving one).
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}.")
    if moving.ndim not in (4, 5):
        raise ValueError(f"moving must be (B, C, H, W[, D]), got shape {tuple(moving.shape)}.")
    d = moving.ndim - 2
    if tuple(ddf.shape) != (moving.shape[0], d, *moving.shape[2:]):
        raise ValueError(
            f"ddf shape {tuple(ddf.shape)} does not match moving {tuple(moving.shape)}: "
            f"expected {(moving.shape[0], d, *moving.shape[2:])}."
        )
    in_dtype = moving.dtype
    img = as_plain_tensor(moving)
    u = as_plain_tensor(ddf)
    if not img.is_floating_point():
        img = img.float()
    u = u.to(img.dtype)
    out = warp(img, u, mode=mode)
    if mode == "nearest" and out.dtype != in_dtype:
        out = out.round().to(in_dtype) if not in_dtype.is_floating_point else out.to(in_dtype)
    return out
