"""Evaluation of a registration network on labelled pairs, outside the ignite engines.

The same preprocessing and metrics as the bundle's evaluation (``configs/evaluate.json``:
:func:`~ran_bundle.transforms.registration_transforms` in ``"eval"`` mode and
:func:`~ran_bundle.metrics.evaluate_pair`), for comparing several networks on the same pairs in one process
(``scripts/compare.py``) or checking weights in a test:

- :func:`evaluation_pairs`: the pairs preprocessed once, batched, with their names and voxel sizes;
- :func:`evaluate_model`: the metric rows of every pair and the median forward time of a network (or of the
  identity);
- :func:`label_names`: the names of the evaluated labels.

Every network is called as ``net(cat[moving, fixed])`` -> DDF ``(1, d, *S)`` in voxels on the fixed grid
(:func:`~ran_bundle.engines.prepare_batch`), and the moving label is warped with nearest neighbour by
:func:`~ran_bundle.flow.warp`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import list_data_collate

from ran_bundle.engines import pair_name, prepare_batch
from ran_bundle.flow import spacing_of, warp
from ran_bundle.metrics import dice_per_label, evaluate_pair, hd95_per_label
from ran_bundle.transforms import registration_transforms

__all__ = [
    "evaluation_pairs",
    "evaluate_model",
    "label_names",
    "CORTEX_LABELS",
    "native_label_scores",
]


def evaluation_pairs(
    pairs: Sequence[dict[str, Any]], spacing: Sequence[float] | None, intensity: str
) -> list[dict[str, Any]]:
    """The evaluation pairs preprocessed once and batched.

    Args:
        pairs: datalist pairs with ``"moving_image"``, ``"fixed_image"``, ``"moving_label"``, ``"fixed_label"``.
        spacing: voxel size in mm to resample to (``None``: the images' grid).
        intensity: ``"ct"``, ``"mr"`` or ``"none"`` (:func:`~ran_bundle.transforms.registration_transforms`).

    Returns:
        one dict per pair: the batched images and labels ``(1, 1, *S)`` (MetaTensors), ``"name"``
        (:func:`~ran_bundle.engines.pair_name`) and ``"spacing"`` (the fixed grid's voxel size in mm).

    Raises:
        ValueError: a pair has no labels.
    """
    pre = registration_transforms("eval", spacing=spacing, intensity=intensity, with_labels=True)
    out = []
    for pair in pairs:
        if "moving_label" not in pair:
            raise ValueError(f"evaluation pair {pair['moving_image']} -> {pair['fixed_image']} has no labels.")
        batch = list_data_collate([pre(pair)])
        name = pair_name(pair["moving_image"], pair["fixed_image"])
        out.append({**batch, "name": name, "spacing": spacing_of(np.asarray(batch["fixed_image"].affine[0]))})
    return out


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def evaluate_model(
    net: torch.nn.Module | None, pairs: Sequence[dict[str, Any]], labels: Sequence[int], device: str | torch.device
) -> dict[str, Any]:
    """Metrics of every pair and the median forward time of ``net``; ``net=None`` is the identity (zero field).

    Args:
        net: the network (put in eval mode), or ``None``.
        pairs: :func:`evaluation_pairs`.
        labels: the label values to score.
        device: where the network runs.

    Returns:
        ``{"rows": the rows of :func:`~ran_bundle.metrics.evaluate_pair` of every pair (keys ``pair``, ``label``,
        ``dice``, ``hd95``, ``hd``, ``asd``, ``non_pos_jac_count``, ``non_pos_jac_percent``, ``sdlogj``),
        "time": median seconds of one forward pass after an untimed warm-up (nan for the identity)}``.
    """
    rows, times = [], []
    if net is not None:
        net.eval()
    with torch.no_grad():
        for k, pair in enumerate(pairs):
            inputs, _ = prepare_batch(pair, device)
            moving_label = pair["moving_label"].as_tensor().to(device)
            if net is None:
                ddf = torch.zeros(1, inputs.ndim - 2, *inputs.shape[2:], device=device)
            else:
                if k == 0:
                    net(inputs)  # warm-up, not timed
                _sync(device)
                t0 = time.perf_counter()
                ddf = net(inputs).float()
                _sync(device)
                times.append(time.perf_counter() - t0)
            warped_label = warp(moving_label, ddf, mode="nearest")
            rows += evaluate_pair(
                warped_label[0, 0].cpu(), pair["fixed_label"][0, 0], ddf[0].cpu(), pair["spacing"], labels, pair["name"]
            )
    return {"rows": rows, "time": float(np.median(times)) if times else math.nan}


def label_names(
    datalist: str | os.PathLike, pairs: Sequence[dict[str, Any]], labels: Sequence[int] | None = None
) -> dict[int, str]:
    """``{value: name}`` of the evaluated labels: ``labels``, else the datalist's ``"labels"``, else all present.

    Args:
        datalist: the datalist JSON file (its optional ``"labels"`` maps values to names).
        pairs: :func:`evaluation_pairs` (their fixed labels give the values present).
        labels: the values to score, named from the datalist where it names them.
    """
    raw = json.loads(Path(datalist).read_text())
    table = {int(k): str(v) for k, v in (raw.get("labels") or {}).items() if int(k) != 0}
    if labels:
        return {int(v): table.get(int(v), str(v)) for v in labels}
    if table:
        return table
    present = sorted({int(v) for p in pairs for v in torch.unique(p["fixed_label"]).tolist() if v != 0})
    return {v: str(v) for v in present}


#: DKT31 cortical parcels (FreeSurfer codes 1000-1999 left, 2000-2999 right hemisphere)
CORTEX_LABELS = range(1000, 3000)


def native_label_scores(
    warped_label: np.ndarray | torch.Tensor,
    fixed_label: np.ndarray,
    spacing: Sequence[float],
    min_voxels: int = 100,
    cortex: Sequence[int] | range = CORTEX_LABELS,
) -> dict[str, float]:
    """Overlap scores of one registration on the fixed image's own grid, as the brain comparison reports them.

    Args:
        warped_label: ``(*F)`` moving labels warped onto the fixed grid (nearest neighbour).
        fixed_label: ``(*F)`` fixed labels (integer values; float maps are rounded).
        spacing: fixed voxel size (mm) for HD95.
        min_voxels: labels with fewer fixed voxels are left out (tiny structures, partial labels).
        cortex: the label values of the cortex.

    Returns:
        ``{"dice", "dice_cortex", "hd95", "labels", "cortex_labels"}``: mean Dice over the labels of at least
        ``min_voxels`` voxels, over the cortex labels among them, mean HD95 (mm) over them, and their counts.
    """
    pred = np.asarray(warped_label.numpy() if isinstance(warped_label, torch.Tensor) else warped_label)
    ref = np.rint(np.asarray(fixed_label)).astype(np.int64)
    values, counts = np.unique(ref, return_counts=True)
    labels = [int(v) for v, c in zip(values, counts, strict=True) if v != 0 and c >= min_voxels]
    cortex_set = set(cortex)
    dice = dice_per_label(pred, ref, labels)
    hd95 = hd95_per_label(pred, ref, labels, spacing)
    cortical = [v for v in labels if v in cortex_set]
    return {
        "dice": float(np.nanmean([dice[v] for v in labels])) if labels else math.nan,
        "dice_cortex": float(np.nanmean([dice[v] for v in cortical])) if cortical else math.nan,
        "hd95": float(np.nanmean([hd95[v] for v in labels])) if labels else math.nan,
        "labels": len(labels),
        "cortex_labels": len(cortical),
    }
