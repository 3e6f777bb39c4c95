"""World-space geometry of ran-bundle: voxel grids, world <-> voxel maps, resampling of images and fields
between grids, and the bridge to SimpleITK images.

Conventions (those of :mod:`ran_bundle.fields`): affines are ``(4, 4)`` voxel-to-world matrices in the
**RAS** frame; a world field ``v`` ``(3, *S)`` on a grid with affine ``A`` maps the point ``p = A y``
(voxel ``y``) to ``p + v(p)``, in mm. SimpleITK (and ITK, ANTs, Slicer) store points and vectors in
**LPS**: :data:`ran_bundle.fields.RAS_TO_LPS` converts either way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from ran_bundle.checks import InputError
from ran_bundle.fields import RAS_TO_LPS, as_affine
from ran_bundle.networks.blocks import warp

__all__ = [
    "voxel_grid",
    "world_to_voxel",
    "voxel_to_world",
    "apply_matrix",
    "sample_voxels",
    "resample_field",
    "warp_to_grid",
    "field_to_voxel_ddf",
    "read_displacement_field",
    "map_points",
    "to_sitk_image",
    "ras_affine_of",
    "ras_matrix",
    "sitk_affine",
    "Grid",
    "foreground_mask",
    "foreground_grid",
    "resample_to_grid",
]


def voxel_grid(shape: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Voxel indices ``(3, *shape)`` of a grid (channel ``i`` = index along axis ``i``)."""
    axes = [torch.arange(int(n), dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def apply_matrix(matrix: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    """A ``(4, 4)`` matrix applied to points ``(3, *S)``, in the points' dtype: the one homogeneous point map
    behind :func:`world_to_voxel`, :func:`voxel_to_world` and the affine stage's fixed -> moving RAS map."""
    a = torch.as_tensor(np.asarray(matrix, dtype=np.float64), dtype=points.dtype)
    return torch.einsum("ij,j...->i...", a[:3, :3], points) + a[:3, 3].reshape(3, *([1] * (points.ndim - 1)))


def world_to_voxel(points: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """Map world points ``(3, *S)`` (RAS mm) to continuous voxel indices ``(3, *S)`` of a grid with ``affine``."""
    return apply_matrix(np.linalg.inv(as_affine(affine)), points)


def voxel_to_world(index: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """Map voxel indices ``(3, *S)`` of a grid with ``affine`` to world points ``(3, *S)`` (RAS mm)."""
    return apply_matrix(as_affine(affine), index)


def sample_voxels(
    image: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Sample ``image`` at continuous voxel indices: ``out(y) = image(coords(y))``.

    :func:`ran_bundle.networks.blocks.warp` (the package's one sampling function) with the displacement
    ``coords - y``; the output grid may differ from the input grid.

    Args:
        image: ``(1, C, *S_in)`` (integer dtypes allowed with ``mode="nearest"``).
        coords: ``(3, *S_out)`` or ``(1, 3, *S_out)`` voxel indices of ``image`` (float).
        mode: ``"bilinear"`` (trilinear) or ``"nearest"``.
        padding_mode: ``"zeros"`` (outside is 0) or ``"border"`` (outside takes the nearest edge value).

    Returns:
        ``(1, C, *S_out)``, ``image``'s dtype for ``mode="nearest"``, float32 otherwise.
    """
    if coords.ndim == 4:
        coords = coords[None]
    in_dtype = image.dtype
    ddf = coords.float() - voxel_grid(coords.shape[2:], torch.float32)[None]
    out = warp(image.float(), ddf, mode=mode, padding_mode=padding_mode)
    if mode == "nearest" and not in_dtype.is_floating_point:
        out = out.round().to(in_dtype)
    return out


def resample_field(
    field: torch.Tensor, affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray
) -> torch.Tensor:
    """Resample a world displacement field onto another grid (trilinear, edge values outside).

    Args:
        field: ``(1, 3, *S)`` or ``(3, *S)`` displacement in mm (RAS) on the grid ``affine``.
        affine: ``(4, 4)`` RAS affine of ``field``'s grid.
        shape: spatial shape of the target grid.
        target_affine: its ``(4, 4)`` RAS affine.

    Returns:
        ``(1, 3, *shape)`` float32: ``v`` at the target voxel centres.
    """
    field = field[None] if field.ndim == 4 else field
    target_to_source = np.linalg.inv(as_affine(affine)) @ as_affine(target_affine)  # one map of voxel indices
    coords = apply_matrix(target_to_source, voxel_grid(shape))
    return sample_voxels(field.float(), coords, mode="bilinear", padding_mode="border")


def warp_to_grid(
    image: torch.Tensor,
    image_affine: np.ndarray,
    field: torch.Tensor,
    field_affine: np.ndarray,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Pull ``image`` onto a field's grid: ``out(p) = image(p + v(p))`` for every voxel centre ``p``.

    Equivalent to ``sitk.Resample(image, reference, sitk.DisplacementFieldTransform(field))`` with
    zero outside the image.

    Args:
        image: ``(1, C, *S_in)`` on the grid ``image_affine`` (RAS).
        image_affine: ``(4, 4)`` RAS affine of ``image``.
        field: ``(1, 3, *S)`` or ``(3, *S)`` world displacement (mm, RAS) on the grid ``field_affine``.
        field_affine: ``(4, 4)`` RAS affine of the output grid.
        mode: ``"bilinear"`` for images, ``"nearest"`` for label maps (dtype kept).

    Returns:
        ``(1, C, *S)`` on the field's grid.
    """
    field = field[0] if field.ndim == 5 else field
    points = voxel_to_world(voxel_grid(field.shape[1:]), field_affine) + field.to(torch.float64)
    return sample_voxels(image, world_to_voxel(points, image_affine), mode=mode, padding_mode="zeros")


def field_to_voxel_ddf(field: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """World displacement (mm, RAS) -> voxel DDF of the same grid: ``u = L^-1 v`` (``L`` = linear part of ``affine``).

    The inverse of :func:`ran_bundle.fields.ddf_voxel_to_mm` without moving affine, so
    :func:`~ran_bundle.fields.write_displacement_nifti` and :mod:`ran_bundle.metrics` can be used
    on fields that live on the original image grids. ``det(I + grad u)`` is the Jacobian determinant
    of the world mapping ``p -> p + v(p)``.

    Args:
        field: ``(1, 3, *S)`` or ``(3, *S)``.
        affine: ``(4, 4)`` RAS affine of the grid.

    Returns:
        ``(1, 3, *S)`` float32.
    """
    field = field[None] if field.ndim == 4 else field
    field = field if field.dtype in (torch.float32, torch.float64) else field.float()
    inv = torch.as_tensor(np.linalg.inv(as_affine(affine)[:3, :3]), dtype=field.dtype)
    return torch.einsum("ij,bj...->bi...", inv, field).float()  # in the field's precision: float32 on a 1 mm grid


def read_displacement_field(path: str | os.PathLike) -> tuple[torch.Tensor, np.ndarray]:
    """Read an ITK displacement field file (as :func:`~ran_bundle.fields.write_displacement_nifti` writes).

    Args:
        path: a 3D vector image with 3 components (NIfTI, MHA, NRRD) in ITK's convention (LPS mm).

    Returns:
        ``(field, affine)``: ``(1, 3, *S)`` float64 world displacement in mm in the **RAS** frame and
        the ``(4, 4)`` RAS affine of the field's grid (ITK index order = array axis order).

    Raises:
        InputError: file missing, unreadable, truncated or corrupt (SimpleITK would read a cut-off ``.nii.gz``
            silently, :func:`~ran_bundle.checks.check_complete_file`), or not a 3D field of 3-vectors.
    """
    import SimpleITK as sitk

    from ran_bundle.checks import check_complete_file

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise InputError(f"field {p}: file not found.")
    check_complete_file(p, "field")
    try:
        img = sitk.ReadImage(p)
    except RuntimeError as e:
        raise InputError(f"field {p}: cannot read it ({str(e).strip().splitlines()[-1][:200]}).") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 3:
        raise InputError(
            f"field {p}: not a 3D displacement field (dimension {img.GetDimension()}, "
            f"{img.GetNumberOfComponentsPerPixel()} components per voxel; expected 3 and 3)."
        )
    arr = sitk.GetArrayFromImage(img).astype(np.float64)  # (z, y, x, 3)
    if not np.isfinite(arr).all():
        raise InputError(f"field {p}: holds NaN or infinite vectors.")
    arr = np.transpose(arr, (2, 1, 0, 3))  # (i, j, k, 3) in ITK index order
    vec = np.einsum("ij,...j->i...", RAS_TO_LPS[:3, :3], arr)  # (3, i, j, k): LPS -> RAS
    lin_lps = np.reshape(img.GetDirection(), (3, 3)) * np.asarray(img.GetSpacing())[None, :]
    affine_lps = np.eye(4)
    affine_lps[:3, :3], affine_lps[:3, 3] = lin_lps, img.GetOrigin()
    return torch.from_numpy(np.ascontiguousarray(vec))[None], RAS_TO_LPS @ affine_lps


def map_points(points: np.ndarray, field: torch.Tensor, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map world points by a displacement field: ``p -> p + v(p)`` (ITK's ``TransformPoint``).

    ``v`` is interpolated trilinearly (edge values in the outer half voxel). Points outside the
    field's grid (beyond half a voxel from the edge centres) keep ``v = 0``, as ITK does.

    Args:
        points: ``(N, 3)`` RAS mm.
        field: ``(1, 3, *S)`` or ``(3, *S)`` displacement (mm, RAS) on the grid ``affine``.
        affine: ``(4, 4)`` RAS affine.

    Returns:
        ``(mapped, inside)``: ``(N, 3)`` float64 RAS mm and an ``(N,)`` bool array.
    """
    pts = torch.as_tensor(np.asarray(points, dtype=np.float64).reshape(-1, 3))
    if pts.shape[0] == 0:
        return pts.numpy().copy(), np.zeros(0, dtype=bool)
    field = field[None] if field.ndim == 4 else field
    idx = world_to_voxel(pts.T.contiguous(), affine)  # (3, N)
    sizes = torch.tensor(field.shape[2:], dtype=torch.float64)[:, None]
    inside = ((idx >= -0.5) & (idx <= sizes - 0.5)).all(0)
    v = sample_voxels(field.float(), idx[None, :, :, None, None], "bilinear", "border")
    v = v[0, :, :, 0, 0].to(torch.float64)  # (3, N)
    v[:, ~inside] = 0.0
    return (pts + v.T).numpy(), inside.numpy()


def to_sitk_image(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image of a 3-D ``array`` (array axis ``i`` = ITK index ``i``) on the grid of the RAS ``affine``."""
    a = RAS_TO_LPS @ as_affine(affine)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(np.asarray(array), (2, 1, 0))))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in a[:3, 3]))
    image.SetDirection(tuple(float(v) for v in (a[:3, :3] / spacing).ravel()))
    return image


def ras_affine_of(image: sitk.Image) -> np.ndarray:
    """The ``(4, 4)`` RAS voxel-to-world affine of a 3-D SimpleITK image (ITK index order = array axis order)."""
    lin = np.reshape(image.GetDirection(), (3, 3)) * np.asarray(image.GetSpacing())[None, :]
    a = np.eye(4)
    a[:3, :3], a[:3, 3] = lin, image.GetOrigin()
    return RAS_TO_LPS @ a


def ras_matrix(transform: sitk.Transform) -> np.ndarray:
    """``(4, 4)`` matrix, on RAS world points, of a 3-D SimpleITK transform that is linear (affine, rigid,
    similarity, translation, or a composite of those); ITK works in LPS, so ``M_ras = F M_lps F`` with
    ``F`` = :data:`~ran_bundle.fields.RAS_TO_LPS`."""
    origin = np.zeros(3)
    m_lps = np.eye(4)
    m_lps[:3, 3] = np.asarray(transform.TransformPoint(tuple(origin)))
    for axis in range(3):
        unit = np.zeros(3)
        unit[axis] = 1.0
        m_lps[:3, axis] = np.asarray(transform.TransformPoint(tuple(unit))) - m_lps[:3, 3]
    return RAS_TO_LPS @ m_lps @ RAS_TO_LPS


def sitk_affine(matrix: np.ndarray) -> sitk.AffineTransform:
    """The SimpleITK ``AffineTransform`` (LPS) of a ``(4, 4)`` RAS matrix (the inverse of :func:`ras_matrix`)."""
    m_lps = RAS_TO_LPS @ np.asarray(matrix, dtype=np.float64) @ RAS_TO_LPS
    out = sitk.AffineTransform(3)
    out.SetMatrix(tuple(float(v) for v in m_lps[:3, :3].ravel()))
    out.SetTranslation(tuple(float(v) for v in m_lps[:3, 3]))
    return out


@dataclass(frozen=True)
class Grid:
    """A voxel grid in world space: ``shape`` ``(X, Y, Z)`` and its ``(4, 4)`` RAS voxel-to-world ``affine``."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def reference_image(self) -> sitk.Image:
        """An empty SimpleITK image on this grid (the ``referenceImage`` of ``sitk.Resample``)."""
        image = sitk.Image([int(s) for s in self.shape], sitk.sitkUInt8)
        geometry = to_sitk_image(np.zeros((1, 1, 1), np.uint8), self.affine)
        image.SetSpacing(geometry.GetSpacing())
        image.SetOrigin(geometry.GetOrigin())
        image.SetDirection(geometry.GetDirection())
        return image


def foreground_mask(array: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """The foreground of an image: voxels above its minimum plus 1% of the range from the minimum to the
    99th percentile (the brain of a skull-stripped MR, the body of a CT). The region where the package
    counts folding and sizes its grids. Same type and shape as ``array`` (bool)."""
    if isinstance(array, torch.Tensor):
        flat = array.detach().float().flatten()
        lo = flat.min()
        hi = torch.quantile(flat[:: max(1, flat.numel() // 1_000_000)], 0.99)
        return array > lo + 0.01 * (hi - lo)
    arr = np.asarray(array)
    lo, hi = float(arr.min()), float(np.percentile(arr.ravel()[:: max(1, arr.size // 1_000_000)], 99))
    return arr > lo + 0.01 * (hi - lo)


def foreground_grid(image: sitk.Image, spacing: Sequence[float], divisible_k: int = 16, margin_mm: float = 4.0) -> Grid:
    """The RAS-aligned grid of ``spacing`` mm that covers the foreground of ``image`` (plus ``margin_mm``),
    each size rounded up to a multiple of ``divisible_k`` around the foreground's centre.

    Foreground: :func:`foreground_mask`; an image with no foreground gives a grid over all of it.
    """
    arr = sitk.GetArrayViewFromImage(image)
    zyx = np.argwhere(foreground_mask(arr))
    if zyx.size == 0:
        zyx = np.array([[0, 0, 0], np.asarray(arr.shape) - 1])
    corners_index = np.array(
        [
            [x, y, z]
            for x in (zyx[:, 2].min(), zyx[:, 2].max())
            for y in (zyx[:, 1].min(), zyx[:, 1].max())
            for z in (zyx[:, 0].min(), zyx[:, 0].max())
        ],
        dtype=np.float64,
    )
    a = ras_affine_of(image)
    corners = corners_index @ a[:3, :3].T + a[:3, 3]
    lo_w, hi_w = corners.min(0) - margin_mm, corners.max(0) + margin_mm
    step = np.asarray([float(s) for s in spacing], dtype=np.float64)
    k = int(divisible_k)
    shape = np.maximum(k, np.ceil((hi_w - lo_w) / step / k) * k).astype(int)
    centre = (lo_w + hi_w) / 2
    affine = np.eye(4)
    affine[:3, :3] = np.diag(step)
    affine[:3, 3] = centre - step * (shape - 1) / 2
    return Grid(tuple(int(s) for s in shape), affine)  # type: ignore[arg-type]


def resample_to_grid(
    image: sitk.Image, grid: Grid, matrix: np.ndarray | None = None, label: bool = False
) -> np.ndarray:
    """``image`` resampled onto ``grid`` through an affine: ``out(p) = image(matrix p)`` for every voxel
    centre ``p`` (RAS mm), zero outside the image.

    Args:
        image: SimpleITK image.
        grid: the output grid.
        matrix: ``(4, 4)`` RAS map of grid points to ``image`` points (:func:`ran_bundle.affine.register_affine`'s
            ``matrix``); ``None``: the identity.
        label: nearest neighbour (label maps, values kept) instead of linear.

    Returns:
        ``(X, Y, Z)`` float32 array in the grid's axis order.
    """
    transform = sitk_affine(np.eye(4) if matrix is None else matrix)
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    out = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid.reference_image(), transform, interpolator, 0.0)
    return np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0)))
