"""The bundle's inference workflow (``configs/inference.json``): the registration pipeline over the pairs of a
datalist, one set of files a pair and a summary."""

from __future__ import annotations

import csv
import io
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ran_bundle.checks import InputError, parse_spacing
from ran_bundle.engines import pair_name
from ran_bundle.fields import atomic_write
from ran_bundle.outputs import OutputFolder, write_json
from ran_bundle.pipeline import RegistrationPipeline

__all__ = ["register_pairs"]

logger = logging.getLogger(__name__)


def register_pairs(
    pipeline: RegistrationPipeline,
    pairs: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    trained_with: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Register every pair of a datalist with ``pipeline`` and write each pair's outputs into ``output_dir``.

    The body of ``configs/inference.json``: per pair (:func:`ran_bundle.engines.pair_name`, e.g.
    ``s1_to_s0``) the files of :meth:`RegistrationPipeline.write` prefixed with the pair's name
    (``s1_to_s0_warped.nii.gz``, ``_ddf.nii.gz`` (the whole mapping, affine included), ``_affine.tfm``,
    ``_jacobian.nii.gz``, ``_warped_label.nii.gz`` when the moving label exists) and its
    ``_report.json``; at the end ``inference_summary.csv`` (one row a pair: mean Dice over the labels of
    at least 100 voxels after the affine stage and after the registration when both labels exist, folding,
    seconds, warnings). The folder is taken through :class:`ran_bundle.outputs.OutputFolder`: checked and
    locked before the first pair, and each pair's files appear together when that pair is done.

    Args:
        pipeline: the configured pipeline (its weights, spacing, intensity, affine stage, instance optimisation).
        pairs: dicts with ``"moving_image"``, ``"fixed_image"`` and optionally ``"moving_label"``,
            ``"fixed_label"`` file paths (:func:`ran_bundle.data.load_datalist`'s pairs).
        output_dir: the output folder (created when missing).
        trained_with: what the weights were trained with (``"intensity"``, ``"spacing"``, ``"data"`` in
            words): a pipeline set up otherwise is a user's choice, so it runs, with a warning in the log and
            in every report. Images whose values contradict ``intensity`` (CT in Hounsfield units scaled as
            MR, or no air in images scaled as CT) are warned about too.

    Returns:
        One dict a pair: ``name``, ``files`` (role -> file name), ``dice_affine``, ``dice_registered``
        (``None`` without both labels), ``folding_percent``, ``seconds``, ``warnings``.

    Raises:
        InputError: a pair without both images, an unwritable or busy ``output_dir``, or a bad input file
            (the pairs before it are written).
    """

    for i, pair in enumerate(pairs):
        if not all(pair.get(key) for key in ("moving_image", "fixed_image")):
            raise InputError(f"pair {i} ({dict(pair)}): needs 'moving_image' and 'fixed_image' file paths.")
    setup_warnings = []
    trained = dict(trained_with or {})
    if trained.get("intensity") not in (None, pipeline.intensity):
        setup_warnings.append(
            f"intensity {pipeline.intensity!r} differs from the {trained['intensity']!r} the weights "
            f"{pipeline.weights} were trained with ({trained.get('data', 'see the model card')}): expect a poor "
            "registration."
        )
    if trained.get("spacing") is not None and not np.allclose(parse_spacing(trained["spacing"]), pipeline.spacing):
        setup_warnings.append(
            f"network grid spacing {list(pipeline.spacing)} mm differs from the {trained['spacing']} mm the weights "
            f"{pipeline.weights} were trained at: expect a poor registration."
        )
    for warning in setup_warnings:
        logger.warning("warning: %s", warning)
    names = [pair_name(pair["moving_image"], pair["fixed_image"]) for pair in pairs]
    if len(set(names)) != len(names):  # same file names in several folders: number them instead
        names = [f"pair{i:03d}_{name}" for i, name in enumerate(names)]
    summary: list[dict[str, Any]] = []
    with OutputFolder(output_dir, tool="monai.bundle run (configs/inference.json)", known=()) as folder:
        for name, pair in tqdm(
            list(zip(names, pairs, strict=True)), desc="pairs", unit="pair", file=sys.stderr,
            disable=not pipeline.progress,
        ):  # fmt: skip
            logger.info("pair %s", name)
            start = time.perf_counter()
            registration = pipeline.register(
                pair["fixed_image"], pair["moving_image"], pair.get("fixed_label"), pair.get("moving_label")
            )
            warnings = list(setup_warnings)
            for volume in (registration.inputs.fixed, registration.inputs.moving):
                low = float(np.min(volume.array))
                if pipeline.intensity == "mr" and low < -500:
                    warnings.append(
                        f"{volume.role} {volume.path} holds values down to {low:.0f} (CT in Hounsfield units?) but "
                        "is scaled as MR (intensity 'mr'): use weights and intensity 'ct' for CT."
                    )
                elif pipeline.intensity == "ct" and low > -200:
                    warnings.append(
                        f"{volume.role} {volume.path} has no value below -200 (no air): it does not look like CT in "
                        "Hounsfield units, yet it is scaled as CT (intensity 'ct')."
                    )
            for warning in warnings[len(setup_warnings) :]:
                logger.warning("warning: %s", warning)
            registration.warnings[:0] = warnings
            with folder.stage() as staging:
                written = pipeline.write(registration, staging)
                files = {}
                for role, file in written.items():
                    files[role] = f"{name}_{file}"
                    if role != "report":
                        os.replace(staging / file, staging / files[role])
                arguments = {"pair": dict(pair), "name": name, "output_dir": os.fspath(output_dir)}
                write_json(staging / files["report"], pipeline.report(registration, files, arguments))
            dice = registration.stats.get("dice") or {}
            summary.append(
                {
                    "name": name,
                    "files": files,
                    "dice_affine": dice.get("mean_affine_100"),
                    "dice_registered": dice.get("mean_registered_100"),
                    "folding_percent": registration.stats["non_positive_jacobian_percent"],
                    "seconds": round(time.perf_counter() - start, 1),
                    "warnings": registration.warnings,
                }
            )
            if dice:
                logger.info(
                    "%s: mean Dice (labels of >= 100 voxels) %.4f affine only, %.4f registered",
                    name, dice["mean_affine_100"], dice["mean_registered_100"],
                )  # fmt: skip
        text = io.StringIO()
        columns = ("name", "dice_affine", "dice_registered", "folding_percent", "seconds", "warnings")
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in summary:
            writer.writerow({**row, "warnings": " | ".join(row["warnings"])})
        with folder.stage() as staging:
            atomic_write(staging / "inference_summary.csv", lambda tmp: Path(tmp).write_text(text.getvalue()))
    return summary
