"""Speed / memory / FLOPs benchmark of the RAN presets against MONAI's VoxelMorph and LocalNet.

What it measures, for every (model, input size) pair, batch size 1, one image pair ``(1, 2, *S)`` -> DDF:

* ``params (M)``: trainable + frozen parameters of the network, in millions.
* ``GFLOPs``: floating-point operations of ONE forward pass counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` (convolutions and matmuls, a multiply-add counting as
  2 FLOPs; ``grid_sample``/interpolation/elementwise ops are not counted). Counted on the ``meta`` device
  at the real size (no compute, no memory); if a model cannot run on ``meta`` it is counted by one real
  forward in the measuring subprocess instead (marked ``*``).
* ``time/pair (s)``: median wall time of ``--repeats`` forward passes after ``--warmup`` (1) untimed ones, under
  ``torch.inference_mode`` (``torch.cuda.synchronize`` around each pass on cuda). With ``--budget S``
  a slow model gets fewer timed passes (at least 1, marked ``(n=...)``) so that they fit ``S`` seconds.
* ``peak mem (GB)``: on CPU the increase of the peak resident set size (``ru_maxrss``) of a fresh
  subprocess over the forward passes (model and input already allocated before the "before" reading);
  on cuda ``torch.cuda.max_memory_allocated`` (model and input included).
* ``tensors (GiB)``: peak bytes of live tensors tracked in a ``meta``-device pass at the real size
  (:func:`scripts.profiling.meta_pass`; with ``--amp`` all activations in bfloat16): the memory a GPU's
  allocator must hold, without cuDNN workspaces; on CPU the measured peak is higher (convolution buffers).
  ``--estimate-only`` reports only these meta-device figures, in seconds at any size.
* with ``--train``: one optimisation step (the package's training step,
  :func:`ran_bundle.engines.registration_train_step`: forward + backward + Adam step, with the cheap loss
  MSE of the warped moving image to the fixed image + 0.01 x squared finite-difference smoothness of the
  DDF), its median time and peak memory, in a separate subprocess.
* ratio columns: time and memory of each model divided by those of ``--baseline`` (default
  ``voxelmorph``) at the same size in the same run ("n/a" when the baseline was not run).
* ``GFLOP/s``: the achieved speed, the counted forward FLOPs (``GFLOPs`` above) divided by the measured
  ``time/pair``; ``train GFLOP/s``: 3 x the forward FLOPs (the convention: the backward pass costs about two forward
  passes, one for the input gradients and one for the weight gradients; the recomputation of ``--checkpointing``,
  the loss and the optimiser step are not counted) divided by the ``train step`` time. Only convolutions and matmuls
  are counted, so time spent elsewhere (norms, ``grid_sample``, concatenations) lowers a model's figure.
* ``GFLOP/s / conv16`` (and ``train GFLOP/s / conv16``): each model's GFLOP/s divided by that of ``conv16`` (a plain
  stack of 16-channel 3x3x3 convolutions of about the FLOPs of ``ref``, :class:`scripts.peers.ConvStack`) at the
  same size in the same run: how close a network comes to the speed per FLOP of the convolutions this CPU runs
  well ("n/a" when ``conv16`` was not run).

CPU threads and a busy machine: OpenMP's waiting threads spin by default, and when another process takes one of
the cores a parallel region waits for a descheduled thread; convolutions with many synchronisation points (the
weight gradient of a dilated convolution) then take 30x longer on 2 threads than on 1 (measured: 1.05 s against
0.035 s for a 32-channel dilation-3 weight gradient at 2x32^3, with a training job on one of the two cores).
``--omp-wait-policy passive`` runs the workers with ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep: 0.036 s
there); the settings line records the policy and the 1-minute load average at the start and the end of the run,
so that a report taken on a busy machine says so.

Every measurement runs in its own subprocess so that peaks do not leak across models, with a timeout
(``--timeout``, recorded as ``timeout``). On CPU a (model, size) whose estimated memory need (live
tensor bytes tracked during a ``meta``-device pass, x 2 + 0.5 GB) exceeds 90% of
``MemAvailable`` is recorded as ``skipped (needs ~X GB)``; a subprocess killed by the OOM killer or raising
an out-of-memory error is recorded as ``OOM``.

Models: the RAN presets (``ref``, ``RAn0``, ``RAn3``, ``RAn4``, ``RAn4+``; weights and activations in
``channels_last_3d`` and the fused ``ScalarNorm``, the network's defaults), the same with those off
(``ref-contiguous``: contiguous memory format; ``ref-stdmean``: ``ScalarNorm`` by its ``std_mean`` definition;
``ref-contiguous-stdmean``: both, the network as before; likewise for every preset, same weights and FLOPs,
:data:`scripts.peers.RAN_VARIANTS`), ``conv16`` (above), ``voxelmorph``
(``monai.networks.nets.VoxelMorph()`` defaults: VoxelMorphUNet backbone, 7 scaling-and-squaring steps;
timed up to the DDF, i.e. without its final warp of the moving image) and ``localnet``
(``monai.networks.nets.LocalNet(spatial_dims=3, in_channels=2, out_channels=3, num_channel_initial=32,
extract_levels=(0, 1, 2, 3))``). The default ``--models`` are the presets, the two peers and ``conv16``.
Note: ``ResidualAlignerNetwork.forward`` evaluates both registration directions (batch 2 internally) in every module
but the last, which is included in its FLOPs, time and memory.

``--throughput`` measures something else: the batch runner's pairs per hour (``ran-register-batch``,
:mod:`ran_bundle.batch`) on the cores this process may use, for 1 process with all of them as threads against
``torchrun`` processes of 1 thread each, one process a core (:func:`throughput`): the wall time of the whole
command (start-up and loading the network included) for ``--throughput-pairs`` pairs (default 8: the tiny CT
subjects 1-5 onto subject 0, repeated; or ``--throughput-csv``) with ``--throughput-options`` (default: CT scaling
at 3 mm, the rest ``ran-register``'s defaults). Run it under ``taskset -c 0,1`` for 2 cores.

Speed and memory TARGETS live here (and in the reports this script writes), never in the test-suite:
``tests/test_benchmark.py`` only checks that the script runs and produces a well-formed table.

Usage::

    python scripts/benchmark.py [--sizes 96x80x128 192x160x256]
        [--models ref RAn0 RAn3 RAn4 RAn4+ voxelmorph localnet conv16 ref-contiguous-stdmean ...]
        [--device cpu|cuda] [--amp]
        [--repeats N] [--out FILE.md] [--train] [--baseline voxelmorph] [--timeout 600] [--warmup 1]
        [--budget S] [--threads N] [--checkpointing] [--estimate-only] [--omp-wait-policy inherit|passive|active]
    taskset -c 0,1 python scripts/benchmark.py --throughput [--throughput-pairs 8] [--throughput-csv pairs.csv]
        [--throughput-options "--intensity ct --spacing 3"] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# the bundle root: scripts.* when run as a file, and ran_bundle from the release zip (not installed there)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.peers import ALL_MODELS, RAN_MODELS, build_model
from scripts.profiling import autocast_ctx, machine_line, meta_pass, train_step_fn

REPO = Path(__file__).resolve().parents[1]

DEFAULT_SIZES = ("96x80x128",)
DEFAULT_MODELS = (*RAN_MODELS, "voxelmorph", "localnet", "conv16")
#: the model of the ``GFLOP/s / conv16`` columns
RATE_BASELINE = "conv16"
#: FLOPs of a training step in forward passes' FLOPs (forward + backward for inputs + backward for weights)
TRAIN_FLOPS_FACTOR = 3
RESULT_TAG = "BENCHMARK_RESULT "


def parse_size(text: str) -> tuple[int, int, int]:
    """``"96x80x128"`` -> ``(96, 80, 128)``."""
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"size must be DxHxW, got {text!r}")
    return parts  # type: ignore[return-value]


def size_str(size: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in size)


def estimate_need_gb(live_bytes: int | None) -> float | None:
    """Conservative RSS need in GB from the tracked live tensor bytes.

    The CPU's convolution buffers (the unfolded input of dilated 3D convolutions), the copies autocast makes
    and allocator slack are not tracked: measured CPU peaks of the RAN training step were 1.6x (float32) and
    1.9x (``--amp``) the tracked bytes at 96x80x128 with checkpointing.
    """
    if live_bytes is None:
        return None
    return live_bytes * 2 / 1e9 + 0.5


def mem_available_gb() -> float | None:
    """``MemAvailable`` from ``/proc/meminfo`` in GB (None when unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------------ worker
def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg


def _timed_passes(step, sync, args: argparse.Namespace) -> list[float]:
    """``--warmup`` untimed calls of ``step``, then the wall times of ``--repeats`` timed calls.

    With ``--budget`` the number of timed calls is cut (to at least 1) from the duration of the first call
    so that they fit the budget.
    """
    times: list[float] = []
    repeats, calls = args.repeats, 0
    while len(times) < repeats:
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        dt = time.perf_counter() - t0
        if calls == 0 and args.budget > 0:
            repeats = max(1, min(args.repeats, int(args.budget // max(dt, 1e-9))))
        if calls >= args.warmup:
            times.append(dt)
        calls += 1
    return times


def worker(args: argparse.Namespace) -> dict:
    """Runs in a fresh subprocess: one (model, size, mode) measurement."""
    device = args.device
    size = parse_size(args.size)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model, args.checkpointing).to(device)
    x = torch.rand(1, 2, *size, device=device)
    res: dict = {"model": args.model, "size": args.size, "mode": args.mode}

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    if args.count_flops and args.mode == "infer":
        from torch.utils.flop_counter import FlopCounterMode

        model.eval()
        with FlopCounterMode(display=False) as counter, torch.inference_mode(), autocast_ctx(device, args.amp):
            model(x)
        res["flops"] = counter.get_total_flops()
        if device == "cpu":
            # the counting pass's peak would pollute ru_maxrss: only report FLOPs from this process
            return res

    if device == "cuda":
        sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    if args.mode == "infer":
        model.eval()
        with torch.inference_mode(), autocast_ctx(device, args.amp):
            times = _timed_passes(lambda: model(x), sync, args)
    else:
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        times = _timed_passes(lambda: train_step_fn(model, opt, x, device, args.amp), sync, args)

    res["time"] = statistics.median(times)
    res["repeats"] = len(times)
    if device == "cuda":
        res["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:
        res["peak_gb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024 / 1e9
    return res


def worker_env(omp_wait_policy: str) -> dict[str, str]:
    """The measuring subprocesses' environment: this one's, with ``OMP_WAIT_POLICY`` set unless ``"inherit"``."""
    env = dict(os.environ)
    if omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = omp_wait_policy.upper()
    return env


def load_average() -> str:
    """The 1-minute load average, ``"?"`` where the platform has none."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return "?"


def run_worker(args: argparse.Namespace, model: str, size: str, mode: str, count_flops: bool = False) -> dict:
    """Runs :func:`worker` in a fresh subprocess; returns its result or ``{"status": ...}``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", model, "--size", size]
    cmd += ["--mode", mode, "--device", args.device, "--repeats", str(args.repeats)]
    if args.amp:
        cmd.append("--amp")
    if args.checkpointing:
        cmd.append("--checkpointing")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.budget > 0:
        cmd += ["--budget", str(args.budget)]
    cmd += ["--warmup", str(args.warmup)]
    if count_flops:
        cmd.append("--count-flops")
    env = worker_env(args.omp_wait_policy)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
    )
    try:
        out, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"status": "timeout"}
    for line in out.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    if proc.returncode in (-signal.SIGKILL, 137):
        return {"status": "OOM"}
    tail = (err.strip().splitlines() or ["?"])[-1]
    if _is_oom(RuntimeError(err)):
        return {"status": "OOM"}
    return {"status": f"error (rc {proc.returncode}: {tail[:80]})"}


# ------------------------------------------------------------------------------------------------ report
def _fmt(value, spec: str) -> str:
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return format(value, spec)
    return str(value) if value is not None else "–"


def _gib(nbytes: int | None) -> str:
    return f"{nbytes / 2**30:.2f}" if nbytes is not None else "–"


def add_rates(row: dict) -> dict:
    """Adds the achieved ``"gflops_s"`` (forward FLOPs / forward time) and ``"train_gflops_s"``
    (:data:`TRAIN_FLOPS_FACTOR` x forward FLOPs / training step time) to ``row`` where both figures exist."""
    flops = row.get("flops")
    if isinstance(flops, (int, float)) and flops > 0:
        for key, time_key, factor in (("gflops_s", "time", 1), ("train_gflops_s", "train_time", TRAIN_FLOPS_FACTOR)):
            t = row.get(time_key)
            if isinstance(t, float) and t > 0:
                row[key] = factor * flops / t / 1e9
    return row


def make_table(rows: list[dict], baseline: str, train: bool) -> str:
    base = {r["size"]: r for r in rows if r["model"] == baseline}
    rate_base = {r["size"]: r for r in rows if r["model"] == RATE_BASELINE}
    head = ["model", "size", "params (M)", "GFLOPs", "time/pair (s)", "peak mem (GB)", "tensors (GiB)"]
    head += [f"time / {baseline}", f"mem / {baseline}", "GFLOP/s", f"GFLOP/s / {RATE_BASELINE}"]
    if train:
        head += ["train step (s)", "train peak (GB)", "train tensors (GiB)"]
        head += [f"train time / {baseline}", f"train mem / {baseline}"]
        head += ["train GFLOP/s", f"train GFLOP/s / {RATE_BASELINE}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def ratio(key: str, r: dict, reference: dict[str, dict] = base) -> str:
        b = reference.get(r["size"], {})
        if isinstance(r.get(key), float) and isinstance(b.get(key), float) and b[key] > 0:
            return f"{r[key] / b[key]:.2f}"
        return "n/a"

    def rate(key: str, r: dict) -> str:
        return f"{r[key]:.1f}" if isinstance(r.get(key), float) else "–"

    for r in rows:
        gflops = _fmt(r["flops"] / 1e9, ".1f") if isinstance(r.get("flops"), (int, float)) else "–"
        if r.get("flops_real"):
            gflops += "*"
        cells = [r["model"], r["size"], f"{r['params'] / 1e6:.6f}", gflops]
        t = _fmt(r.get("time", r.get("status")), ".3f")
        if "repeats" in r and r["repeats"] != r.get("repeats_asked", r["repeats"]):
            t += f" (n={r['repeats']})"
        cells += [t, _fmt(r.get("peak_gb", r.get("status")), ".2f"), _gib(r.get("fwd_bytes"))]
        cells += [ratio("time", r), ratio("peak_gb", r), rate("gflops_s", r), ratio("gflops_s", r, rate_base)]
        if train:
            st = r.get("train_status")
            tt = _fmt(r.get("train_time", st), ".3f")
            if "train_repeats" in r and r["train_repeats"] != r["repeats_asked"]:
                tt += f" (n={r['train_repeats']})"
            cells += [tt, _fmt(r.get("train_peak_gb", st), ".2f"), _gib(r.get("train_bytes"))]
            cells += [ratio("train_time", r), ratio("train_peak_gb", r)]
            cells += [rate("train_gflops_s", r), ratio("train_gflops_s", r, rate_base)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure(args: argparse.Namespace, name: str, size: tuple[int, int, int], log) -> dict:
    s = size_str(size)
    meta = meta_pass(name, size, args.train, args.amp, args.checkpointing)
    row: dict = {"model": name, "size": s, "params": meta["params"], "flops": meta.get("flops")}
    row["fwd_bytes"], row["train_bytes"] = meta.get("fwd_bytes"), meta.get("train_bytes")
    row["repeats_asked"] = args.repeats
    avail = mem_available_gb() if args.device == "cpu" else None

    def guarded(mode: str, live_key: str, count_flops: bool = False) -> dict:
        if args.estimate_only:
            return {"status": "not run"}
        need = estimate_need_gb(meta.get(live_key))
        if avail is not None and need is not None and need > 0.9 * avail:
            log(f"  {name} {s} {mode}: skipped, needs ~{need:.1f} GB, {avail:.1f} GB available")
            return {"status": f"skipped (needs ~{need:.0f} GB)"}
        log(f"  {name} {s} {mode}: running (est. need {need if need is None else round(need, 1)} GB)")
        t0 = time.perf_counter()
        out = run_worker(args, name, s, mode, count_flops)
        log(f"  {name} {s} {mode}: {out.get('status', 'ok')} in {time.perf_counter() - t0:.0f} s")
        return out

    if row["flops"] is None:  # meta failed: count FLOPs with one real forward in a subprocess of its own
        out = guarded("infer", "fwd_bytes", count_flops=True)
        if "flops" in out:
            row["flops"], row["flops_real"] = out["flops"], True
    inf = guarded("infer", "fwd_bytes")
    if "status" in inf:
        row["status"] = inf["status"]
    else:
        row["time"], row["peak_gb"], row["repeats"] = inf["time"], inf["peak_gb"], inf["repeats"]
    if args.train:
        tr = guarded("train", "train_bytes")
        if "status" in tr:
            row["train_status"] = tr["status"]
        else:
            row["train_time"], row["train_peak_gb"], row["train_repeats"] = tr["time"], tr["peak_gb"], tr["repeats"]
    return add_rates(row)


def throughput_pairs(path: Path, count: int) -> Path:
    """A pairs file of ``count`` pairs of the tiny CT data set (subjects 1-5 onto subject 0, repeated)."""
    data = REPO / "data" / "tiny_ct"
    lines = ["fixed,moving"]
    for i in range(count):
        lines.append(f"{data}/images/subject_00.nii.gz,{data}/images/subject_{i % 5 + 1:02d}.nii.gz")
    path.write_text("\n".join(lines) + "\n")
    return path


def throughput(args: argparse.Namespace) -> str:
    """Pairs per hour of ``ran-register-batch`` on this process's cores: 1 process x all cores as threads, then
    ``torchrun`` with one 1-thread process a core, each into a fresh folder; returns the Markdown report."""
    import csv
    import shlex
    import socket
    import tempfile

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    options = shlex.split(args.throughput_options)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    rows = []
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="ran-throughput-") as tmp:
        pairs = args.throughput_csv or throughput_pairs(Path(tmp) / "pairs.csv", args.throughput_pairs)
        batch = ["-m", "ran_bundle.batch", "--pairs", str(pairs), *options, "--quiet"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torchrun = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cores), "--nnodes", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(port),
        ]  # fmt: skip
        runs = [
            (f"1 process x {cores} threads", [sys.executable, *batch, "--threads", str(cores)]),
            (f"{cores} processes x 1 thread", [*torchrun, *batch, "--threads", "1"]),
        ]
        for i, (name, command) in enumerate(runs):
            out = Path(tmp) / f"out-{i}"
            print(f"throughput: {name} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            proc = subprocess.run(
                [*command, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                timeout=args.timeout,
            )  # fmt: skip
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise SystemExit(f"benchmark: {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            with open(out / "summary.csv", newline="") as f:
                summary = list(csv.DictReader(f))
            done = [r for r in summary if r["status"] == "done"]
            seconds = statistics.median(float(r["seconds"]) for r in done)
            rows.append((name, len(done), wall, len(done) * 3600 / wall, seconds))
    base = rows[0][3]
    table = [
        "| run | pairs | wall (s) | pairs/hour | median s/pair (one process) | speed-up |",
        "|---|---|---|---|---|---|",
        *(f"| {n} | {k} | {w:.1f} | {r:.0f} | {m:.1f} | {r / base:.2f} |" for n, k, w, r, m in rows),
    ]
    lines = [
        machine_line("cpu"),
        "",
        f"Throughput of ran-register-batch on {cores} cores: {pairs if args.throughput_csv else 'tiny CT pairs'}, "
        f"options {' '.join(options) or '(defaults)'}; wall time of the whole command, start-up and loading "
        "the network included.",
        "",
        f"Load: 1-minute load average {load_start} at the start, {load_average()} at the end",
        "",
        *table,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="input sizes DxHxW")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=ALL_MODELS)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", action="store_true", help="autocast: bfloat16 on cpu, float16 on cuda")
    p.add_argument("--repeats", type=int, default=3, help="timed passes after one warm-up (median)")
    p.add_argument("--out", type=Path, help="also write the Markdown report here")
    p.add_argument("--train", action="store_true", help="also time one training step")
    p.add_argument(
        "--checkpointing", action="store_true", help="RAN presets train with activation checkpointing (--train)"
    )
    p.add_argument("--baseline", default="voxelmorph", choices=ALL_MODELS, help="model of the ratio columns")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per measuring subprocess")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes before the timed ones")
    p.add_argument(
        "--budget",
        type=float,
        default=0.0,
        help="seconds of timed passes per measurement: fewer than --repeats (>= 1) when one pass is slow (0: off)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch default)")
    p.add_argument(
        "--omp-wait-policy",
        default="inherit",
        choices=("inherit", "passive", "active"),
        help="OMP_WAIT_POLICY of the workers (inherit: this environment's); passive on a busy machine",
    )
    p.add_argument(
        "--estimate-only",
        action="store_true",
        help="only the meta-device figures (params, GFLOPs, tensors): no real pass, seconds at any size",
    )
    p.add_argument("--throughput", action="store_true", help="pairs/hour of ran-register-batch (see above)")
    p.add_argument("--throughput-pairs", type=int, default=8, help="--throughput: tiny CT pairs (default 8)")
    p.add_argument("--throughput-csv", type=Path, help="--throughput: your own pairs file instead")
    p.add_argument(
        "--throughput-options",
        default="--intensity ct --spacing 3",
        help="--throughput: ran-register-batch options (default: '--intensity ct --spacing 3')",
    )
    # internal: one measurement in a fresh subprocess
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="infer", choices=("infer", "train"), help=argparse.SUPPRESS)
    p.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")

    if args.throughput:
        if args.throughput_pairs < 1:
            p.error("--throughput-pairs must be >= 1")
        report = throughput(args)
        print(report, flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(report)
        return 0

    if args.worker:
        try:
            res = worker(args)
        except Exception as exc:  # noqa: BLE001 - report OOM distinctly, re-raise anything else
            if _is_oom(exc):
                res = {"status": "OOM"}
            else:
                raise
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    sizes = [parse_size(s) for s in args.sizes]
    header = machine_line(args.device)
    policy = worker_env(args.omp_wait_policy).get("OMP_WAIT_POLICY", "unset (OpenMP default: spin)")
    load_start = load_average()
    settings = (
        f"Settings: batch 1, repeats {args.repeats} (+{args.warmup} warm-up), amp {'on' if args.amp else 'off'}, "
        f"activation checkpointing {'on' if args.checkpointing else 'off'}, "
        f"train {'on' if args.train else 'off'}, timeout {args.timeout:.0f} s, baseline {args.baseline}, "
        f"budget {f'{args.budget:.0f} s' if args.budget > 0 else 'off'}, threads {args.threads or 'torch default'}, "
        f"OMP_WAIT_POLICY {policy}"
    )
    print(header, flush=True)
    print(settings, flush=True)
    print(f"Load: 1-minute load average {load_start} at the start", flush=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    notes = [
        "GFLOPs: torch.utils.flop_counter.FlopCounterMode, one forward, meta device at the real size "
        "(* = counted by a real forward); convs/matmuls only.",
        "Peak mem: CPU = ru_maxrss increase of a fresh subprocess during the passes; cuda = max_memory_allocated.",
        "Tensors: peak bytes of live tensors in a meta-device pass at the real size (params, activations, "
        "gradients, Adam state; with --amp every activation in bfloat16): what a GPU's allocator must hold, "
        "cuDNN workspaces and allocator slack excluded. CPU peaks are higher (convolution buffers, allocator).",
        "RAN forward evaluates both registration directions up to its last RA module, which computes only the "
        "moving -> fixed one; voxelmorph is timed up to its DDF (no final warp).",
        "(n=k): only k timed passes fitted --budget; the time is their median.",
        "GFLOP/s: counted forward FLOPs / time per pair; train GFLOP/s: 3 x forward FLOPs / train step time "
        "(backward = 2 forward passes; checkpointing's recomputation, loss and optimiser step not counted). "
        f"GFLOP/s / {RATE_BASELINE}: ratio to {RATE_BASELINE} (plain stack of 42 16-channel 3x3x3 convolutions, "
        "1.01x the FLOPs of ref) at the same size in the same run. Below about 36^3 PyTorch sends its batch-1 "
        "convolutions (C x D x H <= 20480) to the slow native slow_conv3d: measure the ratio at 64^3 or more.",
        "RAN presets run in channels_last_3d with the fused ScalarNorm (the defaults); <preset>-contiguous: "
        "contiguous weights and activations; <preset>-stdmean: ScalarNorm by its torch.std_mean definition; "
        "<preset>-contiguous-stdmean: both (the network before either speed-up).",
        "skipped (needs ~X GB): estimated need (meta-device live tensors x 2 + 0.5 GB) > 90% of MemAvailable.",
    ]
    if args.baseline not in args.models:
        notes.append(f"Baseline {args.baseline} not in --models: ratio columns are n/a.")
    if RATE_BASELINE not in args.models:
        notes.append(f"{RATE_BASELINE} not in --models: the GFLOP/s / {RATE_BASELINE} columns are n/a.")

    def render(rows: list[dict], complete: bool) -> str:
        status = "" if complete else f"(partial: {len(rows)} of {len(sizes) * len(args.models)} measurements)"
        load = f"Load: 1-minute load average {load_start} at the start" + (
            f", {load_average()} at the end" if complete else ""
        )
        table = make_table(rows, args.baseline, args.train)
        report = "\n".join([header, "", settings, "", load, status, "", table, "", ""])
        return report + "\n".join(f"- {n}" for n in notes) + "\n"

    rows: list[dict] = []
    for size in sizes:
        for name in args.models:
            rows.append(measure(args, name, size, log))
            if args.out:  # a run cut short still leaves the rows measured so far
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(render(rows, complete=False))
    report = render(rows, complete=True)
    print()
    print(report, flush=True)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
