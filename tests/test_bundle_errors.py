"""A failed bundle run ends with one line that names the problem (ran_bundle.bundle_errors)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ran_bundle.bundle_errors import one_line, root_cause

pytestmark = pytest.mark.slow  # subprocesses or training runs: not in `pytest -m "not slow"`


def test_one_line_names_the_innermost_cause():
    try:
        try:
            raise ValueError("label map x.nii.gz: holds non-integer values; a label map must hold integers.")
        except ValueError as inner:
            raise RuntimeError("Failed to instantiate component 'ran_bundle.data.load_datalist'") from inner
    except RuntimeError as outer:
        assert isinstance(root_cause(outer), ValueError)
        expected = "label map x.nii.gz: holds non-integer values; a label map must hold integers."
        assert one_line(outer) == f"ran-bundle: error: ValueError: {expected}"


def test_bundle_run_with_a_bad_label_ends_with_the_problem(repo_root: Path, tiny_ct: Path, tmp_path: Path):
    """A label map holding 0.5 in a datalist: MONAI's traceback ends with 'Failed to instantiate component'; the
    run's last line must name the label file and the problem."""
    data = tmp_path / "data"
    shutil.copytree(tiny_ct, data)
    label_path = data / "labels" / "subject_01.nii.gz"
    label = nib.load(label_path)
    values = np.asarray(label.dataobj, dtype=np.float32)
    values[values > 0] += 0.5
    nib.save(nib.Nifti1Image(values, label.affine), label_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "training",
            "--config_file",
            str(repo_root / "configs" / "train.json"),
            "--bundle_root",
            str(repo_root),
            "--datalist",
            str(data / "datalist.json"),
            "--ckpt_dir",
            str(tmp_path / "models"),
            "--output_dir",
            str(tmp_path / "eval"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ran-bundle: error:"), last
    assert "non-integer" in last and "subject_01.nii.gz" in last, last
    assert not (tmp_path / "models").exists()  # refused before any output folder
    assert json.loads((data / "datalist.json").read_text())  # the datalist itself was fine
