"""Train RAN presets and MONAI's VoxelMorph and LocalNet the same way, then score them on the same held-out pairs.

Every model gets the same training: the same datalist, preprocessing (spacing, intensity), random pairs, crops
and intensity factors (:class:`ran_bundle.data.RandomPairDataset` seeded with ``--seed``), number of steps,
Adam with a cosine schedule from ``--lr`` down to 1% of it, batch 1, and the same unsupervised loss
(:class:`ran_bundle.losses.RegistrationLoss`: ``--sim-weight`` x masked local NCC or MSE + ``--smooth-weight`` x
edge-aware smoothness), every step being the package's training step
(:func:`ran_bundle.engines.registration_train_step`). The network's weights are seeded with ``--seed`` too. The
models are built by :func:`scripts.peers.build_model` (VoxelMorph: ``monai.networks.nets.VoxelMorph`` defaults up
to its DDF; LocalNet: 32 initial channels, levels 0-3) and every DDF warps the moving image with
:func:`ran_bundle.flow.warp`.

Evaluation (:mod:`ran_bundle.evaluation`): the ``test_pairs`` of the datalist (the ``validation_pairs`` when
there are none), preprocessed like the bundle's evaluation (:func:`ran_bundle.transforms.registration_transforms`
in ``"eval"`` mode, full images), scored with :func:`ran_bundle.metrics.evaluate_pair` (Dice, HD95 and ASD in mm
per label, % of voxels with ``det J <= 0`` inside the fixed labels, SDlogJ over the whole grid), for every model
and for the identity (no registration). Efficiency: parameters, forward GFLOPs at the evaluation size
(meta-device count of :func:`scripts.profiling.meta_pass`) and the median forward time per pair on ``--device``.
No checkpoint selection: each model is scored after its last step, so the evaluation pairs never influence
training.

``--reference PRESET=CKPT`` adds a row for weights trained elsewhere (e.g. ``ref=models/model.pt``, the shipped
bundle weights): they are loaded, not trained, and scored on the same pairs with the same metrics; the row is
named ``PRESET [CKPT]`` and its training-time cell is empty. The checkpoint is checked (it exists and its weights
fit the preset) before any training.

Outputs under ``--out`` (default ``docs/results``): ``compare.md`` (settings, machine, training time per model,
the summary table and the per-label table), ``compare_dice.svg`` (box plots of Dice per label, paper Fig. 6; drawn
with matplotlib, the ``figures`` extra, and left out with a note when it is not installed),
``compare_per_pair.csv`` (every metric of every pair and model). The trained weights go to ``--ckpt-dir``
(default ``runs/compare``, outside git), ``<model>.pt``, for ``scripts/paper_figures.py``; a reference goes there
as ``<preset>_<checkpoint name>.pt`` (e.g. ``ref_model.pt``).

Usage::

    python scripts/compare.py --datalist configs/datalists/brain_mr.json --base-dir ../shared/data \\
        --intensity mr --spacing 4 --crop 48 48 48 --steps 200 [--models RAn0 RAn3 RAn4+ voxelmorph localnet] \
        [--reference ref=models/model.pt]
    python scripts/compare.py --quick   # toy run on data/tiny_ct, 3 steps, written to runs/compare_quick
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import list_data_collate
from monai.utils import set_determinism
from tqdm import tqdm

# the bundle root: scripts.* when run as a file, and ran_bundle from the release zip (not installed there)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ran_bundle.data import RandomPairDataset, load_datalist
from ran_bundle.engines import NonFiniteLossError, prepare_batch, registration_train_step
from ran_bundle.evaluation import evaluate_model, evaluation_pairs, label_names
from ran_bundle.inputs import check_state_dict_fits, read_state_dict
from ran_bundle.losses import RegistrationLoss
from ran_bundle.metrics import summarise
from ran_bundle.transforms import registration_transforms
from scripts import figures
from scripts.peers import ALL_MODELS, build_model, n_params
from scripts.profiling import machine_line, meta_pass

REPO = Path(__file__).resolve().parents[1]

DEFAULT_MODELS = ("RAn0", "RAn3", "RAn4+", "voxelmorph", "localnet")
IDENTITY = "identity"
QUICK = {"datalist": "data/tiny_ct/datalist.json", "spacing": 6.0, "intensity": "ct", "crop": [32, 32, 16], "steps": 3}
QUICK_OUT = REPO / "runs" / "compare_quick"  # never docs/results: toy numbers must not replace the real ones


# ------------------------------------------------------------------------------------------------------ data
def cache_subjects(
    subjects: Sequence[dict[str, Any]], spacing: Sequence[float] | None, intensity: str, folder: Path
) -> list[dict[str, Any]]:
    """Preprocess every training image once (orientation, spacing, intensity) into ``folder``.

    Training then loads these small files with ``spacing=None, intensity="none"`` instead of resampling the
    originals at every step; the result is the same (the deterministic steps commute with the random crop).

    Returns:
        the subject dicts with ``"image"`` pointing at the cached NIfTI (``(X, Y, Z)`` float32, RAS affine).
    """
    pre = registration_transforms("infer", spacing=spacing, intensity=intensity, with_labels=False)
    out = []
    for i, subject in enumerate(subjects):
        d = pre({"moving_image": subject["image"], "fixed_image": subject["image"]})
        img = d["moving_image"]
        path = folder / f"subject_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(img[0].numpy().astype(np.float32), np.asarray(img.affine, dtype=np.float64)), path)
        out.append({**subject, "image": str(path)})
    return out


# -------------------------------------------------------------------------------------------------- training
def train_model(name: str, dataset: RandomPairDataset, args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """Train ``name`` for ``args.steps`` steps on ``dataset`` (item ``i`` = step ``i``); returns the net and stats."""
    device = torch.device(args.device)
    set_determinism(seed=args.seed)
    net = build_model(name).to(device)
    loss_fn = RegistrationLoss(
        3, similarity=args.similarity, sim_weight=args.sim_weight, smooth_weight=args.smooth_weight
    )
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, args.steps), eta_min=args.lr * 0.01)
    dataset.set_epoch(0)
    losses = []
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"train {name}", unit="step", dynamic_ncols=True, disable=args.no_progress)
    for step in bar:
        inputs, _ = prepare_batch(list_data_collate([dataset[step]]), device)
        try:
            _, loss, _ = registration_train_step(net, opt, inputs, loss_fn, device=device)
        except NonFiniteLossError as err:
            raise RuntimeError(f"{name}: non-finite loss at step {step} ({err.terms}); lower --lr.") from None
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    stats = {"train_s": time.perf_counter() - t0, "loss_first": _mean(losses[:10]), "loss_last": _mean(losses[-10:])}
    return net, stats


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def _in_repo(path: Path) -> Path:
    """``path`` as given when it is absolute or exists from the working folder, else relative to the repository."""
    return path if path.is_absolute() or path.exists() else REPO / path


def load_reference(spec: str) -> tuple[str, str, Path, torch.nn.Module]:
    """``"PRESET=CKPT"`` -> (row name ``"PRESET [CKPT]"``, ``PRESET``, the checkpoint's path, the loaded network).

    Raises:
        ValueError: ``spec`` is not ``PRESET=CKPT`` or names an unknown model.
        ran_bundle.inputs.InputError: the checkpoint is missing, unreadable or does not fit ``PRESET``.
    """
    preset, sep, ckpt = spec.partition("=")
    if not sep or not ckpt:
        raise ValueError(f"--reference takes PRESET=CHECKPOINT (e.g. ref=models/model.pt), got {spec!r}.")
    if preset not in ALL_MODELS:
        raise ValueError(f"--reference {spec!r}: unknown model {preset!r}; choose from {ALL_MODELS}.")
    path = _in_repo(Path(ckpt))
    net = build_model(preset)
    state = read_state_dict(path)
    check_state_dict_fits(state, net, str(path), f"the {preset} preset", "pass the preset it was trained with.")
    net.load_state_dict(state)
    return f"{preset} [{ckpt}]", preset, path, net


# --------------------------------------------------------------------------------------------------- reports
def _f(v: Any, spec: str = ".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _pm(summary: dict, key: str, spec: str = ".3f") -> str:
    mean, std = summary.get(f"{key}_mean", math.nan), summary.get(f"{key}_std", math.nan)
    return _f(mean, spec) if math.isnan(std) else f"{_f(mean, spec)} ± {_f(std, spec)}"


def summary_table(results: dict[str, dict], names: dict[int, str]) -> str:
    """One row per model: Dice per label and mean, HD95, ASD, % det J <= 0 (in labels), SDlogJ, efficiency."""
    head = ["model", *(f"Dice {names[v]}" for v in names), "mean Dice", "HD95 (mm)", "ASD (mm)"]
    head += ["% det J ≤ 0 (labels)", "SDlogJ", "params (M)", "GFLOPs", "time/pair (s)", "train (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for model, res in results.items():
        by = {s["label"]: s for s in summarise(res["rows"])}
        cells = [model, *(_pm(by.get(v, {}), "dice") for v in names), _pm(by["mean"], "dice")]
        cells += [_pm(by["mean"], "hd95", ".2f"), _pm(by["mean"], "asd", ".2f")]
        cells += [_pm(by["mean"], "non_pos_jac_percent", ".2f"), _pm(by["all"], "sdlogj", ".3f")]
        eff = res.get("params")
        cells += ["–" if eff is None else f"{eff / 1e6:.3f}", _f(res.get("flops", math.nan) / 1e9, ".1f")]
        cells += [_f(res.get("time", math.nan), ".3f"), _f(res.get("train_s", math.nan) / 60, ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def label_table(results: dict[str, dict], names: dict[int, str]) -> str:
    """One row per (label, model): mean ± std over pairs of Dice, HD95, ASD, % det J <= 0 and SDlogJ in that label."""
    head = ["label", "model", "Dice", "HD95 (mm)", "ASD (mm)", "% det J ≤ 0", "SDlogJ"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for v, lab in [*names.items(), ("mean", "mean (union of labels)")]:
        for model, res in results.items():
            s = {r["label"]: r for r in summarise(res["rows"])}.get(v, {})
            cells = [lab, model, _pm(s, "dice"), _pm(s, "hd95", ".2f"), _pm(s, "asd", ".2f")]
            cells += [_pm(s, "non_pos_jac_percent", ".2f"), _pm(s, "sdlogj", ".3f")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dice_boxes(results: dict[str, dict], names: dict[int, str]):
    """Box plots of Dice per label (and the per-pair mean), one box per model (a matplotlib figure)."""
    groups: dict[str, dict[str, list[float]]] = {}
    for v, lab in [*names.items(), ("mean", "mean")]:
        groups[lab] = {m: [float(r["dice"]) for r in res["rows"] if r["label"] == v] for m, res in results.items()}
    n_pairs = len(next(iter(groups.values()))[next(iter(results))])
    return figures.box_plot(groups, ylabel="Dice", title=f"Dice per label over {n_pairs} held-out pairs")


def write_csv(results: dict[str, dict], path: Path) -> None:
    rows = [{"model": m, **r} for m, res in results.items() for r in res["rows"]]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def report(args: argparse.Namespace, results: dict[str, dict], names: dict[int, str], info: dict) -> str:
    """The Markdown report: settings, machine, training summary and both tables."""
    lines = [
        "# Model comparison (`scripts/compare.py`)",
        "",
        f"Command: `{info['command']}`",
        "",
        f"- {machine_line(torch.device(args.device).type)}",
        f"- Data: `{args.datalist}`; training subjects: {info['n_train']}; evaluated pairs ({info['pairs_key']}): "
        + ", ".join(f"`{n}`" for n in info["pair_names"]),
        f"- Preprocessing: spacing {args.spacing} mm, intensity `{args.intensity}`; training crops {args.crop}; "
        f"evaluation on the full images, size {info['eval_size']}",
        f"- Training (every model the same): {args.steps} steps of batch 1, seed {args.seed}, Adam lr {args.lr} "
        f"(cosine to 1%), loss {args.sim_weight} x {args.similarity} + {args.smooth_weight} x edge-aware smoothness",
        *(
            ["- References (weights loaded, not trained here): " + ", ".join(f"`{r}`" for r in info["references"])]
            if info["references"]
            else []
        ),
        f"- Total wall time {info['wall_s'] / 60:.1f} min",
        "",
        "## Summary (mean ± std over pairs)",
        "",
        "Labels: " + ", ".join(f"{v} = {n}" for v, n in names.items()) + ". HD95/ASD: mean over labels. "
        "% det J ≤ 0: voxels with a non-positive Jacobian determinant inside the fixed labels (the paper's count, as "
        "a percentage). SDlogJ: std of log det J over the whole grid (Learn2Reg). GFLOPs: one forward pass at the "
        "evaluation size (RAN: both registration directions in every RA module but the last, which the released "
        "design's shared feature update needs). time/pair: median forward time on the device above. "
        "train: wall time of the training steps; empty for references, which this run loads and does not train.",
        "",
        summary_table(results, names),
        "",
        "Training loss (mean of the first / last 10 steps): "
        + "; ".join(
            f"{m} {r['loss_first']:.4f} → {r['loss_last']:.4f}" for m, r in results.items() if "loss_first" in r
        ),
        "",
        "## Per label",
        "",
        label_table(results, names),
        "",
        "![Dice per label](compare_dice.svg)" if info["figure"] else f"(No figure: {figures.INSTALL_HINT}.)",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datalist", default="configs/datalists/brain_mr.json")
    p.add_argument("--base-dir", default=None, help="folder relative datalist paths start from (default: its folder)")
    p.add_argument("--spacing", type=float, default=4.0, help="isotropic voxel size in mm (0: keep the images' grid)")
    p.add_argument("--intensity", choices=("ct", "mr", "none"), default="mr")
    p.add_argument("--crop", type=int, nargs=3, default=[48, 48, 48], help="training crop size (multiples of 16)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=ALL_MODELS)
    p.add_argument(
        "--reference",
        nargs="*",
        default=[],
        metavar="PRESET=CKPT",
        help="also score weights trained elsewhere (loaded, not trained), e.g. ref=models/model.pt",
    )
    p.add_argument("--labels", type=int, nargs="*", default=None, help="label values to score (default: datalist's)")
    p.add_argument("--similarity", choices=("ncc", "lncc", "mse"), default="ncc")
    p.add_argument("--sim-weight", type=float, default=2.0)
    p.add_argument("--smooth-weight", type=float, default=0.5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--ckpt-dir", type=Path, default=REPO / "runs" / "compare")
    p.add_argument("--quick", action="store_true", help=f"toy run: {QUICK}, out {QUICK_OUT} (options win)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.quick:
        given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
        quick = {**QUICK, "out": QUICK_OUT, "ckpt_dir": QUICK_OUT / "checkpoints"}
        for key, value in quick.items():
            if key not in given:
                setattr(args, key, value)
    if any(c % 16 for c in args.crop):
        p.error(f"--crop sizes must be multiples of 16, got {args.crop}")
    return args


def _with_efficiency(result: dict, net: torch.nn.Module, name: str, eval_size: tuple[int, ...]) -> dict:
    """``result`` with the network's efficiency (parameters, forward FLOPs at the evaluation size)."""
    info = meta_pass(name, eval_size, train=False, amp=False)
    return {**result, "params": n_params(net), "flops": info.get("flops", math.nan)}


def _print_mean_dice(name: str, rows: list[dict], extra: str = "") -> None:
    mean_dice = {s["label"]: s for s in summarise(rows)}["mean"]["dice_mean"]
    print(f"{name}: mean Dice {mean_dice:.4f}{extra}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    datalist = _in_repo(Path(args.datalist))
    try:  # a bad reference fails before any work
        references = [load_reference(spec) for spec in args.reference]
    except ValueError as err:  # includes ran_bundle.inputs.InputError
        raise SystemExit(f"compare.py: error: {err}") from None
    data = load_datalist(datalist, base_dir=args.base_dir)
    pairs_key = "test_pairs" if data["test_pairs"] else "validation_pairs"
    spacing = None if args.spacing <= 0 else (args.spacing,) * 3
    pairs = evaluation_pairs(data[pairs_key], spacing, args.intensity)
    names = label_names(datalist, pairs, args.labels)
    labels = list(names)
    results: dict[str, dict] = {IDENTITY: evaluate_model(None, pairs, labels, args.device)}
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    eval_size = tuple(int(s) for s in pairs[0]["fixed_image"].shape[2:])
    for row, preset, path, net in references:
        net = net.to(args.device)
        results[row] = _with_efficiency(evaluate_model(net, pairs, labels, args.device), net, preset, eval_size)
        torch.save(
            {"model": net.state_dict(), "name": preset, "label": row, "args": vars(args)},
            args.ckpt_dir / f"{preset}_{path.name.split('.')[0]}.pt",
        )
        _print_mean_dice(row, results[row]["rows"], " (reference, not trained here)")
    with tempfile.TemporaryDirectory(prefix="ran_compare_") as tmp:
        train_subjects = cache_subjects(data["training"], spacing, args.intensity, Path(tmp))
        atlas = cache_subjects(data["atlas"], spacing, args.intensity, Path(tmp) / "atlas") if data["atlas"] else []
        transform = registration_transforms(
            "train", spacing=None, intensity="none", roi_size=args.crop, with_labels=False
        )
        dataset = RandomPairDataset(train_subjects, transform, args.steps, seed=args.seed, fixed_subjects=atlas)
        for name in args.models:
            net, stats = train_model(name, dataset, args)
            torch.save({"model": net.state_dict(), "name": name, "args": vars(args)}, args.ckpt_dir / f"{name}.pt")
            res = _with_efficiency(evaluate_model(net, pairs, labels, args.device), net, name, eval_size)
            results[name] = {**res, **stats}
            _print_mean_dice(name, res["rows"], f", trained in {stats['train_s']:.0f} s")
    info = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "n_train": len(data["training"]),
        "pairs_key": pairs_key,
        "pair_names": [p["name"] for p in pairs],
        "references": [row for row, *_ in references],
        "eval_size": "x".join(map(str, eval_size)),
        "wall_s": time.perf_counter() - t_start,
        "figure": figures.available(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(results, args.out / "compare_per_pair.csv")
    if info["figure"]:
        figures.save(dice_boxes(results, names), args.out / "compare_dice.svg")
    else:
        print(f"compare.py: no compare_dice.svg: {figures.INSTALL_HINT}", file=sys.stderr)
    (args.out / "compare.md").write_text(report(args, results, names, info))
    print(summary_table(results, names))
    written = "compare_dice.svg, " if info["figure"] else ""
    print(f"wrote {args.out / 'compare.md'}, {written}compare_per_pair.csv ({info['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
