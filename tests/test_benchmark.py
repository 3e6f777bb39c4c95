"""Smoke test of ``scripts/benchmark.py``: it runs and prints a well-formed table; its models and meta-device count.

No timing or memory assertions: speed/memory targets live in the benchmark script and its reports. The peers and
the meta-device count live in the bundle's ``scripts`` package (``scripts/peers.py``, ``scripts/profiling.py``),
imported from the repository root as the scripts import them.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.fixture
def scripts_on_path(repo_root, monkeypatch):
    """The repository root on ``sys.path``, where the bundle's ``scripts`` package is found."""
    monkeypatch.syspath_prepend(str(repo_root))


def _table_rows(text: str) -> dict[str, dict[str, str]]:
    """Markdown table in ``text`` -> ``{model: {column: cell}}``."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(head, cells, strict=True))
    return rows


@pytest.mark.slow
def test_benchmark_tiny(repo_root, tmp_path):
    out = tmp_path / "bench.md"
    cmd = [sys.executable, str(repo_root / "scripts" / "benchmark.py"), "--sizes", "32x32x32"]
    cmd += ["--models", "ref", "ref-contiguous-stdmean", "localnet", "conv16", "--repeats", "1", "--warmup", "0"]
    cmd += ["--threads", "1", "--omp-wait-policy", "passive", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Machine:" in proc.stdout and "torch" in proc.stdout
    report = out.read_text()
    assert "OMP_WAIT_POLICY PASSIVE" in report and "at the start" in report and "at the end" in report
    rows = _table_rows(out.read_text())
    assert set(rows) == {"ref", "ref-contiguous-stdmean", "localnet", "conv16"}
    for model, row in rows.items():
        assert row["size"] == "32x32x32"
        for col in ("params (M)", "GFLOPs", "time/pair (s)", "GFLOP/s", "GFLOP/s / conv16"):
            assert float(row[col].rstrip("*")) > 0, (model, col, row[col])
        assert float(row["peak mem (GB)"]) >= 0
        assert row["time / voxelmorph"] == "n/a"  # baseline not run
        # achieved speed = counted forward FLOPs / measured time, to the table's rounding
        gflops, seconds = float(row["GFLOPs"]), float(row["time/pair (s)"])
        assert float(row["GFLOP/s"]) == pytest.approx(gflops / seconds, rel=0.02, abs=0.06)
    assert rows["conv16"]["GFLOP/s / conv16"] == "1.00"
    # exact parameter count of the released topology (6 decimals of millions = exact count), in both formats
    assert round(float(rows["ref"]["params (M)"]) * 1e6) == 738_030
    assert rows["ref-contiguous-stdmean"]["params (M)"] == rows["ref"]["params (M)"]
    assert rows["ref-contiguous-stdmean"]["GFLOPs"] == rows["ref"]["GFLOPs"]


def test_rates_and_their_ratio_to_conv16(scripts_on_path):
    """GFLOP/s = forward FLOPs / forward time; a training step counts 3 forward passes' FLOPs; ratios to conv16
    at the same size, n/a without it; a model that timed out has no rate."""
    from scripts.benchmark import add_rates, make_table

    common = {"size": "64x64x64", "params": 1000, "repeats_asked": 1}
    rows = [
        add_rates({**common, "model": "conv16", "flops": 150e9, "time": 1.0, "train_time": 3.0}),
        add_rates({**common, "model": "ref", "flops": 144e9, "time": 4.0, "train_time": 6.0}),
        add_rates({**common, "model": "localnet", "flops": 10e9, "status": "timeout", "train_status": "timeout"}),
        add_rates({**common, "model": "ref", "size": "32x32x32", "flops": 18e9, "time": 0.5, "train_time": 1.0}),
    ]
    assert rows[1]["gflops_s"] == pytest.approx(36.0) and rows[1]["train_gflops_s"] == pytest.approx(72.0)
    table = make_table(rows, "voxelmorph", train=True)
    by_model = {}
    for ln in table.splitlines()[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        by_model[(cells[0], cells[1])] = cells
    head = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    col = {name: i for i, name in enumerate(head)}
    ref = by_model[("ref", "64x64x64")]
    assert ref[col["GFLOP/s"]] == "36.0" and ref[col["GFLOP/s / conv16"]] == "0.24"
    assert ref[col["train GFLOP/s"]] == "72.0" and ref[col["train GFLOP/s / conv16"]] == "0.48"
    assert by_model[("conv16", "64x64x64")][col["train GFLOP/s / conv16"]] == "1.00"
    timed_out = by_model[("localnet", "64x64x64")]
    assert timed_out[col["GFLOP/s"]] == "–" and timed_out[col["GFLOP/s / conv16"]] == "n/a"
    assert by_model[("ref", "32x32x32")][col["GFLOP/s / conv16"]] == "n/a"  # no conv16 at that size


def test_worker_environment_sets_the_omp_wait_policy(scripts_on_path, monkeypatch):
    from scripts.benchmark import worker_env

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert worker_env("inherit")["OMP_WAIT_POLICY"] == "ACTIVE"
    assert worker_env("passive")["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert "OMP_WAIT_POLICY" not in worker_env("inherit")


def test_conv16_baseline_matches_ref_flops(scripts_on_path):
    """``conv16``: 2 channels in, the 3-channel DDF out, 1.01x the forward FLOPs of ``ref`` at the same size."""
    import torch

    from scripts.peers import ALL_MODELS, build_model
    from scripts.profiling import meta_pass

    assert "conv16" in ALL_MODELS
    size = (32, 48, 64)
    conv16, ref = meta_pass("conv16", size, train=False, amp=False), meta_pass("ref", size, train=False, amp=False)
    assert conv16["flops"] == 557_280 * 32 * 48 * 64
    assert 1.0 < conv16["flops"] / ref["flops"] < 1.02
    with torch.no_grad():
        assert build_model("conv16")(torch.rand(1, 2, 8, 9, 10)).shape == (1, 3, 8, 9, 10)


def test_ran_variants_switch_off_one_speed_up_each(scripts_on_path):
    """``-contiguous`` turns ``channels_last`` off, ``-stdmean`` computes every ScalarNorm with ``torch.std_mean``
    (the fused function does not call it), ``-contiguous-stdmean`` both; same parameters, FLOPs and field."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from scripts.peers import ALL_MODELS, RAN_VARIANTS, build_model
    from scripts.profiling import meta_pass

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    assert {"ref-contiguous", "ref-stdmean", "ref-contiguous-stdmean", "RAn4-contiguous"} <= set(RAN_VARIANTS)
    assert set(RAN_VARIANTS) <= set(ALL_MODELS)
    torch.manual_seed(0)
    ref = build_model("ref").eval()
    x = torch.rand(1, 2, 32, 32, 32)
    with torch.no_grad():
        expected = ref(x)
    flops = meta_pass("ref", (32, 32, 32), train=False, amp=False)["flops"]
    for name, channels_last, std_mean in [
        ("ref", True, False),
        ("ref-contiguous", False, False),
        ("ref-stdmean", True, True),
        ("ref-contiguous-stdmean", False, True),
    ]:
        net = build_model(name).eval()
        net.load_state_dict(ref.state_dict())
        assert net.channels_last == channels_last, name
        ops = Ops()
        with torch.no_grad(), ops:
            ddf = net(x)
        assert ("std_mean" in ops.names) == std_mean, name
        assert (ddf - expected).abs().max() < 1e-5, name
        assert meta_pass(name, (32, 32, 32), train=False, amp=False)["flops"] == flops
    assert not build_model("RAn4-contiguous").channels_last


def test_peer_models_and_meta_pass(scripts_on_path):
    """Every peer is built by name (an unknown name is refused) and counted on the meta device, at no real cost."""
    from scripts.peers import ALL_MODELS, build_model, n_params
    from scripts.profiling import meta_pass

    assert {"voxelmorph", "localnet", "RAn4+"} <= set(ALL_MODELS)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("unet")
    info = meta_pass("localnet", (32, 32, 32), train=True, amp=False)
    assert info["params"] == n_params(build_model("localnet")) and info["flops"] > 0
    assert info["train_bytes"] > info["fwd_bytes"] > 0


def test_meta_pass_memory_savings_are_counted(scripts_on_path):
    """The meta-device tensor count sees what activation checkpointing and half precision save, and counts a
    storage shared by several tensors (a ``detach`` alias) once."""
    import torch

    from scripts.profiling import _LiveBytes, meta_pass

    size = (64, 48, 80)
    plain = meta_pass("ref", size, train=True, amp=False)["train_bytes"]
    recomputed = meta_pass("ref", size, train=True, amp=False, checkpointing=True)["train_bytes"]
    half = meta_pass("ref", size, train=True, amp=True, checkpointing=True)["train_bytes"]
    assert recomputed < 0.5 * plain
    assert 0.4 * recomputed < half < 0.6 * recomputed

    tracker = _LiveBytes()
    with torch.device("meta"), tracker:
        x = torch.empty(1000)
        aliases = [x.detach(), x.view(10, 100)]
    assert tracker.peak == 4000 and len(aliases) == 2


def test_estimate_only_reports_tensors_without_running(repo_root):
    cmd = [sys.executable, str(repo_root / "scripts" / "benchmark.py"), "--sizes", "192x160x256"]
    cmd += ["--models", "ref", "--train", "--checkpointing", "--amp", "--estimate-only"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = _table_rows(proc.stdout)["ref"]
    assert row["time/pair (s)"] == "not run" and row["train step (s)"] == "not run"
    assert row["GFLOP/s"] == "–" and row["train GFLOP/s"] == "–" and row["train GFLOP/s / conv16"] == "n/a"
    assert float(row["train tensors (GiB)"]) > float(row["tensors (GiB)"]) > 0
