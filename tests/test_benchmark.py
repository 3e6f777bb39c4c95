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


def test_benchmark_tiny(repo_root, tmp_path):
    out = tmp_path / "bench.md"
    cmd = [sys.executable, str(repo_root / "scripts" / "benchmark.py"), "--sizes", "32x32x32"]
    cmd += ["--models", "ref", "localnet", "--repeats", "1", "--warmup", "0", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Machine:" in proc.stdout and "torch" in proc.stdout
    rows = _table_rows(out.read_text())
    assert set(rows) == {"ref", "localnet"}
    for model, row in rows.items():
        assert row["size"] == "32x32x32"
        for col in ("params (M)", "GFLOPs", "time/pair (s)"):
            assert float(row[col].rstrip("*")) > 0, (model, col, row[col])
        assert float(row["peak mem (GB)"]) >= 0
        assert row["time / voxelmorph"] == "n/a"  # baseline not run
    # exact parameter count of the released topology (6 decimals of millions = exact count)
    assert round(float(rows["ref"]["params (M)"]) * 1e6) == 738_030


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
    assert float(row["train tensors (GiB)"]) > float(row["tensors (GiB)"]) > 0
