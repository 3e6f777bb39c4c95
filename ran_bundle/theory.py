"""Capture range and motion separability of coarse-to-fine registration (paper Sec. 2.1-2.2).

For RA modules ``k = 1..K`` (coarse to fine) with pool size ``p_k`` (one voxel of the module's grid covers
``p_k`` input voxels per axis) and dilation-rate vector ``r_k`` (the rates of the convolutions that compare
the two streams in that module):

* receptive field (eq. 5): ``s_k = p_k * (1 + 2 * ||r_k||_1)``;
* capture range (eq. 4, approximated as in the paper): ``a_k = (s_k - 1) / 2``;
* global reach (eq. 6): ``p_1 * (1 + 2 * ||r_1||_1) >= 2 * max(size) + 1``;
* separability (eq. 9): the largest motion difference the network can predict between two voxels at
  Chebyshev distance ``p``: with ``S_k = sum_{k' >= k} a_k'`` and thresholds ``t_k = p_k + 2 * S_{k+1}``
  (``t_K = p_K``), ``Delta(p) = 2 * S_k`` for the smallest ``k`` with ``p >= t_k``, and 0 for ``p < p_K``.

All values are in voxels of the input image. For a :class:`~ran_bundle.networks.RANConfig`, ``r_k`` is
taken as the two dilated regressor convolutions of module ``k``, ``(r_k, r_k)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ran_bundle.networks.ran import RANConfig, preset_config

__all__ = ["capture_range", "covers_image", "separability", "config_levels", "preset_theory"]


def _check_levels(pool_sizes: Sequence[int], dilation_vectors: Sequence[Sequence[int]]) -> None:
    if len(pool_sizes) != len(dilation_vectors) or not pool_sizes:
        raise ValueError(
            f"need one dilation vector per level: {len(pool_sizes)} pool sizes, {len(dilation_vectors)} vectors"
        )
    if any(b > a for a, b in zip(pool_sizes, pool_sizes[1:], strict=False)):
        raise ValueError(f"pool sizes must not increase from coarse to fine, got {list(pool_sizes)}")


def capture_range(pool_sizes: Sequence[int], dilation_vectors: Sequence[Sequence[int]]) -> list[float]:
    """Capture range ``a_k = (p_k (1 + 2 ||r_k||_1) - 1) / 2`` of each level (eq. 4-5), in voxels."""
    _check_levels(pool_sizes, dilation_vectors)
    return [(p * (1 + 2 * sum(r)) - 1) / 2 for p, r in zip(pool_sizes, dilation_vectors, strict=True)]


def covers_image(pool_sizes: Sequence[int], dilation_vectors: Sequence[Sequence[int]], shape: Sequence[int]) -> bool:
    """Whether the first level reaches across the whole image (eq. 6)."""
    _check_levels(pool_sizes, dilation_vectors)
    return pool_sizes[0] * (1 + 2 * sum(dilation_vectors[0])) >= 2 * max(shape) + 1


def separability(
    distance: float | np.ndarray, pool_sizes: Sequence[int], dilation_vectors: Sequence[Sequence[int]]
) -> np.ndarray:
    """Motion separability ``Delta_inf(p)`` (eq. 9) at Chebyshev distance(s) ``distance``, in voxels.

    Args:
        distance: scalar or array of distances ``p``.
        pool_sizes: ``p_1..p_K``, coarse to fine.
        dilation_vectors: ``r_1..r_K``.

    Returns:
        array of the shape of ``distance``.
    """
    a = capture_range(pool_sizes, dilation_vectors)
    tail = np.cumsum(a[::-1])[::-1]  # S_k = sum_{k' >= k} a_k'
    after = np.append(tail[1:], 0.0)  # S_{k+1}
    thresholds = np.asarray(pool_sizes, dtype=float) + 2 * after
    p = np.asarray(distance, dtype=float)
    result = np.zeros_like(p)
    # scan fine to coarse: every threshold passed raises Delta to that level's value (thresholds decrease in k)
    for t_k, s_k in zip(thresholds[::-1], tail[::-1], strict=True):
        result = np.where(p >= t_k, 2 * s_k, result)
    return result


def config_levels(config: RANConfig) -> tuple[list[int], list[tuple[int, int]]]:
    """Pool sizes ``p_k`` and dilation vectors ``r_k`` of the RA modules of a configuration."""
    exponents, dilations = config.levels
    return [2**e for e in exponents], [(r, r) for r in dilations]


def preset_theory(preset: str | RANConfig = "ref", max_distance: int = 64, shape: Sequence[int] | None = None) -> dict:
    """Fig. 3(c)(d) of the paper for a preset: pool sizes, dilations, capture ranges and ``Delta_inf(p)``.

    Args:
        preset: a preset name or a :class:`RANConfig`.
        max_distance: ``Delta`` is evaluated for ``p = 0..max_distance``.
        shape: optional image shape, to report whether eq. 6 holds.

    Returns:
        dict with ``pool_sizes``, ``dilations``, ``capture_range``, ``distance``, ``separability``,
        ``area`` (sum of ``Delta`` over the distances) and, with ``shape``, ``covers_image``.
    """
    config = preset_config(preset) if isinstance(preset, str) else preset
    pools, rates = config_levels(config)
    distance = np.arange(max_distance + 1)
    delta = separability(distance, pools, rates)
    result = {
        "pool_sizes": pools,
        "dilations": rates,
        "capture_range": capture_range(pools, rates),
        "distance": distance,
        "separability": delta,
        "area": float(delta.sum()),
    }
    if shape is not None:
        result["covers_image"] = covers_image(pools, rates, shape)
    return result
