"""The bundle's inference workflow (``configs/inference.json``): the pairs of a datalist through the batch runner
(:func:`ran_bundle.batch.run_batch`), so the MONAI way resumes, isolates bad subjects and runs under ``torchrun``
exactly as ``ran-register-batch`` does."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ran_bundle.batch import PairJob, run_batch
from ran_bundle.inputs import InputError
from ran_bundle.pipeline import RegistrationPipeline

__all__ = ["register_pairs"]


def register_pairs(
    pipeline: RegistrationPipeline,
    pairs: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    trained_with: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Register every pair of a datalist with ``pipeline`` into ``output_dir`` (the body of
    ``configs/inference.json``).

    Pair ``i`` (from 1, in the datalist's order) goes to ``output_dir/<i, 5 digits>_<fixed stem>__<moving stem>/``
    with the files of ``ran-register`` (``warped.nii.gz``, ``ddf.nii.gz``, ``affine.tfm``, ``jacobian.nii.gz``,
    ``warped_label.nii.gz`` when the moving label exists, ``report.json``), and ``output_dir/summary.csv`` has
    one row a pair (:data:`ran_bundle.batch.SUMMARY_COLUMNS`). A pair already done with the same settings,
    weights and files is skipped; a pair whose files are bad fails alone, with its reason in the summary.

    Args:
        pipeline: the configured pipeline (its weights, spacing, intensity, affine stage, instance optimisation).
        pairs: dicts with ``"moving_image"``, ``"fixed_image"`` and optionally ``"moving_label"``,
            ``"fixed_label"`` file paths (:func:`ran_bundle.data.load_datalist`'s pairs).
        output_dir: the output folder (created when missing).
        trained_with: what the weights were trained with (:func:`ran_bundle.batch.setup_warnings`): a pipeline
            set up otherwise runs, with a warning in the log and in every report.
        threads: CPU threads of each process (``None``: its cores / the processes on the machine).

    Returns:
        The summary rows (on rank 0 every pair's).

    Raises:
        InputError: a pair without both images or an unwritable or busy ``output_dir`` (before any pair), or,
            at the end, pairs that failed (named with their reasons; the others are written).
    """
    for i, pair in enumerate(pairs):
        if not all(pair.get(key) for key in ("moving_image", "fixed_image")):
            raise InputError(f"pair {i} ({dict(pair)}): needs 'moving_image' and 'fixed_image' file paths.")
    jobs = [
        PairJob(i, p["fixed_image"], p["moving_image"], p.get("fixed_label"), p.get("moving_label"))
        for i, p in enumerate(pairs, start=1)
    ]
    rows = run_batch(
        pipeline, jobs, output_dir, trained_with=trained_with, threads=threads, progress=pipeline.progress,
        tool="monai.bundle run (configs/inference.json)",
    )  # fmt: skip
    failed = [row for row in rows if row["status"] == "failed"]
    if failed:
        reasons = "; ".join(f"{row['name']}: {row['reason']}" for row in failed)
        raise InputError(f"{len(failed)} of {len(rows)} pairs failed (see {output_dir}/summary.csv): {reasons}")
    return rows
