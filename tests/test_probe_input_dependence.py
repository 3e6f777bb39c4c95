"""Smoke test of ``scripts/probe_input_dependence.py``: it trains each network briefly and writes its table."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses or training runs: not in `pytest -m "not slow"`


def test_probe_runs_every_network_and_reports_each_step(repo_root, tmp_path):
    out = tmp_path / "probe.md"
    cmd = [sys.executable, str(repo_root / "scripts" / "probe_input_dependence.py"), "--networks", "ref", "localnet"]
    cmd += ["--steps", "2", "--every", "1", "--size", "32", "--held", "4", "--batch", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.read_text().splitlines()[4:]]
    assert [(r[0], r[1]) for r in rows] == [(n, s) for n in ("ref", "localnet") for s in ("0", "1", "2")]
    for _, _, epe, _, _, spread, true_spread, _ in rows:
        assert float(epe) > 0 and float(spread) >= 0
        assert float(true_spread) > 1.0, "the probe's random fields should differ between pairs"
    ref_start = rows[0]
    # the RAN starts at (almost) the identity transform: its first error is the zero field's
    assert abs(float(ref_start[2]) - float(ref_start[3])) < 1e-3
    assert float(ref_start[5]) < 1e-3


def test_probe_refuses_a_size_the_networks_cannot_take(repo_root):
    cmd = [sys.executable, str(repo_root / "scripts" / "probe_input_dependence.py"), "--size", "40"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert proc.returncode == 2 and "--size must be a multiple of 16" in proc.stderr


def test_probe_builds_presets_with_config_overrides(repo_root):
    spec = importlib.util.spec_from_file_location("probe", repo_root / "scripts" / "probe_input_dependence.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    network = probe.make_network("RAn3:q=1:head_weighting='softmax'")
    assert (network.config.q, network.config.head_weighting, network.spatial_dims) == (1, "softmax", 2)
    with pytest.raises(ValueError, match="unknown network 'voxelmorph3'"):
        probe.make_network("voxelmorph3")
