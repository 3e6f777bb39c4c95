"""Engine glue between the RAN registration model and MONAI's ignite workflows.

MONAI's :class:`~monai.engines.SupervisedTrainer` and :class:`~monai.engines.SupervisedEvaluator`
are built for ``image -> label`` segmentation. Registration needs a different iteration: a pair
batch dict (keys of :mod:`ran_bundle.data`) goes in, the network predicts a DDF, and the loss or
the metrics read the *warped* moving image and label. This module holds the pieces that the
bundle configs plug into those engines:

- :func:`prepare_batch`: pair dict -> ``(inputs, targets)`` = ``(cat[moving, fixed], fixed)``;
- :class:`RegistrationTrainStep`: the trainer's ``iteration_update`` (forward, loss, backward, step);
- :class:`RegistrationEvalStep`: the evaluator's ``iteration_update`` (forward under no_grad, warp
  the moving label with nearest neighbour), whose ``"pred"``/``"label"`` feed
  :class:`~ran_bundle.metrics.MeanDiceOverLabels` through ``from_engine(["pred", "label"])``;
- :class:`RegistrationMetricsWriter`: per-pair metrics in mm (:func:`~ran_bundle.metrics.evaluate_pair`)
  written to ``metrics_per_pair.csv`` and ``metrics_summary.csv``;
- :class:`RegistrationWriter`: per-pair NIfTI outputs (warped image and label, ITK displacement
  field, Jacobian determinant) on the fixed image's grid.

Shapes: images and labels ``(B, 1, *S)``, DDF ``(B, d, *S)`` in voxels on the fixed grid (the
convention of :mod:`ran_bundle.fields`). The engines are created with ``decollate=False`` so
``engine.state.batch`` and ``engine.state.output`` stay batched dicts.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events

from ran_bundle.checks import check_state_dict_fits, read_state_dict
from ran_bundle.data import PAIR_KEYS
from ran_bundle.fields import spacing_of, write_displacement_nifti, write_image_atomic
from ran_bundle.metrics import evaluate_pair, jacobian_determinant, summarise
from ran_bundle.networks.blocks import warp
from ran_bundle.tensors import as_plain_tensor, autocast_if

__all__ = [
    "prepare_batch",
    "pair_name",
    "pair_names",
    "RegistrationTrainStep",
    "RegistrationEvalStep",
    "RegistrationMetricsWriter",
    "RegistrationWriter",
    "LastCheckpointSaver",
    "DatasetEpochHandler",
    "check_checkpoint",
    "SyntheticTrainStep",
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


def _affines(x: Any, batch_size: int) -> list[np.ndarray]:
    """Per-item ``(4, 4)`` affines of a batched MetaTensor (identity when it has none)."""
    affine = getattr(x, "affine", None)
    if affine is None:
        return [np.eye(4) for _ in range(batch_size)]
    a = np.asarray(as_plain_tensor(affine).detach().cpu().numpy(), dtype=np.float64)
    if a.ndim == 2:
        a = np.broadcast_to(a, (batch_size, *a.shape))
    return [np.array(a[i]) for i in range(batch_size)]


def _training_forward(
    engine: Engine,
    inputs: torch.Tensor,
    device: torch.device | str | None,
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward half of a training iteration, shared by the unsupervised and the synthetic step.

    Network in training mode, gradients zeroed, then ``ddf = network(inputs)`` ``(B, d, *S)`` under the
    engine's autocast (calling the possibly DDP-wrapped module itself keeps DistributedDataParallel's
    gradient synchronisation; it is ``register(inputs).ddf``), and in float32, outside autocast (local NCC
    sums and soft Dice lose their meaning in half precision): ``warped = warp(moving, ddf)``
    ``(B, 1, *S)`` and ``loss = loss_of(ddf, warped)``.

    Returns:
        ``(ddf, loss)``.
    """
    engine.network.train()
    engine.optimizer.zero_grad(set_to_none=getattr(engine, "optim_set_to_none", False))
    with _engine_autocast(engine, device):
        ddf = engine.network(inputs)
    ddf = ddf.float()
    warped = warp(inputs[:, : inputs.shape[1] // 2].float(), ddf)
    return ddf, loss_of(ddf, warped)


def _step(engine: Engine, loss: torch.Tensor, kind: str, advice: str) -> dict[str, float]:
    """Backward and optimizer step for ``loss`` (through ``engine.scaler`` under amp); the loss terms.

    Raises:
        RuntimeError: the loss is NaN or infinite (names the iteration, epoch and terms, then ``advice``);
            nothing is stepped, so the weights stay those of the last good iteration.
    """
    terms = getattr(engine.loss_function, "last_terms", {})
    if not torch.isfinite(loss).all():
        raise RuntimeError(
            f"non-finite {kind} loss {loss.item()} at iteration {engine.state.iteration} "
            f"(epoch {engine.state.epoch}); loss terms: {terms}. {advice}"
        )
    scaler = getattr(engine, "scaler", None)
    if getattr(engine, "amp", False) and scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(engine.optimizer)
        scaler.update()
    else:
        loss.backward()
        engine.optimizer.step()
    return {k: float(v) for k, v in terms.items() if k != "total"}


class RegistrationTrainStep:
    """``iteration_update`` of :class:`~monai.engines.SupervisedTrainer` for unsupervised registration.

    One call: ``inputs = cat[moving, fixed]`` ``(B, 2, *S)`` -> ``ddf = net(inputs)`` ``(B, d, *S)``
    (the ``ddf`` of ``net.register``; the module is called so that a DDP wrapper syncs gradients)
    -> ``warped = warp(moving, ddf)`` ``(B, 1, *S)`` -> ``engine.loss_function(warped, fixed,
    ddf[, warped_label, fixed_label])`` -> backward -> ``engine.optimizer.step()``. With
    ``engine.amp`` the forward runs under ``torch.autocast`` and the step goes through
    ``engine.scaler``.

    Args:
        use_labels: pass warped one-hot moving labels and the fixed labels to the loss (for a
            :class:`~ran_bundle.losses.RegistrationLoss` with ``dice_weight > 0``); the labels are
            used only when both are in the batch.
        num_classes: number of label values ``0..N-1`` for the one-hot warp; ``None``: the
            largest value in the batch plus one.

    Returns (``engine.state.output``):
        ``{"loss": float, <loss terms>: float, "pred": ddf (B, d, *S) detached, "label": fixed (B, 1, *S)}``.

    Raises:
        RuntimeError: when the loss is NaN or infinite (names the iteration and the terms).
    """

    def __init__(self, use_labels: bool = False, num_classes: int | None = None) -> None:
        self.use_labels = bool(use_labels)
        self.num_classes = None if num_classes is None else int(num_classes)

    def _one_hot(self, moving_label: torch.Tensor, fixed_label: torch.Tensor) -> torch.Tensor:
        n = self.num_classes or int(max(moving_label.max().item(), fixed_label.max().item())) + 1
        return torch.nn.functional.one_hot(moving_label[:, 0].round().long().clamp(0, n - 1), n).movedim(-1, 1).float()

    def __call__(self, engine: Engine, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        device, nb = engine.state.device, getattr(engine, "non_blocking", False)
        inputs, fixed = prepare_batch(batchdata, device, nb)
        moving_label, fixed_label = _labels(batchdata, device, nb) if self.use_labels else (None, None)

        def loss_of(ddf: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
            warped_label = None
            if moving_label is not None and fixed_label is not None:
                warped_label = warp(self._one_hot(moving_label, fixed_label), ddf)
            return engine.loss_function(warped, fixed, ddf, warped_label, fixed_label)

        ddf, loss = _training_forward(engine, inputs, device, loss_of)
        terms = _step(engine, loss, "training", "Lower the learning rate, disable amp, or check the input intensities.")
        return {"loss": float(loss.detach()), **terms, "pred": ddf.detach(), "label": fixed}


class RegistrationEvalStep:
    """``iteration_update`` of :class:`~monai.engines.SupervisedEvaluator` for registration.

    Runs ``ddf = net(cat[moving, fixed])`` under ``torch.no_grad`` (and ``torch.autocast`` when
    ``engine.amp``), warps the moving image (trilinear) and the moving label (nearest neighbour,
    so only the moving label's values appear) onto the fixed grid.

    Returns (``engine.state.output``), all batched:
        ``{"pred": warped moving label (B, 1, *S) or None, "label": fixed label (B, 1, *S) or None,
        "ddf": (B, d, *S) voxels, "warped": (B, 1, *S), "fixed": (B, 1, *S), "moving_label": ... or None}``.
        ``from_engine(["pred", "label"])`` feeds :class:`~ran_bundle.metrics.MeanDiceOverLabels`.
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


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write dict rows (union of keys, first-seen order) to ``path`` atomically."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


class RegistrationMetricsWriter:
    """Per-pair registration metrics in physical units, written as CSV at the end of an evaluation.

    Attach to an evaluator that runs :class:`RegistrationEvalStep`. After each iteration it calls
    :func:`~ran_bundle.metrics.evaluate_pair` for every pair of the batch (warped moving label vs
    fixed label, DDF for the Jacobian statistics), with the voxel size read from the fixed image's
    affine (mm). At ``COMPLETED`` it writes ``<output_dir>/metrics_per_pair.csv`` (columns
    ``pair, label, dice, hd95, hd, asd, non_pos_jac_count, non_pos_jac_percent, sdlogj``; one row
    per label plus ``mean`` and ``all``), ``<output_dir>/metrics_summary.csv`` (mean/std per label
    over pairs, :func:`~ran_bundle.metrics.summarise`) and logs a summary table.

    Args:
        output_dir: folder of the CSV files (created).
        labels: label values to evaluate; ``None``: every non-zero value of each fixed label.
        per_pair_filename: name of the per-pair CSV.
        summary_filename: name of the summary CSV.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        labels: Sequence[int] | None = None,
        per_pair_filename: str = "metrics_per_pair.csv",
        summary_filename: str = "metrics_summary.csv",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.labels = None if labels is None else [int(v) for v in labels]
        self.per_pair_filename = per_pair_filename
        self.summary_filename = summary_filename
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        self.rows = []

    def update(self, engine: Engine) -> None:
        batch, out = engine.state.batch, engine.state.output
        if out.get("pred") is None or out.get("label") is None:
            raise ValueError("RegistrationMetricsWriter needs moving and fixed labels in every evaluation pair.")
        b = int(out["ddf"].shape[0])
        names = pair_names(batch)
        affines = _affines(batch[FIXED], b)
        for i in range(b):
            self.rows.extend(
                evaluate_pair(
                    out["pred"][i, 0].detach().cpu().numpy(),
                    out["label"][i, 0].detach().cpu().numpy(),
                    out["ddf"][i].detach().cpu().numpy(),
                    spacing=spacing_of(affines[i]),
                    labels=self.labels,
                    pair=names[i],
                )
            )

    def write(self, engine: Engine | None = None) -> list[dict[str, Any]]:
        """Write both CSV files and log the summary; returns the summary rows."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _write_csv(self.rows, self.output_dir / self.per_pair_filename)
        summary = summarise(self.rows)
        _write_csv(summary, self.output_dir / self.summary_filename)
        cols = ["dice", "hd95", "hd", "asd", "non_pos_jac_percent", "sdlogj"]
        lines = [f"{'label':>8} {'n':>4} " + " ".join(f"{c:>22}" for c in cols)]
        for s in summary:
            vals = " ".join(f"{_fmt(s.get(c + '_mean')) + ' +- ' + _fmt(s.get(c + '_std')):>22}" for c in cols)
            lines.append(f"{s['label']!s:>8} {s['n']:>4} {vals}")
        table = "\n".join(lines)
        logger.info("wrote %s and %s", self.output_dir / self.per_pair_filename, self.summary_filename)
        print(f"registration metrics (mean +- std over pairs; distances in mm):\n{table}", flush=True)
        return summary


class RegistrationWriter:
    """Write each registered pair of an evaluator running :class:`RegistrationEvalStep` as NIfTI.

    Per pair ``<moving-stem>_to_<fixed-stem>``, on the fixed image's grid and affine (after the
    preprocessing of the config), atomically (:mod:`ran_bundle.fields`):

    - ``<pair>_warped.nii.gz``: moving image warped onto the fixed grid (float32, preprocessed
      intensities);
    - ``<pair>_warped_label.nii.gz``: moving label warped with nearest neighbour (only written when
      the pair has a moving label; int16, values from the moving label set only);
    - ``<pair>_ddf.nii.gz``: the displacement field in mm in ITK's convention
      (:func:`~ran_bundle.fields.write_displacement_nifti`), usable by SimpleITK/ANTs/Slicer;
    - ``<pair>_jacobian.nii.gz``: Jacobian determinant of ``x -> x + u(x)`` (float32).

    Args:
        output_dir: output folder (created).
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        batch, out = engine.state.batch, engine.state.output
        self.output_dir.mkdir(parents=True, exist_ok=True)
        b = int(out["ddf"].shape[0])
        names = pair_names(batch)
        affines = _affines(batch[FIXED], b)
        for i in range(b):
            prefix, affine = self.output_dir / names[i], affines[i]
            ddf = out["ddf"][i : i + 1].detach().float().cpu()
            write_image_atomic(
                out["warped"][i, 0].detach().float().cpu().numpy(), affine, f"{prefix}_warped.nii.gz", "float32"
            )
            if out.get("pred") is not None:
                lab = out["pred"][i, 0].detach().cpu().numpy()
                write_image_atomic(np.rint(lab).astype(np.int16), affine, f"{prefix}_warped_label.nii.gz", "int16")
            write_displacement_nifti(ddf.numpy(), affine, f"{prefix}_ddf.nii.gz")
            jac = np.asarray(jacobian_determinant(ddf.numpy()), dtype=np.float32).reshape(ddf.shape[2:])
            write_image_atomic(jac, affine, f"{prefix}_jacobian.nii.gz", "float32")
            logger.info("wrote %s_{warped,warped_label,ddf,jacobian}.nii.gz", prefix)


class LastCheckpointSaver:
    """Save the whole training state atomically after every ``interval`` epochs, to resume from.

    MONAI's ``CheckpointSaver`` writes in place (ignite's ``DiskSaver`` with ``atomic=False``), so a
    kill while saving can leave a truncated file. This handler writes
    ``{name: obj.state_dict()}`` (a ``DistributedDataParallel``/``DataParallel`` model is saved
    unwrapped, so single- and multi-process runs read each other's files) to a temporary file in
    ``save_dir``, flushes it to disk and renames it over ``filename``: readers see the previous
    complete file or the new complete one, never a partial one. Only rank 0 writes.

    It saves at ``EPOCH_COMPLETED`` (every ``interval`` epochs) and at ``COMPLETED``; never on an
    exception, so after a failure (e.g. a non-finite loss) the file still holds the last good epoch.
    Resuming from it (``CheckpointLoader`` with the same ``save_dict`` keys) restarts at the next
    epoch; with :class:`~ran_bundle.data.RandomPairDataset` and :class:`DatasetEpochHandler` every
    later epoch draws what the uninterrupted run drew.

    Args:
        save_dir: folder of the checkpoint (created).
        save_dict: objects with ``state_dict()``, e.g. ``{"model": net, "optimizer": opt,
            "lr_scheduler": sched, "trainer": trainer}``.
        filename: checkpoint file name in ``save_dir``.
        interval: save every ``interval`` epochs.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        filename: str = "model_last.pt",
        interval: int = 1,
    ) -> None:
        if int(interval) < 1:
            raise ValueError(f"interval must be >= 1, got {interval}.")
        missing = [k for k, v in save_dict.items() if not callable(getattr(v, "state_dict", None))]
        if missing:
            raise TypeError(f"save_dict entries {missing} have no state_dict().")
        self.path = Path(save_dir) / filename
        self.save_dict = dict(save_dict)
        self.interval = int(interval)
        self._saved_at: tuple[int, int] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def save(self, engine: Engine) -> None:
        """Write the checkpoint now (rank 0 only; once per (epoch, iteration))."""
        if idist.get_rank() != 0 or self._saved_at == (engine.state.epoch, engine.state.iteration):
            return
        state = {
            k: (
                v.module if isinstance(v, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)) else v
            ).state_dict()
            for k, v in self.save_dict.items()
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self._saved_at = (engine.state.epoch, engine.state.iteration)
        logger.info("saved %s (epoch %d, iteration %d)", self.path, engine.state.epoch, engine.state.iteration)


class DatasetEpochHandler:
    """Tell a dataset which epoch starts, so its random draws follow the epoch (see ``set_epoch``).

    Attached to a trainer, it calls ``dataset.set_epoch(engine.state.epoch)`` at every
    ``EPOCH_STARTED`` (1-based epochs, as ignite counts them). With
    :class:`~ran_bundle.data.RandomPairDataset` this makes every epoch's pairs, crops and intensity
    factors a function of ``(seed, epoch, index)``: identical across ranks, workers and resumed runs.

    Args:
        dataset: anything with ``set_epoch(int)``.
    """

    def __init__(self, dataset: Any) -> None:
        if not callable(getattr(dataset, "set_epoch", None)):
            raise TypeError(f"{type(dataset).__name__} has no set_epoch(epoch) method.")
        self.dataset = dataset

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.dataset.set_epoch(engine.state.epoch)


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


class SyntheticTrainStep:
    """``iteration_update`` of :class:`~monai.engines.SupervisedTrainer` for synthetic pretraining.

    The supervised counterpart of :class:`RegistrationTrainStep` for pairs with a known field
    (:mod:`ran_bundle.synthetic`): ``inputs = cat[moving, fixed]`` ``(B, 2, *S)`` -> ``ddf = net(inputs)``
    ``(B, d, *S)`` -> ``warped = warp(moving, ddf)`` -> ``engine.loss_function(warped, fixed, ddf, true_ddf)``
    (a :class:`~ran_bundle.losses.SyntheticFieldLoss`: 0.1 image MSE + 1 field MSE + 1 smoothness)
    -> backward -> ``engine.optimizer.step()``; ``true_ddf`` ``(B, d, *S)`` voxels is read from the
    batch. With ``engine.amp`` the forward runs under ``torch.autocast`` and the step goes through
    ``engine.scaler``.

    Args:
        ddf_key: batch key of the true field; ``None``: :data:`ran_bundle.synthetic.TRUE_DDF` (``"true_ddf"``).

    Returns (``engine.state.output``):
        ``{"loss": float, <loss terms>: float, "pred": ddf (B, d, *S) detached, "label": true_ddf (B, d, *S)}``.

    Raises:
        KeyError: the batch has no true field.
        RuntimeError: when the loss is NaN or infinite (names the iteration and the terms).
    """

    def __init__(self, ddf_key: str | None = None) -> None:
        if ddf_key is None:
            from ran_bundle.synthetic import TRUE_DDF  # lazy: ran_bundle.synthetic imports this module

            ddf_key = TRUE_DDF
        self.ddf_key = ddf_key

    def __call__(self, engine: Engine, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        device, nb = engine.state.device, getattr(engine, "non_blocking", False)
        if self.ddf_key not in batchdata:
            raise KeyError(
                f"a synthetic pair batch needs the true field {self.ddf_key!r}, got keys {sorted(batchdata)}; "
                "build the data with ran_bundle.synthetic.synthetic_pair_transforms."
            )
        inputs, fixed = prepare_batch(batchdata, device, nb)
        true_ddf = _to(batchdata[self.ddf_key], device, nb).float()
        ddf, loss = _training_forward(
            engine, inputs, device, lambda ddf, warped: engine.loss_function(warped, fixed, ddf, true_ddf)
        )
        advice = "Lower the learning rate or the synthetic field magnitudes, disable amp, or check the intensities."
        terms = _step(engine, loss, "pretraining", advice)
        return {"loss": float(loss.detach()), **terms, "pred": ddf.detach(), "label": true_ddf}
