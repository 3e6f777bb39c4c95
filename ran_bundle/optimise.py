"""Instance optimisation: refine a displacement field for one pair, starting from the network's.

The network gives a good start in one forward pass; a few seconds of optimising the field itself (not the
network) for this pair then polish it, as in Learn2Reg's leading methods (e.g. ConvexAdam's Adam stage).
The unknown is a residual displacement ``r`` on the network's grid (voxels), smoothed by two passes of a
3x3x3 box filter before use, so that the field stays smooth without many regulariser iterations:

``u = u_net + smooth(r)``, minimising ``-NCC_w(moving o (id + u), fixed) + weight * diffusion(u)``

with the squared local NCC of the package (:func:`ran_bundle.losses.local_ncc`, window ``w``, masked to
the fixed image's foreground and to the user's masks, eroded by half a window; or, with ``similarity="mind"``, the
SSD of MIND-SSC descriptors, :func:`ran_bundle.losses.mind_ssc`, for another contrast), the diffusion
regulariser ``mean |grad u|^2`` on the whole field and a folding penalty (``mean relu(-det J)``), by Adam. The
defaults were chosen on two validation pairs of the Mindboggle split (subjects 10->11, 11->12; see
docs/results.md): from a zero start, weight 10 and folding weight 50 gave mean Dice 0.650 / 0.624 with 0.06% /
0.03% folding, against 0.678 / 0.654 with 3.5% / 3.3% folding for weight 1 alone.
Optionally a coarser level first (images and residual at half resolution, then upsampled). Fine-tuning the
network's weights on the pair instead is :func:`finetune_network` (slow on a CPU, an option for GPUs).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ran_bundle.defaults import PIPELINE_DEFAULTS
from ran_bundle.flow import compose, exponentiate, warp
from ran_bundle.losses import RegistrationLoss, box_sum, folding_penalty, local_ncc, mind_ssc, mind_ssd
from ran_bundle.spatial import foreground_mask

__all__ = ["SIMILARITIES", "OptimisationResult", "diffusion", "optimise_field", "finetune_network"]

#: similarities of the instance optimisation: local NCC (same contrast), MIND-SSC + SSD (another contrast)
SIMILARITIES = ("ncc", "mind")


@dataclass
class OptimisationResult:
    """What :func:`optimise_field` returns.

    Attributes:
        ddf: ``(1, d, *S)`` refined displacement (voxels of the input grid).
        losses: the loss after each iteration, all levels in order.
        iterations: iterations run per level (coarse to fine).
        seconds: wall time.
    """

    ddf: torch.Tensor
    losses: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    seconds: float = 0.0


def diffusion(ddf: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser ``mean over axes of mean (forward difference of u)^2`` of ``(B, d, *S)``."""
    terms = [ddf.diff(dim=axis).square().mean() for axis in range(2, ddf.ndim)]
    return torch.stack(terms).mean()


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """Two passes of a 3x3x3 box average (zero padding at the border folds the residual to 0 there): what
    ``avg_pool3d(x, 3, stride=1, padding=1)`` twice gives, by :func:`~ran_bundle.losses.box_sum`'s separable
    sums, 3x faster forward and backward on a CPU."""
    window = [3] * (x.ndim - 2)
    return box_sum(box_sum(x, window), window) / float(3 ** (2 * len(window)))


def _refine(start: torch.Tensor, update: torch.Tensor, svf: bool) -> torch.Tensor:
    """The refined displacement ``(1, d, *S)``: ``start + update``, or with ``svf`` the start composed after the
    diffeomorphic update: ``(id + start) o exp(update)`` (:func:`~ran_bundle.flow.compose`)."""
    return compose(start, exponentiate(update)) if svf else start + update


def _downsample(x: torch.Tensor) -> torch.Tensor:
    pool = F.avg_pool3d if x.ndim == 5 else F.avg_pool2d
    return pool(x, 2, stride=2, ceil_mode=True)


def _resize(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    mode = "trilinear" if x.ndim == 5 else "bilinear"
    return F.interpolate(x, size=tuple(shape), mode=mode, align_corners=True)


def _erode(mask: torch.Tensor, window: int) -> torch.Tensor:
    """``mask`` ``(1, 1, *S)`` in [0, 1] eroded by half a window: a voxel keeps its weight only where the whole
    window around it lies inside the mask, so that no window of the local statistics sees excluded voxels."""
    pool = F.max_pool3d if mask.ndim == 5 else F.max_pool2d
    return 1.0 - pool(1.0 - mask, window, stride=1, padding=window // 2)


def _features(image: torch.Tensor, similarity: str) -> torch.Tensor:
    """What the similarity compares: the image itself (``"ncc"``) or its MIND-SSC descriptors (``"mind"``)."""
    return mind_ssc(image) if similarity == "mind" else image


def _level(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    start: torch.Tensor,
    residual: torch.Tensor,
    iterations: int,
    lr: float,
    window: int,
    weight: float,
    losses: list[float],
    bar,
    fold_weight: float = 0.0,
    svf: bool = False,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    similarity: str = "ncc",
) -> torch.Tensor:
    residual = residual.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([residual], lr=lr)
    region = foreground_mask(fixed).float()
    if fixed_mask is not None:
        region = region * _erode(fixed_mask.float(), window)
    moving_features, fixed_features = _features(moving, similarity), _features(fixed, similarity)
    kernel = [window] * (fixed.ndim - 2)
    for _ in range(iterations):
        optimiser.zero_grad(set_to_none=True)
        ddf = _refine(start, _smooth(residual), svf)
        weights = region
        if moving_mask is not None:  # the moving mask follows the current field (no gradient through it)
            weights = region * _erode(warp(moving_mask.float(), ddf.detach()), window)
        warped = warp(moving_features, ddf)
        if similarity == "mind":
            dissimilarity = mind_ssd(warped, fixed_features, weights).mean()
        else:
            dissimilarity = -local_ncc(warped, fixed_features, kernel, weights).mean()
        loss = dissimilarity + weight * diffusion(ddf)
        if fold_weight:
            loss = loss + fold_weight * folding_penalty(ddf)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix({similarity: f"{abs(float(dissimilarity.detach())):.4f}"})
    return residual.detach()


def optimise_field(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    ddf: torch.Tensor,
    iterations: Sequence[int] = PIPELINE_DEFAULTS.io_iterations,
    lr: float = 0.2,
    window: int = 5,
    weight: float = 10.0,
    fold_weight: float = 50.0,
    svf: bool = False,
    progress: bool = True,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    similarity: str = "ncc",
) -> OptimisationResult:
    """Refine ``ddf`` for this pair (instance optimisation of the field, not of the network).

    Args:
        moving: ``(1, 1, *S)`` preprocessed moving image on the network grid.
        fixed: ``(1, 1, *S)`` preprocessed fixed image on the same grid.
        ddf: ``(1, d, *S)`` start (the network's DDF, voxels; zeros for none).
        iterations: Adam iterations per level, coarse to fine: ``(n_half, n_full)`` runs ``n_half`` at half
            resolution first; ``(n,)`` runs only the full resolution.
        lr: Adam learning rate (voxels of the level's grid).
        window: local NCC window (voxels of the level's grid).
        weight: weight of the diffusion regulariser.
        fold_weight: weight of the folding penalty :func:`ran_bundle.losses.folding_penalty`.
        svf: refine by a diffeomorphic update (:func:`~ran_bundle.flow.exponentiate`, composed before the start)
            instead of adding the residual.
        progress: show a tqdm bar on stderr.
        fixed_mask: ``(1, 1, *S)`` voxels of the fixed image that count (non-zero), on the same grid.
        moving_mask: ``(1, 1, *S)`` voxels of the moving image that count, on the same grid (the moving image's
            mask mapped like the moving image); it is warped with the field at each iteration.
        similarity: ``"ncc"`` (local NCC of the intensities, same contrast) or ``"mind"`` (SSD of the MIND-SSC
            descriptors, :func:`ran_bundle.losses.mind_ssc`: another contrast).

    Both masks are eroded by half the NCC window and multiplied with the fixed image's foreground: a voxel counts
    in the similarity only where no excluded voxel lies in the window around it.

    Returns:
        :class:`OptimisationResult`.

    Raises:
        ValueError: shapes that do not match, no iterations, or an unknown similarity.
    """
    from tqdm import tqdm

    if moving.shape != fixed.shape or ddf.shape[2:] != fixed.shape[2:] or ddf.shape[1] != fixed.ndim - 2:
        raise ValueError(
            f"optimise_field: moving {tuple(moving.shape)}, fixed {tuple(fixed.shape)} and ddf {tuple(ddf.shape)} "
            "must share one grid."
        )
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}.")
    for name, mask in (("fixed_mask", fixed_mask), ("moving_mask", moving_mask)):
        if mask is not None and mask.shape[2:] != fixed.shape[2:]:
            raise ValueError(f"optimise_field: {name} {tuple(mask.shape)} is not on the grid {tuple(fixed.shape)}.")
    iterations = [int(n) for n in iterations]
    if not iterations or any(n < 0 for n in iterations) or len(iterations) > 2:
        raise ValueError(f"iterations must be one or two non-negative counts (coarse, fine), got {iterations}.")
    start_time = time.perf_counter()
    moving, fixed, start = moving.float(), fixed.float(), ddf.float().detach()
    losses: list[float] = []
    residual = torch.zeros_like(start)
    bar = tqdm(total=sum(iterations), desc="instance optimisation", file=sys.stderr, disable=not progress)
    with torch.enable_grad(), bar:
        if len(iterations) == 2 and iterations[0] > 0:
            m2, f2 = _downsample(moving), _downsample(fixed)
            start2 = _resize(start, f2.shape[2:]) * 0.5
            masks2 = [None if m is None else _downsample(m.float()) for m in (fixed_mask, moving_mask)]
            coarse = _level(
                m2, f2, start2, torch.zeros_like(start2), iterations[0], lr, window, weight, losses, bar, fold_weight,
                fixed_mask=masks2[0], moving_mask=masks2[1], similarity=similarity,
            )  # fmt: skip
            # the smoothed coarse residual, in fine voxels, becomes part of the fine level's start
            start = _refine(start, _resize(_smooth(coarse), fixed.shape[2:]) * 2.0, svf)
        residual = _level(
            moving, fixed, start, residual, iterations[-1], lr, window, weight, losses, bar, fold_weight, svf,
            fixed_mask, moving_mask, similarity,
        )  # fmt: skip
    refined = _refine(start, _smooth(residual), svf)
    return OptimisationResult(refined.detach(), losses, iterations, time.perf_counter() - start_time)


def finetune_network(
    net: torch.nn.Module,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    steps: int,
    lr: float = 1e-4,
    loss: Callable[..., torch.Tensor] | None = None,
    amp: bool = False,
    progress: bool = True,
) -> tuple[torch.nn.Module, list[float]]:
    """Fine-tune a **copy** of ``net`` on one pair and return it in eval mode (the slow option, for GPUs).

    Each step is the package's training step (:func:`ran_bundle.engines.registration_train_step`):
    ``ddf = net(cat[moving, fixed])``, ``loss(warp(moving, ddf), fixed, ddf)``, backward, Adam.

    Args:
        net: the trained network (left unchanged).
        moving: ``(1, 1, *S)`` preprocessed moving image.
        fixed: ``(1, 1, *S)`` preprocessed fixed image.
        steps: Adam steps.
        lr: Adam learning rate.
        loss: called as ``loss(warped, fixed, ddf)``; default :class:`~ran_bundle.losses.RegistrationLoss`.
        amp: forward under ``torch.autocast`` (the loss in float32).
        progress: tqdm bar on stderr.

    Returns:
        ``(network, losses)``.

    Raises:
        RuntimeError: a non-finite loss (:class:`ran_bundle.engines.NonFiniteLossError`).
    """
    from tqdm import tqdm

    from ran_bundle.engines import registration_train_step  # ignite: imported only for fine-tuning

    device = next(net.parameters()).device
    tuned = copy.deepcopy(net).to(device)
    x = torch.cat([moving.float(), fixed.float()], dim=1).to(device)
    loss_fn = loss if loss is not None else RegistrationLoss(spatial_dims=x.ndim - 2)
    optimiser = torch.optim.Adam(tuned.parameters(), lr=float(lr))
    history: list[float] = []
    bar = tqdm(range(int(steps)), desc="network fine-tuning", file=sys.stderr, disable=not progress)
    with torch.enable_grad(), bar:
        for _ in bar:
            _, value, _ = registration_train_step(tuned, optimiser, x, loss_fn, amp=amp, device=device)
            history.append(float(value))
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    return tuned.eval(), history
