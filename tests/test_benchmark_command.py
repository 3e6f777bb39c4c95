"""Smoke test of ``scripts/benchmark_command.py``: on one tiny pair it writes its table with the ratio column.

No timing assertion (the speed target lives in the benchmark's report, docs/benchmark.md), only that the table is
produced, holds the ratio column and that the figures it reports are well formed.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest


def test_benchmark_command_tiny(repo_root, tiny_ct, tmp_path):
    pytest.importorskip("ants", reason="antspyx (pip install 'ran-bundle[compare]') times the ANTs side")
    subjects = json.loads((tiny_ct / "datalist.json").read_text())["training"][:2]
    datalist = tmp_path / "pair.json"
    datalist.write_text(json.dumps({"test": subjects}))  # two subjects: two ordered pairs, the first one run
    out = tmp_path / "table"
    cmd = [sys.executable, str(repo_root / "scripts" / "benchmark_command.py"), "--datalist", str(datalist)]
    cmd += ["--base-dir", str(tiny_ct), "--threads", "1", "--limit", "1", "--out", str(out)]
    cmd += ["--ran-args", "--intensity ct --affine none --no-io --spacing 6", "--ants-transform", "Rigid"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=repo_root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    head = [c.strip() for c in (out / "benchmark_command.md").read_text().splitlines()[0].strip("|").split("|")]
    assert "ratio" in head and "ran-register (s)" in head and "ANTs SyN (s)" in head
    rows = list(csv.DictReader(open(out / "benchmark_command.csv")))
    assert [r["pair"] for r in rows] == ["subject_00->subject_01", "mean (1 pairs)"]
    row = rows[0]
    assert float(row["ratio"]) == pytest.approx(float(row["ran_s"]) / float(row["ants_s"]))
    shares = [float(v) for k, v in row.items() if k.endswith("_share")]
    assert all(s >= 0 for s in shares) and math.isclose(sum(shares), 1.0, abs_tol=0.01)
    assert float(row["ran_peak_gb"]) > 0 and float(row["ants_peak_gb"]) > 0
    assert 0 < float(row["ran_dice"]) <= 1 and 0 < float(row["ants_dice"]) <= 1
    assert int(row["ran_threads"]) == 1  # the default follows the CPUs it is pinned to
