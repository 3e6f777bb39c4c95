"""Evaluation metrics of deformable registration, in physical units.

Conventions: a DDF is ``(B, d, *spatial)`` (or ``(d, *spatial)``) in **voxel** units on the fixed
grid, channel ``i`` along array axis ``i``; label maps hold integer labels, 0 is background;
``spacing`` is the voxel size in mm per array axis. Functions accept numpy arrays or torch
tensors.

- Field quality: :func:`jacobian_determinant`, :func:`non_positive_jacobian`, :func:`sdlogj`.
- Label overlap and surface distances: :func:`dice`, :func:`label_metrics` (Dice, HD95, HD and
  symmetric ASD in mm, with MONAI's surface-distance functions).
- One registered pair: :func:`evaluate_pair` gives flat rows ready for a CSV;
  :func:`summarise` gives mean and std per label across pairs.
- For ignite/MONAI evaluators: :class:`ran_bundle.handlers.MeanDiceOverLabels` and
  :class:`ran_bundle.handlers.FoldingPercent`, built on these functions.

Reporting both conventions of the paper and of Learn2Reg: the paper counts voxels with
``det J <= 0`` inside the organs and reports Dice / HD / ASD; Learn2Reg adds HD95 and SDlogJ.

Plain functions of numpy and torch: MONAI's surface distances are imported where they are used, so that
``ran-register``, which needs only the Jacobian and Dice, does not pay MONAI's import (about 4 s on 2 cores,
``docs/benchmark.md``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "jacobian_determinant",
    "jacobian_determinant_differentiable",
    "non_positive_jacobian",
    "sdlogj",
    "dice",
    "dice_per_label",
    "hd95_per_label",
    "label_metrics",
    "evaluate_pair",
    "summarise",
    "LABEL_METRICS",
    "FIELD_METRICS",
]

LABEL_METRICS = ("dice", "hd95", "hd", "asd")
FIELD_METRICS = ("non_pos_jac_count", "non_pos_jac_percent", "sdlogj")

ArrayLike = np.ndarray | torch.Tensor


def _to_tensor(x: ArrayLike, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.detach()
    return t if dtype is None else t.to(dtype)


def _is_unbatched_ddf(t: ArrayLike) -> bool:
    """``(d, *S)`` rather than ``(B, d, *S)``; the batched reading wins when both fit."""
    batched = t.ndim >= 4 and t.shape[1] == t.ndim - 2
    return not batched and t.shape[0] == t.ndim - 1


def _batched_ddf(ddf: ArrayLike, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(d, *S)`` or ``(B, d, *S)`` -> ``(B, d, *S)`` tensor of ``dtype``."""
    t = _to_tensor(ddf, dtype)
    if _is_unbatched_ddf(t):
        t = t[None]
    if t.ndim - 2 != t.shape[1] or t.shape[1] not in (2, 3):
        raise ValueError(f"ddf must have shape (B, d, *spatial) with d = 2 or 3, got {tuple(ddf.shape)}.")
    return t


def _batched_mask(mask: ArrayLike | None, batch: int, spatial: Sequence[int]) -> torch.Tensor | None:
    """``(*S)``, ``(1, *S)``, ``(B, *S)`` or ``(B, 1, *S)`` -> boolean ``(B, *S)``."""
    if mask is None:
        return None
    m = _to_tensor(mask).bool()
    while m.ndim > len(spatial) + 1:
        m = m.squeeze(1) if m.shape[1] == 1 else m.squeeze(0)
    if m.ndim == len(spatial):
        m = m[None]
    if tuple(m.shape[1:]) != tuple(spatial):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the ddf spatial shape {tuple(spatial)}.")
    return m.expand(batch, *spatial)


def jacobian_determinant(
    ddf: ArrayLike, spacing: Sequence[float] | None = None, dtype: torch.dtype = torch.float64
) -> ArrayLike:
    """Determinant of the Jacobian of ``x -> x + u(x)``, ``det(I + grad u)``, per voxel, as a metric
    (detached, float64 unless told); :func:`jacobian_determinant_differentiable` is the same computation for losses.

    Derivatives are central differences inside and one-sided at the borders (as ``np.gradient``).
    The determinant is invariant to the voxel spacing (``det(S (I + G) S^-1) = det(I + G)`` for the
    diagonal spacing matrix ``S``), so ``spacing`` only documents the physical setting: with it the
    derivatives are taken in mm of a displacement converted to mm, which gives the same value.

    Args:
        ddf: ``(B, d, *spatial)`` or ``(d, *spatial)`` displacement in voxels, d = 2 or 3.
        spacing: voxel size per axis in mm, or ``None`` (1 mm).
        dtype: precision of the computation and the result; ``torch.float32`` halves the time and memory on a
            1 mm grid (what ``ran-register`` writes as ``jacobian.nii.gz``).

    Returns:
        ``(B, *spatial)`` (``(*spatial)`` for an unbatched input), numpy for numpy input, torch
        (``dtype``, on the input's device) for torch input.
    """
    unbatched = _is_unbatched_ddf(ddf)
    det = jacobian_determinant_differentiable(_batched_ddf(ddf, dtype), spacing)
    if unbatched:
        det = det[0]
    return det if isinstance(ddf, torch.Tensor) else det.cpu().numpy()


def jacobian_determinant_differentiable(ddf: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """``det(I + grad u)`` of a batched ``(B, d, *spatial)`` voxel DDF (d = 2 or 3), in its dtype and with
    its autograd graph (for a folding penalty); see :func:`jacobian_determinant`. Returns ``(B, *spatial)``."""
    u = ddf
    d = u.shape[1]
    sp = [1.0] * d if spacing is None else [float(s) for s in spacing]
    if len(sp) != d:
        raise ValueError(f"spacing must have {d} values, got {spacing}.")
    # jac[i][j] = delta_ij + d(u_i mm) / d(x_j mm)
    jac = [[None] * d for _ in range(d)]
    for i in range(d):
        component = u[:, i] if sp[i] == 1.0 else u[:, i] * sp[i]
        grads = torch.gradient(component, spacing=sp, dim=list(range(1, d + 1)), edge_order=1)
        for j in range(d):
            jac[i][j] = grads[j] + 1.0 if i == j else grads[j]  # no full-size copies for the zeros
    if d == 2:
        return jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    return (
        jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
        - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
        + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
    )


def non_positive_jacobian(ddf: ArrayLike, mask: ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Number and percentage of voxels with ``det J <= 0`` (folding), per batch item.

    Args:
        ddf: ``(B, d, *spatial)`` or ``(d, *spatial)`` displacement in voxels.
        mask: optional region to count in (e.g. the fixed organs, as in the paper), ``(*spatial)``,
            ``(B, *spatial)`` or ``(B, 1, *spatial)``; the percentage is of the region's voxels
            (nan for an empty region).

    Returns:
        ``(count, percent)``: two numpy arrays of shape ``(B,)`` (int64 and float64).
    """
    det = _to_tensor(jacobian_determinant(_batched_ddf(ddf)))
    m = _batched_mask(mask, det.shape[0], det.shape[1:])
    bad = det <= 0
    if m is not None:
        bad = bad & m
        total = m.flatten(1).sum(1).to(torch.float64)
    else:
        total = torch.full((det.shape[0],), float(det[0].numel()), dtype=torch.float64)
    count = bad.flatten(1).sum(1)
    percent = torch.where(total > 0, 100.0 * count / total.clamp_min(1), torch.nan)
    return count.cpu().numpy().astype(np.int64), percent.cpu().numpy()


def sdlogj(ddf: ArrayLike, mask: ArrayLike | None = None) -> np.ndarray:
    """Standard deviation of the log Jacobian determinant, per batch item (Learn2Reg's SDlogJ).

    ``std(log(clip(det J, 1e-9, 1e9)))`` over all voxels (or over ``mask``); folded voxels are
    clipped to ``1e-9`` and so inflate it. Uses :func:`jacobian_determinant` (no border crop).

    Args:
        ddf: ``(B, d, *spatial)`` or ``(d, *spatial)`` displacement in voxels.
        mask: optional region, as in :func:`non_positive_jacobian` (nan for an empty region).

    Returns:
        ``(B,)`` numpy float64 (population std, ``ddof=0``).
    """
    det = _to_tensor(jacobian_determinant(_batched_ddf(ddf)))
    log_det = det.clamp(1e-9, 1e9).log()
    m = _batched_mask(mask, det.shape[0], det.shape[1:])
    out = []
    for b in range(det.shape[0]):
        vals = log_det[b] if m is None else log_det[b][m[b]]
        out.append(vals.std(correction=0).item() if vals.numel() else math.nan)
    return np.asarray(out, dtype=np.float64)


def _label_map(x: ArrayLike) -> np.ndarray:
    """Squeeze leading singleton (batch/channel) axes of a label map; return an integer numpy array."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.rint(a).astype(np.int64) if a.dtype.kind == "f" else a.astype(np.int64)


def _squeeze_leading(a: np.ndarray, ndim: int) -> np.ndarray:
    """Drop leading singleton (batch/channel) axes down to ``ndim`` axes."""
    while a.ndim > ndim and a.shape[0] == 1:
        a = a[0]
    return a


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks: ``2 |A & B| / (|A| + |B|)``; nan when both are empty."""
    denom = int(pred.sum()) + int(ref.sum())
    return 2.0 * int(np.logical_and(pred, ref).sum()) / denom if denom else math.nan


def dice_per_label(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice of each of ``labels`` between two integer label maps of one shape, from one joint histogram
    (fast for many labels: one pass over the voxels instead of one per label); nan where a label is absent
    from both maps."""
    values = np.asarray(sorted(set(int(v) for v in labels)), dtype=np.int64)
    if values.size == 0:
        return {}
    index = {int(v): i + 1 for i, v in enumerate(values)}  # 0: any other value
    low, high = min(int(values.min()), 0), int(values.max())  # the table covers the background 0 too
    table = np.zeros(high - low + 1, dtype=np.int64)  # value -> bin, by lookup (one pass, no search)
    table[values - low] = np.arange(1, values.size + 1)

    def bins(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x).ravel()
        x = x if x.dtype.kind in "iu" else np.rint(x).astype(np.int64)
        if low <= x.min() and x.max() <= high:  # every value has a bin: one lookup (twice as fast on 1 mm brains)
            return table[x - low if low else x]
        inside = (x >= low) & (x <= high)
        return np.where(inside, table[np.clip(x, low, high) - low], 0)

    n = values.size + 1
    joint = np.bincount(bins(pred) * n + bins(ref), minlength=n * n).reshape(n, n)
    pred_count, ref_count, both = joint.sum(1), joint.sum(0), np.diag(joint)
    out = {}
    for v, i in index.items():
        denom = int(pred_count[i]) + int(ref_count[i])
        out[v] = 2.0 * int(both[i]) / denom if denom else math.nan
    return out


def hd95_per_label(
    pred: np.ndarray, ref: np.ndarray, labels: Sequence[int], spacing: Sequence[float] | None = None
) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance of each label (MONAI's
    :func:`~monai.metrics.compute_hausdorff_distance`), computed on the label's own bounding box (in either map,
    plus 2 voxels), which makes a hundred small labels on a 1 mm brain take seconds instead of minutes; nan where
    a label is missing from either map.

    Args:
        pred: ``(*spatial)`` integer label map (e.g. the warped moving labels).
        ref: the same shape (e.g. the fixed labels).
        labels: the label values.
        spacing: voxel size in mm per axis (``None``: voxels).
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    from monai.metrics import compute_hausdorff_distance

    sp = None if spacing is None else [float(s) for s in spacing]
    out: dict[int, float] = {}
    for lab in labels:
        p, r = pred == lab, ref == lab
        if not p.any() or not r.any():
            out[int(lab)] = math.nan
            continue
        where = np.argwhere(p | r)
        lo = np.maximum(where.min(0) - 2, 0)
        hi = where.max(0) + 3
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        p1h = torch.from_numpy(p[box][None, None])
        r1h = torch.from_numpy(r[box][None, None])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            value = compute_hausdorff_distance(p1h, r1h, include_background=True, percentile=95, spacing=sp)
        out[int(lab)] = float(value[0, 0])
    return out


def label_metrics(
    pred_label: ArrayLike,
    ref_label: ArrayLike,
    labels: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
) -> dict[int, dict[str, float]]:
    """Dice, HD95, HD and symmetric ASD (mm) per label between two integer label maps.

    Distances use MONAI's surface-based :func:`~monai.metrics.compute_hausdorff_distance`
    (``percentile=95`` and full, symmetric) and :func:`~monai.metrics.compute_average_surface_distance`
    (``symmetric=True``) with ``spacing`` so that they are in mm.

    Absent labels (no crash, no warning):

    - absent from both maps: every value nan (nothing to compare; nan-means skip it);
    - absent from exactly one map: Dice 0 (a real failure of overlap), distances nan (undefined,
      MONAI would give inf/nan); nan-means therefore skip the distances but count the Dice.

    Args:
        pred_label: ``(*spatial)`` (or with leading singleton axes) integer map, e.g. the warped
            moving labels.
        ref_label: the same shape, e.g. the fixed labels.
        labels: the labels to evaluate; ``None``: every non-zero label in ``ref_label``.
        spacing: voxel size in mm per axis; ``None`` gives distances in voxels.

    Returns:
        ``{label: {"dice", "hd95", "hd", "asd"}}`` with float values.
    """
    pred = _label_map(pred_label)
    ref = _label_map(ref_label)
    ndim = len(spacing) if spacing is not None else min(pred.ndim, ref.ndim, 3)
    pred, ref = _squeeze_leading(pred, ndim), _squeeze_leading(ref, ndim)
    if pred.shape != ref.shape:
        raise ValueError(f"pred_label and ref_label spatial shapes differ: {pred.shape}, {ref.shape}.")
    if pred.ndim != ndim:
        raise ValueError(f"spacing must have {pred.ndim} values (one per spatial axis), got {spacing}.")
    if labels is None:
        labels = [int(v) for v in np.unique(ref) if v != 0]
    labels = [int(v) for v in labels]
    results: dict[int, dict[str, float]] = {}
    both = []  # labels present in both maps get surface distances
    for lab in labels:
        p, r = pred == lab, ref == lab
        results[lab] = {"dice": dice(p, r), "hd95": math.nan, "hd": math.nan, "asd": math.nan}
        if p.any() and r.any():
            both.append(lab)
    if both:
        from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

        p1h = torch.from_numpy(np.stack([pred == lab for lab in both])[None])  # (1, L, *S)
        r1h = torch.from_numpy(np.stack([ref == lab for lab in both])[None])
        sp = None if spacing is None else [float(s) for s in spacing]
        kw: dict[str, Any] = {"include_background": True, "spacing": sp}
        with warnings.catch_warnings():
            # MONAI 1.6 warns about its own internal use of a deprecated argument
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            hd95 = compute_hausdorff_distance(p1h, r1h, percentile=95, **kw)[0]
            hd = compute_hausdorff_distance(p1h, r1h, **kw)[0]
            asd = compute_average_surface_distance(p1h, r1h, symmetric=True, **kw)[0]
        for k, lab in enumerate(both):
            results[lab].update(hd95=float(hd95[k]), hd=float(hd[k]), asd=float(asd[k]))
    return results


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0 or np.all(np.isnan(arr)):
        return math.nan
    return float(np.nanmean(arr))


def evaluate_pair(
    warped_label: ArrayLike,
    fixed_label: ArrayLike,
    ddf: ArrayLike | None,
    spacing: Sequence[float] | None,
    labels: Sequence[int] | None = None,
    pair: str | None = None,
) -> list[dict[str, Any]]:
    """All the metrics of one registered pair, as flat rows with the same keys (CSV-ready).

    Rows, in order:

    - one per label: ``label_metrics`` of ``warped_label`` vs ``fixed_label`` and the field
      statistics inside that fixed organ (the paper counts folding inside the organs);
    - ``label="mean"``: nan-mean of the label rows' Dice/HD95/HD/ASD, and the field statistics
      inside the union of the evaluated fixed organs;
    - ``label="all"``: label metrics nan, field statistics over the whole grid (Learn2Reg SDlogJ).

    Keys: ``pair`` (when given), ``label``, ``dice``, ``hd95``, ``hd``, ``asd`` (mm),
    ``non_pos_jac_count``, ``non_pos_jac_percent``, ``sdlogj`` (nan without ``ddf``).

    Args:
        warped_label: ``(*spatial)`` moving labels warped to the fixed grid (nearest neighbour).
        fixed_label: ``(*spatial)`` fixed labels.
        ddf: ``(d, *spatial)`` or ``(1, d, *spatial)`` displacement in voxels, or ``None``.
        spacing: voxel size in mm per axis (``None``: distances in voxels).
        labels: labels to evaluate; ``None``: every non-zero label of ``fixed_label``.
        pair: an identifier copied into every row.
    """
    ref = _label_map(fixed_label)
    per_label = label_metrics(warped_label, ref, labels, spacing)
    det = None
    if ddf is not None:
        u = _batched_ddf(ddf)[:1]
        ref = ref.reshape(u.shape[2:])
        det = _to_tensor(jacobian_determinant(u))[0]  # computed once for all the regions
        log_det = det.clamp(1e-9, 1e9).log()
    else:
        ref = _squeeze_leading(ref, len(spacing) if spacing is not None else min(ref.ndim, 3))

    def field_stats(mask: np.ndarray | None) -> dict[str, float]:
        """Same values as :func:`non_positive_jacobian` and :func:`sdlogj` restricted to ``mask``."""
        if det is None:
            return dict.fromkeys(FIELD_METRICS, math.nan)
        m = torch.ones_like(det, dtype=torch.bool) if mask is None else torch.from_numpy(mask)
        n = int(m.sum())
        count = int(((det <= 0) & m).sum())
        return {
            "non_pos_jac_count": count,
            "non_pos_jac_percent": 100.0 * count / n if n else math.nan,
            "sdlogj": float(log_det[m].std(correction=0)) if n else math.nan,
        }

    rows: list[dict[str, Any]] = []
    head = {} if pair is None else {"pair": pair}
    for lab, vals in per_label.items():
        rows.append({**head, "label": lab, **vals, **field_stats(ref == lab)})
    union = np.isin(ref, list(per_label)) if per_label else np.zeros(ref.shape, dtype=bool)
    mean_vals = {k: _nanmean([v[k] for v in per_label.values()]) for k in LABEL_METRICS}
    rows.append({**head, "label": "mean", **mean_vals, **field_stats(union)})
    rows.append({**head, "label": "all", **dict.fromkeys(LABEL_METRICS, math.nan), **field_stats(None)})
    return rows


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std per label across pairs of :func:`evaluate_pair` rows.

    Every numeric key ``k`` of the rows gives ``k_mean`` and ``k_std`` (nan-aware, ``ddof=0``)
    plus ``n``, the number of rows of that label. Labels keep their first-seen order.

    Returns:
        one dict per label: ``{"label", "n", "dice_mean", "dice_std", ...}``.
    """
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["label"], []).append(row)
    out = []
    for lab, group in groups.items():
        summary: dict[str, Any] = {"label": lab, "n": len(group)}
        keys = [k for k in group[0] if k not in ("label", "pair")]
        for k in keys:
            vals = np.asarray([float(r[k]) for r in group], dtype=np.float64)
            valid = vals[~np.isnan(vals)]
            summary[f"{k}_mean"] = float(valid.mean()) if valid.size else math.nan
            summary[f"{k}_std"] = float(valid.std()) if valid.size else math.nan
        out.append(summary)
    return out
