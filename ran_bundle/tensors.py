"""Small tensor helpers shared by the engines, the command-line registration and the atlas transforms."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

__all__ = ["as_plain_tensor", "autocast_if"]


def as_plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a plain ``torch.Tensor``: a MONAI ``MetaTensor`` loses its metadata, anything else is returned as is.

    Args:
        x: a tensor of any shape, e.g. an image ``(C, *S)`` or a batch ``(B, C, *S)``.

    Returns:
        The same data and shape, without metadata (a view, no copy), so network outputs and losses carry no stale
        affines.
    """
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def autocast_if(
    enabled: bool, device: torch.device | str | None, **kwargs: Any
) -> torch.autocast | AbstractContextManager[None]:
    """``torch.autocast`` on the type of ``device`` when ``enabled``, else a context that does nothing.

    Args:
        enabled: whether to autocast (mixed precision).
        device: the device the tensors live on; ``None`` means ``"cuda"`` (ignite's and MONAI's default).
        kwargs: passed to ``torch.autocast`` (``dtype``, ``cache_enabled``).
    """
    if not enabled:
        return nullcontext()
    device_type = torch.device(device).type if device is not None else "cuda"
    return torch.autocast(device_type, **kwargs)
