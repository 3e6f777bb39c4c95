"""Peer networks of the comparisons: the RAN presets and MONAI's VoxelMorph and LocalNet, built one way.

Besides the peers, the speed-per-FLOP baseline ``conv16`` (:class:`ConvStack`, a plain stack of 16-channel
convolutions with about the FLOPs of ``ref``) and the RAN presets with their CPU speed-ups switched off are built here
too (:data:`RAN_VARIANTS`, e.g. ``ref-contiguous``: the same network and weights in the contiguous memory format), so
that one benchmark run shows each speed-up.

Every model is called as ``net(x)`` with ``x = (B, 2, *S)`` (moving, fixed stacked as channels) and returns the
DDF ``(B, 3, *S)`` in voxels. Used by ``scripts/benchmark.py``, ``scripts/compare.py`` and
``scripts/paper_figures.py``; the peer's training config ``scripts/brain_voxelmorph.json`` names
:class:`VoxelMorphDDF` as ``scripts.peers.VoxelMorphDDF`` (``python -m monai.bundle run`` puts the bundle root on
``sys.path``). MONAI and the RAN are imported when a model
is built, so that importing this module stays cheap (the benchmark's measuring subprocesses).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "RAN_MODELS",
    "VARIANT_SUFFIXES",
    "RAN_VARIANTS",
    "ALL_MODELS",
    "ConvStack",
    "VoxelMorphDDF",
    "build_model",
    "local_net",
    "n_params",
]

#: the RAN presets (:data:`ran_bundle.networks.PRESETS` names) compared with the peers
RAN_MODELS = ("ref", "RAn0", "RAn3", "RAn4", "RAn4+")
#: a RAN preset's name + one of these: the same network and weights with CPU speed-ups off. ``-contiguous``:
#: ``channels_last=False`` (weights and activations in the contiguous memory format instead of ``channels_last_3d``);
#: ``-stdmean``: every ``ScalarNorm`` computed by its definition
#: (:func:`ran_bundle.networks.blocks.scalar_norm_reference`: ``torch.std_mean`` and autograd) instead of the fused
#: function; ``-contiguous-stdmean``: both, the network as it ran before either
VARIANT_SUFFIXES = ("-contiguous", "-stdmean", "-contiguous-stdmean")
RAN_VARIANTS = tuple(f"{name}{suffix}" for name in RAN_MODELS for suffix in VARIANT_SUFFIXES)
#: every model :func:`build_model` builds
ALL_MODELS = (*RAN_MODELS, *RAN_VARIANTS, "voxelmorph", "localnet", "conv16")


class ConvStack(nn.Module):
    """The speed-per-FLOP baseline ``conv16``: a plain stack of 3x3x3 convolutions, ``x (B, 2, *S)`` -> ``(B, 3, *S)``.

    ``Conv3d(2 -> 16)``, ``depth - 2`` times ``Conv3d(16 -> 16)``, ``Conv3d(16 -> 3)`` (bias, "same" padding), each
    but the last followed by ``LeakyReLU(0.2)``; no norms, no dilation, no pooling, no resampling: the convolutions
    oneDNN runs best, at full resolution. With the default ``depth=42`` one forward pass costs
    ``2 * 27 * (2*16 + 40*16*16 + 16*3) = 557,280`` FLOPs per voxel, 1.013x the 550,157 of the ``ref`` preset
    (FlopCounterMode, convolutions only; ``ref``'s count at sizes divisible by 16), so at the same input size the
    two do the same arithmetic and their times compare directly. Weights and activations are kept in
    ``channels_last_3d``, as the RAN does by default (for this stack the two memory formats measured the same within
    noise).

    Args:
        depth: number of convolutions, at least 2.
        channels: width of the hidden convolutions.
    """

    def __init__(self, depth: int = 42, channels: int = 16) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        widths = [2] + [channels] * (depth - 1) + [3]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Conv3d(c_in, c_out, 3, padding=1))
            if i < depth - 1:
                layers.append(nn.LeakyReLU(0.2))
        self.layers = nn.Sequential(*layers)
        self.to(memory_format=torch.channels_last_3d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.contiguous(memory_format=torch.channels_last_3d))


class VoxelMorphDDF(nn.Module):
    """``monai.networks.nets.VoxelMorph`` called as ``net(x)``, ``x = (B, 2, *S)`` (moving, fixed) -> DDF.

    Same computation as ``VoxelMorph.forward`` up to the DDF (backbone, optional half-resolution,
    scaling-and-squaring integration), without the final warp of the moving image.
    """

    def __init__(self) -> None:
        super().__init__()
        from monai.networks.nets import VoxelMorph

        self.vm = VoxelMorph(spatial_dims=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vm = self.vm
        ddf = vm.backbone(x)
        if vm.half_res:
            ddf = nn.functional.interpolate(ddf, scale_factor=0.5, mode="trilinear", align_corners=True) * 2.0
        if vm.diffeomorphic:
            ddf = vm.dvf2ddf(ddf)
        if vm.half_res:
            ddf = nn.functional.interpolate(ddf * 0.5, scale_factor=2.0, mode="trilinear", align_corners=True)
        return ddf


def build_model(name: str, checkpointing: bool = False) -> nn.Module:
    """The network ``name`` (one of :data:`ALL_MODELS`), called as ``net(x)`` with ``x (B, 2, *S)`` -> DDF.

    ``checkpointing`` turns on the RAN presets' activation checkpointing (training steps only).
    """
    preset, suffix = name, ""
    if name in RAN_VARIANTS:
        suffix = next(s for s in sorted(VARIANT_SUFFIXES, key=len, reverse=True) if name.endswith(s))
        preset = name[: -len(suffix)]
    if preset in RAN_MODELS:
        from ran_bundle.networks import ResidualAlignerNetwork

        net = ResidualAlignerNetwork(
            spatial_dims=3,
            preset=preset,
            activation_checkpointing=checkpointing,
            channels_last="contiguous" not in suffix,
        )
        if "stdmean" in suffix:
            _use_reference_norms(net)
        return net
    if name == "conv16":
        return ConvStack()
    if name == "voxelmorph":
        return VoxelMorphDDF()
    if name == "localnet":
        return local_net()
    raise ValueError(f"unknown model {name!r}; choose from {ALL_MODELS}")


def local_net(spatial_dims: int = 3, channels: int = 32, extract_levels: Sequence[int] = (0, 1, 2, 3)) -> nn.Module:
    """MONAI's ``LocalNet`` as a DDF network: ``x (B, 2, *S)`` (moving, fixed) -> ``(B, spatial_dims, *S)`` voxels.

    The defaults are the comparison's peer (32 initial channels, levels 0-3); ``scripts/pretraining_report.py``
    builds ``local_net(3, 8, (3,))`` and ``scripts/probe_input_dependence.py`` ``local_net(2, 16, (3,))``.
    """
    from monai.networks.nets import LocalNet

    return LocalNet(
        spatial_dims=spatial_dims,
        in_channels=2,
        out_channels=spatial_dims,
        num_channel_initial=channels,
        extract_levels=tuple(extract_levels),
    )


def _use_reference_norms(net: nn.Module) -> None:
    """Every ``ScalarNorm`` of ``net`` computed by its definition (``torch.std_mean`` and autograd); same values."""
    from ran_bundle.networks.blocks import ScalarNorm, scalar_norm_reference

    for module in net.modules():
        if isinstance(module, ScalarNorm):
            module.forward = functools.partial(_reference_norm_forward, module, scalar_norm_reference)


def _reference_norm_forward(norm: nn.Module, reference: Callable, x: torch.Tensor) -> torch.Tensor:
    return reference(x, norm.gamma, norm.beta, norm.eps)


def n_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (trainable and frozen)."""
    return sum(p.numel() for p in model.parameters())
