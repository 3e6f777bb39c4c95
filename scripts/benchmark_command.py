"""The whole ``ran-register`` command against ANTs SyN end to end, as a user times them, on the test pairs.

For every pair of the datalist's split (default: every ordered pair of the Mindboggle test subjects 13-15, the
comparison run's pairs, :mod:`scripts.compare_brain`), in one run, one after the other on the same CPUs:

- **ran-register**: ``python -m ran_bundle --fixed F --moving M --moving-label ML --out DIR`` (the
  ``ran-register`` console script's code) in a fresh process, with only the paths and the label (the user's
  command: every default, the number of threads included, which must come from the CPUs it may use);
- **ANTs SyN**: a fresh Python process that imports ``ants`` (antspyx), reads both images and the moving label
  map, runs ``ants.registration(fixed, moving, type_of_transform="SyN")``, applies the transforms to the label
  map (nearest neighbour) and writes the warped image and labels; ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` is
  the number of CPUs.

Both processes are pinned to the same ``--threads`` CPUs (``os.sched_setaffinity``) and timed by wall clock from
start to exit (interpreter start, imports, reading, registering, applying to the labels and writing included);
peak memory is each process's own peak resident set (``os.wait4``'s ``ru_maxrss``). The table gives, per pair,
both times, their ratio, each ``ran-register`` step's share of its time (``report.json`` ``timings_s``; "start"
is everything else: interpreter, imports, weights), both peaks and both mean Dice over the labels of at least 100
voxels on the fixed image's own grid (:func:`ran_bundle.evaluation.native_label_scores`, as the comparison run
scores). Writes ``benchmark_command.md`` and ``benchmark_command.csv`` into ``--out``.

Example (the run of docs/benchmark.md, two idle cores)::

    python scripts/benchmark_command.py --threads 2 --out docs/results/command

Data: Mindboggle-101 OASIS-TRT-20 (Klein & Tourville 2012, CC BY-NC-SA 3.0) from ``RAN_SHARED_DATA``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the bundle root: scripts.* and ran_bundle from this checkout when run as a file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nibabel as nib
import numpy as np

from ran_bundle.evaluation import native_label_scores
from ran_bundle.pipeline import STEPS
from scripts.compare_brain import add_pair_options, load_pairs

REPO = Path(__file__).resolve().parents[1]

#: antspyx end to end in a fresh process: argv = fixed, moving, moving label, output folder, transform type
ANTS_SCRIPT = """
import sys
import ants
fixed_path, moving_path, label_path, out, transform = sys.argv[1:6]
fixed, moving, label = ants.image_read(fixed_path), ants.image_read(moving_path), ants.image_read(label_path)
reg = ants.registration(fixed, moving, type_of_transform=transform)
warped_label = ants.apply_transforms(fixed, label, reg["fwdtransforms"], interpolator="nearestNeighbor")
ants.image_write(reg["warpedmovout"], out + "/warped.nii.gz")
ants.image_write(warped_label, out + "/warped_label.nii.gz")
"""
#: thread settings of the calling shell that would override the children's own defaults
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_options(p)
    p.add_argument("--threads", type=int, default=2, help="CPUs both commands are pinned to (the first N allowed)")
    p.add_argument(
        "--ran-args", default="", help="extra ran-register arguments (default none: the user's command; smoke runs)"
    )
    p.add_argument("--ants-transform", default="SyN", help="ants.registration type_of_transform (default SyN)")
    p.add_argument("--no-ants", action="store_true", help="time ran-register alone (the ratio column reads '-')")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per command before it is stopped")
    p.add_argument("--keep", help="keep every command's output folder under this folder (default: a temporary one)")
    p.add_argument("--out", required=True, help="folder for benchmark_command.md and benchmark_command.csv")
    return p.parse_args(argv)


def pinned_cpus(threads: int) -> list[int]:
    """The first ``threads`` CPUs this process may use (its affinity); an error when it may use fewer."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads < 1 or threads > len(allowed):
        raise SystemExit(f"--threads {threads}: this process may use {len(allowed)} CPU(s) ({allowed}).")
    return allowed[:threads]


def subject_name(path: str) -> str:
    """A subject's name: its folder's (``oasis_trt_13/image.nii.gz``), or its file's when the folder is shared."""
    path = Path(path)
    return path.name.split(".")[0] if path.parent.name in ("images", "imagesTr") else path.parent.name


def run_timed(cmd: list[str], cpus: list[int], env: dict[str, str], timeout: float, log: Path) -> tuple[float, float]:
    """Run ``cmd`` pinned to ``cpus``; wall seconds from start to exit and its peak resident memory (GB).

    Raises:
        RuntimeError: the command failed or ran past ``timeout`` (its log's last lines in the message).
    """
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=lambda: os.sched_setaffinity(0, cpus)
        )
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{shlex.join(cmd)} exited with {proc.returncode} after {seconds:.0f} s:\n{tail}")
    return seconds, usage.ru_maxrss / 1e6  # kB -> GB


def label_dice(path: Path, pair: dict) -> float:
    """Mean Dice (labels of >= 100 voxels) of a warped label file against the pair's fixed labels."""
    fixed = nib.load(pair["fixed_label"])
    warped = np.asarray(nib.load(path).dataobj)
    if warped.shape != fixed.shape:
        raise RuntimeError(f"{path}: shape {warped.shape}, the fixed label's is {fixed.shape}")
    return native_label_scores(np.rint(warped).astype(np.int64), np.asarray(fixed.dataobj), fixed.header.get_zooms())[
        "dice"
    ]


def benchmark_pair(pair: dict, name: str, args: argparse.Namespace, cpus: list[int], work: Path) -> dict:
    """Both commands on one pair: the row of the table."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    ran_out = work / f"{name}_ran"
    cmd = [sys.executable, "-m", "ran_bundle", "--fixed", pair["fixed_image"], "--moving", pair["moving_image"]]
    cmd += ["--moving-label", pair["moving_label"], "--out", str(ran_out), *shlex.split(args.ran_args)]
    ran_s, ran_gb = run_timed(cmd, cpus, env, args.timeout, work / f"{name}_ran.log")
    report = json.loads((ran_out / "report.json").read_text())
    timings = report["timings_s"]
    row = {"pair": name, "ran_s": ran_s}
    for step in STEPS:
        row[f"{step}_share"] = timings.get(step, 0.0) / ran_s
    row["start_share"] = max(0.0, 1.0 - sum(timings.values()) / ran_s)
    row["ran_threads"] = report["system"]["threads"]
    row["ran_peak_gb"] = ran_gb
    row["ran_dice"] = label_dice(ran_out / "warped_label.nii.gz", pair)
    row["ran_folding_percent"] = report["field"]["non_positive_jacobian_percent"]
    row.update(ants_s=math.nan, ratio=math.nan, ants_peak_gb=math.nan, ants_dice=math.nan)
    if not args.no_ants:
        ants_out = work / f"{name}_ants"
        ants_out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-c", ANTS_SCRIPT, pair["fixed_image"], pair["moving_image"], pair["moving_label"]]
        cmd += [str(ants_out), args.ants_transform]
        ants_env = {**env, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(len(cpus))}
        ants_s, ants_gb = run_timed(cmd, cpus, ants_env, args.timeout, work / f"{name}_ants.log")
        row.update(ants_s=ants_s, ratio=ran_s / ants_s, ants_peak_gb=ants_gb)
        row["ants_dice"] = label_dice(ants_out / "warped_label.nii.gz", pair)
    return row


def _cell(value: float, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def write_table(rows: list[dict], args: argparse.Namespace, cpus: list[int], load: tuple[float, ...]) -> str:
    """``benchmark_command.csv`` and ``benchmark_command.md`` in ``args.out``; returns the markdown."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mean = {"pair": f"mean ({len(rows)} pairs)"}
    for key in rows[0]:
        if key != "pair":
            mean[key] = float(np.mean([r[key] for r in rows]))
    mean["ratio"] = mean["ran_s"] / mean["ants_s"]  # ratio of the mean times
    with open(out / "benchmark_command.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([*rows, mean])
    shares = [*STEPS, "start"]
    head = ["pair", "ran-register (s)", "ANTs SyN (s)", "ratio"]
    head += [f"{s} %" for s in shares]
    head += ["peak ran (GB)", "peak ANTs (GB)", "Dice ran", "Dice ANTs", "% det J <= 0 ran"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in [*rows, mean]:
        cells = [r["pair"], _cell(r["ran_s"], ".1f"), _cell(r["ants_s"], ".1f"), _cell(r["ratio"], ".2f")]
        cells += [_cell(100 * r[f"{s}_share"], ".0f") for s in shares]
        cells += [_cell(r["ran_peak_gb"], ".2f"), _cell(r["ants_peak_gb"], ".2f")]
        cells += [_cell(r["ran_dice"], ".3f"), _cell(r["ants_dice"], ".3f"), _cell(r["ran_folding_percent"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    import torch

    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs on the machine, both commands pinned to "
        f"CPUs {cpus} ({len(cpus)} threads; ran-register used {rows[0]['ran_threads']} torch threads by default), "
        f"load average {load[0]:.2f} at the start and {os.getloadavg()[0]:.2f} at the end; Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )
    lines += [
        "",
        "Times: wall clock of each fresh process from start to exit (interpreter, imports, reading, registration, "
        "applying to the label map, writing). ratio = ran-register / ANTs SyN (mean row: ratio of the mean times). "
        "Step shares: ran-register's report.json timings_s over its wall time; start = the rest (interpreter, "
        "imports, weights). Peak: each process's peak resident memory. Dice: mean over the labels of >= 100 voxels "
        "on the fixed grid, nearest-neighbour label warps.",
        f"Machine: {machine}.",
        f"ran-register: `python -m ran_bundle --fixed F --moving M --moving-label ML --out DIR {args.ran_args}`; "
        f"ANTs: `ants.registration(type_of_transform={args.ants_transform!r})` + `ants.apply_transforms` "
        "(nearestNeighbor) + `ants.image_write`.",
        f"Command: `python scripts/benchmark_command.py {shlex.join(sys.argv[1:])}`",
    ]
    text = "\n".join(lines) + "\n"
    (out / "benchmark_command.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cpus = pinned_cpus(args.threads)
    _, pairs = load_pairs(args)
    if not pairs or any(p.get("moving_label") is None or p.get("fixed_label") is None for p in pairs):
        raise SystemExit(f"{args.datalist}: {args.split} needs pairs with labels on both sides.")
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="benchmark_command_") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for i, pair in enumerate(pairs):
            name = f"{subject_name(pair['moving_image'])}->{subject_name(pair['fixed_image'])}"
            row = benchmark_pair(pair, name.replace("->", "_to_"), args, cpus, work)
            row["pair"] = name
            rows.append(row)
            print(
                f"[{i + 1}/{len(pairs)}] {name}: ran-register {row['ran_s']:.1f} s, ANTs "
                f"{_cell(row['ants_s'], '.1f')} s, ratio {_cell(row['ratio'], '.2f')}; Dice {row['ran_dice']:.3f} vs "
                f"{_cell(row['ants_dice'], '.3f')}",
                flush=True,
            )
    print(write_table(rows, args, cpus, load))


if __name__ == "__main__":
    main()
