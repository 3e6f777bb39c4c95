"""Grids in world space and the bridge to SimpleITK: images, transforms and displacement field files in ITK's
frame, the foreground and the network grid around it, resampling of SimpleITK images onto a grid.

The field algebra on tensors (voxel grids, world <-> voxel maps, warping) is :mod:`ran_bundle.flow`'s.
Conventions (those of :mod:`ran_bundle.flow`): affines are ``(4, 4)`` voxel-to-world matrices in the
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

from ran_bundle.fields import RAS_TO_LPS
from ran_bundle.flow import as_affine
from ran_bundle.inputs import InputError, check_complete_file

__all__ = [
    "read_displacement_field",
    "to_sitk_image",
    "ras_affine_of",
    "ras_matrix",
    "sitk_affine",
    "Grid",
    "foreground_mask",
    "foreground_grid",
    "resample_to_grid",
]


def read_displacement_field(path: str | os.PathLike) -> tuple[torch.Tensor, np.ndarray]:
    """Read an ITK displacement field file (as :func:`~ran_bundle.fields.write_displacement_nifti` writes).

    Args:
        path: a 3D vector image with 3 components (NIfTI, MHA, NRRD) in ITK's convention (LPS mm).

    Returns:
        ``(field, affine)``: ``(1, 3, *S)`` float64 world displacement in mm in the **RAS** frame and
        the ``(4, 4)`` RAS affine of the field's grid (ITK index order = array axis order).

    Raises:
        InputError: file missing, unreadable, truncated or corrupt (SimpleITK would read a cut-off ``.nii.gz``
            silently, :func:`~ran_bundle.inputs.check_complete_file`), or not a 3D field of 3-vectors.
    """
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
