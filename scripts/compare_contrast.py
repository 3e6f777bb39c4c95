"""Registration across contrasts on real brains: the moving image in a **synthetic** other contrast, against ANTs
SyN with mutual information, after the same affine stage (Mattes MI), on the test pairs of the brain comparison.

Each moving T1 is replaced by a synthetic contrast drawn from its own label map
(:func:`ran_bundle.synthetic.synthetic_contrast`: random per-structure intensities, bias, noise, as SynthSeg; one
seed per pair), written to a temporary folder only. Rows: the affine stage alone; ANTs SyN with mutual information
(``antspyx``, ``syn_metric="mattes"``; its affine is ours); ``ran-register`` with ``--similarity ncc`` and
``--similarity mind`` (the network's start, its default) and ``mind`` from the affine alone (``--io-start zero``);
and, for reference, ``ncc`` on the same pair with the moving image in T1. Scores as ``scripts/compare_brain.py``
(labels of the fixed image's own 1 mm grid); seconds of the deformable stage.

Example (what docs/register.md quotes)::

    python scripts/compare_contrast.py --threads 2 --out docs/results/contrast

Data: Mindboggle-101 OASIS-TRT-20 (Klein & Tourville 2012, CC BY-NC-SA 3.0) from ``RAN_SHARED_DATA``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # scripts.* when run as a file

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from ran_bundle.data import load_datalist  # noqa: E402
from ran_bundle.evaluation import native_label_scores  # noqa: E402
from ran_bundle.fields import write_image_atomic  # noqa: E402
from ran_bundle.flow import ddf_voxel_to_mm  # noqa: E402
from ran_bundle.inputs import load_volume  # noqa: E402
from ran_bundle.pipeline import RegistrationPipeline  # noqa: E402
from ran_bundle.spatial import Grid, foreground_mask, sitk_affine  # noqa: E402
from ran_bundle.synthetic import synthetic_contrast  # noqa: E402
from scripts import classical  # noqa: E402

#: row -> pipeline settings (None: not the pipeline)
METHODS = {
    "affine only": None,
    "ANTs SyN (MI)": None,
    "RAN + IO, ncc": {"similarity": "ncc"},
    "RAN + IO, mind": {"similarity": "mind", "io_start": "network"},
    "IO alone, mind": {"similarity": "mind", "io_start": "zero"},
    "T1 moving (not synthetic): RAN + IO, ncc": {"similarity": "ncc"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datalist", default=str(REPO / "configs/datalists/brain_mindboggle.json"))
    p.add_argument("--base-dir", default=os.environ.get("RAN_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--split", default="test_pairs", help="pairs of the datalist: test_pairs or validation_pairs")
    p.add_argument("--weights", default=str(REPO / "models/model.pt"), help="RAN weights")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every method (torch, ITK, ANTs)")
    p.add_argument("--spacing", type=float, default=2.0, help="network grid (mm)")
    p.add_argument("--limit", type=int, help="only the first N pairs (smoke runs)")
    p.add_argument("--out", required=True, help="folder for contrast.json and contrast.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    pairs = load_datalist(args.datalist, base_dir=args.base_dir)[args.split][: args.limit]
    pipes = {
        name: RegistrationPipeline(weights=args.weights, spacing=args.spacing, progress=False, **settings)
        for name, settings in METHODS.items()
        if settings is not None and name in args.methods
    }
    any_pipe = next(iter(pipes.values()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, pair in enumerate(pairs):
            name = f"{Path(pair['moving_image']).parent.name}->{Path(pair['fixed_image']).parent.name}"
            t1 = load_volume(pair["moving_image"], "moving image")
            label = load_volume(pair["moving_label"], "moving label")
            synthetic = synthetic_contrast(label.array, foreground_mask(t1.array), seed=i)
            synthetic_path = write_image_atomic(synthetic, t1.affine, Path(tmp) / f"synthetic_{i}.nii.gz", "float32")
            inputs = any_pipe.check_inputs(
                pair["fixed_image"], synthetic_path, pair["fixed_label"], pair["moving_label"]
            )
            start = time.perf_counter()
            affine = any_pipe.run_affine(inputs)
            affine_s = time.perf_counter() - start
            for method in args.methods:
                if method == "ANTs SyN (MI)" and not classical.ants_available():
                    continue
                start = time.perf_counter()
                if method in pipes:
                    pipe = pipes[method]
                    own = inputs
                    if method.startswith("T1"):
                        own = pipe.check_inputs(*(pair[k] for k in ("fixed_image", "moving_image", "fixed_label")))
                        own.moving_label = inputs.moving_label
                    network_pair = pipe.preprocess(own, affine)
                    ddf = torch.zeros(1, 3, *network_pair.grid.shape)
                    if pipe.io_start == "network":
                        ddf = pipe.predict(network_pair)
                    ddf, _ = pipe.optimise(network_pair, ddf)
                    grid, field = network_pair.grid, ddf_voxel_to_mm(ddf, network_pair.grid.affine)
                else:
                    grid = Grid(tuple(inputs.fixed.array.shape), inputs.fixed.affine)
                    field = torch.zeros(1, 3, *grid.shape)
                    if method == "ANTs SyN (MI)":
                        fixed_image = inputs.sitk("fixed")
                        moving = sitk.Resample(
                            inputs.sitk("moving"), fixed_image, sitk_affine(affine.matrix), sitk.sitkLinear
                        )
                        field = classical.ants_syn(fixed_image, moving, syn_metric="mattes")
                seconds = time.perf_counter() - start
                world = any_pipe.to_world(inputs, affine, grid, field)
                scores = native_label_scores(world["warped_label"], inputs.fixed_label.array, inputs.fixed.spacing)
                rows.append({"pair": name, "method": method, **scores, "seconds": seconds, "affine_seconds": affine_s,
                             "folding_percent": world["stats"]["non_positive_jacobian_percent"]})  # fmt: skip
                print(f"[{i + 1}/{len(pairs)}] {name} {method}: Dice {scores['dice']:.4f} "
                      f"fold {rows[-1]['folding_percent']:.3f}% {seconds:.1f} s", flush=True)  # fmt: skip
    write_report(rows, args)


def write_report(rows: list[dict], args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        if mine:
            summary[method] = {k: float(np.mean([r[k] for r in mine])) for k in ("dice", "folding_percent", "seconds")}
            summary[method]["pairs"] = len(mine)
    machine = f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    lines = [
        "Moving images in a SYNTHETIC other contrast (random per-structure intensities, bias and noise drawn from "
        "their label maps); fixed images real T1.",
        "",
        "| method | mean Dice | % det J <= 0 | s / pair (deformable stage) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {m} | {s['dice']:.3f} | {s['folding_percent']:.3f} | {s['seconds']:.1f} |" for m, s in summary.items()
    ]
    lines += ["", f"Machine: {machine}. Command: `python scripts/compare_contrast.py {' '.join(sys.argv[1:])}`"]
    (out / "contrast.md").write_text("\n".join(lines) + "\n")
    (out / "contrast.json").write_text(json.dumps({"rows": rows, "summary": summary, "machine": machine}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
