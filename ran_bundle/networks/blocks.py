"""Building blocks of the Residual Aligner Network (RAN).

Zheng et al., "Residual Aligner-based Network (RAN): Motion-separable structure for coarse-to-fine
discontinuous deformable registration", the paper in ``shared/docs/ran-paper.md``. Details that the paper
leaves open follow the authors' released code, as summarised in ``shared/docs/ran-architecture.md``.

Conventions used by every block:

* tensors are channel-first, ``(B, C, *spatial)`` with ``spatial`` of length ``spatial_dims`` (2 or 3);
* a dense displacement field (DDF) is ``(B, spatial_dims, *spatial)`` in voxels of the grid it lives on,
  channel ``i`` being the displacement along array axis ``i``; ``warp(image, ddf)(x) = image(x + ddf(x))``
  (:func:`ran_bundle.flow.warp`);
* the two image streams (moving/source and fixed/target) share all weights, so they are processed together
  as one batch of ``2B`` samples: rows ``[:B]`` are the moving stream, rows ``[B:]`` the fixed stream.
  For a stream ``s``, ``swap_streams`` gives the other stream at the same rows, and the DDF stored at the
  rows of ``s`` lives on the grid of ``s`` and warps the other stream onto it.

All shape-dependent operations are written with tensor ops on the input's shape, so that a model traced by
``torch.jit.trace`` at one size runs correctly at another.

Over 500 lines because the paper's two modules (Motion-Aware layers, Residual Aligner with its accumulator)
and the fused :class:`ScalarNorm` they use belong together; networks/ builds the nets from them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from monai.networks.layers.factories import Conv, Pool
from torch import nn
from torch.utils.checkpoint import checkpoint

from ran_bundle.flow import shape_tensor, warp

T = TypeVar("T")

__all__ = [
    "ScalarNorm",
    "scalar_norm_reference",
    "conv_nd",
    "resize_nearest_like",
    "swap_streams",
    "run_checkpointed",
    "ResidualBlock",
    "MotionAwareEncoder",
    "SharedHeads",
    "ResidualAligner",
    "HEAD_WEIGHTINGS",
]

HEAD_WEIGHTINGS = ("softmax_confidence", "softmax", "none")
"""How the accumulator weights the heads: the paper's softmax mask times a confidence (default), the softmax
mask alone (confidence weights switched off, paper Table 2), or the raw attribute logits (what the released
checkpoint was trained with). With one head (multi-head off) the softmax over a single head is 1, so
``"softmax_confidence"`` weights the DDF by the confidence alone (paper Table 2's "CW on, MH off" rows),
``"softmax"`` does not weight it, and ``"none"`` weights it by ``relu(theta)`` (the released code's one-head
path)."""


def conv_nd(
    spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1
) -> nn.Module:
    """A ``spatial_dims``-D convolution with bias and "same" zero padding for odd ``kernel_size``."""
    conv_type = Conv[Conv.CONV, spatial_dims]
    return conv_type(
        in_channels, out_channels, kernel_size, padding=dilation * (kernel_size - 1) // 2, dilation=dilation
    )


class _ScalarNormFunction(torch.autograd.Function):
    """:class:`ScalarNorm`'s forward and backward in closed form: ``(x, gamma, beta, eps) -> y``.

    The same function as :func:`scalar_norm_reference`, computed faster on CPU and keeping only ``x`` for the
    backward pass: the statistics in two vectorised passes (``mean``, then the mean of the squared deviations)
    instead of ``torch.std_mean``'s Welford reduction (10-40x slower than a sum on CPU), and the gradients from
    their closed form instead of autograd's graph of ``std_mean``, ``addcmul`` and the broadcast scalars. With
    ``s = gamma / (std + eps)``, ``c = x - mean`` and sums over each sample's ``n`` values,
    ``dL/dx = s * (g - sum(g) / n - c * sum(g * c) / (n * std * (std + eps)))``, ``dL/dgamma = sum(g * c) / (std +
    eps)`` and ``dL/dbeta = sum(g)`` (the term through ``std`` is taken as 0 for a constant sample, ``std = 0``,
    where autograd's gives NaN). Statistics accumulate in float32 at least (bfloat16 inputs under autocast).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
        dims = tuple(range(1, x.ndim))
        mean = x.mean(dim=dims, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
        std = (x - mean).square_().mean(dim=dims, keepdim=True).sqrt_()
        scale = gamma / (std + eps)
        shift = beta - mean * scale
        ctx.save_for_backward(x, gamma, mean, std)
        ctx.eps = eps
        # one full-size output, in ``x``'s dtype (see ScalarNorm.forward)
        return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, gamma, mean, std = ctx.saved_tensors
        dims = tuple(range(1, x.ndim))
        n = x[0].numel()
        denom = std + ctx.eps
        centred = x - mean
        sum_g = grad.sum(dim=dims, keepdim=True, dtype=mean.dtype)
        sum_gc = (grad * centred).sum(dim=dims, keepdim=True)
        grad_x = grad_gamma = grad_beta = None
        if ctx.needs_input_grad[0]:
            scale = gamma / denom
            through_std = -scale * sum_gc / (n * std.clamp_min(torch.finfo(std.dtype).tiny) * denom)
            through_std = torch.where(std > 0, through_std, torch.zeros_like(through_std))
            grad_x = centred.mul_(through_std).add_(-scale * sum_g / n).addcmul_(grad, scale).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_gamma = (sum_gc / denom).sum().reshape(1).to(gamma.dtype)
        if ctx.needs_input_grad[2]:
            grad_beta = sum_g.sum().reshape(1).to(gamma.dtype)
        return grad_x, grad_gamma, grad_beta, None


def scalar_norm_reference(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """:class:`ScalarNorm` written with ``torch.std_mean`` and autograd: the definition, used when tracing (a
    ``torch.jit.trace`` of the fast path would record an opaque Python op) and by the tests."""
    dims = tuple(range(1, x.ndim))
    std, mean = torch.std_mean(x, dim=dims, keepdim=True, correction=0)
    scale = gamma / (std + eps)
    shift = beta - mean * scale
    # one full-size output (autograd keeps only ``x``), in ``x``'s dtype: under autocast the float32
    # gamma and beta would otherwise promote every normalised map to float32
    return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))


class ScalarNorm(nn.Module):
    """The reference normalisation: each sample normalised over all channels and voxels together.

    ``y = (x - mean) / (std + eps) * gamma + beta`` with one scalar ``gamma`` and one scalar ``beta`` per layer
    (a one-group GroupNorm whose affine is a scalar, not per channel). Input and output ``(B, C, *spatial)``.
    Computed by a fused forward and closed-form backward (:class:`_ScalarNormFunction`: the same values as
    :func:`scalar_norm_reference` to float rounding; a ``ref`` training step at 64^3 takes 9-12% and inference 17%
    less CPU time).

    Args:
        eps: added to the (population) standard deviation, 1e-3 as in the reference.
    """

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.jit.is_scripting():
            return scalar_norm_reference(x, self.gamma, self.beta, self.eps)
        return _ScalarNormFunction.apply(x, self.gamma, self.beta, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def run_checkpointed(enabled: bool, function: Callable[..., T], *args) -> T:
    """``function(*args)``; when ``enabled`` and gradients are being recorded, through activation
    checkpointing (``torch.utils.checkpoint``, non-reentrant): the activations inside ``function`` are
    recomputed in the backward pass instead of kept. Results and gradients are unchanged."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def resize_nearest_like(x: torch.Tensor, reference: torch.Tensor, factor: int = 1) -> torch.Tensor:
    """Nearest-neighbour upsampling of ``x`` by an integer ``factor`` to the grid of ``reference``.

    Voxel ``j`` of the output takes voxel ``j // factor`` of ``x``; voxels past the end of the upsampled
    ``x`` (odd sizes lost by the floor of average pooling) repeat the last one.

    Args:
        x: ``(B, C, *small)``.
        reference: ``(B', C', *large)`` whose spatial size is taken, ``large >= small * factor - factor + 1``.
        factor: the ratio of the two grids' pool sizes.

    Returns:
        ``(B, C, *large)``.
    """
    for axis in range(2, x.ndim):
        last = shape_tensor(x)[axis] - 1
        index = torch.div(torch.arange(reference.shape[axis], device=x.device), factor, rounding_mode="floor")
        x = x.index_select(axis, torch.minimum(index, last.to(x.device)))
    return x


def swap_streams(x: torch.Tensor) -> torch.Tensor:
    """Exchange the two halves of the stream batch: ``(2B, ...) -> (2B, ...)``, moving <-> fixed."""
    half = x.shape[0] // 2
    return torch.cat([x[half:], x[:half]], dim=0)


class ResidualBlock(nn.Module):
    """The reference residual block (paper: U-net with residual structure).

    ``r = lrelu(norm(conv3(x)))``; ``y = lrelu(norm(conv3(r)))``; ``y = norm(conv3_dilated(y))``;
    output ``lrelu(y + r)``. With ``upsample=True`` a stride-2 transposed convolution (``in -> out``
    channels) first doubles the grid, and the output is brought to the grid of ``reference``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        dilations: dilation rates of the three convolutions, ``(1, 1, 3)`` in the reference.
        upsample: double the resolution first.
        negative_slope: LeakyReLU slope, 0.2 in the backbone.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        dilations: tuple[int, int, int] = (1, 1, 3),
        upsample: bool = False,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        self.upsample = None
        if upsample:
            self.upsample = Conv[Conv.CONVTRANS, spatial_dims](in_channels, out_channels, 2, stride=2)
            in_channels = out_channels
        self.convs = nn.ModuleList(
            [
                conv_nd(spatial_dims, in_channels, out_channels, dilation=dilations[0]),
                conv_nd(spatial_dims, out_channels, out_channels, dilation=dilations[1]),
                conv_nd(spatial_dims, out_channels, out_channels, dilation=dilations[2]),
            ]
        )
        self.norms = nn.ModuleList([ScalarNorm() for _ in range(3)])
        self.act = nn.LeakyReLU(negative_slope)

    def forward(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, in, *S) -> (B, out, *S)``, or ``(B, out, *reference.spatial)`` when upsampling."""
        if self.upsample is not None:
            if reference is None:
                raise ValueError("an upsampling ResidualBlock needs the reference grid")
            # the transposed conv gives 2n voxels; an odd finer grid repeats the last one
            x = resize_nearest_like(self.upsample(x), reference)
        r = self.act(self.norms[0](self.convs[0](x)))
        y = self.act(self.norms[1](self.convs[1](r)))
        y = self.norms[2](self.convs[2](y))
        return self.act(y + r)


class MotionAwareEncoder(nn.Module):
    """Encoder of the Motion-Aware FCN, shared by the two streams (paper Sec. 2.3, Fig. 3a).

    Four residual stages, each followed by 2x average pooling; stage ``i`` also gives a skip feature map
    (``conv3 -> lrelu``) at ``1/2**(i+1)`` resolution. Bringing skips up to the resolution where alignment
    happens (the MA step) is left to the network, which knows where each skip is used.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels per stream (1).
        channels: output channels of the four residual stages.
        skip_channels: channels of each stage's skip map.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: tuple[int, ...],
        skip_channels: tuple[int, ...],
    ) -> None:
        super().__init__()
        if len(channels) != len(skip_channels):
            raise ValueError(f"channels {channels} and skip_channels {skip_channels} differ in length")
        self.stages = nn.ModuleList()
        self.skips = nn.ModuleList()
        for out_channels, skip in zip(channels, skip_channels, strict=True):
            self.stages.append(ResidualBlock(spatial_dims, in_channels, out_channels))
            self.skips.append(nn.Sequential(conv_nd(spatial_dims, out_channels, skip), nn.LeakyReLU(0.2)))
            in_channels = out_channels
        self.pool = Pool[Pool.AVG, spatial_dims](kernel_size=2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(2B, in, *S)`` -> skip maps, item ``i`` ``(2B, skip_channels[i], *S // 2**(i+1))``."""
        skips = []
        for stage, skip in zip(self.stages, self.skips, strict=True):
            x = self.pool(stage(x))
            skips.append(skip(x))
        return skips


class SharedHeads(nn.Module):
    """Convolutions that every Residual Aligner module of the reference shares.

    ``ddf_hidden/ddf_out``: the m-head residual DDF from the regressor features; ``attribute_logits``:
    the attribute ``vartheta`` (m channels, after a per-module norm); ``feature_attribute``: the attribute
    used by the feature update; ``attribute_fusion``: second conv of C3; ``ddf_fusion``: second conv of
    C2/C4. Widths follow the reference: ``3**d - d**2`` regressor channels (18 in 3D), ``3**d`` hidden.

    Args:
        spatial_dims: 2 or 3.
        heads: number of heads ``m``; with one head the accumulator fuses whole vectors.
    """

    def __init__(self, spatial_dims: int, heads: int) -> None:
        super().__init__()
        width = regressor_width(spatial_dims)
        self.ddf_hidden = conv_nd(spatial_dims, width, 3**spatial_dims)
        self.ddf_out = conv_nd(spatial_dims, 3**spatial_dims, heads * spatial_dims, kernel_size=1)
        self.attribute_hidden = conv_nd(spatial_dims, width, width)
        self.attribute_logits = conv_nd(spatial_dims, width, heads, kernel_size=1)
        self.feature_attribute = conv_nd(spatial_dims, width, heads, kernel_size=1)
        self.attribute_fusion = conv_nd(spatial_dims, width, heads)
        self.ddf_fusion = conv_nd(spatial_dims, width, 1 if heads > 1 else spatial_dims)


def regressor_width(spatial_dims: int) -> int:
    """Channels inside the regressor, ``3**d - d**2`` as in the reference (18 in 3D, 5 in 2D)."""
    return 3**spatial_dims - spatial_dims**2


class ResidualAligner(nn.Module):
    """One Residual Aligner (RA) module (paper Sec. 3, Fig. 4, eq. 10-12), both directions at once.

    For stream features ``F`` ``(2B, c, *S)``, the previous DDF and attribute map (``None`` for the first
    module, else on this module's grid already), it:

    1. warps the other stream's features (after a 1x1 conv) by the previous DDF;
    2. normalises raw and warped features and regresses, with dilated convolutions (rate ``dilation``),
       an m-head residual DDF ``varphi`` ``(2B, m*d, *S)``, the attribute ``vartheta`` ``(2B, m, *S)`` and a
       feature attribute ``(2B, m, *S)``;
    3. fuses the attributes, ``theta_k = C3([vartheta, theta_{k-1}])``;
    4. accumulates (eq. 11-12): each spatial component separately, the heads weighted by
       ``softmax(theta_k)`` times a confidence ``C1`` (``head_weighting``), plus the head mean, for the
       residual and the previous DDF, fused by ``C2/C4`` into the new DDF, which replaces the previous one;
       clamped to ``+-(2 * size - 1)`` voxels;
    5. updates each stream's features with the other stream warped by the new DDF.

    Args:
        spatial_dims: 2 or 3.
        channels: feature channels ``c`` of both streams.
        dilation: dilation rate of the regressor's first two convolutions.
        shared: the convolutions shared by all modules.
        heads: number of heads ``m`` (1 switches multi-head off).
        first: the first module has no previous DDF or attribute map.
        head_weighting: one of :data:`HEAD_WEIGHTINGS`.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        dilation: int,
        shared: SharedHeads,
        heads: int = 6,
        first: bool = False,
        head_weighting: str = "softmax_confidence",
    ) -> None:
        super().__init__()
        if head_weighting not in HEAD_WEIGHTINGS:
            raise ValueError(f"head_weighting must be one of {HEAD_WEIGHTINGS}, got {head_weighting!r}")
        width = regressor_width(spatial_dims)
        self.spatial_dims = spatial_dims
        self.heads = heads
        self.first = first
        self.head_weighting = head_weighting
        self.dilation = dilation
        self.shared = [shared]  # a list so that the shared module is registered (and counted) once, above
        self.resample = conv_nd(spatial_dims, channels, channels, kernel_size=1)
        self.feature_update = conv_nd(spatial_dims, channels + heads, channels, kernel_size=1)
        self.regressor = nn.ModuleList(
            [
                conv_nd(spatial_dims, 2 * channels, width, dilation=dilation),
                conv_nd(spatial_dims, width, width, dilation=dilation),
                conv_nd(spatial_dims, width, width),
            ]
        )
        inputs = 1 if first else 2
        self.attribute_fusion = conv_nd(spatial_dims, inputs * heads, width)
        stacked = heads + 1 if heads > 1 else 2 * spatial_dims
        self.ddf_fusion = conv_nd(spatial_dims, inputs * stacked, width)
        self.confidence = None
        if head_weighting == "softmax_confidence":
            self.confidence = conv_nd(spatial_dims, heads, 1, kernel_size=1)
        self.norm_features = ScalarNorm()
        self.norm_warped = ScalarNorm()
        self.norm_attribute = ScalarNorm()
        self.norm_fusion = ScalarNorm()
        self.norm_feature_attribute = ScalarNorm()
        self.act = nn.LeakyReLU(0.01)

    def extra_repr(self) -> str:
        return f"dilation={self.dilation}, heads={self.heads}, first={self.first}, weighting={self.head_weighting}"

    def _match(self, features: torch.Tensor, source: torch.Tensor, previous_ddf: torch.Tensor | None) -> torch.Tensor:
        """Stage 1, the regressor's trunk: the source stream resampled, warped by the previous DDF, normalised and
        convolved with ``features``; ``(N, c, *S)`` twice (and ``(N, d, *S)``) -> ``(N, width, *S)``."""
        other = self.resample(source)
        if previous_ddf is not None:
            other = warp(other, previous_ddf)
        x = self.act(self.regressor[0](torch.cat([self.norm_features(features), self.norm_warped(other)], dim=1)))
        return self.act(self.regressor[2](self.act(self.regressor[1](x))) + x)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 2, the regressor's heads: ``(N, width, *S)`` -> m-head residual DDF ``(N, m*d, *S)``, attribute
        ``vartheta`` and feature attribute ``(N, m, *S)``."""
        shared = self.shared[0]
        residual = shared.ddf_out(self.act(shared.ddf_hidden(x)))
        attribute = shared.attribute_logits(self.act(self.norm_attribute(shared.attribute_hidden(x))))
        feature_attribute = self.act(self.norm_feature_attribute(shared.feature_attribute(x)))
        return residual, attribute, feature_attribute

    def head_weights(self, theta: torch.Tensor, confidence_source: torch.Tensor) -> torch.Tensor:
        """Weights of the heads ``(2B, m, *S)`` (paper eq. 12) from the fused attribute ``theta`` and, for the
        confidence C1, the attribute the DDF came with: ``softmax(theta) * relu(C1(confidence_source))``, the
        softmax alone, or ``theta`` itself (``"none"``; ``relu(theta)`` with one head, as the released code)."""
        if self.head_weighting == "none":
            return torch.relu(theta) if self.heads == 1 else theta
        weights = torch.softmax(theta, dim=1)  # all ones with a single head
        if self.confidence is not None:
            weights = weights * torch.relu(self.confidence(self.act(confidence_source)))
        return weights

    def stack_heads(self, ddf: torch.Tensor, theta: torch.Tensor, confidence_source: torch.Tensor) -> torch.Tensor:
        """Per-component stack for the fusion convs: ``(2B, k*d, *S) -> (2B*d, m+1, *S)`` (weighted heads and
        the head mean), or ``(2B, 2d, *S)`` with a single head (the vector and the weighted vector)."""
        if self.heads == 1:
            return torch.cat([ddf, ddf * self.head_weights(theta, confidence_source)], dim=1)
        b, d = ddf.shape[0], self.spatial_dims
        spatial = ddf.shape[2:]
        per_head = ddf.reshape(b, -1, d, *spatial)  # (2B, k, d, *S), k = m or 1 (the previous DDF)
        weights = self.head_weights(theta, confidence_source).unsqueeze(2)
        stacked = torch.cat([per_head * weights, per_head.mean(dim=1, keepdim=True)], dim=1)
        return stacked.transpose(1, 2).reshape(b * d, self.heads + 1, *spatial)

    def _accumulate(
        self,
        residual: torch.Tensor,
        attribute: torch.Tensor,
        previous_ddf: torch.Tensor | None,
        previous_theta: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 3 (eq. 11-12): fuse the attributes and accumulate the heads and the previous DDF into the new
        DDF ``(N, d, *S)`` and attribute ``theta`` ``(N, m, *S)``."""
        shared = self.shared[0]
        fusion_in = attribute if previous_theta is None else torch.cat([attribute, previous_theta], dim=1)
        theta = shared.attribute_fusion(self.act(self.norm_fusion(self.attribute_fusion(fusion_in))))

        stacked = self.stack_heads(residual, theta, attribute)
        if previous_ddf is not None:
            stacked = torch.cat([stacked, self.stack_heads(previous_ddf, theta, previous_theta)], dim=1)
        fused = shared.ddf_fusion(self.act(self.ddf_fusion(stacked)))
        if self.heads > 1:
            fused = fused.reshape(residual.shape[0], self.spatial_dims, *fused.shape[2:])
        return clamp_to_grid(fused), theta

    def _update_features(
        self, features: torch.Tensor, source: torch.Tensor, ddf: torch.Tensor, feature_attribute: torch.Tensor
    ) -> torch.Tensor:
        """Stage 4: ``features`` ``(N, c, *S)`` updated with the source stream warped by the new DDF."""
        update = torch.cat([warp(source, ddf), feature_attribute], dim=1)
        return features + self.act(self.feature_update(update))

    def forward(
        self,
        features: torch.Tensor,
        previous_ddf: torch.Tensor | None,
        previous_theta: torch.Tensor | None,
        one_way: bool = False,
        checkpointing: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``features (2B, c, *S)``, previous DDF ``(2B, d, *S)`` and attribute ``(2B, m, *S)`` (or ``None``)
        -> updated features ``(N, c, *S)``, DDF ``(N, d, *S)``, attribute ``theta`` ``(N, m, *S)``.

        ``N = 2B`` (both streams), or ``N = B`` with ``one_way``: only the fixed stream's rows ``[B:]`` (the
        moving -> fixed DDF and the fixed stream's features), all that the network's last module must give
        for the forward registration; the same values as the corresponding rows of the two-way result.
        With ``checkpointing`` (and gradients recorded) each of the four stages recomputes its activations
        in the backward pass instead of keeping them.
        """
        if (previous_ddf is None) != self.first:
            raise ValueError("only the first RA module runs without a previous DDF")
        source = swap_streams(features)  # at each row, the other stream
        if one_way:
            half = features.shape[0] // 2
            features, source = features[half:], source[half:]
            if previous_ddf is not None and previous_theta is not None:
                previous_ddf, previous_theta = previous_ddf[half:], previous_theta[half:]
        matched = run_checkpointed(checkpointing, self._match, features, source, previous_ddf)
        residual, attribute, feature_attribute = run_checkpointed(checkpointing, self._heads, matched)
        ddf, theta = run_checkpointed(
            checkpointing, self._accumulate, residual, attribute, previous_ddf, previous_theta
        )
        features = run_checkpointed(checkpointing, self._update_features, features, source, ddf, feature_attribute)
        return features, ddf, theta


def clamp_to_grid(ddf: torch.Tensor) -> torch.Tensor:
    """Clamp each component of ``ddf`` ``(B, d, *S)`` to ``+-(2 * S_i - 1)`` voxels, as the reference does."""
    d = ddf.shape[1]
    bound = (shape_tensor(ddf)[2:].to(ddf) * 2 - 1).view(1, d, *([1] * d))
    return torch.maximum(torch.minimum(ddf, bound), -bound)
