"""One comparison run on real native-space brains: every method after the same affine stage, on every ordered pair
of the test subjects that no training or model selection saw.

Methods (rows): no deformation (the affine stage alone), SimpleITK multi-resolution demons, ANTs SyN
(``antspyx`` defaults, "not installed" when absent), VoxelMorph trained with the RAN's recipe, the RAN alone,
the RAN + instance optimisation (``ran-register``'s default pipeline), instance optimisation from a zero field
(``ran-register --no-network``) and from VoxelMorph's field: the network's worth is what its start adds to the
optimisation. ``--curve`` adds the Dice against the optimisation's iterations (the defaults scaled) for each
start, and the iterations the RAN's start saves to reach the Dice of a zero start. Columns: mean Dice over the labels of
at least 100 voxels, Dice over the cortex labels, HD95 (mm), % det J <= 0 inside the fixed foreground, seconds
per pair of the deformable stage (and as a ratio to ANTs in the same run). Everything is scored on the fixed
image's own 1 mm grid with nearest-neighbour label warps (:func:`ran_bundle.evaluation.native_label_scores`).

Example (the run of docs/results.md)::

    python scripts/compare_brain.py --threads 2 --out docs/results/brain

Landmarks: a subject of the datalist with ``"landmarks"`` (a CSV of corresponding points with columns ``x, y, z``, mm,
LPS as ``ran-warp`` reads them; the same rows in every subject) adds ``tre_mm`` to each row: the mean distance between
the moving landmarks and the fixed landmarks mapped by the registration (the Mindboggle subjects have none).

Data: Mindboggle-101 OASIS-TRT-20 (Klein & Tourville 2012, CC BY-NC-SA 3.0) from ``RAN_SHARED_DATA``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

# the bundle root: scripts.* when run as a file, and ran_bundle from the release zip (not installed there)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import SimpleITK as sitk
import torch

from ran_bundle.apply import read_points_csv
from ran_bundle.data import load_datalist
from ran_bundle.evaluation import native_label_scores
from ran_bundle.flow import ddf_voxel_to_mm, sample_voxels, world_to_voxel
from ran_bundle.optimise import optimise_field
from ran_bundle.pipeline import RegistrationPipeline
from ran_bundle.spatial import Grid, sitk_affine
from scripts import classical

REPO = Path(__file__).resolve().parents[1]

METHODS = ("affine only", "demons", "ANTs SyN", "VoxelMorph", "VoxelMorph + IO", "RAN", "IO from zero", "RAN + IO")
#: the rows of instance optimisation and where each starts
IO_STARTS = {"VoxelMorph + IO": "VoxelMorph", "IO from zero": "zero", "RAN + IO": "RAN"}
#: the starts of the curve of Dice against the optimisation's iterations
STARTS = ("zero", "RAN", "VoxelMorph")


def add_pair_options(p: argparse.ArgumentParser) -> None:
    """The pairs of a brain run: ``--datalist``, ``--base-dir``, ``--split``, ``--limit`` (:func:`load_pairs`)."""
    p.add_argument("--datalist", default=str(REPO / "configs/datalists/brain_mindboggle.json"))
    p.add_argument(
        "--base-dir",
        default=os.environ.get("RAN_SHARED_DATA", str(REPO.parent / "shared" / "data")),
        help="shared data folder (RAN_SHARED_DATA)",
    )
    p.add_argument("--split", default="test_pairs", help="pairs of the datalist: test_pairs or validation_pairs")
    p.add_argument("--limit", type=int, help="only the first N pairs (smoke runs)")


def load_pairs(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """The datalist and its ``--split`` pairs (the first ``--limit``) from the options of :func:`add_pair_options`."""
    data = load_datalist(args.datalist, base_dir=args.base_dir)
    return data, data[args.split][: args.limit]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_options(p)
    p.add_argument("--weights", default=str(REPO / "models/model.pt"), help="RAN weights")
    p.add_argument("--voxelmorph", default=str(REPO / "models/peers/voxelmorph_brain.pt"), help="VoxelMorph weights")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every method (torch, ITK, ANTs)")
    p.add_argument(
        "--curve",
        type=float,
        nargs="*",
        default=[],
        metavar="SCALE",
        help="also the Dice against instance-optimisation iterations: the default iterations times each SCALE "
        "(e.g. 0.25 0.5 1), from a zero start, the RAN's and VoxelMorph's",
    )
    p.add_argument("--out", required=True, help="folder for comparison.csv, comparison.md, comparison.json")
    return p.parse_args(argv)


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    data, pairs = load_pairs(args)
    landmarks = {
        s["image"]: os.path.join(args.base_dir, s["landmarks"])
        for split in ("training", "validation", "test")
        for s in data.get(split) or []
        if s.get("landmarks")
    }
    ran = RegistrationPipeline(weights=args.weights, progress=False)
    vxm = None
    if any(m.startswith("VoxelMorph") for m in args.methods) or args.curve:
        from scripts.peers import VoxelMorphDDF

        net = VoxelMorphDDF()
        state = torch.load(args.voxelmorph, map_location="cpu", weights_only=True)
        net.load_state_dict(state.get("model", state))
        vxm = RegistrationPipeline(weights=args.voxelmorph, network=net.eval(), progress=False)
    nets = {"RAN": ran, "VoxelMorph": vxm}
    rows, curve = [], []
    for i, pair in enumerate(pairs):
        name = f"{Path(pair['moving_image']).parent.name}->{Path(pair['fixed_image']).parent.name}"
        inputs = ran.check_inputs(pair["fixed_image"], pair["moving_image"], pair["fixed_label"], pair["moving_label"])
        affine, affine_s = _timed(ran.run_affine, inputs)
        fixed_image = inputs.sitk("fixed")
        native = Grid(tuple(inputs.fixed.array.shape), inputs.fixed.affine)
        moving_affined = sitk.Resample(inputs.sitk("moving"), fixed_image, sitk_affine(affine.matrix), sitk.sitkLinear)
        network_pair = ran.preprocess(inputs, affine)
        fields: dict[str, tuple[Grid, torch.Tensor, float]] = {}
        starts: dict[str, tuple[torch.Tensor, float]] = {}  # each start's field and seconds, once per pair
        for method in args.methods:
            if method == "affine only":
                fields[method] = (native, torch.zeros(1, 3, *native.shape), 0.0)
            elif method == "demons":
                v, s = _timed(classical.demons, fixed_image, moving_affined)
                fields[method] = (native, v, s)
            elif method == "ANTs SyN":
                if not classical.ants_available():
                    continue
                v, s = _timed(classical.ants_syn, fixed_image, moving_affined)
                fields[method] = (native, v, s)
            elif method in ("VoxelMorph", "RAN"):
                ddf, s = _start(starts, method, network_pair, nets)
                fields[method] = (network_pair.grid, ddf_voxel_to_mm(ddf, network_pair.grid.affine), s)
            elif method in IO_STARTS:
                ddf, start_s = _start(starts, IO_STARTS[method], network_pair, nets)
                (ddf_io, _), s = _timed(ran.optimise, network_pair, ddf)
                fields[method] = (network_pair.grid, ddf_voxel_to_mm(ddf_io, network_pair.grid.affine), start_s + s)
        for method in args.methods:
            if method not in fields:
                continue
            grid, v, seconds = fields[method]
            world = ran.to_world(inputs, affine, grid, v)
            scores = native_label_scores(world["warped_label"], inputs.fixed_label.array, inputs.fixed.spacing)
            if pair["fixed_image"] in landmarks and pair["moving_image"] in landmarks:
                scores["tre_mm"] = landmark_tre(
                    world["field"], inputs.fixed.affine, *(landmarks[pair[k]] for k in ("fixed_image", "moving_image"))
                )
            rows.append(
                {
                    "pair": name,
                    "method": method,
                    **scores,
                    "folding_percent": world["stats"]["non_positive_jacobian_percent"],
                    "seconds": seconds,
                    "affine_seconds": affine_s,
                }
            )
            print(
                f"[{i + 1}/{len(pairs)}] {name} {method:12s} Dice {scores['dice']:.4f} cortex "
                f"{scores['dice_cortex']:.4f} HD95 {scores['hd95']:.2f} fold "
                f"{rows[-1]['folding_percent']:.3f}% {seconds:.1f} s",
                flush=True,
            )
        for scale in args.curve:
            iterations = [round(n * scale) for n in ran.io_iterations]
            for start_name in STARTS:
                start, start_s = _start(starts, start_name, network_pair, nets)
                result = optimise_field(
                    network_pair.moving, network_pair.fixed, start, iterations, weight=ran.io_weight,
                    fold_weight=ran.io_fold_weight, progress=False,
                )  # fmt: skip
                world = ran.to_world(
                    inputs, affine, network_pair.grid, ddf_voxel_to_mm(result.ddf, network_pair.grid.affine)
                )
                scores = native_label_scores(world["warped_label"], inputs.fixed_label.array, inputs.fixed.spacing)
                curve.append(
                    {
                        "pair": name,
                        "start": start_name,
                        "scale": scale,
                        "iterations": sum(iterations),
                        "dice": scores["dice"],
                        "folding_percent": world["stats"]["non_positive_jacobian_percent"],
                        "io_seconds": result.seconds,
                        "start_seconds": start_s,
                    }
                )
                print(
                    f"[{i + 1}/{len(pairs)}] {name} curve {start_name:10s} x{scale:g} ({sum(iterations)} it) "
                    f"Dice {scores['dice']:.4f} fold {curve[-1]['folding_percent']:.3f}% {result.seconds:.1f} s",
                    flush=True,
                )
    write_report(rows, args)
    if curve:
        write_curve(curve, args)


def _start(
    cache: dict[str, tuple[torch.Tensor, float]], name: str, pair, nets: dict[str, RegistrationPipeline | None]
) -> tuple[torch.Tensor, float]:
    """The field ``(1, 3, *S)`` (voxels) of the network ``name`` ("RAN", "VoxelMorph"; "zero": none) on the
    network pair and its seconds, computed once per pair (kept in ``cache``)."""
    if name not in cache:
        if name == "zero":
            cache[name] = (torch.zeros(1, 3, *pair.grid.shape), 0.0)
        else:
            cache[name] = _timed(nets[name].predict, pair)
    return cache[name]


def landmark_tre(field: torch.Tensor, fixed_affine: np.ndarray, fixed_csv: str, moving_csv: str) -> float:
    """Mean distance (mm) between the moving landmarks and the fixed landmarks mapped by the whole mapping's world
    field ``(1, 3, *F)`` (RAS mm, on the fixed grid, linear between voxels)."""
    fixed_points = torch.as_tensor(read_points_csv(fixed_csv)[2], dtype=torch.float32).T  # (3, N) RAS
    moving_points = torch.as_tensor(read_points_csv(moving_csv)[2], dtype=torch.float32).T
    coords = world_to_voxel(fixed_points.reshape(3, -1, 1, 1), fixed_affine)
    moved = fixed_points + sample_voxels(field, coords, padding_mode="border")[0].reshape(3, -1)
    return float((moved - moving_points).norm(dim=0).mean())


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    return (float(arr.mean()), float(arr.std())) if arr.size else (math.nan, math.nan)


def write_report(rows: list[dict], args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {}
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            summary[method] = None
            continue
        summary[method] = {
            k: _mean_std([r[k] for r in mine]) for k in ("dice", "dice_cortex", "hd95", "folding_percent", "seconds")
        }
        if any("tre_mm" in r for r in mine):
            summary[method]["tre_mm"] = _mean_std([r.get("tre_mm") for r in mine])
        summary[method]["pairs"] = len(mine)
    ants = summary.get("ANTs SyN")
    ants_s = ants["seconds"][0] if ants else math.nan
    machine = f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    n_pairs = len({r["pair"] for r in rows})
    lines = [
        f"| method ({n_pairs} pairs) | mean Dice | Dice cortex | HD95 (mm) | % det J <= 0 | s / pair | vs ANTs time |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, s in summary.items():
        if s is None:
            note = "not installed (pip install 'ran-bundle[compare]')" if method == "ANTs SyN" else "not run"
            lines.append(f"| {method} | {note} | | | | | |")
            continue
        ratio = s["seconds"][0] / ants_s if ants_s and not math.isnan(ants_s) and s["seconds"][0] > 0 else math.nan
        lines.append(
            f"| {method} | {s['dice'][0]:.3f} ± {s['dice'][1]:.3f} | {s['dice_cortex'][0]:.3f} | "
            f"{s['hd95'][0]:.2f} | {s['folding_percent'][0]:.3f} | {s['seconds'][0]:.1f} | "
            + ("-" if math.isnan(ratio) else f"{ratio:.2f}")
            + " |"
        )
    affine_s = _mean_std([r["affine_seconds"] for r in rows if r["method"] == rows[0]["method"]])[0]
    lines += [
        "",
        f"Affine stage (shared by every row, not in the times above): {affine_s:.1f} s per pair. Machine: {machine}.",
        f"Command: `python scripts/compare_brain.py {' '.join(sys.argv[1:])}`",
    ]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    (out / "comparison.json").write_text(json.dumps({"summary": summary, "machine": machine}, indent=1) + "\n")
    print("\n".join(lines))


def write_curve(curve: list[dict], args: argparse.Namespace) -> None:
    """``curve.csv`` and ``curve.md``: mean Dice, folding and optimisation seconds per start and iteration count,
    and the network's worth: the iterations (and seconds) its start needs to reach the Dice of a zero start at the
    default iterations, read off the curve by linear interpolation."""
    out = Path(args.out)
    with open(out / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(curve[0]))
        writer.writeheader()
        writer.writerows(curve)
    scales = sorted({r["scale"] for r in curve})
    mean = {
        (start, scale): {
            k: _mean_std([r[k] for r in curve if r["start"] == start and r["scale"] == scale])[0]
            for k in ("dice", "folding_percent", "io_seconds", "iterations")
        }
        for start in STARTS
        for scale in scales
    }
    lines = [
        "| start | " + " | ".join(f"{mean[('zero', s)]['iterations']:.0f} it" for s in scales) + " |",
        "|---|" + "---|" * len(scales),
    ]
    for start in STARTS:
        cells = [
            f"{mean[(start, s)]['dice']:.3f} ({mean[(start, s)]['folding_percent']:.3f}%, "
            f"{mean[(start, s)]['io_seconds']:.1f} s)"
            for s in scales
        ]
        lines.append(f"| {start} | " + " | ".join(cells) + " |")
    lines += ["", "Mean Dice (% det J <= 0, instance-optimisation seconds) per start and iteration count."]
    if 1.0 in scales:
        target = mean[("zero", 1.0)]["dice"]
        for start in ("RAN", "VoxelMorph"):
            dice = [mean[(start, s)]["dice"] for s in scales]
            reached = next((k for k, d in enumerate(dice) if d >= target), None)
            gain = mean[(start, 1.0)]["dice"] - target
            if reached is None:
                text = f"does not reach it within {mean[(start, scales[-1])]['iterations']:.0f} iterations"
            elif reached == 0:
                text = f"reaches it within {mean[(start, scales[0])]['iterations']:.0f} iterations (the fewest tried)"
            else:
                lo, hi = scales[reached - 1], scales[reached]
                frac = (target - dice[reached - 1]) / max(dice[reached] - dice[reached - 1], 1e-9)
                scale = lo + frac * (hi - lo)
                text = (
                    f"reaches it at about {scale * mean[('zero', 1.0)]['iterations']:.0f} iterations "
                    f"({scale:.2f} of the default)"
                )
            lines.append(
                f"- {start} start: {gain:+.3f} Dice over a zero start at the default iterations; to match a zero "
                f"start's {target:.3f} it {text}."
            )
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
