"""Peer networks of the comparisons: the RAN presets and MONAI's VoxelMorph and LocalNet, built one way.

Every model is called as ``net(x)`` with ``x = (B, 2, *S)`` (moving, fixed stacked as channels) and returns the
DDF ``(B, 3, *S)`` in voxels. Used by ``scripts/benchmark.py``, ``scripts/compare.py`` and
``scripts/paper_figures.py``; a bundle config can name :class:`VoxelMorphDDF` as ``scripts.peers.VoxelMorphDDF``
(``python -m monai.bundle run`` puts the bundle root on ``sys.path``). MONAI and the RAN are imported when a model
is built, so that importing this module stays cheap (the benchmark's measuring subprocesses).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RAN_MODELS", "ALL_MODELS", "VoxelMorphDDF", "build_model", "n_params"]

#: the RAN presets (:data:`ran_bundle.networks.PRESETS` names) compared with the peers
RAN_MODELS = ("ref", "RAn0", "RAn3", "RAn4", "RAn4+")
#: every model :func:`build_model` builds
ALL_MODELS = (*RAN_MODELS, "voxelmorph", "localnet")


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
    if name in RAN_MODELS:
        from ran_bundle.networks import ResidualAlignerNetwork

        return ResidualAlignerNetwork(spatial_dims=3, preset=name, activation_checkpointing=checkpointing)
    if name == "voxelmorph":
        return VoxelMorphDDF()
    if name == "localnet":
        from monai.networks.nets import LocalNet

        return LocalNet(
            spatial_dims=3, in_channels=2, out_channels=3, num_channel_initial=32, extract_levels=(0, 1, 2, 3)
        )
    raise ValueError(f"unknown model {name!r}; choose from {ALL_MODELS}")


def n_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (trainable and frozen)."""
    return sum(p.numel() for p in model.parameters())
