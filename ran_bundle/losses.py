"""Losses for unsupervised deformable registration with the Residual Aligner Network (RAN).

Conventions (shared by the whole package):

- images are channel-first tensors ``(B, C, *spatial)``, 2D or 3D;
- a dense displacement field (DDF) is ``(B, d, *spatial)`` in **voxel** units on the **fixed** grid,
  channel ``i`` being the displacement along array axis ``i``: ``warped(x) = moving(x + u(x))``
  (the convention of :class:`monai.networks.blocks.Warp`).

The module has a functional core of plain functions (:func:`box_sum`, :func:`local_ncc`,
:func:`masked_mse`, :func:`mind_ssc`, :func:`mind_ssd`, :func:`spatial_diffs`, :func:`edge_weights`,
:func:`edge_aware_smoothness`)
and thin :class:`torch.nn.modules.loss._Loss` wrappers that keep the hyperparameters; the label
overlap term is MONAI's :class:`~monai.losses.DiceLoss`. The training objective of the paper
(Zheng et al., "Residual Aligner Network", eq. 13) and of its released code is

    abdomen CT: 2 * (-NCC, window 8, mask fixed > 0.1) + 0.5 * smooth(code form, s=25, L1)
    lung CT:    2 * MSE(mask fixed > 0.01)             + 0.05 * smooth(code form, s=9, L1)

which :class:`RegistrationLoss` composes (its defaults are the abdomen recipe).

It runs past 500 lines because every term of that objective (similarity, edge-aware smoothness in the
paper's and the code's forms, folding, the supervised pretraining loss) is a function plus its loss class,
and splitting them would separate terms that :class:`RegistrationLoss` composes from one another.

MONAI is imported where a class needs it (``DiceLoss``, ``LocalNormalizedCrossCorrelationLoss``, ``one_hot``,
``LossReduction``), not at the top: ``ran-register``'s instance optimisation uses only the functional core, and
importing MONAI loads all of its submodules (about 4 s on 2 cores, ``docs/benchmark.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from ran_bundle.metrics import jacobian_determinant_differentiable

if TYPE_CHECKING:
    from monai.utils import LossReduction

__all__ = [
    "box_sum",
    "local_ncc",
    "masked_mse",
    "mind_ssc",
    "mind_ssd",
    "spatial_diffs",
    "edge_weights",
    "edge_aware_smoothness",
    "LocalNCCLoss",
    "MaskedMSELoss",
    "EdgeAwareSmoothnessLoss",
    "similarity_loss",
    "folding_penalty",
    "end_point_error",
    "RegistrationLoss",
    "SyntheticFieldLoss",
]

SMOOTHNESS_MODES = ("paper", "code")


# ----------------------------------------------------------------------------------------------
# functional core
# ----------------------------------------------------------------------------------------------
def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a per-batch-item tensor ``(B,)`` with ``reduction`` in {"mean", "sum", "none"}."""
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def _check_reduction(reduction: LossReduction | str) -> str:
    """Validate ``reduction`` (a string or MONAI's ``LossReduction``) and return its string value."""
    value = getattr(reduction, "value", reduction)
    if value not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
    return value


def _check_spatial(x: torch.Tensor, spatial_dims: int, name: str) -> None:
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"{name} must have shape (B, C, *spatial) with {spatial_dims} spatial dims, got shape {tuple(x.shape)}."
        )


def box_sum(x: torch.Tensor, kernel_size: Sequence[int]) -> torch.Tensor:
    """Local window sums of ``x`` (box filter, zero padding, output the size of the input).

    The filter is separable: along each axis, the sum of ``k`` shifted slices of the padded input (a 1D
    convolution with ones, as ``k - 1`` additions: forward and backward about 3x faster on a CPU than
    ``conv3d``, whose one-channel 1D kernels take PyTorch's unvectorised ``slow_conv3d``). Even windows are
    padded like TensorFlow's ``"SAME"`` (``(k - 1) // 2`` before, the rest after), as in the released code.

    Args:
        x: ``(B, C, *spatial)``, 1 to 3 spatial dims; channels are filtered independently.
        kernel_size: window length per spatial axis.

    Returns:
        ``(B, C, *spatial)``: the sum over the window around every voxel.
    """
    spatial_dims = x.ndim - 2
    out = x
    for axis, k in enumerate(kernel_size):
        if k == 1:
            continue
        before = (k - 1) // 2
        pad = [0, 0] * spatial_dims
        # F.pad lists pads from the last axis backwards
        idx = 2 * (spatial_dims - 1 - axis)
        pad[idx], pad[idx + 1] = before, k - 1 - before
        padded = F.pad(out, pad)
        n = out.shape[2 + axis]
        out = padded.narrow(2 + axis, 0, n)
        for shift in range(1, k):
            out = out + padded.narrow(2 + axis, shift, n)
    return out


# Why a local NCC of our own beside MONAI's LocalNormalizedCrossCorrelationLoss: the released RAN code
# (and so the shipped weights' recipe) uses an even window (8), which MONAI refuses ("kernel_size must be
# odd"), averages only inside a mask of the fixed image, and pools the channels; MONAI's loss has no mask
# and averages channel by channel. Where both apply (odd window, no mask, one channel) they agree:
# tests/test_losses.py::test_local_ncc_equals_monai_lncc_for_odd_windows_without_mask.
def local_ncc(
    pred: torch.Tensor,
    target: torch.Tensor,
    kernel_size: Sequence[int],
    mask: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Masked mean of the squared local normalised cross-correlation, per batch item.

    ``cc = cross^2 / (var_I * var_J + eps)`` with window sums (see :func:`box_sum`) as in the
    released RAN/VoxelMorph code; channels are pooled (cross and variances summed over ``C``).
    ``cc`` lies in ``[0, 1]``; it is 1 where ``pred`` is locally an affine function of ``target``.

    Args:
        pred: ``(B, C, *spatial)``, e.g. the warped moving image.
        target: ``(B, C, *spatial)``, the fixed image.
        kernel_size: window length per spatial axis.
        mask: ``(B, 1, *spatial)`` (or broadcastable) weights/booleans; ``None`` averages over all voxels.
        eps: added to the variance product in the denominator.

    Returns:
        ``(B,)``: mean ``cc`` over the (masked) voxels; 0 for an item whose mask is empty.
    """
    win = float(math.prod(kernel_size))
    i_sum = box_sum(pred, kernel_size)
    j_sum = box_sum(target, kernel_size)
    i2_sum = box_sum(pred * pred, kernel_size)
    j2_sum = box_sum(target * target, kernel_size)
    ij_sum = box_sum(pred * target, kernel_size)
    cross = (ij_sum - i_sum * j_sum / win).sum(1)
    i_var = (i2_sum - i_sum * i_sum / win).sum(1)
    j_var = (j2_sum - j_sum * j_sum / win).sum(1)
    cc = cross * cross / (i_var * j_var + eps)  # (B, *spatial)
    dims = tuple(range(1, cc.ndim))
    if mask is None:
        return cc.mean(dims)
    m = mask.to(cc.dtype).expand(cc.shape[0], 1, *cc.shape[1:]).sum(1)  # (B, *spatial)
    return (cc * m).sum(dims) / m.sum(dims).clamp_min(1.0)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per batch item, optionally restricted to a mask.

    Args:
        pred: ``(B, C, *spatial)``.
        target: ``(B, C, *spatial)``.
        mask: ``(B, 1, *spatial)`` (or broadcastable) weights/booleans; ``None`` uses every voxel.

    Returns:
        ``(B,)``: mean of ``(pred - target)^2`` over channels and (masked) voxels; 0 for an empty mask.
    """
    sq = (pred - target) ** 2
    dims = tuple(range(1, sq.ndim))
    if mask is None:
        return sq.mean(dims)
    m = mask.to(sq.dtype).expand_as(sq)
    return (sq * m).sum(dims) / m.sum(dims).clamp_min(1.0)


# MIND-SSC (Heinrich et al., "Towards realtime multimodal fusion for image-guided interventions using
# self-similarity", MICCAI 2013): MONAI 1.6.1 has no MIND, so it is written here once, after its definition.
#: the six face neighbours of a voxel (unit offsets)
_SIX = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
#: the 12 pairs of six-neighbours at distance sqrt(2) from each other (neither equal nor opposite)
MIND_SSC_PAIRS = tuple(
    (a, b)
    for i, a in enumerate(_SIX)
    for b in _SIX[i + 1 :]
    if sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) == 2
)


def _shift(x: torch.Tensor, offset: Sequence[int]) -> torch.Tensor:
    """``y(p) = x(p + offset)`` of ``(B, C, D, H, W)``, the border voxel repeated outside the image."""
    pad = max(abs(o) for o in offset)
    if pad == 0:
        return x
    padded = F.pad(x, [pad] * 6, mode="replicate")
    d, h, w = x.shape[2:]
    o = [pad + k for k in offset]
    return padded[:, :, o[0] : o[0] + d, o[1] : o[1] + h, o[2] : o[2] + w]


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2, eps: float = 1e-3) -> torch.Tensor:
    """MIND-SSC descriptors (modality independent neighbourhood descriptor, self-similarity context) of a 3-D image.

    For each of the 12 pairs ``(a, b)`` of :data:`MIND_SSC_PAIRS` (six-neighbourhood offsets at distance
    ``sqrt(2)``, scaled by ``dilation`` voxels), the patch distance
    ``D_ab(p) = mean over the (2 radius + 1)^3 patch around p of (I(q + dilation a) - I(q + dilation b))^2``;
    then ``D' = D - min_ab D`` and ``MIND_ab(p) = exp(-D'_ab(p) / V(p))`` with the variance estimate
    ``V(p) = mean_ab D'_ab(p)``, clamped to ``[eps, 1/eps]`` times its mean over the image (the form of the
    Learn2Reg reference code, which ConvexAdam uses). Each descriptor depends only on local intensity differences
    within one image, so descriptors of two contrasts of the same anatomy can be compared by SSD.

    Args:
        image: ``(B, 1, D, H, W)``.
        radius: patch radius (voxels).
        dilation: distance of the neighbours (voxels).
        eps: relative clamp of the variance estimate.

    Returns:
        ``(B, 12, D, H, W)`` in ``(0, 1]``.
    """
    _check_spatial(image, 3, "image")
    k = 2 * radius + 1
    distances = []
    for a, b in MIND_SSC_PAIRS:
        diff = _shift(image, [dilation * v for v in a]) - _shift(image, [dilation * v for v in b])
        distances.append(diff.square())
    d = torch.cat(distances, dim=1)
    d = F.avg_pool3d(F.pad(d, [radius] * 6, mode="replicate"), k, stride=1)
    d = d - d.amin(dim=1, keepdim=True)
    var = d.mean(dim=1, keepdim=True)
    scale = var.mean()
    var = var.clamp(min=float(scale) * eps, max=float(scale) / eps).clamp_min(1e-12)
    return torch.exp(-d / var)


def mind_ssd(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Masked mean over voxels of the mean squared difference of two descriptor maps ``(B, C, *spatial)``
    (e.g. :func:`mind_ssc` of the warped moving and of the fixed image), per batch item ``(B,)``; lower is better.
    ``mask``: ``(B, 1, *spatial)`` weights; ``None`` averages over all voxels."""
    ssd = (pred - target).square().mean(1)  # (B, *spatial)
    dims = tuple(range(1, ssd.ndim))
    if mask is None:
        return ssd.mean(dims)
    m = mask.to(ssd.dtype).expand(ssd.shape[0], 1, *ssd.shape[1:]).sum(1)
    return (ssd * m).sum(dims) / m.sum(dims).clamp_min(1e-6)


def spatial_diffs(x: torch.Tensor, pad_first: bool = False) -> list[torch.Tensor]:
    """Finite differences of ``x`` along every spatial axis, zero-padded back to the input size.

    All the returned tensors have the shape of ``x``, whatever the (odd or even) sizes, so that
    differences along different axes and per-voxel weights line up voxel by voxel.

    Args:
        x: ``(B, C, *spatial)``.
        pad_first: ``False``: forward differences ``x[k+1] - x[k]`` stored at ``k``, 0 in the last
            slice (Neumann boundary). ``True``: the same differences stored at ``k + 1``, 0 in the
            first slice (the released code's ``_eq_diffs``).

    Returns:
        list of ``d`` tensors ``(B, C, *spatial)``, item ``i`` for array axis ``i``.
    """
    out = []
    spatial_dims = x.ndim - 2
    for axis in range(spatial_dims):
        dim = axis + 2
        n = x.shape[dim]
        diff = x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)
        pad = [0, 0] * spatial_dims
        idx = 2 * (spatial_dims - 1 - axis) + (0 if pad_first else 1)
        pad[idx] = 1
        out.append(F.pad(diff, pad))
    return out


def edge_weights(image: torch.Tensor, edge_weight: float, mode: str = "paper") -> torch.Tensor:
    """Per-voxel edge-aware weights of the smoothness term, small on strong edges of ``image``.

    - ``"paper"`` (eq. 13): ``w = exp(-s * ||grad I||^2)`` with forward differences.
    - ``"code"`` (released code): ``w = exp(-s * sum_axes sum_C (dI)^2 / sum_C (0.2 + I)^2)``
      with the code's differences (see ``pad_first`` of :func:`spatial_diffs`).

    Args:
        image: ``(B, C, *spatial)``, the fixed image (intensities about [0, 1]).
        edge_weight: ``s`` above (paper 1; released code 25 for abdomen CT, 9 for lung CT).
        mode: ``"paper"`` or ``"code"``.

    Returns:
        ``(B, 1, *spatial)`` weights in ``(0, 1]``.
    """
    grads = spatial_diffs(image, pad_first=(mode == "code"))
    sq = torch.stack([(g * g).sum(1, keepdim=True) for g in grads]).sum(0)
    if mode == "code":
        sq = sq / ((0.2 + image) ** 2).sum(1, keepdim=True)
    return torch.exp(-edge_weight * sq)


def edge_aware_smoothness(
    ddf: torch.Tensor,
    image: torch.Tensor | None = None,
    p: int = 2,
    edge_weight: float = 1.0,
    mode: str = "paper",
) -> torch.Tensor:
    """Edge-aware gradient penalty of a DDF, per batch item.

    With ``D_i u`` the differences of :func:`spatial_diffs` and ``w`` the weights of :func:`edge_weights`:

    - ``"paper"``: mean of ``|D_i u_c * w|^p`` (the weight sits inside the norm, eq. 13 for p=2);
    - ``"code"``:  mean of ``|D_i u_c|^p * w`` (the released ``Grad`` loss for p=1).

    The mean runs over the ``d`` axes, the ``d`` components and all voxels, so that it is
    ``1 / d^2`` times the per-voxel ``||grad u * w||_p^p`` and the loss weights of the released
    code keep their meaning. ``image=None`` gives plain (unweighted) gradient smoothness.

    Args:
        ddf: ``(B, d, *spatial)``.
        image: ``(B, C, *spatial)`` fixed image, or ``None``.
        p: 1 or 2.
        edge_weight: ``s`` of :func:`edge_weights`.
        mode: ``"paper"`` or ``"code"``.

    Returns:
        ``(B,)``.
    """
    diffs = spatial_diffs(ddf, pad_first=(mode == "code"))
    w = None if image is None else edge_weights(image, edge_weight, mode)
    terms = []
    for d in diffs:
        if w is None:
            t = d.abs() ** p
        elif mode == "paper":
            t = (d * w).abs() ** p
        else:
            t = d.abs() ** p * w
        terms.append(t.mean(dim=tuple(range(1, t.ndim))))
    return torch.stack(terms).mean(0)


# ----------------------------------------------------------------------------------------------
# loss modules
# ----------------------------------------------------------------------------------------------
class LocalNCCLoss(_Loss):
    """Negative masked squared local NCC of the RAN paper and released code (``NCC`` class).

    ``loss = -mean over voxels with fixed > mask_threshold of cc`` with
    ``cc = cross^2 / (var_I * var_J + eps)`` over a box window (see :func:`local_ncc`).
    A perfect (locally affine) match gives -1; unrelated images give values near 0.

    Args:
        spatial_dims: number of spatial dims, 1, 2 or 3.
        kernel_size: window length, an int for every axis or one per axis. Default 9; the
            released code uses 8.
        mask_threshold: average only where any channel of the fixed image exceeds it
            (released code 0.1 for abdomen CT); ``None`` averages over every voxel.
        eps: added to the variance product.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the batch (``"none"`` returns ``(B,)``).

    Example::

        loss = LocalNCCLoss(spatial_dims=3, kernel_size=8)(warped, fixed)
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        kernel_size: int | Sequence[int] = 9,
        mask_threshold: float | None = 0.1,
        eps: float = 1e-5,
        reduction: LossReduction | str = "mean",
    ) -> None:
        super().__init__(reduction=_check_reduction(reduction))
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        ks = [kernel_size] * spatial_dims if isinstance(kernel_size, int) else list(kernel_size)
        if len(ks) != spatial_dims or any(int(k) != k or k < 1 for k in ks):
            raise ValueError(f"kernel_size must be a positive int or {spatial_dims} ints, got {kernel_size}.")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}.")
        self.spatial_dims = spatial_dims
        self.kernel_size = tuple(int(k) for k in ks)
        self.mask_threshold = mask_threshold
        self.eps = eps

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: ``(B, C, *spatial)`` warped moving image.
            target: ``(B, C, *spatial)`` fixed image; also defines the mask.

        Returns:
            scalar, or ``(B,)`` with ``reduction="none"``.
        """
        _check_spatial(input, self.spatial_dims, "input")
        if input.shape != target.shape:
            raise ValueError(f"input and target shapes differ: {tuple(input.shape)}, {tuple(target.shape)}.")
        mask = None
        if self.mask_threshold is not None:
            mask = (target > self.mask_threshold).any(1, keepdim=True)
        return _reduce(-local_ncc(input, target, self.kernel_size, mask, self.eps), self.reduction)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, mask_threshold={self.mask_threshold}, eps={self.eps}"


class MaskedMSELoss(_Loss):
    """Mean squared error restricted to voxels where the fixed image exceeds a threshold.

    The released code uses it for lung CT with threshold 0.01.

    Args:
        mask_threshold: average only where any channel of the fixed image (``target``) exceeds it;
            ``None`` (default) is the plain MSE.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the batch.
    """

    def __init__(self, mask_threshold: float | None = None, reduction: LossReduction | str = "mean") -> None:
        super().__init__(reduction=_check_reduction(reduction))
        self.mask_threshold = mask_threshold

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: ``(B, C, *spatial)`` warped moving image (or any prediction).
            target: ``(B, C, *spatial)`` fixed image (or any reference).

        Returns:
            scalar, or ``(B,)`` with ``reduction="none"``.
        """
        if input.shape != target.shape:
            raise ValueError(f"input and target shapes differ: {tuple(input.shape)}, {tuple(target.shape)}.")
        mask = None
        if self.mask_threshold is not None:
            mask = (target > self.mask_threshold).any(1, keepdim=True)
        return _reduce(masked_mse(input, target, mask), self.reduction)

    def extra_repr(self) -> str:
        return f"mask_threshold={self.mask_threshold}"


class EdgeAwareSmoothnessLoss(_Loss):
    """Edge-aware smoothness of a DDF, the regulariser of the RAN paper (eq. 13) and released code.

    - ``mode="paper"``: mean of ``|grad u * exp(-s ||grad I_fixed||^2)|^p`` (eq. 13: p=2, s=1).
    - ``mode="code"``: mean of ``|grad u|^p * exp(-s sum (dI)^2 / (0.2 + I)^2)`` (released code:
      p=1, s=25 abdomen, s=9 lung).

    See :func:`edge_aware_smoothness` for the exact normalisation. Without a fixed image the
    loss is the plain mean ``|grad u|^p``. The loss is 0 for a constant (translation) field.

    Args:
        spatial_dims: number of spatial dims, 1, 2 or 3.
        p: 1 (L1) or 2 (squared L2).
        edge_weight: ``s``; ``None`` picks 1.0 for ``"paper"`` and 25.0 (abdomen) for ``"code"``.
        mode: ``"paper"`` or ``"code"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the batch.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        p: int = 2,
        edge_weight: float | None = None,
        mode: str = "paper",
        reduction: LossReduction | str = "mean",
    ) -> None:
        super().__init__(reduction=_check_reduction(reduction))
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p}.")
        if mode not in SMOOTHNESS_MODES:
            raise ValueError(f"mode must be one of {SMOOTHNESS_MODES}, got {mode!r}.")
        if edge_weight is None:
            edge_weight = 1.0 if mode == "paper" else 25.0
        if edge_weight < 0:
            raise ValueError(f"edge_weight must be non-negative, got {edge_weight}.")
        self.spatial_dims = spatial_dims
        self.p = p
        self.edge_weight = float(edge_weight)
        self.mode = mode

    def forward(self, ddf: torch.Tensor, fixed_image: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            ddf: ``(B, spatial_dims, *spatial)`` displacement in voxels.
            fixed_image: ``(B, C, *spatial)`` or ``None`` for unweighted smoothness.

        Returns:
            scalar, or ``(B,)`` with ``reduction="none"``.
        """
        _check_spatial(ddf, self.spatial_dims, "ddf")
        if fixed_image is not None and fixed_image.shape[2:] != ddf.shape[2:]:
            raise ValueError(
                f"fixed_image spatial shape {tuple(fixed_image.shape[2:])} differs from ddf's {tuple(ddf.shape[2:])}."
            )
        values = edge_aware_smoothness(ddf, fixed_image, self.p, self.edge_weight, self.mode)
        return _reduce(values, self.reduction)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, p={self.p}, edge_weight={self.edge_weight}, mode={self.mode}"


def similarity_loss(name: str, spatial_dims: int = 3, **kwargs) -> _Loss:
    """Build an image similarity loss by name.

    Args:
        name: ``"ncc"`` (:class:`LocalNCCLoss`, the paper's), ``"lncc"`` (MONAI's
            :class:`~monai.losses.LocalNormalizedCrossCorrelationLoss`) or ``"mse"``
            (:class:`MaskedMSELoss`).
        spatial_dims: passed to ``"ncc"`` and ``"lncc"``; ignored by ``"mse"``.
        kwargs: the remaining constructor arguments of the chosen class.

    Every returned loss is called as ``loss(warped, fixed)`` and is lower for a better match.
    """
    key = name.lower()
    if key == "ncc":
        return LocalNCCLoss(spatial_dims, **kwargs)
    if key == "lncc":
        from monai.losses import LocalNormalizedCrossCorrelationLoss

        return LocalNormalizedCrossCorrelationLoss(spatial_dims=spatial_dims, **kwargs)
    if key == "mse":
        return MaskedMSELoss(**kwargs)
    raise ValueError(f"name must be one of 'ncc', 'lncc', 'mse', got {name!r}.")


def folding_penalty(ddf: torch.Tensor) -> torch.Tensor:
    """Mean of ``relu(-det(I + grad u))`` over the voxels and batch of a ``(B, d, *spatial)`` voxel DDF: zero for a
    field that folds nowhere, growing with how much and where it folds (the determinant of
    :func:`ran_bundle.metrics.jacobian_determinant_differentiable`, central differences)."""
    return torch.relu(-jacobian_determinant_differentiable(ddf)).mean()


def end_point_error(ddf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean end-point error ``mean ||ddf - target||_2`` over the voxels and batch of two ``(B, d, *spatial)``
    displacements, in their unit (voxels). The Euclidean norm per voxel, not its square: large local
    disagreements (a teacher's mistakes) weigh linearly, as in optical-flow training."""
    if ddf.shape != target.shape:
        raise ValueError(f"ddf and target shapes differ: {tuple(ddf.shape)}, {tuple(target.shape)}.")
    return (ddf - target).square().sum(dim=1).add(1e-12).sqrt().mean()


class RegistrationLoss(_Loss):
    """Weighted training objective of unsupervised registration (paper eq. 13 plus optional Dice).

    ``total = sim_weight * similarity(warped, fixed) + smooth_weight * smoothness(ddf, fixed)
    + dice_weight * DiceLoss(warped_label, fixed_label) + fold_weight * folding_penalty(ddf)
    + field_weight * end_point_error(ddf, target_ddf)``

    with MONAI's :class:`~monai.losses.DiceLoss` (soft Dice of the foreground channels, smoothing 1e-5,
    averaged over labels and batch items; a ``(B, 1, *spatial)`` integer ``fixed_label`` is made one-hot).

    The defaults are the released abdomen CT recipe: ``2 * (-NCC, window 8, mask > 0.1)
    + 0.5 * smooth(code form, p=1, s=25)``, no Dice. ``forward`` returns the scalar total and
    stores the detached terms as floats in :attr:`last_terms` (keys ``"similarity"``,
    ``"smoothness"``, ``"dice"`` (only with labels and ``dice_weight > 0``) and ``"total"``)
    for logging; :meth:`terms` returns the same as tensors, without side effects.

    Args:
        spatial_dims: number of spatial dims, 1, 2 or 3.
        similarity: a loss called as ``similarity(warped, fixed)``, or a name for
            :func:`similarity_loss` (built with default arguments, except window 8 for ``"ncc"``).
        smoothness: a loss called as ``smoothness(ddf, fixed)``; ``None`` builds
            ``EdgeAwareSmoothnessLoss(spatial_dims, p=1, edge_weight=25, mode="code")``.
        sim_weight: weight of the similarity term.
        smooth_weight: weight of the smoothness term.
        dice_weight: weight of the Dice loss of the labels (foreground channels); 0 = off.
        fold_weight: weight of :func:`folding_penalty` (not in the paper; it removes the folding that a Dice
            term drives the network to); 0 = off.
        field_weight: weight of :func:`end_point_error` to a target field (a teacher's, see
            :mod:`ran_bundle.distillation`), used when one is given; 0 = off.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        similarity: str | _Loss = "ncc",
        smoothness: _Loss | None = None,
        sim_weight: float = 2.0,
        smooth_weight: float = 0.5,
        dice_weight: float = 0.0,
        fold_weight: float = 0.0,
        field_weight: float = 0.0,
    ) -> None:
        super().__init__()
        weights = {
            "sim_weight": sim_weight,
            "smooth_weight": smooth_weight,
            "dice_weight": dice_weight,
            "fold_weight": fold_weight,
            "field_weight": field_weight,
        }
        for arg, value in weights.items():
            if value < 0:
                raise ValueError(f"{arg} must be non-negative, got {value}.")
        if isinstance(similarity, str):
            kwargs = {"kernel_size": 8} if similarity.lower() == "ncc" else {}
            similarity = similarity_loss(similarity, spatial_dims, **kwargs)
        if smoothness is None:
            smoothness = EdgeAwareSmoothnessLoss(spatial_dims, p=1, edge_weight=25.0, mode="code")
        self.spatial_dims = spatial_dims
        self.similarity = similarity
        self.smoothness = smoothness
        self.sim_weight = float(sim_weight)
        self.smooth_weight = float(smooth_weight)
        self.dice_weight = float(dice_weight)
        self.fold_weight = float(fold_weight)
        self.field_weight = float(field_weight)
        from monai.losses import DiceLoss

        self.dice = DiceLoss(include_background=False, smooth_nr=1e-5, smooth_dr=1e-5)
        self.last_terms: dict[str, float] = {}

    def terms(
        self,
        warped: torch.Tensor,
        fixed: torch.Tensor,
        ddf: torch.Tensor,
        warped_label: torch.Tensor | None = None,
        fixed_label: torch.Tensor | None = None,
        target_ddf: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The unweighted terms and the weighted ``"total"`` as scalar tensors (see :meth:`forward`)."""
        out = {"similarity": self.similarity(warped, fixed), "smoothness": self.smoothness(ddf, fixed)}
        total = self.sim_weight * out["similarity"] + self.smooth_weight * out["smoothness"]
        if self.dice_weight > 0 and warped_label is not None and fixed_label is not None:
            n = warped_label.shape[1]
            if fixed_label.shape[1] == 1 and n > 1:
                from monai.networks import one_hot

                fixed_label = one_hot(fixed_label.long(), n, dtype=warped_label.dtype)
            out["dice"] = self.dice(warped_label, fixed_label)
            total = total + self.dice_weight * out["dice"]
        if self.fold_weight > 0:
            out["folding"] = folding_penalty(ddf)
            total = total + self.fold_weight * out["folding"]
        if self.field_weight > 0 and target_ddf is not None:
            out["field"] = end_point_error(ddf, target_ddf)
            total = total + self.field_weight * out["field"]
        out["total"] = total
        return out

    def forward(
        self,
        warped: torch.Tensor,
        fixed: torch.Tensor,
        ddf: torch.Tensor,
        warped_label: torch.Tensor | None = None,
        fixed_label: torch.Tensor | None = None,
        target_ddf: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            warped: ``(B, C, *spatial)`` moving image warped by ``ddf``.
            fixed: ``(B, C, *spatial)`` fixed image.
            ddf: ``(B, d, *spatial)`` predicted displacement in voxels.
            warped_label: ``(B, N, *spatial)`` warped one-hot moving labels (soft), optional.
            fixed_label: ``(B, N, *spatial)`` one-hot or ``(B, 1, *spatial)`` integer fixed labels, optional.
            target_ddf: ``(B, d, *spatial)`` a target displacement in voxels (a teacher's), optional.

        Returns:
            the scalar total loss; the terms are in :attr:`last_terms`.
        """
        out = self.terms(warped, fixed, ddf, warped_label, fixed_label, target_ddf)
        self.last_terms = {k: float(v.detach()) for k, v in out.items()}
        return out["total"]

    def extra_repr(self) -> str:
        return (
            f"sim_weight={self.sim_weight}, smooth_weight={self.smooth_weight}, dice_weight={self.dice_weight}, "
            f"fold_weight={self.fold_weight}, field_weight={self.field_weight}"
        )


class SyntheticFieldLoss(_Loss):
    """Loss of the synthetic pre-training stage, where the true DDF is known.

    ``total = image_weight * MSE(warped, fixed) + field_weight * MSE(ddf, true_ddf)
    + smooth_weight * smoothness(ddf, fixed)`` (released recipe: 0.1, 1, 1). Like
    :class:`RegistrationLoss`, ``forward`` returns the total and stores the float terms
    (``"image"``, ``"field"``, ``"smoothness"``, ``"total"``) in :attr:`last_terms`.

    Args:
        spatial_dims: number of spatial dims, 1, 2 or 3.
        image_weight: weight of the image MSE.
        field_weight: weight of the DDF MSE (voxel units, both fields on the fixed grid).
        smooth_weight: weight of the smoothness term.
        smoothness: called as ``smoothness(ddf, fixed)``; ``None`` builds
            ``EdgeAwareSmoothnessLoss(spatial_dims, p=1, edge_weight=25, mode="code")``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        image_weight: float = 0.1,
        field_weight: float = 1.0,
        smooth_weight: float = 1.0,
        smoothness: _Loss | None = None,
    ) -> None:
        super().__init__()
        for arg, value in (
            ("image_weight", image_weight),
            ("field_weight", field_weight),
            ("smooth_weight", smooth_weight),
        ):
            if value < 0:
                raise ValueError(f"{arg} must be non-negative, got {value}.")
        self.spatial_dims = spatial_dims
        self.image_weight = float(image_weight)
        self.field_weight = float(field_weight)
        self.smooth_weight = float(smooth_weight)
        if smoothness is None:
            smoothness = EdgeAwareSmoothnessLoss(spatial_dims, p=1, edge_weight=25.0, mode="code")
        self.smoothness = smoothness
        self.last_terms: dict[str, float] = {}

    def forward(
        self, warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor, true_ddf: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            warped: ``(B, C, *spatial)`` moving image warped by the predicted ``ddf``.
            fixed: ``(B, C, *spatial)`` fixed image (the moving image warped by ``true_ddf``).
            ddf: ``(B, d, *spatial)`` predicted displacement in voxels.
            true_ddf: ``(B, d, *spatial)`` the known displacement in voxels.

        Returns:
            the scalar total loss; the terms are in :attr:`last_terms`.
        """
        if ddf.shape != true_ddf.shape:
            raise ValueError(f"ddf and true_ddf shapes differ: {tuple(ddf.shape)}, {tuple(true_ddf.shape)}.")
        out = {
            "image": F.mse_loss(warped, fixed),
            "field": F.mse_loss(ddf, true_ddf),
            "smoothness": self.smoothness(ddf, fixed),
        }
        out["total"] = (
            self.image_weight * out["image"] + self.field_weight * out["field"] + self.smooth_weight * out["smoothness"]
        )
        self.last_terms = {k: float(v.detach()) for k, v in out.items()}
        return out["total"]

    def extra_repr(self) -> str:
        return f"image_weight={self.image_weight}, field_weight={self.field_weight}, smooth_weight={self.smooth_weight}"
