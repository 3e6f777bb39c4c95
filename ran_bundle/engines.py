"""Engine glue between the RAN registration model and MONAI's ignite workflows: the iteration steps.

MONAI's :class:`~monai.engines.SupervisedTrainer` and :class:`~monai.engines.SupervisedEvaluator`
are built for ``image -> label`` segmentation. Registration needs a different iteration: a pair
batch dict (keys of :mod:`ran_bundle.data`) goes in, the network predicts a DDF, and the loss or
the metrics read the *warped* moving image and label. This module holds the iterations that the
bundle configs plug into those engines (the handlers attached to them are in :mod:`ran_bundle.handlers`):

- :func:`prepare_batch`: pair dict -> ``(inputs, targets)`` = ``(cat[moving, fixed], fixed)``;
- :func:`registration_train_step`: the package's one training step (zero_grad, forward, warp, loss,
  non-finite check, backward, optimizer step), which every training loop calls: the trainer steps
  below, and the comparison, benchmark and probe scripts;
- :class:`RegistrationTrainStep`: the trainer's ``iteration_update`` for unsupervised pairs;
- :class:`SyntheticTrainStep`: the same for synthetic pairs with a known field (pretraining);
- :class:`RegistrationEvalStep`: the evaluator's ``iteration_update`` (forward under no_grad, warp
  the moving label with nearest neighbour), whose ``"pred"``/``"label"`` feed
  :class:`~ran_bundle.handlers.MeanDiceOverLabels` through ``from_engine(["pred", "label"])``;
- :class:`SyntheticEvalStep`: the same, passing the batch's true field on;
- :func:`pair_name` / :func:`pair_names`: the names of the registered pairs;
- :func:`check_checkpoint`: the configs' check of a checkpoint before any work.

Shapes: images and labels ``(B, 1, *S)``, DDF ``(B, d, *S)`` in voxels on the fixed grid (the
convention of :mod:`ran_bundle.flow`). The engines are created with ``decollate=False`` so
``engine.state.batch`` and ``engine.state.output`` stay batched dicts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from ignite.engine import Engine

from ran_bundle.flow import warp
from ran_bundle.inputs import check_state_dict_fits, read_state_dict
from ran_bundle.keys import PAIR_KEYS, TRUE_DDF
from ran_bundle.tensors import as_plain_tensor, autocast_if

__all__ = [
    "prepare_batch",
    "pair_name",
    "pair_names",
    "NonFiniteLossError",
    "registration_train_step",
    "RegistrationTrainStep",
    "SyntheticTrainStep",
    "RegistrationEvalStep",
    "SyntheticEvalStep",
    "check_checkpoint",
]

logger = logging.getLogger(__name__)

MOVING, FIXED, MOVING_LABEL, FIXED_LABEL = PAIR_KEYS
_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".gz")


def _to(x: torch.Tensor | None, device: torch.device | str | None, non_blocking: bool = False) -> torch.Tensor | None:
    return None if x is None else as_plain_tensor(x).to(device=device, non_blocking=non_blocking)


def prepare_batch(
    batchdata: Mapping[str, Any],
    device: torch.device | str | None = None,
    non_blocking: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a pair batch into the network input and the registration target.

    Signature of MONAI's ``prepare_batch`` (``default_prepare_batch``), so it can be given to
    ``SupervisedTrainer``/``SupervisedEvaluator``.

    Args:
        batchdata: dict with ``"moving_image"`` and ``"fixed_image"`` ``(B, 1, *S)``.
        device: target device.
        non_blocking: passed to ``Tensor.to``.
        kwargs: other ``Tensor.to`` arguments (ignored).

    Returns:
        ``(inputs, targets)``: ``(B, 2, *S)`` moving and fixed stacked as channels (moving
        first, as :class:`~ran_bundle.networks.ResidualAlignerNetwork` expects) and the fixed
        image ``(B, 1, *S)``.
    """
    if MOVING not in batchdata or FIXED not in batchdata:
        raise KeyError(f"a pair batch needs {MOVING!r} and {FIXED!r}, got keys {sorted(batchdata)}.")
    moving = _to(batchdata[MOVING], device, non_blocking)
    fixed = _to(batchdata[FIXED], device, non_blocking)
    if moving.shape != fixed.shape:
        raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must have the same shape.")
    return torch.cat([moving, fixed], dim=1), fixed


def _labels(batchdata: Mapping[str, Any], device: Any, non_blocking: bool) -> tuple[Any, Any]:
    """``(moving_label, fixed_label)`` ``(B, 1, *S)`` on ``device``, or ``None`` where missing."""
    return (
        _to(batchdata.get(MOVING_LABEL), device, non_blocking),
        _to(batchdata.get(FIXED_LABEL), device, non_blocking),
    )


def _engine_autocast(engine: Engine, device: torch.device | str | None):
    """:func:`~ran_bundle.tensors.autocast_if` ``engine.amp``, with the kwargs of ``engine.amp_kwargs``."""
    return autocast_if(getattr(engine, "amp", False), device, **(getattr(engine, "amp_kwargs", None) or {}))


def _stem(path: Any) -> str:
    name = os.path.basename(str(path))
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def _filenames(x: Any, batch_size: int) -> list[str]:
    meta = getattr(x, "meta", None) or {}
    names = meta.get("filename_or_obj")
    if names is None:
        return [f"item{i}" for i in range(batch_size)]
    if isinstance(names, str):
        names = [names]
    return [str(n) for n in names]


def pair_name(moving: Any, fixed: Any) -> str:
    """``<moving-stem>_to_<fixed-stem>`` from two file paths; from their folder names when the file names are
    the same (data sets that keep one ``image.nii.gz`` per subject folder)."""
    if _stem(moving) == _stem(fixed):
        return f"{os.path.basename(os.path.dirname(str(moving)))}_to_{os.path.basename(os.path.dirname(str(fixed)))}"
    return f"{_stem(moving)}_to_{_stem(fixed)}"


def pair_names(batchdata: Mapping[str, Any]) -> list[str]:
    """:func:`pair_name` of every pair of a batch (from the MetaTensors' file names)."""
    b = int(batchdata[FIXED].shape[0])
    moving, fixed = _filenames(batchdata[MOVING], b), _filenames(batchdata[FIXED], b)
    return [pair_name(m, f) for m, f in zip(moving, fixed, strict=False)]


class NonFiniteLossError(RuntimeError):
    """The loss of a training step is NaN or infinite; nothing was stepped (the weights are the last good ones).

    Attributes:
        loss: the loss value.
        terms: the loss function's ``last_terms`` (``{}`` when it has none).
    """

    def __init__(self, message: str, loss: float, terms: Mapping[str, float]) -> None:
        super().__init__(message)
        self.loss = loss
        self.terms = dict(terms)


def _one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, 1, *S)`` integer-valued label map -> ``(B, N, *S)`` float32 one-hot (values clamped to ``0..N-1``)."""
    return (
        torch.nn.functional.one_hot(label[:, 0].round().long().clamp(0, num_classes - 1), num_classes)
        .movedim(-1, 1)
        .float()
    )


def registration_train_step(
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    loss_fn: Callable[..., torch.Tensor],
    *,
    moving_label: torch.Tensor | None = None,
    fixed_label: torch.Tensor | None = None,
    num_classes: int | None = None,
    true_ddf: torch.Tensor | None = None,
    teacher_ddf: torch.Tensor | None = None,
    amp: bool = False,
    amp_kwargs: Mapping[str, Any] | None = None,
    scaler: Any = None,
    device: torch.device | str | None = None,
    set_to_none: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """One optimisation step of a registration network on a batch of pairs: the package's only training step.

    ``network.train()``, ``optimizer.zero_grad()``, then ``ddf = network(inputs)`` ``(B, d, *S)`` (under
    ``torch.autocast`` when ``amp``; calling the possibly DDP-wrapped module itself keeps
    DistributedDataParallel's gradient synchronisation; for the RAN it is ``register(inputs).ddf``), and in
    float32, outside autocast (local NCC sums and soft Dice lose their meaning in half precision):
    ``warped = warp(moving, ddf)`` (:func:`ran_bundle.flow.warp`) and the loss

    - ``loss_fn(warped, fixed, ddf, true_ddf)`` with ``true_ddf`` (supervised, e.g.
      :class:`~ran_bundle.losses.SyntheticFieldLoss`);
    - ``loss_fn(warped, fixed, ddf, warped_label, fixed_label)`` with both labels, ``warped_label`` the
      one-hot moving label warped by ``ddf`` (trilinear, ``(B, N, *S)``), e.g. a
      :class:`~ran_bundle.losses.RegistrationLoss` with ``dice_weight > 0``;
    - ``loss_fn(warped, fixed, ddf)`` otherwise;

    and with ``teacher_ddf`` (distillation, :mod:`ran_bundle.distillation`) the last two also get
    ``target_ddf=teacher_ddf`` (a :class:`~ran_bundle.losses.RegistrationLoss` with ``field_weight > 0``);

    then the non-finite check, backward and ``optimizer.step()`` (through ``scaler`` when ``amp`` and a
    scaler is given).

    Args:
        network: called as ``network(inputs)`` -> DDF ``(B, d, *S)`` in voxels on the fixed grid.
        optimizer: the optimiser of ``network``'s parameters.
        inputs: ``(B, 2C, *S)``: moving and fixed images stacked as channels (moving first, :func:`prepare_batch`).
        loss_fn: the loss, called as above; its ``last_terms`` (if any) are returned.
        moving_label: ``(B, 1, *S)`` integer-valued moving label, used with ``fixed_label``.
        fixed_label: ``(B, 1, *S)`` integer-valued fixed label (or one-hot ``(B, N, *S)``), passed to the loss.
        num_classes: number of label values ``0..N-1`` of the one-hot warp; ``None``: the largest value of
            both labels plus one.
        true_ddf: ``(B, d, *S)`` known field in voxels, passed to the loss.
        teacher_ddf: ``(B, d, *S)`` a teacher's field in voxels, passed to the loss as ``target_ddf``.
        amp: forward under ``torch.autocast``.
        amp_kwargs: ``torch.autocast`` arguments (``dtype``, ...).
        scaler: a ``GradScaler`` for ``amp``; ``None`` steps the plain gradients.
        device: the device type of the autocast; ``None``: that of ``inputs``.
        set_to_none: ``optimizer.zero_grad(set_to_none=...)``; with ``False`` Adam also moves parameters that
            got no gradient in this step (MONAI's trainers default to ``False``).

    Returns:
        ``(ddf, loss, terms)``: the DDF ``(B, d, *S)`` float32 and the loss (both detached), and the loss
        terms as floats without ``"total"``.

    Raises:
        NonFiniteLossError: the loss is NaN or infinite; nothing is stepped.
    """
    network.train()
    optimizer.zero_grad(set_to_none=set_to_none)
    with autocast_if(amp, inputs.device if device is None else device, **(amp_kwargs or {})):
        ddf = network(inputs)
    ddf = ddf.float()
    half = inputs.shape[1] // 2
    moving, fixed = inputs[:, :half].float(), inputs[:, half:].float()
    warped = warp(moving, ddf)
    target = {} if teacher_ddf is None else {"target_ddf": teacher_ddf.float()}
    if true_ddf is not None:
        loss = loss_fn(warped, fixed, ddf, true_ddf)
    elif moving_label is not None and fixed_label is not None:
        n = num_classes or int(max(moving_label.max().item(), fixed_label.max().item())) + 1
        loss = loss_fn(warped, fixed, ddf, warp(_one_hot(moving_label, n), ddf), fixed_label, **target)
    else:
        loss = loss_fn(warped, fixed, ddf, **target)
    terms = dict(getattr(loss_fn, "last_terms", {}))
    if not loss.is_meta and not torch.isfinite(loss).all():  # meta tensors (memory counts) hold no values
        value = loss.item()
        raise NonFiniteLossError(f"non-finite loss {value}; loss terms: {terms}; nothing was stepped.", value, terms)
    if amp and scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return ddf.detach(), loss.detach(), {k: float(v) for k, v in terms.items() if k != "total"}


def _engine_train_step(engine: Engine, inputs: torch.Tensor, kind: str, advice: str, **kwargs: Any):
    """:func:`registration_train_step` with the engine's network, optimizer, loss, amp and scaler.

    Raises:
        NonFiniteLossError: naming the iteration, the epoch and the terms, then ``advice``.
    """
    amp = bool(getattr(engine, "amp", False))
    try:
        return registration_train_step(
            engine.network,
            engine.optimizer,
            inputs,
            engine.loss_function,
            amp=amp,
            amp_kwargs=getattr(engine, "amp_kwargs", None),
            scaler=getattr(engine, "scaler", None) if amp else None,
            device=engine.state.device,
            set_to_none=getattr(engine, "optim_set_to_none", False),
            **kwargs,
        )
    except NonFiniteLossError as err:
        message = (
            f"non-finite {kind} loss {err.loss} at iteration {engine.state.iteration} "
            f"(epoch {engine.state.epoch}); loss terms: {err.terms}. {advice}"
        )
        raise NonFiniteLossError(message, err.loss, err.terms) from None


class RegistrationTrainStep:
    """``iteration_update`` of :class:`~monai.engines.SupervisedTrainer` for unsupervised registration.

    One call of :func:`registration_train_step` on ``inputs = cat[moving, fixed]`` ``(B, 2, *S)`` with the
    engine's network, optimizer and ``loss_function`` (called as ``loss(warped, fixed, ddf[, warped_label,
    fixed_label])``). With ``engine.amp`` the forward runs under ``torch.autocast`` (``engine.amp_kwargs``)
    and the step goes through ``engine.scaler``.

    Args:
        use_labels: pass warped one-hot moving labels and the fixed labels to the loss (for a
            :class:`~ran_bundle.losses.RegistrationLoss` with ``dice_weight > 0``); the labels are
            used only when both are in the batch.
        num_classes: number of label values ``0..N-1`` for the one-hot warp; ``None``: the
            largest value in the batch plus one.
        teacher_key: batch key of a teacher field ``(B, d, *S)`` passed to the loss as ``target_ddf``
            (distillation: :data:`ran_bundle.data.TEACHER_DDF`); ``None``: none.

    Returns (``engine.state.output``):
        ``{"loss": float, <loss terms>: float, "pred": ddf (B, d, *S) detached, "label": fixed (B, 1, *S)}``.

    Raises:
        NonFiniteLossError: when the loss is NaN or infinite (names the iteration and the terms).
    """

    def __init__(
        self, use_labels: bool = False, num_classes: int | None = None, teacher_key: str | None = None
    ) -> None:
        self.use_labels = bool(use_labels)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.teacher_key = teacher_key

    def __call__(self, engine: Engine, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        device, nb = engine.state.device, getattr(engine, "non_blocking", False)
        inputs, fixed = prepare_batch(batchdata, device, nb)
        moving_label, fixed_label = _labels(batchdata, device, nb) if self.use_labels else (None, None)
        if self.teacher_key is not None and self.teacher_key not in batchdata:
            raise KeyError(
                f"the batch has no teacher field {self.teacher_key!r} (keys {sorted(batchdata)}); give the train "
                "preprocessing before_crop=ran_bundle.distillation.TeacherFieldd(...)."
            )
        teacher = None if self.teacher_key is None else _to(batchdata[self.teacher_key], device, nb)
        ddf, loss, terms = _engine_train_step(
            engine,
            inputs,
            "training",
            "Lower the learning rate, disable amp, or check the input intensities.",
            moving_label=moving_label,
            fixed_label=fixed_label,
            num_classes=self.num_classes,
            teacher_ddf=teacher,
        )
        return {"loss": float(loss), **terms, "pred": ddf, "label": fixed}


class SyntheticTrainStep:
    """``iteration_update`` of :class:`~monai.engines.SupervisedTrainer` for synthetic pretraining.

    The supervised counterpart of :class:`RegistrationTrainStep` for pairs with a known field
    (:mod:`ran_bundle.synthetic`): one call of :func:`registration_train_step` with ``true_ddf``
    ``(B, d, *S)`` voxels read from the batch, so the loss is ``engine.loss_function(warped, fixed, ddf,
    true_ddf)`` (a :class:`~ran_bundle.losses.SyntheticFieldLoss`: 0.1 image MSE + 1 field MSE + 1
    smoothness). With ``engine.amp`` the forward runs under ``torch.autocast`` and the step goes through
    ``engine.scaler``.

    Args:
        ddf_key: batch key of the true field (:data:`ran_bundle.synthetic.TRUE_DDF`, ``"true_ddf"``).

    Returns (``engine.state.output``):
        ``{"loss": float, <loss terms>: float, "pred": ddf (B, d, *S) detached, "label": true_ddf (B, d, *S)}``.

    Raises:
        KeyError: the batch has no true field.
        NonFiniteLossError: when the loss is NaN or infinite (names the iteration and the terms).
    """

    def __init__(self, ddf_key: str = TRUE_DDF) -> None:
        self.ddf_key = ddf_key

    def __call__(self, engine: Engine, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        device, nb = engine.state.device, getattr(engine, "non_blocking", False)
        if self.ddf_key not in batchdata:
            raise KeyError(
                f"a synthetic pair batch needs the true field {self.ddf_key!r}, got keys {sorted(batchdata)}; "
                "build the data with ran_bundle.synthetic.synthetic_pair_transforms."
            )
        inputs, _ = prepare_batch(batchdata, device, nb)
        true_ddf = _to(batchdata[self.ddf_key], device, nb).float()
        advice = "Lower the learning rate or the synthetic field magnitudes, disable amp, or check the intensities."
        ddf, loss, terms = _engine_train_step(engine, inputs, "pretraining", advice, true_ddf=true_ddf)
        return {"loss": float(loss), **terms, "pred": ddf, "label": true_ddf}


class RegistrationEvalStep:
    """``iteration_update`` of :class:`~monai.engines.SupervisedEvaluator` for registration.

    Runs ``ddf = net(cat[moving, fixed])`` under ``torch.no_grad`` (and ``torch.autocast`` when
    ``engine.amp``), warps the moving image (trilinear) and the moving label (nearest neighbour,
    so only the moving label's values appear) onto the fixed grid.

    Returns (``engine.state.output``), all batched:
        ``{"pred": warped moving label (B, 1, *S) or None, "label": fixed label (B, 1, *S) or None,
        "ddf": (B, d, *S) voxels, "warped": (B, 1, *S), "fixed": (B, 1, *S), "moving_label": ... or None}``.
        ``from_engine(["pred", "label"])`` feeds :class:`~ran_bundle.handlers.MeanDiceOverLabels`.
    """

    def __call__(self, engine: Engine, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        device, nb = engine.state.device, getattr(engine, "non_blocking", False)
        inputs, fixed = prepare_batch(batchdata, device, nb)
        moving_label, fixed_label = _labels(batchdata, device, nb)
        engine.network.eval()
        with torch.no_grad(), _engine_autocast(engine, device):
            ddf = engine.network(inputs).float()
        with torch.no_grad():
            warped = warp(inputs[:, :1].float(), ddf)
            warped_label = None if moving_label is None else warp(moving_label.float(), ddf, mode="nearest")
        return {
            "pred": warped_label,
            "label": fixed_label,
            "ddf": ddf,
            "warped": warped,
            "fixed": fixed,
            "moving_label": moving_label,
        }


class SyntheticEvalStep(RegistrationEvalStep):
    """:class:`RegistrationEvalStep` that also returns the batch's true field.

    Output: that of ``RegistrationEvalStep`` plus ``ddf_key`` (``"true_ddf"``, ``(B, d, *S)``
    voxels, on the engine's device), so ``from_engine(["ddf", "true_ddf"])`` feeds
    :class:`~ran_bundle.synthetic.EndPointError`.
    """

    def __init__(self, ddf_key: str = TRUE_DDF) -> None:
        self.ddf_key = ddf_key

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        if self.ddf_key not in batchdata:
            raise KeyError(f"a synthetic batch needs {self.ddf_key!r}, got keys {sorted(batchdata)}.")
        out = super().__call__(engine, batchdata)
        out[self.ddf_key] = as_plain_tensor(batchdata[self.ddf_key]).to(engine.state.device).float()
        return out


def check_checkpoint(
    path: str | os.PathLike, hint: str = "", network: torch.nn.Module | None = None, key: str = "model"
) -> str:
    """Return ``path`` as a string, or raise naming it (used in configs' ``initialize``, before any work).

    Args:
        path: checkpoint file that a workflow is about to load.
        hint: appended to the error message (e.g. how to train or where to download the weights).
        network: when given, the checkpoint's ``key`` weights must load into it strictly (a DDP
            wrapper is looked through).
        key: the checkpoint entry holding the weights.

    Raises:
        FileNotFoundError: the file does not exist.
        InputError: unreadable, not a checkpoint, or weights that do not fit ``network``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} not found. {hint}".strip())
    if network is not None:
        state = read_state_dict(path, key)
        check_state_dict_fits(
            state,
            getattr(network, "module", network),
            os.fspath(path),
            "the network",
            "use the network_def (preset and options) the checkpoint was trained with.",
        )
    return os.fspath(path)
