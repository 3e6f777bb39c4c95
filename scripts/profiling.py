"""Cost of a network without running it for real, and the machine line of the reports.

:func:`meta_pass` counts parameters, forward FLOPs and the live tensor bytes of a forward (and a training step) on
the ``meta`` device, at the real size, without compute or memory; :func:`train_step_fn` is the benchmark's training
step (the package's :func:`ran_bundle.engines.registration_train_step` with a cheap loss); :func:`machine_line`
describes the machine. Shared by ``scripts/benchmark.py`` and ``scripts/compare.py``.
"""

from __future__ import annotations

import os
import platform
import weakref
from contextlib import AbstractContextManager

import torch
from torch import nn

from ran_bundle.engines import registration_train_step
from ran_bundle.tensors import autocast_if
from scripts.peers import build_model, n_params

__all__ = ["autocast_ctx", "autocast_kwargs", "benchmark_loss", "train_step_fn", "meta_pass", "machine_line"]


def autocast_ctx(device: str, amp: bool) -> AbstractContextManager:
    """Mixed precision of the benchmarks when ``amp``: bfloat16 on ``"cpu"``, float16 on ``"cuda"``."""
    return autocast_if(amp, device, **autocast_kwargs(device))


def autocast_kwargs(device: str) -> dict:
    """The ``torch.autocast`` arguments of :func:`autocast_ctx`: bfloat16 on ``"cpu"``, float16 on ``"cuda"``."""
    return {"dtype": torch.bfloat16 if device == "cpu" else torch.float16}


def benchmark_loss(warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """MSE(warped, fixed) + 0.01 * mean squared forward difference of the DDF summed over the axes (cheap, any size)."""
    smooth = sum((ddf.diff(dim=d) ** 2).mean() for d in range(2, ddf.ndim))
    return nn.functional.mse_loss(warped, fixed) + 0.01 * smooth


def train_step_fn(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, device: str, amp: bool
) -> torch.Tensor:
    """One training step with :func:`benchmark_loss`: :func:`ran_bundle.engines.registration_train_step`.

    Args:
        model: called as ``model(x)`` -> DDF ``(B, 3, *S)`` (:func:`scripts.peers.build_model`).
        optimizer: the optimiser of ``model``'s parameters.
        x: ``(B, 2, *S)`` moving and fixed images stacked as channels.
        device: ``"cpu"`` or ``"cuda"`` (the autocast type).
        amp: forward under :func:`autocast_ctx`'s autocast.

    Returns:
        The loss, a detached scalar tensor.
    """
    _, loss, _ = registration_train_step(
        model, optimizer, x, benchmark_loss, amp=amp, amp_kwargs=autocast_kwargs(device), device=device
    )
    return loss


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Tracks the bytes of live storages created by dispatched ops; ``peak`` is their maximum.

    A storage counts once however many tensors share it (views, and aliases such as ``detach`` that autograd
    does not call views), and is freed when the last of them is.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._holders: dict[int, int] = {}  # storage id -> number of live tensors seen holding it

    def _release(self, key: int, nbytes: int) -> None:
        self._holders[key] -= 1
        if not self._holders[key]:
            del self._holders[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage._cdata, storage.nbytes()
                if key not in self._holders:
                    self._holders[key] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self._holders[key] += 1
                weakref.finalize(t, self._release, key, nbytes)
        return out


def meta_pass(name: str, size: tuple[int, int, int], train: bool, amp: bool, checkpointing: bool = False) -> dict:
    """Params, forward FLOPs and estimated peak live bytes (forward, and train step) on the meta device.

    Args:
        name: a model of :data:`scripts.peers.ALL_MODELS`.
        size: spatial size ``S`` of the input ``(1, 2, *S)``.
        train: also track a training step (:func:`train_step_fn`).
        amp: mixed precision. Autocast does not act on ``meta`` tensors, so the model and input are cast to
            bfloat16 instead: every activation in half precision, as autocast makes those of the convolutions
            (the few ops autocast keeps in float32, reductions and the loss, make the real figure slightly
            higher).
        checkpointing: the RAN presets' activation checkpointing.

    Returns:
        ``{"params", "param_bytes", "flops", "fwd_bytes"[, "train_bytes"]}``; ``"meta_error"`` (and no FLOPs) when
        the model cannot run on the meta device, ``"meta_train_error"`` when its training step cannot.
    """
    from torch.utils.flop_counter import FlopCounterMode

    info: dict = {}
    dtype = torch.bfloat16 if amp else torch.float32
    with torch.device("meta"):
        model = build_model(name, checkpointing).to(dtype)
        x = torch.zeros(1, 2, *size, dtype=dtype)
    info["params"] = n_params(model)
    info["param_bytes"] = sum(p.numel() * 4 for p in model.parameters())  # float32, as trained
    try:
        model.eval()
        tracker = _LiveBytes()
        with FlopCounterMode(display=False) as counter, tracker, torch.inference_mode():
            model(x)
        info["flops"] = counter.get_total_flops()
        info["fwd_bytes"] = tracker.peak
    except Exception as exc:  # noqa: BLE001 - any failure: fall back to counting on the real device
        info["meta_error"] = f"{type(exc).__name__}: {exc}"[:200]
        return info
    if train:
        try:
            model.train()
            tracker = _LiveBytes()
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            with tracker:
                train_step_fn(model, opt, x, "cpu", amp=False)
            # Adam state (2 x params) and gradients are created inside the tracked region already
            info["train_bytes"] = tracker.peak
        except Exception as exc:  # noqa: BLE001
            info["meta_train_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return info


def machine_line(device: str) -> str:
    """One line naming the CPU, cores, torch threads, Python, torch and MONAI versions and ``device`` (``"cpu"`` or
    ``"cuda"``, with the GPU's name)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = os.cpu_count()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        import monai

        monai_v = monai.__version__
    except ImportError:
        monai_v = "?"
    dev = "cpu"
    if device == "cuda":
        dev = f"cuda ({torch.cuda.get_device_name()})"
    return (
        f"Machine: {cpu}, {cores} cores, {torch.get_num_threads()} torch threads; "
        f"Python {platform.python_version()}, torch {torch.__version__}, monai {monai_v}; device: {dev}"
    )
