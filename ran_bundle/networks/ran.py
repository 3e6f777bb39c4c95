"""The Residual Aligner Network and its presets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import nn

from ran_bundle.flow import warp
from ran_bundle.networks.blocks import (
    HEAD_WEIGHTINGS,
    MotionAwareEncoder,
    ResidualAligner,
    ResidualBlock,
    SharedHeads,
    conv_nd,
    resize_nearest_like,
    run_checkpointed,
)

__all__ = ["RANConfig", "PRESETS", "preset_config", "RegistrationOutput", "ResidualAlignerNetwork"]


def motion_aware_levels(q: int, levels: int = 4) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Pool-size exponents and dilations of the ``levels + 1`` RA modules for ``q`` MA layers (paper Sec. 2.3).

    ``p_k = 2**(K - q)`` for ``k <= q`` and ``2**(K - k)`` after; dilation ``r_k = 2**max(q - k, 0)``
    (appendix Table 4: RAn0 16,8,4,2,1 / 1,1,1,1,1; RAn3 2,2,2,2,1 / 8,4,2,1,1; RAn4 1,1,1,1,1 / 16,8,4,2,1).

    Returns:
        ``(exponents, dilations)``, the pool size of module ``k`` being ``2**exponents[k]``.
    """
    if not 0 <= q <= levels:
        raise ValueError(f"q must be in [0, {levels}], got {q}")
    exponents = tuple(levels - q if k <= q else levels - k for k in range(levels + 1))
    dilations = tuple(2 ** max(q - k, 0) for k in range(levels + 1))
    return exponents, dilations


@dataclass(frozen=True)
class RANConfig:
    """Topology of a RAN.

    Args:
        encoder_channels: channels of the four encoder stages.
        skip_channels: channels of each stage's skip map.
        decoder_channels: feature channels of the five RA modules (coarse to fine).
        q: number of Motion-Aware layers; sets each module's resolution and dilation.
        first_skips: the first module reads the deepest ``first_skips`` skip maps, concatenated.
        heads: number of DDF heads ``m``; 1 switches multi-head off.
        head_weighting: one of ``"softmax_confidence"`` (paper), ``"softmax"`` (confidence weights off),
            ``"none"`` (the released checkpoint's behaviour). With one head the softmax mask is 1, so
            ``"softmax_confidence"`` is the confidence weights alone (paper Table 2, CW on and MH off) and
            ``"softmax"`` weights nothing.
    """

    encoder_channels: tuple[int, ...] = (8, 16, 16, 32)
    skip_channels: tuple[int, ...] = (16, 16, 16, 16)
    decoder_channels: tuple[int, ...] = (32, 32, 16, 16, 8)
    q: int = 3
    first_skips: int = 2
    heads: int = 6
    head_weighting: str = "softmax_confidence"
    levels: tuple[tuple[int, ...], tuple[int, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.encoder_channels)
        if len(self.skip_channels) != n or len(self.decoder_channels) != n + 1:
            raise ValueError(
                f"need {n} skip and {n + 1} decoder channel counts for {n} encoder stages, got "
                f"skip_channels={self.skip_channels}, decoder_channels={self.decoder_channels}"
            )
        if not 1 <= self.first_skips <= n:
            raise ValueError(f"first_skips must be in [1, {n}], got {self.first_skips}")
        if self.heads < 1:
            raise ValueError(f"heads must be >= 1, got {self.heads}")
        if self.head_weighting not in HEAD_WEIGHTINGS:
            raise ValueError(f"head_weighting must be one of {HEAD_WEIGHTINGS}, got {self.head_weighting!r}")
        object.__setattr__(self, "levels", motion_aware_levels(self.q, n))


PRESETS: dict[str, RANConfig] = {
    # the released code's topology and behaviour: 738,030 parameters in 3D
    "ref": RANConfig(
        encoder_channels=(8, 8, 16, 32),
        decoder_channels=(32, 32, 32, 16, 8),
        q=3,
        first_skips=2,
        head_weighting="none",
    ),
    # appendix Tables 3-4: decoder inputs c0..c4 = first skips, then running features + skip
    "RAn0": RANConfig(skip_channels=(8, 16, 16, 32), q=0, first_skips=1),
    "RAn3": RANConfig(q=3, first_skips=2),
    "RAn4": RANConfig(skip_channels=(12, 12, 12, 12), q=4, first_skips=3),
    "RAn4+": RANConfig(q=4, first_skips=3),
}


def preset_config(preset: str = "ref", **overrides) -> RANConfig:
    """The configuration of a named preset, with fields replaced by ``overrides``.

    The ablation switches of paper Table 2 are overrides: ``head_weighting="softmax"`` (confidence weights
    off), ``heads=1`` (multi-head off; with the default weighting the confidence weights stay on, as in the
    table's CW-only rows), ``q=0/3/4``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[preset]
    if "q" in overrides and "first_skips" not in overrides:
        overrides["first_skips"] = max(1, overrides["q"] - 1)
    return replace(config, **overrides) if overrides else config


class RegistrationOutput(NamedTuple):
    """What the training step needs from one forward pass.

    ddf: ``(B, d, *S)`` moving -> fixed displacement on the fixed grid (voxels).
    backward_ddf: ``(B, d, *S)`` fixed -> moving displacement on the moving grid (voxels).
    warped: ``(B, 1, *S)`` the moving image warped onto the fixed grid.
    """

    ddf: torch.Tensor
    backward_ddf: torch.Tensor
    warped: torch.Tensor


class ResidualAlignerNetwork(nn.Module):
    """Residual Aligner Network (paper Fig. 1): Motion-Aware feature extractor + stacked RA modules.

    ``forward`` takes ONE tensor, the moving and fixed images stacked as two channels ``(B, 2, *S)``
    (moving first), and returns the dense displacement field ``(B, d, *S)`` on the fixed grid in voxels,
    channel ``i`` along array axis ``i``: ``warped(x) = moving(x + ddf(x))``. Any spatial size of at
    least 16 voxels per axis works, odd sizes included.

    Args:
        spatial_dims: 2 or 3.
        preset: ``"ref"`` (released code), ``"RAn0"``, ``"RAn3"``, ``"RAn4"``, ``"RAn4+"``.
        in_channels: channels per image (1).
        activation_checkpointing: in training (grad enabled), recompute the activations of the
            feature extractor, each decoder block and each of the four stages of every RA module in the
            backward pass instead of keeping them (``torch.utils.checkpoint``): less memory for about one
            more forward pass of compute; results and gradients are unchanged.
        channels_last: keep 3-D weights and activations in the ``channels_last_3d`` memory format, which
            oneDNN's CPU convolutions run about 1.6x faster for this network's small channel counts
            (``scripts/benchmark.py``); the values (and the state dict) are the same, only the strides change.
        **overrides: fields of :class:`RANConfig` to change (ablation switches).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        preset: str = "ref",
        in_channels: int = 1,
        activation_checkpointing: bool = False,
        channels_last: bool = True,
        **overrides,
    ) -> None:
        super().__init__()
        self.activation_checkpointing = bool(activation_checkpointing)
        self.channels_last = bool(channels_last) and spatial_dims == 3
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.preset = preset
        self.config = config = preset_config(preset, **overrides)
        exponents, dilations = config.levels
        self.exponents = exponents
        n_levels = len(config.encoder_channels)
        self.min_size = 2**n_levels

        self.encoder = MotionAwareEncoder(spatial_dims, in_channels, config.encoder_channels, config.skip_channels)
        self.shared_heads = SharedHeads(spatial_dims, config.heads)
        # module 0 reads the deepest skips; module k >= 1 reads skip (levels - k) on the previous grid
        self.first_skip_levels = tuple(range(n_levels - config.first_skips, n_levels))
        self.skip_levels = tuple(n_levels - k for k in range(1, n_levels + 1))
        blocks, aligners = [], []
        in_ch = sum(config.skip_channels[i] for i in self.first_skip_levels)
        for k, out_ch in enumerate(config.decoder_channels):
            if k > 0:
                in_ch = config.decoder_channels[k - 1] + config.skip_channels[self.skip_levels[k - 1]]
            upsample = k > 0 and exponents[k] < exponents[k - 1]
            if upsample and exponents[k - 1] - exponents[k] != 1:
                raise ValueError("consecutive RA modules may differ by one resolution level at most")
            blocks.append(ResidualBlock(spatial_dims, in_ch, out_ch, upsample=upsample))
            aligners.append(
                ResidualAligner(
                    spatial_dims,
                    out_ch,
                    dilations[k],
                    self.shared_heads,
                    heads=config.heads,
                    first=k == 0,
                    head_weighting=config.head_weighting,
                )
            )
        self.decoder_blocks = nn.ModuleList(blocks)
        self.aligners = nn.ModuleList(aligners)
        self.output_head = conv_nd(spatial_dims, config.decoder_channels[-1] + spatial_dims, spatial_dims)
        # start close to the identity transform, as VoxelMorph does: tiny weights, zero bias
        nn.init.normal_(self.output_head.weight, std=1e-5)
        nn.init.zeros_(self.output_head.bias)
        if self.channels_last:
            self.to(memory_format=torch.channels_last_3d)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, preset={self.preset!r}, config={self.config}"

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the problem if ``x`` is not ``(B, 2 * in_channels, *S)``."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a (B, {2 * self.in_channels}, *spatial) tensor with {self.spatial_dims} spatial dims, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != 2 * self.in_channels:
            raise ValueError(f"expected moving and fixed stacked as {2 * self.in_channels} channels, got {x.shape[1]}")
        if min(x.shape[2:]) < self.min_size:
            raise ValueError(f"each spatial size must be at least {self.min_size}, got {tuple(x.shape[2:])}")

    def _ddfs(self, x: torch.Tensor, both_directions: bool) -> torch.Tensor:
        """``(B, 2c, *S)`` -> the moving -> fixed DDF ``(B, d, *S)`` on the fixed grid, or with
        ``both_directions`` ``(2B, d, *S)``: rows ``[:B]`` fixed -> moving on the moving grid, rows ``[B:]``
        moving -> fixed. Every module but the last needs both streams; the last one computes only the
        rows asked for."""
        if not torch.jit.is_tracing():
            self.check_input(x)
        c = self.in_channels
        checkpointing = self.activation_checkpointing and self.training  # recompute only when training
        streams = torch.cat([x[:, :c], x[:, c:]], dim=0)  # (2B, c, *S): moving rows, then fixed rows
        if self.channels_last:
            streams = streams.contiguous(memory_format=torch.channels_last_3d)
        skips = run_checkpointed(checkpointing, self.encoder, streams)
        grids = [streams] + skips  # item e: a tensor on the grid of pool size 2**e

        exponents = self.exponents
        last = len(self.aligners) - 1
        ddf = theta = None
        for k, (block, aligner) in enumerate(zip(self.decoder_blocks, self.aligners, strict=True)):
            if k == 0:
                inputs = [
                    resize_nearest_like(skips[i], grids[exponents[0]], 2 ** (i + 1 - exponents[0]))
                    for i in self.first_skip_levels
                ]
                features = run_checkpointed(checkpointing, block, torch.cat(inputs, dim=1))
            else:
                level = self.skip_levels[k - 1]
                skip = resize_nearest_like(skips[level], grids[exponents[k - 1]], 2 ** (level + 1 - exponents[k - 1]))
                features = run_checkpointed(
                    checkpointing, block, torch.cat([features, skip], dim=1), grids[exponents[k]]
                )
                factor = 2 ** (exponents[k - 1] - exponents[k])
                if factor > 1:
                    ddf = resize_nearest_like(ddf, grids[exponents[k]], factor) * factor
                    theta = resize_nearest_like(theta, grids[exponents[k]], factor)
            one_way = k == last and not both_directions
            features, ddf, theta = aligner(features, ddf, theta, one_way=one_way, checkpointing=checkpointing)
        return self.output_head(torch.cat([features, ddf], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 2, *S)`` moving and fixed -> DDF ``(B, d, *S)`` on the fixed grid, in voxels."""
        return self._ddfs(x, both_directions=False)

    def register(self, x: torch.Tensor) -> RegistrationOutput:
        """Both DDFs and the warped moving image for ``x`` ``(B, 2, *S)``; see :class:`RegistrationOutput`."""
        ddf = self._ddfs(x, both_directions=True)
        b = x.shape[0]
        forward_ddf = ddf[b:]
        return RegistrationOutput(forward_ddf, ddf[:b], warp(x[:, : self.in_channels], forward_ddf))
