"""Atlas-based label propagation: a segmentation task built from the registration network.

The bundle ships an atlas (an image and its label map; by default the real scan of the embedded
``data/tiny_ct``, ``subject_00``, with its 10 organ labels). For a user's image, the atlas is
registered to it (atlas = moving, user's image = fixed) and the atlas labels are warped onto the user's
image with nearest-neighbour interpolation: the warped labels are the proposed segmentation.
``configs/atlas_inference.json`` wires the two transforms below around the network the way MONAI
Label's ``BundleInferTask`` runs a bundle (pre-transforms, ``network(data["image"][None])``,
post-transforms):

1. :class:`AtlasPaird` (pre-transform) reads the user's image, runs the bundle's inference
   preprocessing (:func:`ran_bundle.transforms.registration_transforms`, ``mode="infer"``) on the pair
   (atlas, image) and puts the network input, the ``(2, *S)`` stack ``[atlas, image]``, in
   ``data["image"]``.
2. The network predicts the voxel DDF ``(3, *S)`` on the preprocessed image grid (``data["pred"]``).
3. :class:`PropagateAtlasLabelsd` (post-transform) turns the DDF into the world displacement (mm) of
   the network's warp, resamples it onto the user's image grid **as read from the file** (its shape and
   affine) and samples the atlas label map there once, nearest neighbour, on the atlas's own grid
   (:func:`propagate_labels`, the same steps as ``ran-register``'s warped label). The label map
   ``(1, *S_image)`` replaces ``data["pred"]``; it only holds values of the atlas label map.

Geometry follows :mod:`ran_bundle.fields` (RAS affines, ``warped(p) = atlas(p + v(p))``). As for every
use of the network, atlas and image must be roughly aligned in array space after reorientation to RAS
and resampling to ``spacing`` (same body region, similar field of view): there is no affine
pre-registration.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Transform

from ran_bundle.checks import load_volume
from ran_bundle.data import PAIR_KEYS
from ran_bundle.fields import as_affine, ddf_voxel_to_mm
from ran_bundle.spatial import resample_field, warp_to_grid
from ran_bundle.tensors import as_plain_tensor
from ran_bundle.transforms import registration_transforms

__all__ = ["ATLAS_IMAGE_KEY", "ATLAS_LABEL_KEY", "AtlasPaird", "PropagateAtlasLabelsd", "propagate_labels"]

#: data key of the preprocessed atlas image ``(1, *S)`` (its affine converts the DDF to mm)
ATLAS_IMAGE_KEY = "atlas_image"
#: data key of the atlas label map ``(1, *S_atlas)`` on the atlas's own grid, as read
ATLAS_LABEL_KEY = "atlas_label"

_MOVING, _FIXED = PAIR_KEYS[:2]


def propagate_labels(
    ddf: torch.Tensor,
    fixed_affine: np.ndarray | torch.Tensor,
    moving_affine: np.ndarray | torch.Tensor,
    label: torch.Tensor,
    label_affine: np.ndarray | torch.Tensor,
    shape: Sequence[int],
    affine: np.ndarray | torch.Tensor,
) -> torch.Tensor:
    """Warp a label map with a network DDF onto another grid, nearest neighbour, one interpolation.

    ``out(p) = label(p + v(p))`` at every voxel centre ``p`` of the output grid, where ``v`` (mm, RAS)
    is the world displacement of the network's warp (:func:`ran_bundle.fields.ddf_voxel_to_mm`),
    resampled trilinearly onto the output grid (edge values outside the network grid); zero where
    ``p + v(p)`` falls outside the label map.

    Args:
        ddf: ``(3, *S)`` or ``(1, 3, *S)`` voxel DDF on the network's fixed grid.
        fixed_affine: ``(4, 4)`` RAS affine of that grid (the preprocessed fixed image).
        moving_affine: ``(4, 4)`` RAS affine of the preprocessed moving image (the atlas).
        label: ``(*S_l)``, ``(1, *S_l)`` or ``(1, 1, *S_l)`` integer label map, on the grid ``label_affine``.
        label_affine: ``(4, 4)`` RAS affine of ``label``.
        shape: spatial shape of the output grid (e.g. the user's image as read).
        affine: ``(4, 4)`` RAS affine of the output grid.

    Returns:
        ``(1, *shape)`` label map, ``label``'s dtype (float labels are rounded to int64).
    """
    u = as_plain_tensor(ddf).detach().float().cpu()
    u = u[None] if u.ndim == 4 else u
    a_f, a_m = as_affine(fixed_affine), as_affine(moving_affine)
    lab = as_plain_tensor(label).detach().cpu()
    while lab.ndim < 5:
        lab = lab[None]
    if lab.is_floating_point():
        lab = lab.round().long()
    target = as_affine(affine)
    v = resample_field(ddf_voxel_to_mm(u, a_f, moving_affine=a_m), a_f, [int(s) for s in shape], target)
    return warp_to_grid(lab, as_affine(label_affine), v, target, mode="nearest")[0]


class AtlasPaird(Transform):
    """Pre-transform: the network input pair of atlas label propagation (atlas = moving, image = fixed).

    Reads the file ``data[image_key]`` (the user's image, the fixed image) and the atlas, runs the
    bundle's inference preprocessing on the pair (:func:`ran_bundle.transforms.registration_transforms`
    with ``mode="infer"``: RAS orientation, optional resampling to ``spacing``, intensity scaling, one
    common shape divisible by ``divisible_k``) and writes:

    - ``data[image_key]``: ``(2, *S)`` float32 ``MetaTensor``, channel 0 = atlas, channel 1 = image, on the
      preprocessed image grid (its ``affine``); its ``meta`` is the image's (``original_affine``,
      ``spatial_shape``, ``filename_or_obj`` of the file as read), which MONAI Label's ``Restored``
      reads;
    - ``data["atlas_image"]``: ``(1, *S)`` preprocessed atlas ``MetaTensor``;
    - ``data["atlas_label"]``: ``(1, *S_atlas)`` atlas label map on the atlas's own grid, as read
      (integer dtype of the file).

    Args:
        atlas_image: atlas image file.
        atlas_label: atlas label map file (sampled in world coordinates through its own affine, so it is
            normally on the atlas image's grid but need not be).
        image_key: key of the user's image path (MONAI Label: ``"image"``).
        spacing: resampling of both images in mm, or None to keep each grid.
        intensity: ``"ct"``, ``"mr"`` or ``"none"`` (see :func:`~ran_bundle.transforms.registration_transforms`).
        spatial_size: fixed network grid size instead of the common padded shape.
        divisible_k: every network grid size is a multiple of it (16 for RAN).
        reader: optional MONAI reader name for the image files.

    Raises:
        InputError: (on call) the atlas label map is missing, unreadable or not 3D.
        TypeError: (on call) ``data[image_key]`` is not a file path.
    """

    def __init__(
        self,
        atlas_image: str | os.PathLike,
        atlas_label: str | os.PathLike,
        image_key: str = "image",
        spacing: Sequence[float] | None = None,
        intensity: str = "ct",
        spatial_size: Sequence[int] | None = None,
        divisible_k: int = 16,
        reader: str | None = None,
    ) -> None:
        self.atlas_image = os.fspath(atlas_image)
        self.atlas_label = os.fspath(atlas_label)
        self.image_key = image_key
        self.reader = reader
        self.preprocessing = registration_transforms(
            mode="infer",
            spacing=spacing,
            intensity=intensity,
            spatial_size=spatial_size,
            divisible_k=divisible_k,
            with_labels=False,
            reader=reader,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        path = d[self.image_key]
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"AtlasPaird reads the image from a file: data[{self.image_key!r}] must be a path, "
                f"got {type(path).__name__}."
            )
        label = load_volume(self.atlas_label, "atlas label", reader=self.reader)
        pair = self.preprocessing({_MOVING: self.atlas_image, _FIXED: os.fspath(path)})
        moving, fixed = pair[_MOVING], pair[_FIXED]
        d[self.image_key] = MetaTensor(
            torch.cat([as_plain_tensor(moving), as_plain_tensor(fixed)], dim=0), meta=dict(fixed.meta)
        )
        d[ATLAS_IMAGE_KEY] = moving
        d[ATLAS_LABEL_KEY] = MetaTensor(torch.from_numpy(np.ascontiguousarray(label.array))[None], affine=label.affine)
        return d


class PropagateAtlasLabelsd(Transform):
    """Post-transform: replace the network's DDF by the atlas labels warped onto the user's image grid.

    Reads ``data[pred_key]`` (the ``(3, *S)`` voxel DDF the network predicted from ``data[image_key]``),
    the pair's affines and the atlas label map that :class:`AtlasPaird` stored, and writes
    ``data[pred_key]``: ``(1, *S_image)`` ``MetaTensor`` label map (the atlas label map's dtype) on the
    grid of the user's image as read from its file (``meta["spatial_shape"]``, ``meta["original_affine"]``
    of ``data[image_key]``), computed by :func:`propagate_labels`.

    Args:
        pred_key: key of the DDF, replaced by the label map (MONAI Label: ``"pred"``).
        image_key: key of the network input written by :class:`AtlasPaird` (MONAI Label: ``"image"``).
    """

    def __init__(self, pred_key: str = "pred", image_key: str = "image") -> None:
        self.pred_key = pred_key
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        pair, atlas, label = d[self.image_key], d[ATLAS_IMAGE_KEY], d[ATLAS_LABEL_KEY]
        shape = [int(s) for s in np.asarray(pair.meta["spatial_shape"]).reshape(-1)[:3]]
        affine = as_affine(pair.meta["original_affine"])
        out = propagate_labels(d[self.pred_key], pair.affine, atlas.affine, label, label.affine, shape, affine)
        d[self.pred_key] = MetaTensor(out, affine=torch.as_tensor(affine))
        return d
