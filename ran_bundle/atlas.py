"""Atlas label propagation with the registration pipeline: a segmentation task built from registration.

An atlas is an image with a label map and the names of its labels. For a user's image, the atlas is
registered to it (atlas = moving, user's image = fixed) by :class:`~ran_bundle.pipeline.RegistrationPipeline`
and the atlas label map is warped onto the user's image grid (nearest neighbour): the warped labels are the
proposed segmentation. ``configs/atlas_inference.json`` wires the pipeline's steps around the network the way
MONAI Label's ``BundleInferTask`` runs a bundle (pre-transforms, ``network(data["image"][None])``,
post-transforms), so that MONAI Label itself runs the network:

1. :class:`AtlasRegistrationd` (pre-transform): the pipeline's
   :meth:`~ran_bundle.pipeline.RegistrationPipeline.check_inputs`,
   :meth:`~ran_bundle.pipeline.RegistrationPipeline.run_affine` and
   :meth:`~ran_bundle.pipeline.RegistrationPipeline.preprocess` on (atlas, user's image); the network input,
   the ``(2, *S)`` stack ``[atlas, image]`` on the network grid, goes into ``data["image"]``.
2. The network predicts the voxel DDF ``(3, *S)`` on that grid (``data["pred"]``).
3. :class:`PropagateAtlasLabelsd` (post-transform): the pipeline's
   :meth:`~ran_bundle.pipeline.RegistrationPipeline.optimise` and
   :meth:`~ran_bundle.pipeline.RegistrationPipeline.to_world`; the atlas labels warped through the whole
   mapping (affine stage included) onto the user's image grid **as read from the file** replace
   ``data["pred"]``, and the registration's figures and warnings go into ``data["result"]`` (MONAI Label
   returns it with the label map).

The same steps as ``ran-register --moving atlas --moving-label atlas_labels --fixed image``: only the network
call is MONAI Label's. Geometry follows :mod:`ran_bundle.pipeline` (RAS affines; fixed-space points map to
moving-space points).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Transform

from ran_bundle.affine import AffineResult
from ran_bundle.flow import ddf_voxel_to_mm
from ran_bundle.inputs import InputError
from ran_bundle.pipeline import NetworkPair, PairInputs, RegistrationPipeline
from ran_bundle.tensors import as_plain_tensor

__all__ = ["ATLAS_STATE_KEY", "AtlasState", "AtlasRegistrationd", "PropagateAtlasLabelsd", "load_label_names"]

#: data key of the :class:`AtlasState` that the pre-transform hands to the post-transform
ATLAS_STATE_KEY = "atlas_registration"


def load_label_names(path: str | os.PathLike) -> dict[int, str]:
    """Label names of an atlas from a JSON file: ``{"1": "spleen", ...}``, or a datalist whose ``"labels"``
    entry is such a mapping (``data/tiny_ct/datalist.json``, ``configs/datalists/brain_mindboggle.json``).

    Returns:
        ``{value: name}`` sorted by value, background (0) excluded.

    Raises:
        InputError: the file is missing, not JSON, or not such a mapping (integer keys, text values).
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise InputError(f"atlas label names {p}: file not found.")
    try:
        raw = json.loads(open(p, encoding="utf-8").read())
    except (OSError, ValueError) as e:
        raise InputError(f"atlas label names {p}: cannot read it as JSON ({e}).") from None
    if isinstance(raw, Mapping) and isinstance(raw.get("labels"), Mapping):
        raw = raw["labels"]
    try:
        names = {int(value): str(name) for value, name in raw.items() if isinstance(name, str)}
    except (AttributeError, TypeError, ValueError):
        names = {}
    if not names or len(names) != len(raw):
        raise InputError(
            f"atlas label names {p}: expected a JSON object {{label value: name}} (or a datalist with one under "
            "'labels')."
        )
    return {value: names[value] for value in sorted(names) if value != 0}


@dataclass
class AtlasState:
    """What the pre-transform hands to the post-transform: the checked inputs (fixed = the user's image,
    moving = the atlas with its label map), the affine stage and the pair on the network grid."""

    inputs: PairInputs
    affine: AffineResult
    pair: NetworkPair


class AtlasRegistrationd(Transform):
    """Pre-transform of atlas label propagation: the pipeline's steps up to the network input.

    Reads the user's image ``data[image_key]`` (a file path; the fixed image) and the atlas (the moving image
    and its label map), runs :meth:`RegistrationPipeline.check_inputs`, :meth:`~RegistrationPipeline.run_affine`
    and :meth:`~RegistrationPipeline.preprocess`, and writes:

    - ``data[image_key]``: ``(2, *S)`` float32 ``MetaTensor`` on the network grid (its ``affine``), channel 0 =
      atlas, channel 1 = image (the bundle's network input); its ``meta`` also holds the user's image as read
      (``spatial_shape``, ``original_affine``, ``filename_or_obj``), which MONAI Label's ``Restored`` reads;
    - ``data["atlas_registration"]``: the :class:`AtlasState` for :class:`PropagateAtlasLabelsd`.

    Args:
        pipeline: the registration pipeline (spacing, intensity, affine stage, instance optimisation); its own
            network is not called here.
        atlas_image: atlas image file.
        atlas_label: atlas label map file, on the atlas image's grid.
        atlas_label_names: optional JSON file of the label names (:func:`load_label_names`): values of the label
            map without a name are reported in ``data["result"]``.
        image_key: key of the user's image path (MONAI Label: ``"image"``).

    Raises:
        InputError: (on call) a missing or unreadable file, a label map on another grid, images too small.
        TypeError: (on call) ``data[image_key]`` is not a file path.
    """

    def __init__(
        self,
        pipeline: RegistrationPipeline,
        atlas_image: str | os.PathLike,
        atlas_label: str | os.PathLike,
        atlas_label_names: str | os.PathLike | None = None,
        image_key: str = "image",
    ) -> None:
        self.pipeline = pipeline
        self.atlas_image = os.fspath(atlas_image)
        self.atlas_label = os.fspath(atlas_label)
        self.atlas_label_names = None if atlas_label_names is None else os.fspath(atlas_label_names)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        path = d[self.image_key]
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"AtlasRegistrationd reads the image from a file: data[{self.image_key!r}] must be a path, "
                f"got {type(path).__name__}."
            )
        pipeline = self.pipeline
        pipeline.timings = {}
        inputs = pipeline.check_inputs(path, self.atlas_image, moving_label=self.atlas_label)
        affine = pipeline.run_affine(inputs)
        pair = pipeline.preprocess(inputs, affine)
        fixed = inputs.fixed
        meta = {
            "filename_or_obj": fixed.path,
            "spatial_shape": np.asarray(fixed.array.shape),
            "original_affine": torch.as_tensor(fixed.affine, dtype=torch.float64),
            "affine": torch.as_tensor(pair.grid.affine, dtype=torch.float64),
        }
        d[self.image_key] = MetaTensor(torch.cat([pair.moving, pair.fixed], dim=1)[0], meta=meta)
        d[ATLAS_STATE_KEY] = AtlasState(inputs, affine, pair)
        if self.atlas_label_names is not None:
            names = load_label_names(self.atlas_label_names)
            values = np.unique(inputs.moving_label.array).astype(np.int64)  # type: ignore[union-attr]
            unnamed = [int(v) for v in values if v != 0 and int(v) not in names]
            if unnamed:
                d.setdefault("result", {})["atlas_label_values_without_names"] = unnamed
        return d


class PropagateAtlasLabelsd(Transform):
    """Post-transform of atlas label propagation: the pipeline's steps after the network, then the label map.

    Reads the network's voxel DDF ``data[pred_key]`` ``(3, *S)`` (or ``(1, 3, *S)``) and the
    :class:`AtlasState` of :class:`AtlasRegistrationd`, runs :meth:`RegistrationPipeline.optimise` and
    :meth:`~RegistrationPipeline.to_world`, and writes:

    - ``data[pred_key]``: ``(1, *F)`` int32 ``MetaTensor``, the atlas label map warped onto the user's image
      grid as read from its file (shape ``F``, ``affine`` = its RAS affine); it only holds atlas label values;
    - ``data["result"]``: the atlas files, the affine stage and its Mattes MI, the folding of the whole mapping
      in the image's foreground (% of voxels with det J <= 0), the pipeline's warnings and seconds per step.

    Args:
        pipeline: the pipeline of the pre-transform.
        pred_key: key of the DDF, replaced by the label map (MONAI Label: ``"pred"``).

    Raises:
        KeyError: (on call) ``data`` holds no :class:`AtlasState` (the pre-transform did not run).
    """

    def __init__(self, pipeline: RegistrationPipeline, pred_key: str = "pred") -> None:
        self.pipeline = pipeline
        self.pred_key = pred_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if ATLAS_STATE_KEY not in d:
            raise KeyError(f"PropagateAtlasLabelsd: data has no {ATLAS_STATE_KEY!r}; run AtlasRegistrationd first.")
        state: AtlasState = d.pop(ATLAS_STATE_KEY)
        pipeline, grid = self.pipeline, state.pair.grid
        ddf = as_plain_tensor(d[self.pred_key]).detach().float().cpu()
        ddf = ddf[None] if ddf.ndim == 4 else ddf
        ddf, _ = pipeline.optimise(state.pair, ddf)
        world = pipeline.to_world(state.inputs, state.affine, grid, ddf_voxel_to_mm(ddf, grid.affine))
        fixed = state.inputs.fixed
        affine = torch.as_tensor(fixed.affine, dtype=torch.float64)
        label = as_plain_tensor(world["warped_label"])[None].to(torch.int32)  # drop the sampling's metadata
        d[self.pred_key] = MetaTensor(label, affine=affine)
        stats = world["stats"]
        result = dict(d.get("result") or {})
        result.update(
            {
                "atlas_image": str(state.inputs.moving.path),
                "atlas_label": str(state.inputs.moving_label.path),  # type: ignore[union-attr]
                "affine_stage": state.affine.stage,
                "affine_mattes_mi": {k: _finite(v) for k, v in state.affine.metric.items()},
                "non_positive_jacobian_percent": _finite(stats["non_positive_jacobian_percent"]),
                "foreground_overlap_after_affine": _finite(stats["foreground_overlap_after_affine"]),
                "warnings": list(world["warnings"]),
                "timings_s": dict(pipeline.timings),
            }
        )
        d["result"] = result
        return d


def _finite(value: Any) -> float | None:
    """A JSON-safe float: ``None`` for NaN or infinity."""
    value = float(value)
    return value if math.isfinite(value) else None
