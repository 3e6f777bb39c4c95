"""Quality figures of one registration and the warnings a user must see: folding in the fixed foreground,
displacement sizes, the foreground overlap after the affine stage, and the Dice of the label maps after the
affine stage and after the whole registration (:meth:`ran_bundle.pipeline.RegistrationPipeline.to_world`).

Offline evaluation of a network on many pairs is :mod:`ran_bundle.evaluation`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ran_bundle.flow import apply_matrix, sample_affine, sample_voxels, voxel_grid, voxel_to_world, world_to_voxel
from ran_bundle.inputs import Volume
from ran_bundle.metrics import dice_per_label
from ran_bundle.spatial import foreground_mask

__all__ = ["foreground_overlap", "affine_and_registered_dice", "registration_quality"]


def foreground_overlap(
    fixed_mask: np.ndarray,
    fixed_affine: np.ndarray,
    moving_mask: np.ndarray,
    moving_affine: np.ndarray,
    matrix: np.ndarray,
) -> float:
    """Fraction of the fixed image's foreground whose point, mapped by the ``(4, 4)`` RAS ``matrix`` (fixed ->
    moving), falls in the moving image's foreground (every 4th voxel per axis).

    Args:
        fixed_mask: ``(*F)`` bool foreground of the fixed image (:func:`ran_bundle.spatial.foreground_mask`).
        fixed_affine: its ``(4, 4)`` RAS affine.
        moving_mask: ``(*M)`` bool foreground of the moving image.
        moving_affine: its ``(4, 4)`` RAS affine.
        matrix: the affine stage's ``(4, 4)`` RAS map of fixed points to moving points.
    """
    sub = (slice(None, None, 4),) * 3
    mask_f = fixed_mask[sub]
    if not mask_f.any():
        return 0.0
    index = voxel_grid(fixed_mask.shape)[(slice(None),) + sub]
    mapped = apply_matrix(matrix, voxel_to_world(index, fixed_affine))
    moving = torch.from_numpy(moving_mask.astype(np.int32))[None, None]
    hit = sample_voxels(moving, world_to_voxel(mapped, moving_affine), "nearest")[0, 0].numpy() > 0
    return float((hit & mask_f).sum() / mask_f.sum())


def affine_and_registered_dice(
    fixed_label: Volume, moving_label: Volume, matrix: np.ndarray, warped_label: torch.Tensor
) -> dict[str, Any]:
    """Dice per label of the fixed label map after the affine stage alone (``matrix``, fixed -> moving points) and
    after the whole registration (``warped_label`` on the fixed grid), with the means over all labels and over the
    labels of at least 100 voxels; nearest-neighbour label warps on the fixed grid."""
    reference = np.rint(fixed_label.array).astype(np.int64)
    fixed_to_moving = np.linalg.inv(moving_label.affine) @ matrix @ fixed_label.affine  # voxel indices, one map
    affine_only = sample_affine(moving_label.label_tensor(), fixed_to_moving, reference.shape, "nearest")[0, 0]
    values, counts = np.unique(reference, return_counts=True)
    labels = [int(v) for v in values if v != 0]
    big = {int(v) for v, c in zip(values, counts, strict=True) if v != 0 and c >= 100}
    scores = {
        "affine": dice_per_label(affine_only.numpy(), reference, labels),
        "registered": dice_per_label(np.asarray(warped_label), reference, labels),
    }
    out: dict[str, Any] = {"labels": {str(v): {k: scores[k][v] for k in scores} for v in labels}}
    for name, per in scores.items():
        out[f"mean_{name}"] = float(np.nanmean(list(per.values()))) if per else math.nan
        out[f"mean_{name}_100"] = float(np.nanmean([per[v] for v in big])) if big else math.nan
    return out


def registration_quality(
    fixed: Volume,
    moving: Volume,
    matrix: np.ndarray,
    jacobian: torch.Tensor,
    field_mm: torch.Tensor,
    network_grid: Sequence[int],
    network_spacing: float,
) -> tuple[dict[str, Any], list[str]]:
    """Folding, displacement and overlap figures of one registration, and the warnings a user must see.

    Folding is counted inside the fixed image's foreground (the package's one definition).

    Args:
        fixed: the fixed image.
        moving: the moving image.
        matrix: the affine stage's ``(4, 4)`` RAS map of fixed points to moving points.
        jacobian: ``(*F)`` determinant of the whole mapping on the fixed grid.
        field_mm: ``(1, 3, *F)`` whole displacement (mm) on the fixed grid.
        network_grid: the network grid's shape.
        network_spacing: its voxel size (mm).

    Returns:
        ``(stats, warnings)``.
    """
    fixed_mask, moving_mask = (np.asarray(foreground_mask(v.array)) for v in (fixed, moving))
    mask = torch.from_numpy(fixed_mask)
    folded = int(((jacobian <= 0) & mask).sum())
    inside = int(mask.sum())
    extent = np.asarray(fixed.array.shape) * np.asarray(fixed.spacing)
    norm = field_mm[0].square().sum(0).sqrt()  # elementwise: norm(dim=0) reduces across strides, 10x slower
    stats: dict[str, Any] = {
        "folding_region": "fixed image foreground (ran_bundle.spatial.foreground_mask)",
        "non_positive_jacobian_count": folded,
        "non_positive_jacobian_percent": 100.0 * folded / max(inside, 1),
        "sdlogj": float(jacobian[mask].clamp(1e-9, 1e9).log().std(correction=0)) if inside else math.nan,
        "displacement_mm_mean": float(norm[mask].mean()) if inside else math.nan,
        "displacement_mm_max": float(norm.max()),
        "affine_determinant": float(np.linalg.det(matrix[:3, :3])),
    }
    warnings = []
    if stats["non_positive_jacobian_percent"] > 1.0:
        warnings.append(
            f"{stats['non_positive_jacobian_percent']:.2f}% of the fixed foreground folds (det J <= 0): the "
            "field is implausible there."
        )
    if stats["displacement_mm_max"] > float(extent.min()):
        warnings.append(
            f"the largest displacement ({stats['displacement_mm_max']:.0f} mm) exceeds the fixed image's "
            f"smallest extent ({float(extent.min()):.0f} mm): check that the images show the same anatomy and overlap."
        )
    if min(network_grid) <= 16 or float(extent.min()) < 64:
        warnings.append(
            f"the fixed image covers under 64 mm along an axis (network grid {list(network_grid)} at "
            f"{network_spacing:g} mm): the network's field is unreliable on images this small."
        )
    overlap = foreground_overlap(fixed_mask, fixed.affine, moving_mask, moving.affine, matrix)
    stats["foreground_overlap_after_affine"] = overlap
    if overlap < 0.5:
        warnings.append(
            f"after the affine stage only {100 * overlap:.0f}% of the fixed foreground overlaps the moving "
            "image's: the images may not show the same region, or a header is wrong (e.g. a flipped axis)."
        )
    return stats, warnings
