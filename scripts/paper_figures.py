"""The paper's analyses of the Motion-Aware design as figures: Fig. 3 (c-d) from theory, Fig. 7 from trained models.

**Fig. 3 (c-d), theory** (:func:`ran_bundle.theory.preset_theory`, paper eq. 4-9): for each preset, the capture
range ``a_k`` of every RA module (c) and the motion separability ``Delta_inf(p)``, the largest motion difference the
network can predict between two voxels at Chebyshev distance ``p`` (d), with a Markdown table.

**Fig. 7, trained models**: the density of *correctly predicted motion pairs* over their voxel distance and their
motion difference. Definition (paper Fig. 7): a voxel ``x`` is correctly predicted when the moving labels warped by
the predicted field agree with the fixed labels there, on an organ (``L_t[x] = phi(L_s)[x] != 0``); a correctly
predicted pair is two such voxels ``x != y``; the figure is the probability density of the pairs over the voxel
distance ``||x - y||_inf`` (horizontal) and the motion difference ``||phi[x] - phi[y]||_inf`` (vertical, voxels),
smoothed by a Gaussian of sigma 1 bin, and (b) the differences of those densities between models (a model with
better separability has more mass at short distances and large motion differences, the top-left). Pairs are
sampled: ``x`` uniform over the correct voxels, ``y = x + o`` with ``o`` uniform in ``[-D, D]^3``, kept when ``y`` is
correct too: uniform over all correct pairs within distance ``D`` (``--max-distance``), ``--num-pairs`` draws per
model (seed ``--seed``).

The pair has a **known field**: the moving image is a real held-out subject (the moving image of the first
evaluation pair of the datalist the models were trained on, preprocessed as in training) and the fixed image is
that subject warped by a smooth random field ``u`` from :func:`scripts.tiny_ct.random_field` (small rigid
motion + Gaussian-smoothed displacement of a few voxels, no folding), so ``fixed(x) = moving(x + u(x))`` and the
ideal prediction is ``u``. With it, the table also reports, on the fixed labels, the mean end-point error
``|phi - u|`` and the share of voxels within ``--tolerance`` voxels of ``u`` (a stricter notion of "correct").

The models are the checkpoints that ``scripts/compare.py`` wrote (``--ckpt-dir``, default ``runs/compare``); the
paper compares RAn0, RAn3 and RAn4 (we default to the trained RAn0, RAn3, RAn4+).

Outputs under ``--out`` (default ``docs/results``): ``paper_figures.md``, ``fig3c_capture_range.svg``,
``fig3d_separability.svg`` and, unless ``--theory-only``, ``fig7a_pdf.svg`` and ``fig7b_diff.svg``. The figures are
drawn with matplotlib (the ``figures`` extra: ``pip install "ran-bundle[figures]"``) and the script stops with that
hint when it is missing; it also needs scipy (the known field and the smoothing of the densities).

Usage::

    python scripts/paper_figures.py [--ckpt-dir runs/compare] [--models RAn0 RAn3 RAn4+] [--out docs/results]
    python scripts/paper_figures.py --theory-only
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import list_data_collate
from scipy.ndimage import gaussian_filter

# the bundle root: scripts.* when run as a file, and ran_bundle from the release zip (not installed there)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ran_bundle.data import load_datalist
from ran_bundle.engines import prepare_batch
from ran_bundle.flow import warp
from ran_bundle.theory import preset_theory
from ran_bundle.transforms import registration_transforms
from scripts import figures
from scripts.peers import build_model
from scripts.tiny_ct import random_field, warp_volume

REPO = Path(__file__).resolve().parents[1]

THEORY_PRESETS = ("RAn0", "RAn3", "RAn4", "RAn4+", "ref")
FIG7_MODELS = ("RAn0", "RAn3", "RAn4+")


# ---------------------------------------------------------------------------------------------------- Fig. 3
def theory_section(presets: Sequence[str], max_distance: int, out: Path) -> str:
    """Write Fig. 3 (c) and (d) as SVG and return the Markdown table of the presets' theory."""
    theory = {p: preset_theory(p, max_distance) for p in presets}
    levels = {p: (list(range(1, len(t["capture_range"]) + 1)), t["capture_range"]) for p, t in theory.items()}
    figures.save(
        figures.line_plot(
            levels, "RA module k (coarse to fine)", "capture range a_k (voxels)", "Fig. 3(c) capture range"
        ),
        out / "fig3c_capture_range.svg",
    )
    curves = {p: (t["distance"], t["separability"]) for p, t in theory.items()}
    figures.save(
        figures.line_plot(
            curves, "distance p (voxels)", "separability Δ(p) (voxels)", "Fig. 3(d) motion separability", step=True
        ),
        out / "fig3d_separability.svg",
    )
    probe = [1, 2, 4, 8, 16, 32]
    head = ["preset", "pool sizes p_k", "dilations r_k", "capture range a_k", "Σ a_k", f"area Δ(0..{max_distance})"]
    head += [f"Δ({p})" for p in probe]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for p, t in theory.items():
        cells = [p, str(t["pool_sizes"]), str([r[0] for r in t["dilations"]])]
        cells += [str([round(a, 1) for a in t["capture_range"]]), f"{sum(t['capture_range']):.1f}", f"{t['area']:.0f}"]
        cells += [f"{t['separability'][d]:.0f}" for d in probe]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- Fig. 7
def load_models(ckpt_dir: Path, names: Sequence[str]) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    """The networks ``{label: net}`` (eval mode) and the comparison arguments stored with the first one.

    ``names`` are checkpoint file stems in ``ckpt_dir`` as ``scripts/compare.py`` writes them: a trained model's
    name (``RAn0``) or a reference's ``<preset>_<checkpoint name>`` (``ref_model``), labelled as in its table.
    """
    nets, train_args = {}, None
    for name in names:
        path = ckpt_dir / f"{name}.pt"
        if not path.is_file():
            raise SystemExit(
                f"checkpoint not found: {path}. Run scripts/compare.py (with --models {name}, or --reference) first."
            )
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        net = build_model(ckpt.get("name", name))
        net.load_state_dict(ckpt["model"])
        nets[ckpt.get("label", name)] = net.eval()
        train_args = train_args or ckpt["args"]
    return nets, train_args


def known_field_pair(train_args: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """A held-out subject and the same subject warped by a known smooth random field (see the module docstring).

    Returns:
        ``{"moving_image", "fixed_image", "moving_label", "fixed_label"}`` ``(1, 1, *S)`` and ``"field"``
        ``(3, *S)`` float32 voxels with ``fixed(x) = moving(x + field(x))``, ``"subject"`` (the image path).
    """
    datalist = Path(train_args["datalist"])
    datalist = datalist if datalist.is_absolute() or datalist.is_file() else REPO / datalist
    data = load_datalist(datalist, base_dir=train_args.get("base_dir"))
    pairs = data["test_pairs"] or data["validation_pairs"]
    subject = {"image": pairs[0]["moving_image"], "label": pairs[0]["moving_label"]}
    spacing = None if train_args["spacing"] <= 0 else (train_args["spacing"],) * 3
    pre = registration_transforms("eval", spacing=spacing, intensity=train_args["intensity"], with_labels=True)
    d = pre(
        {
            "moving_image": subject["image"],
            "fixed_image": subject["image"],
            **dict.fromkeys(("moving_label", "fixed_label"), subject["label"]),
        }
    )
    image = d["moving_image"][0].numpy().astype(np.float64)
    label = d["moving_label"][0].numpy()
    field, _ = random_field(image.shape, np.random.default_rng(seed))
    fixed = warp_volume(image, field, order=1)
    fixed_label = warp_volume(label, field, order=0)
    batch = list_data_collate(
        [
            {
                "moving_image": torch.from_numpy(image[None]).float(),
                "fixed_image": torch.from_numpy(fixed[None]).float(),
                "moving_label": torch.from_numpy(label[None]).float(),
                "fixed_label": torch.from_numpy(fixed_label[None]).float(),
            }
        ]
    )
    return {**batch, "field": torch.from_numpy(field).float(), "subject": subject["image"]}


def correct_pairs(
    correct: np.ndarray, ddf: np.ndarray, max_distance: int, num_pairs: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sample pairs of correct voxels within Chebyshev distance ``max_distance``; their distance and motion difference.

    Args:
        correct: ``(*S)`` boolean map of the correctly predicted voxels.
        ddf: ``(3, *S)`` predicted displacement in voxels.
        max_distance: ``D``; offsets are uniform in ``[-D, D]^3``.
        num_pairs: number of candidate draws (pairs whose second voxel is not correct, or equal, are dropped).
        rng: random generator.

    Returns:
        ``(distance, motion_difference)``: 1D arrays over the kept pairs, ``||x - y||_inf`` and
        ``||phi[x] - phi[y]||_inf`` in voxels.
    """
    pts = np.argwhere(correct)
    if len(pts) == 0:
        return np.zeros(0), np.zeros(0)
    x = pts[rng.integers(len(pts), size=num_pairs)]
    y = x + rng.integers(-max_distance, max_distance + 1, size=x.shape)
    shape = np.asarray(correct.shape)
    ok = np.all((y >= 0) & (y < shape), axis=1)
    x, y = x[ok], y[ok]
    ok = correct[tuple(y.T)] & np.any(x != y, axis=1)
    x, y = x[ok], y[ok]
    distance = np.abs(x - y).max(axis=1).astype(np.float64)
    motion = np.abs(ddf[(slice(None), *x.T)] - ddf[(slice(None), *y.T)]).max(axis=0)
    return distance, motion


def pair_density(distance: np.ndarray, motion: np.ndarray, max_distance: int, max_motion: float, bin_motion: float):
    """2D density ``(D, M)`` over distances 1..D and motion bins of ``bin_motion``, smoothed (sigma 1 bin), sum 1."""
    x_edges = np.arange(0.5, max_distance + 1.0, 1.0)
    y_edges = np.arange(0.0, max_motion + bin_motion / 2, bin_motion)
    hist, _, _ = np.histogram2d(distance, np.minimum(motion, max_motion - 1e-6), bins=(x_edges, y_edges))
    hist = gaussian_filter(hist, sigma=1.0, mode="constant")
    total = hist.sum()
    return (hist / total if total > 0 else hist), x_edges, y_edges


def fig7_section(args: argparse.Namespace, out: Path) -> str:
    """Run the trained models on the known-field pair, write Fig. 7 (a) and (b), return the Markdown section."""
    nets, train_args = load_models(args.ckpt_dir, args.models)
    pair = known_field_pair(train_args, args.seed)
    inputs, _ = prepare_batch(pair, "cpu")
    fixed_label = pair["fixed_label"][0, 0].numpy().round().astype(int)
    field = pair["field"].numpy()
    organ = fixed_label != 0
    rng = np.random.default_rng(args.seed)
    samples, rows = {}, []
    with torch.no_grad():
        for name, net in nets.items():
            ddf = net(inputs).float()
            warped = warp(pair["moving_label"].float(), ddf, mode="nearest")[0, 0].numpy().round()
            ddf_np = ddf[0].numpy()
            correct = organ & (warped == fixed_label)
            dist, motion = correct_pairs(correct, ddf_np, args.max_distance, args.num_pairs, rng)
            samples[name] = (dist, motion)
            epe = np.abs(ddf_np - field).max(axis=0)[organ]
            rows.append(
                [
                    name,
                    f"{100 * correct.sum() / organ.sum():.1f}",
                    f"{len(dist)}",
                    f"{np.abs(ddf_np).max():.2f}",
                    f"{epe.mean():.2f}",
                    f"{100 * (epe <= args.tolerance).mean():.1f}",
                    f"{100 * np.mean((dist <= 4) & (motion >= 1.0)):.2f}" if len(dist) else "–",
                ]
            )
    max_motion = max(1e-3, float(np.percentile(np.concatenate([m for _, m in samples.values()] or [[1.0]]), 99.5)))
    dens = {}
    for name, (dist, motion) in samples.items():
        dens[name], x_edges, y_edges = pair_density(dist, motion, args.max_distance, max_motion, max_motion / 40)
    labels = ("voxel distance ||x − y||∞", "motion difference ||φ[x] − φ[y]||∞ (voxels)")
    figures.save(figures.heatmaps(dens, x_edges, y_edges, *labels, value_label="density"), out / "fig7a_pdf.svg")
    names = list(dens)
    diffs = {f"{b} − {a}": dens[b] - dens[a] for i, a in enumerate(names) for b in names[i + 1 :]}
    if diffs:
        fig = figures.heatmaps(diffs, x_edges, y_edges, *labels, diverging=True, value_label="density difference")
        figures.save(fig, out / "fig7b_diff.svg")
    true_max = float(np.abs(field).max())
    head = ["model", "% organ voxels correct (labels)", "correct pairs sampled", "max ‖φ‖∞ (vox)"]
    head += ["mean EPE ‖φ − u‖∞ in organs (vox)", f"% organ voxels EPE ≤ {args.tolerance}", "% pairs d ≤ 4, Δφ ≥ 1"]
    table = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    shape = "x".join(str(s) for s in fixed_label.shape)
    subject = os.path.relpath(pair["subject"], REPO)
    return "\n".join(
        [
            f"Pair: moving = `{subject}` preprocessed as in training (spacing {train_args['spacing']} mm, "
            f"intensity `{train_args['intensity']}`, grid {shape}); fixed = the same image warped by a known random "
            f"field u (seed {args.seed}, max |u| = {true_max:.2f} voxels). Models: `{args.ckpt_dir}` "
            f"(trained {train_args['steps']} steps each by the comparison; references were trained elsewhere). "
            f"Pairs: {args.num_pairs} draws per model "
            f"within distance D = {args.max_distance}; motion bins of {max_motion / 40:.3f} voxels up to "
            f"{max_motion:.2f} "
            "(the 99.5th percentile of all models' differences; larger ones count in the top bin).",
            "",
            "\n".join(table),
            "",
            "![Fig. 7(a)](fig7a_pdf.svg)",
            "",
            "![Fig. 7(b)](fig7b_diff.svg)" if diffs else "",
        ]
    )


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--presets", nargs="+", default=list(THEORY_PRESETS), help="presets of Fig. 3")
    p.add_argument("--theory-distance", type=int, default=64, help="Fig. 3(d) distances 0..N")
    p.add_argument("--theory-only", action="store_true", help="only Fig. 3 (no trained models needed)")
    p.add_argument("--ckpt-dir", type=Path, default=REPO / "runs" / "compare")
    p.add_argument("--models", nargs="+", default=list(FIG7_MODELS), help="trained models of Fig. 7")
    p.add_argument("--seed", type=int, default=20240, help="seed of the known field and of the pair sampling")
    p.add_argument("--num-pairs", type=int, default=400_000)
    p.add_argument("--max-distance", type=int, default=24, help="D: largest voxel distance of a pair")
    p.add_argument("--tolerance", type=float, default=1.0, help="voxels; EPE at most this counts as correct")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not figures.available():
        raise SystemExit(f"paper_figures.py: error: {figures.INSTALL_HINT}")
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = [
        "# Paper analyses (`scripts/paper_figures.py`)",
        "",
        "## Fig. 3 (c-d): capture range and motion separability (theory, paper eq. 4-9)",
        "",
        "Values in voxels of the input image; `r_k` is counted twice per module (its two dilated regressor "
        "convolutions), as in `ran_bundle.theory`.",
        "",
        theory_section(args.presets, args.theory_distance, args.out),
        "",
        "![Fig. 3(c)](fig3c_capture_range.svg)",
        "",
        "![Fig. 3(d)](fig3d_separability.svg)",
        "",
    ]
    if not args.theory_only:
        parts += [
            "## Fig. 7: density of correctly predicted motion pairs",
            "",
            "A voxel x is *correctly predicted* when the warped moving labels equal the fixed labels there, on an "
            "organ (`L_t[x] = φ(L_s)[x] ≠ 0`, the paper's definition); a *correctly predicted pair* is two such "
            "voxels. (a) density of those pairs over voxel distance and motion difference (Gaussian-smoothed, "
            "sigma 1 bin); (b) differences between the models' densities (red: more pairs for the first-named "
            "model). See `scripts/paper_figures.py` for the sampling.",
            "",
            fig7_section(args, args.out),
            "",
        ]
    (args.out / "paper_figures.md").write_text("\n".join(parts))
    print(f"wrote {args.out / 'paper_figures.md'} and its figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
