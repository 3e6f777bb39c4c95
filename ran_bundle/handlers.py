"""Handlers of the registration engines: what is attached to MONAI's trainer and evaluator besides the step.

- :class:`RegistrationMetricsWriter`: per-pair metrics in mm (:func:`~ran_bundle.metrics.evaluate_pair`)
  written to ``metrics_per_pair.csv`` and ``metrics_summary.csv``;
- :class:`LastCheckpointSaver`: the whole training state in one file, written atomically, to resume from
  (ignite's :class:`~ignite.handlers.Checkpoint` and :class:`~ignite.handlers.DiskSaver`);
- :class:`DatasetEpochHandler`: tells a dataset which epoch starts, so that its random draws follow it;
- :class:`TrainingReport`: the validation Dice of no registration, each validation against it, and where
  the run's files went.

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
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from ignite.handlers.checkpoint import CheckpointEvents

from ran_bundle.data import PAIR_KEYS
from ran_bundle.engines import pair_names
from ran_bundle.fields import spacing_of
from ran_bundle.metrics import evaluate_pair, summarise
from ran_bundle.tensors import as_plain_tensor

__all__ = [
    "RegistrationMetricsWriter",
    "LastCheckpointSaver",
    "DatasetEpochHandler",
    "TrainingReport",
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
    """Tells the person who runs a training what they get.

    - Before the first epoch: the validation Dice of no registration (the moving labels as they are, on the
      validation pairs as preprocessed), the figure that every later validation Dice is to be judged against.
    - After each validation: the Dice next to that baseline and the best so far.
    - At the end: the best validation Dice and its epoch, and where the best model, the last training state
      (to resume from) and the TensorBoard logs were written.

    In multi-process training it is attached on every process: each scores its share of the validation pairs
    and the metric gathers them (a gather on the main process alone would wait for the others for ever);
    only the main process logs.

    Args:
        validator: the evaluator whose ``data_loader`` yields the validation pairs (with labels).
        ckpt_dir: the folder of ``model.pt`` (best) and ``model_last.pt`` (last state).
        log_dir: the TensorBoard log folder.
        key_metric: the validator's key metric name.
    """

    def __init__(
        self,
        validator: Engine,
        ckpt_dir: str | os.PathLike,
        log_dir: str | os.PathLike,
        key_metric: str = "val_mean_dice",
    ) -> None:
        self.validator = validator
        self.ckpt_dir = Path(ckpt_dir)
        self.log_dir = Path(log_dir)
        self.key_metric = key_metric
        self.identity: float = math.nan

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.baseline)
        engine.add_event_handler(Events.COMPLETED, self.summary)
        self.validator.add_event_handler(Events.COMPLETED, self.after_validation)

    def baseline(self, engine: Engine) -> None:
        """The mean Dice of the validation pairs without registration."""
        from ran_bundle.metrics import MeanDiceOverLabels

        metric = MeanDiceOverLabels()
        pairs = 0
        for batch in self.validator.data_loader:
            moving, fixed = batch.get(PAIR_KEYS[2]), batch.get(PAIR_KEYS[3])
            if moving is None or fixed is None:
                continue
            metric(moving, fixed)
            pairs += int(moving.shape[0])
        if idist.all_reduce(pairs):
            self.identity = float(metric.aggregate())
            pairs = int(metric.get_buffer().shape[0])
            if idist.get_rank() == 0:
                logger.info("validation Dice with no registration (identity): %.4f over %d pairs", self.identity, pairs)

    def after_validation(self, engine: Engine) -> None:
        value = engine.state.metrics.get(self.key_metric)
        if value is not None and idist.get_rank() == 0:
            logger.info(
                "validation Dice %.4f (no registration: %.4f; best %.4f at epoch %d)",
                float(value),
                self.identity,
                float(getattr(engine.state, "best_metric", math.nan)),
                int(getattr(engine.state, "best_metric_epoch", -1)),
            )

    def summary(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        state = self.validator.state
        best = float(getattr(state, "best_metric", math.nan)) if state is not None else math.nan
        epoch = int(getattr(state, "best_metric_epoch", -1)) if state is not None else -1
        logger.info(
            "training done after %d epochs: best validation Dice %.4f at epoch %d (no registration: %.4f). "
            "Best model: %s. Last state (resume with --resume True): %s. TensorBoard logs: %s",
            engine.state.epoch,
            best,
            epoch,
            self.identity,
            self.ckpt_dir / "model.pt",
            self.ckpt_dir / "model_last.pt",
            self.log_dir,
        )
