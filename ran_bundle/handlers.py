"""Handlers of the registration engines: what is attached to MONAI's trainer and evaluator besides the step.

- :class:`RegistrationMetricsWriter`: per-pair metrics in mm (:func:`~ran_bundle.metrics.evaluate_pair`)
  written to ``metrics_per_pair.csv`` and ``metrics_summary.csv``;
- :class:`LastCheckpointSaver`: the whole training state in one file, written atomically, to resume from
  (ignite's :class:`~ignite.handlers.Checkpoint` and :class:`~ignite.handlers.DiskSaver`);
- :class:`DatasetEpochHandler`: tells a dataset which epoch starts, so that its random draws follow it;
- :class:`TrainingReport`: the validation Dice of no registration, each validation against it, and where
  the run's files went;
- :class:`MeanDiceOverLabels` and :class:`FoldingPercent`: MONAI cumulative metrics of the evaluator (through
  :class:`monai.handlers.IgniteMetricHandler`), built on :mod:`ran_bundle.metrics`' functions.

The evaluator handlers read the outputs of :class:`~ran_bundle.engines.RegistrationEvalStep` (batched dicts:
the engines run with ``decollate=False``).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from ignite.handlers.checkpoint import CheckpointEvents
from monai.metrics import CumulativeIterationMetric, compute_dice
from monai.utils import MetricReduction

from ran_bundle.engines import pair_names
from ran_bundle.fields import atomic_write
from ran_bundle.flow import spacing_of
from ran_bundle.keys import PAIR_KEYS
from ran_bundle.metrics import evaluate_pair, non_positive_jacobian, summarise
from ran_bundle.spatial import foreground_mask
from ran_bundle.tensors import as_plain_tensor

__all__ = [
    "RegistrationMetricsWriter",
    "LastCheckpointSaver",
    "DatasetEpochHandler",
    "TrainingReport",
    "MeanDiceOverLabels",
    "FoldingPercent",
]

logger = logging.getLogger(__name__)

FIXED = PAIR_KEYS[1]


def _affines(x: Any, batch_size: int) -> list[np.ndarray]:
    """Per-item ``(4, 4)`` affines of a batched MetaTensor (identity when it has none)."""
    affine = getattr(x, "affine", None)
    if affine is None:
        return [np.eye(4) for _ in range(batch_size)]
    a = np.asarray(as_plain_tensor(affine).detach().cpu().numpy(), dtype=np.float64)
    if a.ndim == 2:
        a = np.broadcast_to(a, (batch_size, *a.shape))
    return [np.array(a[i]) for i in range(batch_size)]


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

    Attach to an evaluator that runs :class:`~ran_bundle.engines.RegistrationEvalStep`. After each
    iteration it calls :func:`~ran_bundle.metrics.evaluate_pair` for every pair of the batch (warped
    moving label vs fixed label, DDF for the Jacobian statistics), with the voxel size read from the
    fixed image's affine (mm). At ``COMPLETED`` it writes ``<output_dir>/metrics_per_pair.csv`` (columns
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


class _ReplacingDiskSaver(DiskSaver):
    """:class:`~ignite.handlers.DiskSaver` that lets its atomic write replace the file of the same name.

    :class:`~ignite.handlers.Checkpoint` deletes the previous file before writing one of the same name; with
    the one fixed name of :class:`LastCheckpointSaver` that would leave no checkpoint at all if the process
    died during the write. ``DiskSaver(atomic=True)`` writes a temporary file and renames it over the old
    one, so the deletion is not needed: readers see the previous complete file or the new one.
    """

    def remove(self, filename: str) -> None:
        pass


class LastCheckpointSaver(Checkpoint):
    """Save the whole training state atomically after every ``interval`` epochs, to resume from.

    Ignite's :class:`~ignite.handlers.Checkpoint` with ``DiskSaver(save_dir, atomic=True,
    require_empty=False)``, one file named ``filename`` (``n_saved=1``). MONAI's ``CheckpointSaver`` writes
    in place (``atomic=False``), so a kill while saving could leave a truncated file; here the file holds
    ``{name: obj.state_dict()}`` of ``save_dict`` (a single entry is saved as its bare state dict, which
    MONAI's ``CheckpointLoader`` also reads; a ``DistributedDataParallel``/``DataParallel`` model is saved
    unwrapped, so single- and multi-process runs read each other's files), written to a temporary file in
    ``save_dir`` and renamed over ``filename``. Only rank 0 writes.

    It saves at ``EPOCH_COMPLETED`` (every ``interval`` epochs) and at ``COMPLETED`` (once per iteration
    count: the end of the last epoch is written once); never on an exception, so after a failure (e.g. a
    non-finite loss) the file still holds the last good epoch. Resuming from it (``CheckpointLoader`` with
    the same ``save_dict`` keys) restarts at the next epoch; with :class:`~ran_bundle.data.RandomPairDataset`
    and :class:`DatasetEpochHandler` every later epoch draws what the uninterrupted run drew.

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
        saver = _ReplacingDiskSaver(save_dir, atomic=True, create_dir=True, require_empty=False)
        super().__init__(dict(save_dict), saver, filename_pattern=filename, n_saved=1)
        self.interval = int(interval)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval) | Events.COMPLETED, self)
        if not engine.has_registered_events(CheckpointEvents.SAVED_CHECKPOINT):
            engine.register_events(*CheckpointEvents)
        engine.add_event_handler(CheckpointEvents.SAVED_CHECKPOINT, self._log)

    def _log(self, engine: Engine) -> None:
        logger.info(
            "saved %s (epoch %d, iteration %d)", self.last_checkpoint, engine.state.epoch, engine.state.iteration
        )


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


class TrainingReport:
    """Tells the person who runs a training what they get, and what to try next.

    - Before the first epoch: the validation Dice of no registration (the moving labels as they are, on the
      validation pairs as preprocessed), the figure that every later validation Dice is to be judged against,
      and with ``score_start`` that of the starting weights.
    - After each validation: the Dice next to that baseline and the best so far.
    - At the end: the validation Dice before training (no registration; the starting weights with ``score_start``)
      and after (the best model, and the last validation); where the best model, the last training state (to
      resume from) and the TensorBoard logs were written; the learning curve (mean training loss per epoch and
      validation Dice against the baseline, drawn with matplotlib, the optional ``figures`` extra, as
      ``<log_dir>/learning_curve.png``); and the next commands to try: ``ran-register`` on the first validation
      pair with the best model, and ``ran-register --help``.

    In multi-process training it is attached on every process: each scores its share of the validation pairs
    and the metric gathers them (a gather on the main process alone would wait for the others for ever);
    only the main process logs and draws.

    Args:
        validator: the evaluator whose ``data_loader`` yields the validation pairs (with labels).
        ckpt_dir: the folder of ``model.pt`` (best) and ``model_last.pt`` (last state).
        log_dir: the TensorBoard log folder; the learning curve is written there.
        key_metric: the validator's key metric name.
        example_pair: a pair dict (``moving_image``, ``fixed_image``, optional labels) for the ``ran-register``
            command of the report; ``None``: the command names placeholder files.
        spacing: the training grid's voxel size (mm), passed to that command (``None``: not passed).
        intensity: the training's intensity scaling, passed to that command.
        score_start: also score the network before the first step (its starting weights, e.g. pretrained ones),
            so that the report tells what the training added; not when resuming (the resumed weights are loaded
            after this handler's start).
    """

    CURVE = "learning_curve.png"

    def __init__(
        self,
        validator: Engine,
        ckpt_dir: str | os.PathLike,
        log_dir: str | os.PathLike,
        key_metric: str = "val_mean_dice",
        example_pair: Mapping[str, Any] | None = None,
        spacing: Sequence[float] | float | None = None,
        intensity: str = "ct",
        score_start: bool = False,
    ) -> None:
        self.validator = validator
        self.ckpt_dir = Path(ckpt_dir)
        self.log_dir = Path(log_dir)
        self.key_metric = key_metric
        self.example_pair = dict(example_pair) if example_pair is not None else None
        self.spacing = spacing
        self.intensity = intensity
        self.score_start = bool(score_start)
        self.identity: float = math.nan
        self.start: float = math.nan
        self.trainer: Engine | None = None
        self.losses: list[float] = []  # training losses of the running epoch
        self.train_curve: list[tuple[int, float]] = []  # (epoch, mean training loss)
        self.val_curve: list[tuple[int, float]] = []  # (epoch, validation Dice)

    def attach(self, engine: Engine) -> None:
        self.trainer = engine
        engine.add_event_handler(Events.STARTED, self.baseline)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record_loss)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_loss)
        engine.add_event_handler(Events.COMPLETED, self.summary)
        self.validator.add_event_handler(Events.COMPLETED, self.after_validation)

    def baseline(self, engine: Engine) -> None:
        """The mean Dice of the validation pairs without registration and, with ``score_start``, with the
        network's weights before the first step (:class:`~ran_bundle.engines.RegistrationEvalStep`)."""
        from ran_bundle.engines import RegistrationEvalStep

        identity, start = MeanDiceOverLabels(), MeanDiceOverLabels()
        step = RegistrationEvalStep()
        pairs = 0
        for batch in self.validator.data_loader:
            moving, fixed = batch.get(PAIR_KEYS[2]), batch.get(PAIR_KEYS[3])
            if moving is None or fixed is None:
                continue
            identity(moving, fixed)
            if self.score_start:
                output = step(self.validator, batch)
                start(output["pred"], output["label"])
            pairs += int(moving.shape[0])
        if idist.all_reduce(pairs):
            self.identity = float(identity.aggregate())
            self.start = float(start.aggregate()) if self.score_start else math.nan
            pairs = int(identity.get_buffer().shape[0])
            if idist.get_rank() == 0:
                logger.info("validation Dice with no registration (identity): %.4f over %d pairs", self.identity, pairs)
                if self.score_start:
                    logger.info("validation Dice with the starting weights: %.4f", self.start)

    def record_loss(self, engine: Engine) -> None:
        output = engine.state.output
        if isinstance(output, Mapping) and output.get("loss") is not None:
            self.losses.append(float(output["loss"]))

    def epoch_loss(self, engine: Engine) -> None:
        if self.losses:
            self.train_curve.append((int(engine.state.epoch), float(np.mean(self.losses))))
        self.losses = []

    def after_validation(self, engine: Engine) -> None:
        value = engine.state.metrics.get(self.key_metric)
        if value is None:
            return
        epoch = int(self.trainer.state.epoch) if self.trainer is not None else int(engine.state.epoch)
        self.val_curve.append((epoch, float(value)))
        if idist.get_rank() == 0:
            logger.info(
                "validation Dice %.4f (no registration: %.4f; best %.4f at epoch %d)",
                float(value),
                self.identity,
                float(getattr(engine.state, "best_metric", math.nan)),
                int(getattr(engine.state, "best_metric_epoch", -1)),
            )

    def register_command(self) -> str:
        """The ``ran-register`` command line that registers the example pair with the best model."""
        pair = self.example_pair or {"moving_image": "moving.nii.gz", "fixed_image": "fixed.nii.gz"}
        args = ["ran-register", "--fixed", _shown(pair["fixed_image"]), "--moving", _shown(pair["moving_image"])]
        if pair.get("moving_label") is not None and pair.get("fixed_label") is not None:
            args += ["--fixed-label", _shown(pair["fixed_label"]), "--moving-label", _shown(pair["moving_label"])]
        args += ["--weights", _shown(self.ckpt_dir / "model.pt"), "--intensity", str(self.intensity)]
        if self.spacing is not None:
            values = np.atleast_1d(np.asarray(self.spacing, dtype=float)).tolist()
            args += ["--spacing", *(f"{v:g}" for v in (values[:1] if len(set(values)) == 1 else values))]
        args += ["--out", _shown(self.ckpt_dir.parent / "register")]
        if _has_matplotlib():
            args.append("--png")
        return " ".join(args)

    def summary(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        state = self.validator.state
        best = float(getattr(state, "best_metric", math.nan)) if state is not None else math.nan
        epoch = int(getattr(state, "best_metric_epoch", -1)) if state is not None else -1
        last = self.val_curve[-1][1] if self.val_curve else math.nan
        curve = self.learning_curve()
        logger.info(
            "training done after %d epochs (%d iterations). Best model: %s. Last state (resume with --resume True): "
            "%s. TensorBoard logs: %s",
            engine.state.epoch,
            engine.state.iteration,
            _shown(self.ckpt_dir / "model.pt"),
            _shown(self.ckpt_dir / "model_last.pt"),
            _shown(self.log_dir),
        )
        logger.info(
            "learning curve: %s",
            _shown(curve) if curve is not None else f"not drawn, it needs matplotlib: {MATPLOTLIB_HINT}",
        )
        start = "" if math.isnan(self.start) else f", {self.start:.4f} with the starting weights"
        if self.val_curve:
            after = f"{best:.4f} (best model, epoch {epoch}; last validation {last:.4f}), "
            after += f"{best - self.identity:+.4f} over no registration"
        else:
            after = "not validated (val_interval is larger than the number of epochs)"
        logger.info(
            "validation Dice before training: %.4f with no registration%s; after training: %s",
            self.identity,
            start,
            after,
        )
        logger.info("next, register a pair with the best model: %s", self.register_command())
        logger.info("all the options: ran-register --help")

    def learning_curve(self) -> Path | None:
        """Write ``<log_dir>/learning_curve.png`` (training loss and validation Dice per epoch); ``None``
        without matplotlib or without any epoch to draw."""
        if not _has_matplotlib() or not (self.train_curve or self.val_curve):
            return None
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8.0, 3.2), layout="constrained")
        loss_ax, dice_ax = fig.subplots(1, 2)
        if self.train_curve:
            epochs, losses = np.asarray(self.train_curve).T
            loss_ax.plot(epochs, losses, marker="o", color="tab:blue")
        loss_ax.set(xlabel="epoch", ylabel="mean training loss", title="training loss")
        val_curve = self.val_curve if math.isnan(self.start) else [(0, self.start), *self.val_curve]
        if val_curve:
            epochs, dice = np.asarray(val_curve).T
            dice_ax.plot(epochs, dice, marker="o", color="tab:green", label="registered (network)")
        if not math.isnan(self.identity):
            dice_ax.axhline(self.identity, color="grey", linestyle="--", label="no registration")
        dice_ax.set(xlabel="epoch", ylabel="mean Dice", title="validation Dice")
        dice_ax.legend(loc="lower right", fontsize=8)
        for ax in (loss_ax, dice_ax):
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        path = self.log_dir / self.CURVE
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png", facecolor="white"))


MATPLOTLIB_HINT = "pip install 'ran-bundle[figures]'"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _shown(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies below it (shorter to read and to copy)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


class FoldingPercent(CumulativeIterationMetric):
    """Percentage of folded voxels (``det J <= 0``, :func:`~ran_bundle.metrics.non_positive_jacobian`) inside the
    fixed image's foreground (:func:`ran_bundle.spatial.foreground_mask`), the package's one definition of folding,
    for ignite/MONAI evaluators (``output_transform=from_engine(["ddf", "fixed"])``).

    Args:
        reduction: MONAI reduction of the buffered ``(N, 1)`` values (default ``"mean"``).
    """

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN) -> None:
        super().__init__()
        self.reduction = reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """
        Args:
            y_pred: ``(B, d, *spatial)`` DDF in voxels.
            y: ``(B, 1, *spatial)`` fixed image.

        Returns:
            ``(B, 1)`` float32 percentages.
        """
        if y is None:
            raise ValueError("y (the fixed image) is required.")
        masks = torch.stack([foreground_mask(y[b, 0]) for b in range(y.shape[0])])
        _, percent = non_positive_jacobian(y_pred.detach().float(), masks)
        return torch.as_tensor(percent, dtype=torch.float32, device=y_pred.device)[:, None]

    def aggregate(self, reduction: MetricReduction | str | None = None) -> torch.Tensor:
        from monai.metrics.utils import do_metric_reduction

        f, _ = do_metric_reduction(self.get_buffer(), reduction or self.reduction)
        return f


class MeanDiceOverLabels(CumulativeIterationMetric):
    """Mean Dice over the foreground labels present in the reference, for ignite/MONAI evaluators.

    Each call takes integer label maps (e.g. moving labels warped with nearest neighbour, and
    the fixed labels) and appends, per batch item, the mean Dice over the non-zero labels
    present in ``y`` (optionally only ``labels``); a label missing from ``y_pred`` scores 0. An
    item with no such label gives nan and is skipped by :meth:`aggregate`. The Dice values are
    MONAI's :func:`~monai.metrics.compute_dice`; this class only picks the labels (arbitrary values,
    e.g. FreeSurfer's, which ``DiceMetric(num_classes=...)`` would have to enumerate one by one) and
    averages over them. Use it through :class:`monai.handlers.IgniteMetricHandler`.

    Args:
        labels: restrict to these label values; ``None``: all non-zero values of ``y``.
        reduction: MONAI reduction of the buffered ``(N, 1)`` values in :meth:`aggregate`
            (default ``"mean"``, nan-aware).
        get_not_nans: also return the number of non-nan items from :meth:`aggregate`.
    """

    _LABELS_PER_PASS = 16  # labels one-hot encoded at once

    def __init__(
        self,
        labels: Sequence[int] | None = None,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__()
        self.labels = None if labels is None else [int(v) for v in labels]
        if self.labels is not None and any(v == 0 for v in self.labels):
            raise ValueError(f"labels must be foreground (non-zero) values, got {labels}.")
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """
        Args:
            y_pred: ``(B, 1, *spatial)`` integer labels (a ``(B, N, *spatial)`` one-hot/soft map is argmaxed).
            y: ``(B, 1, *spatial)`` integer reference labels (same rule).

        Returns:
            ``(B, 1)`` float32 mean Dice per item: MONAI's :func:`~monai.metrics.compute_dice` of the one-hot
            maps of the labels present in ``y`` (``ignore_empty``: a label absent from an item's ``y`` is nan
            there), nan-averaged over the labels.
        """
        if y is None:
            raise ValueError("y (the fixed label map) is required.")
        y_pred = y_pred.argmax(1, keepdim=True) if y_pred.shape[1] > 1 else y_pred
        y = y.argmax(1, keepdim=True) if y.shape[1] > 1 else y
        y_pred, y = y_pred.round().long(), y.round().long()
        present = [int(v) for v in torch.unique(y) if v != 0]
        if self.labels is not None:
            present = [v for v in present if v in self.labels]
        if not present:
            return torch.full((y.shape[0], 1), torch.nan, dtype=torch.float32, device=y.device)
        scores = []
        for i in range(0, len(present), self._LABELS_PER_PASS):  # bounds the one-hot maps' memory
            values = torch.as_tensor(present[i : i + self._LABELS_PER_PASS], device=y.device)
            values = values.view(1, -1, *([1] * (y.ndim - 2)))
            scores.append(compute_dice(y_pred == values, y == values, include_background=True, ignore_empty=True))
        return torch.nanmean(torch.cat(scores, 1).float(), dim=1, keepdim=True)

    def aggregate(self, reduction: MetricReduction | str | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Reduce the buffered per-item values (nan-aware); see ``reduction`` and ``get_not_nans``."""
        from monai.metrics.utils import do_metric_reduction

        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return [f, not_nans] if self.get_not_nans else f
