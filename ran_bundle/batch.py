"""Batch registration: many pairs through one :class:`~ran_bundle.pipeline.RegistrationPipeline`, resumable,
with bad subjects isolated, spread over ``torchrun`` processes (``ran-register-batch`` and
``configs/inference.json``).

What a run does (:func:`run_batch`):

* **one folder a pair**: ``OUT/<row>_<fixed stem>__<moving stem>/`` (row numbers from 1, five digits) holds the
  files of ``ran-register`` for that pair, written through :class:`ran_bundle.outputs.OutputFolder` (locked,
  staged, ``report.json`` moved in last), so a folder is complete or holds the previous run's files.
* **resume**: a pair whose folder holds a complete run (``report.json`` and every output it lists) made with the
  same *fingerprint* (:func:`pipeline_settings`: every setting that changes the result, the md5 of the weights and
  of the initial transform, plus the md5 of the pair's files and the package version) is ``skipped``. Kill a
  run at any point and start it again: it redoes at most the pairs that were in progress.
* **isolation**: a pair whose files are missing, truncated or unreadable (or that fails in any other way) is
  ``failed`` with its one-line reason; the run goes on. Nothing of a failed pair is written.
* **processes**: launched by ``torchrun`` (``WORLD_SIZE`` set), rank ``r`` of ``w`` takes the pairs ``i`` with
  ``i % w == r`` (the order of the list), loads the network once, uses ``cores / local world size`` threads in
  PyTorch and SimpleITK (``threads`` overrides) and its own GPU (``cuda:LOCAL_RANK``); the process group (gloo on
  CPU, nccl on GPU) only gathers the results on rank 0. Each rank appends each pair's result to
  ``OUT/.partial-rank<r>-of-<w>.jsonl`` as it goes (rank 0's progress bar counts them); rank 0 writes
  ``OUT/summary.csv`` (atomically) once all ranks are done. A plain command is one process without a process group.

``summary.csv`` has one row a pair (:data:`SUMMARY_COLUMNS`): ``status`` ``done`` (registered by this run),
``skipped`` (complete outputs of the same fingerprint found) or ``failed`` (``reason``), the mean Dice (labels of at
least 100 voxels) after the affine stage and after the registration when both labels are given, folding
(% det J <= 0 in the fixed foreground), warnings and seconds (for a skipped pair, those of the run that made it).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from ran_bundle.fields import atomic_write
from ran_bundle.inputs import InputError, parse_spacing
from ran_bundle.outputs import KNOWN_OUTPUTS, OutputFolder, write_json
from ran_bundle.pipeline import Registration, RegistrationPipeline

__all__ = [
    "SUMMARY_COLUMNS",
    "PairJob",
    "read_pairs_csv",
    "atlas_pairs",
    "pipeline_settings",
    "setup_warnings",
    "default_threads",
    "run_batch",
    "summary_lines",
    "batch_parser",
    "batch_main",
]

logger = logging.getLogger(__name__)

#: the columns of ``summary.csv``
SUMMARY_COLUMNS = (
    "row",
    "name",
    "status",
    "fixed",
    "moving",
    "dice_affine",
    "dice_registered",
    "folding_percent",
    "seconds",
    "warnings",
    "reason",
)
_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".gz")


def _stem(path: str) -> str:
    """The file name without its image suffix, safe as part of a folder name."""
    name = Path(path).name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


@dataclass(frozen=True)
class PairJob:
    """One pair of a batch: its row number (from 1) and its files."""

    row: int
    fixed: str
    moving: str
    fixed_label: str | None = None
    moving_label: str | None = None

    @property
    def name(self) -> str:
        """The pair's folder name: ``<row, 5 digits>_<fixed stem>__<moving stem>``."""
        return f"{self.row:05d}_{_stem(self.fixed)}__{_stem(self.moving)}"

    def files(self) -> dict[str, str | None]:
        return {
            "fixed": self.fixed,
            "moving": self.moving,
            "fixed_label": self.fixed_label,
            "moving_label": self.moving_label,
        }


def _resolve(value: str, base: Path) -> str:
    path = Path(value).expanduser()
    return os.fspath(path if path.is_absolute() else base / path)


def _read_text(path: str | os.PathLike, flag: str) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise InputError(f"{flag} {path}: not found.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{flag} {path}: cannot read it ({getattr(e, 'strerror', None) or e}).") from None


def read_pairs_csv(path: str | os.PathLike) -> list[PairJob]:
    """The pairs of a CSV file with a header holding ``fixed`` and ``moving`` (and optionally ``fixed_label``,
    ``moving_label``), one pair a row; relative paths are relative to the CSV file's folder.

    Raises:
        InputError: the file is missing or unreadable, lacks the header, has no rows, or a row lacks an image.
    """
    text = _read_text(path, "--pairs")
    rows = list(csv.DictReader(io.StringIO(text)))
    header = [name.strip() for name in (csv.DictReader(io.StringIO(text)).fieldnames or [])]
    if not {"fixed", "moving"} <= set(header):
        raise InputError(f"--pairs {path}: needs a header with 'fixed' and 'moving' columns (found {header}).")
    if not rows:
        raise InputError(f"--pairs {path}: holds no pairs.")
    base = Path(path).absolute().parent
    jobs = []
    for i, row in enumerate(rows, start=1):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not row["fixed"] or not row["moving"]:
            raise InputError(f"--pairs {path}: row {i} lacks a fixed or a moving image.")
        labels = [_resolve(row[key], base) if row.get(key) else None for key in ("fixed_label", "moving_label")]
        jobs.append(PairJob(i, _resolve(row["fixed"], base), _resolve(row["moving"], base), *labels))
    return jobs


def atlas_pairs(atlas: str, atlas_label: str | None, subjects: str | os.PathLike) -> list[PairJob]:
    """Atlas mode: the atlas (moving, with its label map) onto every subject of ``subjects`` (fixed), a text file
    with one image path a line (blank lines and lines starting with ``#`` are ignored; relative paths are
    relative to its folder).

    Raises:
        InputError: the subjects file is missing, unreadable or empty.
    """
    base = Path(subjects).absolute().parent
    lines = [line.strip() for line in _read_text(subjects, "--subjects").splitlines()]
    images = [_resolve(line, base) for line in lines if line and not line.startswith("#")]
    if not images:
        raise InputError(f"--subjects {subjects}: holds no subjects.")
    return [PairJob(i, image, atlas, None, atlas_label) for i, image in enumerate(images, start=1)]


# --------------------------------------------------------------------------------------------------
# fingerprints and results
# --------------------------------------------------------------------------------------------------


def _md5(path: str | os.PathLike | None) -> str | None:
    """The md5 of a file; ``None`` without a path or when it cannot be read (the pipeline then says why)."""
    if path is None:
        return None
    digest = hashlib.md5()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def pipeline_settings(pipeline: RegistrationPipeline, png: bool = False) -> dict[str, Any]:
    """Everything of ``pipeline`` (and the package) that changes a pair's outputs; the device and the threads are
    left out (a run on another machine resumes a run)."""
    from ran_bundle import __version__

    return {
        "version": __version__,
        "weights_md5": _md5(pipeline.weights),
        "preset": pipeline.preset,
        "spacing": list(pipeline.spacing),
        "intensity": pipeline.intensity,
        "affine": pipeline.affine_stage,
        "initial_transform_md5": _md5(pipeline.initial_transform),
        "io_iterations": list(pipeline.io_iterations),
        "io_weight": pipeline.io_weight,
        "io_fold_weight": pipeline.io_fold_weight,
        "finetune_steps": pipeline.finetune_steps,
        "finetune_lr": pipeline.finetune_lr,
        "inverse": pipeline.inverse,
        "amp": pipeline.amp,
        "png": bool(png),
    }


def _fingerprint(settings: Mapping[str, Any], job: PairJob) -> str:
    files = {role: _md5(path) for role, path in job.files().items()}
    text = json.dumps({"settings": settings, "files": files}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _complete_report(folder: Path, fingerprint: str) -> dict[str, Any] | None:
    """The report of a complete earlier run of the same fingerprint in ``folder``, else ``None``."""
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("arguments", {}).get("fingerprint") != fingerprint:
        return None
    outputs = report.get("outputs") or {}
    return report if all((folder / name).is_file() for name in outputs.values()) else None


def _result(job: PairJob, status: str, report: Mapping[str, Any] | None, seconds: float, reason: str = "") -> dict:
    field = (report or {}).get("field") or {}
    dice = field.get("dice") or {}
    folding = field.get("non_positive_jacobian_percent")
    return {
        "row": job.row,
        "name": job.name,
        "status": status,
        "fixed": job.fixed,
        "moving": job.moving,
        "dice_affine": dice.get("mean_affine_100"),
        "dice_registered": dice.get("mean_registered_100"),
        "folding_percent": folding,
        "seconds": round(seconds, 1),
        "warnings": list((report or {}).get("warnings") or []),
        "reason": reason,
    }


def setup_warnings(pipeline: RegistrationPipeline, trained_with: Mapping[str, Any] | None) -> list[str]:
    """Warnings for a pipeline set up otherwise than the weights were trained (``trained_with``: ``"intensity"``,
    ``"spacing"``, ``"data"`` in words): a user's choice, so it runs, with these in the log and every report."""
    warnings = []
    trained = dict(trained_with or {})
    if trained.get("intensity") not in (None, pipeline.intensity):
        warnings.append(
            f"intensity {pipeline.intensity!r} differs from the {trained['intensity']!r} the weights "
            f"{pipeline.weights} were trained with ({trained.get('data', 'see the model card')}): expect a poor "
            "registration."
        )
    if trained.get("spacing") is not None and not np.allclose(parse_spacing(trained["spacing"]), pipeline.spacing):
        warnings.append(
            f"network grid spacing {list(pipeline.spacing)} mm differs from the {trained['spacing']} mm the weights "
            f"{pipeline.weights} were trained at: expect a poor registration."
        )
    return warnings


def _intensity_warnings(registration: Registration, intensity: str) -> list[str]:
    """Images whose values contradict ``intensity`` (CT in Hounsfield units scaled as MR, no air scaled as CT)."""
    warnings = []
    for volume in (registration.inputs.fixed, registration.inputs.moving):
        low = float(np.min(volume.array))
        if intensity == "mr" and low < -500:
            warnings.append(
                f"{volume.role} {volume.path} holds values down to {low:.0f} (CT in Hounsfield units?) but "
                "is scaled as MR (intensity 'mr'): use weights and intensity 'ct' for CT."
            )
        elif intensity == "ct" and low > -200:
            warnings.append(
                f"{volume.role} {volume.path} has no value below -200 (no air): it does not look like CT in "
                "Hounsfield units, yet it is scaled as CT (intensity 'ct')."
            )
    return warnings


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if isinstance(error, InputError) else f"{type(error).__name__}: {text}"


def _register_one(
    pipeline: RegistrationPipeline,
    job: PairJob,
    out_dir: Path,
    settings: Mapping[str, Any],
    warnings_first: Sequence[str],
    png: bool,
    rank: str = "0/1",
) -> dict[str, Any]:
    """Skip, register or fail one pair; never raises but for ``KeyboardInterrupt``/``SystemExit``."""
    start = time.perf_counter()
    folder = OutputFolder(out_dir / job.name, tool="ran-register-batch", known=KNOWN_OUTPUTS)
    try:
        fingerprint = _fingerprint(settings, job)
        with folder:  # locked: a second run into OUT leaves this pair alone; stale staging folders go
            report = _complete_report(folder.target, fingerprint)
            if report is not None:
                return _result(job, "skipped", report, sum((report.get("timings_s") or {}).values()))
            registration = pipeline.register(job.fixed, job.moving, job.fixed_label, job.moving_label)
            extra = _intensity_warnings(registration, pipeline.intensity)
            for warning in extra:
                logger.warning("warning: %s: %s", job.name, warning)
            registration.warnings[:0] = [*warnings_first, *extra]
            with folder.stage() as staging:
                outputs = pipeline.write(registration, staging, png=png)
                arguments = {"pair": job.files(), "row": job.row, "fingerprint": fingerprint, "rank": rank}
                report = pipeline.report(registration, outputs, arguments)
                write_json(staging / outputs["report"], report)
        return _result(job, "done", report, time.perf_counter() - start)
    except Exception as e:  # a bad subject: recorded, the batch goes on
        logger.debug("pair %s failed", job.name, exc_info=True)
        return _result(job, "failed", None, time.perf_counter() - start, _one_line(e))


# --------------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------------


def default_threads() -> int:
    """CPU threads for one process: the cores this process may use divided by the processes on this machine
    (``LOCAL_WORLD_SIZE``, set by ``torchrun``), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def rank_device(device: str | torch.device | None) -> str | torch.device | None:
    """Under ``torchrun`` a process's GPU is ``cuda:LOCAL_RANK`` when ``device`` is ``None`` or ``"cuda"``."""
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available() and str(device) in ("None", "cuda"):
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


class _Group:
    """The ``torch.distributed`` side of a batch: rank, world size and the collectives (no-ops for one process)."""

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.created = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(device)
            # ranks wait for each other only at the end, possibly for hours: a long timeout
            dist.init_process_group(backend, timeout=datetime.timedelta(days=7))
            self.created = True
        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def broadcast(self, value: Any) -> Any:
        if not self.on:
            return value
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def wait_all(self, while_waiting) -> None:
        """Wait for every rank (a barrier), calling ``while_waiting()`` every half second meanwhile."""
        if not self.on:
            return
        work = self.dist.barrier(async_op=True)
        while not work.is_completed():
            while_waiting()
            time.sleep(0.5)
        work.wait()

    def gather(self, value: Any) -> list[Any]:
        if not self.on:
            return [value]
        out = [None] * self.world if self.rank == 0 else None
        self.dist.gather_object(value, out, dst=0)
        return out if out is not None else [value]

    def close(self) -> None:
        if self.created:
            self.dist.destroy_process_group()


def _partial_path(out_dir: Path, rank: int, world: int) -> Path:
    return out_dir / f".partial-rank{rank}-of-{world}.jsonl"


def _count_partials(out_dir: Path, world: int) -> int:
    """Pairs recorded so far by all ranks (the partial files this machine can see)."""
    total = 0
    for rank in range(world):
        try:
            total += _partial_path(out_dir, rank, world).read_text().count("\n")
        except OSError:
            continue
    return total


def _summary_text(rows: Iterable[Mapping[str, Any]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                **row,
                **{k: "" if row[k] is None else f"{row[k]:.4f}" for k in ("dice_affine", "dice_registered")},
                "folding_percent": "" if row["folding_percent"] is None else f"{row['folding_percent']:.4f}",
                "warnings": " | ".join(row["warnings"]),
            }
        )
    return text.getvalue()


def run_batch(
    pipeline: RegistrationPipeline,
    jobs: Sequence[PairJob],
    out_dir: str | os.PathLike,
    trained_with: Mapping[str, Any] | None = None,
    png: bool = False,
    threads: int | None = None,
    progress: bool = True,
    tool: str = "ran-register-batch",
) -> list[dict[str, Any]]:
    """Register ``jobs`` into ``out_dir``: one folder a pair, resumable, failures isolated, sharded over the
    ``torchrun`` processes (see the module docstring).

    Args:
        pipeline: the configured pipeline (network loaded once for the whole batch).
        jobs: the pairs (:func:`read_pairs_csv`, :func:`atlas_pairs`).
        out_dir: the batch's folder (created when missing; locked by rank 0 for the run).
        trained_with: what the weights were trained with (:func:`setup_warnings`).
        png: also write each pair's ``overview.png`` (matplotlib).
        threads: CPU threads of this process; ``None``: :func:`default_threads`.
        progress: a progress bar over the whole batch on rank 0 (stderr).
        tool: the name recorded in the lock of ``out_dir``.

    Returns:
        The summary rows (:data:`SUMMARY_COLUMNS`, ``warnings`` a list), in row order: every pair's on rank 0, the
        rank's own pairs on the other ranks.

    Raises:
        InputError: no pairs, two pairs of one row number, a bad ``threads``, or ``out_dir`` unwritable or busy
            (before any pair).
    """
    if not jobs:
        raise InputError("no pairs to register.")
    if len({job.name for job in jobs}) != len(jobs):
        raise InputError("two pairs share a row number.")
    if threads is not None and threads < 1:
        raise InputError(f"--threads {threads}: expected a positive integer.")
    out_dir = Path(out_dir).absolute()
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)  # the affine stage and resampling, likewise
    group = _Group(pipeline.device)
    folder = OutputFolder(out_dir, tool=tool, known=("summary.csv",))
    try:
        refused = None
        if group.rank == 0:
            try:
                folder.acquire()
                out_dir.mkdir(exist_ok=True)
                for old in out_dir.glob(".partial-rank*-of-*.jsonl"):  # of a killed run (the others wait below)
                    old.unlink(missing_ok=True)
            except InputError as e:
                refused = str(e)
        refused = group.broadcast(refused)
        if refused:
            raise InputError(refused)
        out_dir.mkdir(parents=True, exist_ok=True)  # the other nodes' view of it, shared or not
        first = setup_warnings(pipeline, trained_with)
        for warning in first:
            logger.warning("warning: %s", warning)
        settings = pipeline_settings(pipeline, png)
        shard = [job for i, job in enumerate(jobs) if i % group.world == group.rank]
        partial = _partial_path(out_dir, group.rank, group.world)
        partial.write_text("")
        bar = tqdm(total=len(jobs), desc="pairs", unit="pair", file=sys.stderr, disable=not progress or group.rank != 0)

        def show(own: int) -> None:
            bar.n = max(own, _count_partials(out_dir, group.world)) if group.world > 1 else own
            bar.refresh()

        rows = []
        for job in shard:
            row = _register_one(pipeline, job, out_dir, settings, first, png, f"{group.rank}/{group.world}")
            if row["status"] == "failed":
                logger.warning("%s failed: %s", job.name, row["reason"])
            rows.append(row)
            with open(partial, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
            show(len(rows))
        group.wait_all(lambda: show(len(rows)))
        gathered = group.gather(rows)
        bar.n = bar.total  # every rank is done
        bar.close()
        rows = sorted((row for part in gathered for row in part), key=lambda r: r["row"])
        if group.rank == 0:
            text = _summary_text(rows)
            with folder.stage() as staging:
                atomic_write(staging / "summary.csv", lambda tmp: Path(tmp).write_text(text))
        partial.unlink(missing_ok=True)
        return rows
    finally:
        folder.release()
        group.close()


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


def summary_lines(rows: Sequence[Mapping[str, Any]], seconds: float, summary: str | os.PathLike) -> list[str]:
    """The last lines of a batch: totals, the slowest pairs, the worst (lowest registered Dice, else most folding)
    and the failed ones with their reasons."""
    count = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")}
    rate = f", {count['done'] * 3600 / seconds:.0f} pairs/hour" if seconds > 0 and count["done"] else ""
    lines = [
        f"{len(rows)} pairs: {count['done']} done, {count['skipped']} skipped, {count['failed']} failed "
        f"in {seconds:.1f} s{rate}; summary: {summary}"
    ]
    ok = [r for r in rows if r["status"] != "failed"]
    if ok:
        slow = sorted(ok, key=lambda r: -r["seconds"])[:3]
        lines.append("slowest: " + ", ".join(f"{r['name']} {r['seconds']:.1f} s" for r in slow))
        with_dice = [r for r in ok if r["dice_registered"] is not None]
        if with_dice:
            worst = sorted(with_dice, key=lambda r: r["dice_registered"])[:3]
            lines.append("worst Dice: " + ", ".join(f"{r['name']} {r['dice_registered']:.4f}" for r in worst))
        folded = [r for r in ok if r["folding_percent"] is not None]
        if folded:
            worst = sorted(folded, key=lambda r: -r["folding_percent"])[:3]
            lines.append("most folding: " + ", ".join(f"{r['name']} {r['folding_percent']:.3f} %" for r in worst))
    lines += [f"failed: {r['name']}: {r['reason']}" for r in rows if r["status"] == "failed"]
    return lines


def batch_parser() -> argparse.ArgumentParser:
    """The ``ran-register-batch`` argument parser (the registration options are ``ran-register``'s)."""
    from ran_bundle.cli import _Parser, add_pipeline_options, add_run_options

    p = _Parser(
        prog="ran-register-batch",
        description=(
            "Register many pairs: OUT/<row>_<fixed>__<moving>/ gets each pair's ran-register outputs and "
            "OUT/summary.csv one row a pair (status done, skipped or failed). Resumable: a pair with complete "
            "outputs of the same settings, weights and input files is skipped. A bad pair fails alone; the exit "
            "status is 1 when any failed. Under torchrun (e.g. python -m torch.distributed.run --nproc_per_node 2 "
            "-m ran_bundle.batch ...) the pairs are shared among the processes. See docs/batch.md."
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", help="CSV file with a header: fixed,moving[,fixed_label,moving_label]")
    source.add_argument("--atlas", help="atlas mode: this image (moving) onto every subject of --subjects")
    p.add_argument("--atlas-label", help="atlas mode: the atlas's label map, warped onto every subject")
    p.add_argument("--subjects", help="atlas mode: text file, one subject image (fixed) a line")
    p.add_argument("--out", required=True, help="output folder of the batch")
    add_pipeline_options(p)
    add_run_options(p, threads_help="CPU threads a process (default: its cores / processes per machine)")
    return p


def _batch(args: argparse.Namespace) -> int:
    from ran_bundle.cli import pipeline_options

    if args.pairs is not None:
        if args.subjects or args.atlas_label:
            raise InputError("--subjects and --atlas-label go with --atlas, not with --pairs.")
        jobs = read_pairs_csv(args.pairs)
    else:
        if not args.subjects:
            raise InputError("--atlas needs --subjects (one subject image a line).")
        jobs = atlas_pairs(args.atlas, args.atlas_label, args.subjects)
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads {args.threads}: expected a positive integer.")
    if args.png:
        from ran_bundle.figures import require_matplotlib

        require_matplotlib()
    start = time.perf_counter()
    pipeline = RegistrationPipeline(
        weights=args.weights,
        preset=args.preset,
        device=rank_device(args.device),
        amp=args.amp,
        **{**pipeline_options(args), "progress": False},  # one progress bar: the batch's
    )
    rows = run_batch(pipeline, jobs, args.out, png=args.png, threads=args.threads, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        for line in summary_lines(rows, time.perf_counter() - start, Path(args.out) / "summary.csv"):
            print(line, flush=True)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def batch_main(argv: Sequence[str] | None = None) -> None:
    """Console script ``ran-register-batch`` (also ``python -m ran_bundle.batch``, which ``torchrun`` runs)."""
    from ran_bundle.cli import _fail, _setup_logging

    parser = batch_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    _setup_logging("ran-register-batch", quiet=True)  # each pair's steps would bury the progress bar
    try:
        status = _batch(args)
    except InputError as e:
        _fail("ran-register-batch", str(e))
    except KeyboardInterrupt:
        _fail("ran-register-batch", "interrupted; the pairs done so far are kept, run again to resume", status=130)
    sys.exit(status)


if __name__ == "__main__":
    batch_main()
