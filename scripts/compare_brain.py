"""One comparison run on real native-space brains: every method after the same affine stage, on every ordered pair
of the test subjects that no training or model selection saw.

Methods (rows): no deformation (the affine stage alone), SimpleITK multi-resolution demons, ANTs SyN
(``antspyx`` defaults, "not installed" when absent), VoxelMorph trained with the RAN's recipe, the RAN alone,
the RAN + instance optimisation (``ran-register``'s default pipeline). Columns: mean Dice over the labels of
at least 100 voxels, Dice over the cortex labels, HD95 (mm), % det J <= 0 inside the fixed foreground, seconds
per pair of the deformable stage (and as a ratio to ANTs in the same run). Everything is scored on the fixed
image's own 1 mm grid with nearest-neighbour label warps (:func:`ran_bundle.evaluation.native_label_scores`).

Example (the run of docs/results.md)::

    python scripts/compare_brain.py --threads 2 --out docs/results/brain

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

from ran_bundle.data import load_datalist
from ran_bundle.evaluation import native_label_scores
from ran_bundle.fields import ddf_voxel_to_mm
from ran_bundle.pipeline import RegistrationPipeline
from ran_bundle.spatial import Grid, sitk_affine
from scripts import classical

REPO = Path(__file__).resolve().parents[1]

METHODS = ("affine only", "demons", "ANTs SyN", "VoxelMorph", "RAN", "RAN + IO")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datalist", default=str(REPO / "configs/datalists/brain_mindboggle.json"))
    p.add_argument(
        "--base-dir",
        default=os.environ.get("RAN_SHARED_DATA", str(REPO.parent / "shared" / "data")),
        help="shared data folder (RAN_SHARED_DATA)",
    )
    p.add_argument("--split", default="test_pairs", help="pairs of the datalist: test_pairs or validation_pairs")
    p.add_argument("--weights", default=str(REPO / "models/model.pt"), help="RAN weights")
    p.add_argument("--voxelmorph", default=str(REPO / "models/peers/voxelmorph_brain.pt"), help="VoxelMorph weights")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every method (torch, ITK, ANTs)")
    p.add_argument("--limit", type=int, help="only the first N pairs (smoke runs)")
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
    data = load_datalist(args.datalist, base_dir=args.base_dir)
    pairs = data[args.split][: args.limit]
    ran = RegistrationPipeline(weights=args.weights, progress=False)
    vxm = None
    if "VoxelMorph" in args.methods:
        from scripts.peers import VoxelMorphDDF

        net = VoxelMorphDDF()
        state = torch.load(args.voxelmorph, map_location="cpu", weights_only=True)
        net.load_state_dict(state.get("model", state))
        vxm = RegistrationPipeline(weights=args.voxelmorph, network=net.eval(), progress=False)
    rows = []
    for i, pair in enumerate(pairs):
        name = f"{Path(pair['moving_image']).parent.name}->{Path(pair['fixed_image']).parent.name}"
        inputs = ran.check_inputs(pair["fixed_image"], pair["moving_image"], pair["fixed_label"], pair["moving_label"])
        affine, affine_s = _timed(ran.run_affine, inputs)
        fixed_image = inputs.sitk("fixed")
        native = Grid(tuple(inputs.fixed.array.shape), inputs.fixed.affine)
        moving_affined = sitk.Resample(inputs.sitk("moving"), fixed_image, sitk_affine(affine.matrix), sitk.sitkLinear)
        network_pair = ran.preprocess(inputs, affine)
        fields: dict[str, tuple[Grid, torch.Tensor, float]] = {}
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
            elif method == "VoxelMorph" and vxm is not None:
                ddf, s = _timed(vxm.predict, network_pair)
                fields[method] = (network_pair.grid, ddf_voxel_to_mm(ddf, network_pair.grid.affine), s)
            elif method in ("RAN", "RAN + IO"):
                if "RAN" not in fields:
                    ddf, s = _timed(ran.predict, network_pair)
                    fields["RAN"] = (network_pair.grid, ddf_voxel_to_mm(ddf, network_pair.grid.affine), s)
                    ran_ddf, ran_s = ddf, s
                if method == "RAN + IO":
                    (ddf_io, _), s = _timed(ran.optimise, network_pair, ran_ddf)
                    fields[method] = (network_pair.grid, ddf_voxel_to_mm(ddf_io, network_pair.grid.affine), ran_s + s)
        for method in args.methods:
            if method not in fields:
                continue
            grid, v, seconds = fields[method]
            world = ran.to_world(inputs, affine, grid, v)
            scores = native_label_scores(world["warped_label"], inputs.fixed_label.array, inputs.fixed.spacing)
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
    write_report(rows, args)


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


if __name__ == "__main__":
    main()
