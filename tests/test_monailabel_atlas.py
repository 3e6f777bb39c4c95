"""The atlas task through MONAI Label's own ``BundleInferTask``, in MONAI Label's virtual environment.

MONAI Label 0.8.5 cannot live in the main environment (it pins numpy < 2 and needs a torchvision that
matches torch), so ``scripts/make_monailabel_env.sh`` builds ``.venv-monailabel``; this test finds
its python through ``RAN_MONAILABEL_PYTHON`` (default ``.venv-monailabel/bin/python``) and skips
without it. It runs ``apps/monailabel/run_task.py`` there on a real CT (``tiny_ct/subject_03``): MONAI
Label loads the app from ``apps/monailabel/main.py``, whose ``ran_atlas`` task is a ``BundleInferTask``
on ``configs/atlas_inference.json``; the label map MONAI Label writes is checked here.
"""

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
import torch
from monai.bundle import ConfigParser

from ran_bundle.metrics import dice
from ran_bundle.pipeline import load_network

REPO_ROOT = Path(__file__).resolve().parents[1]
ML_PYTHON = Path(os.environ.get("RAN_MONAILABEL_PYTHON", str(REPO_ROOT / ".venv-monailabel" / "bin" / "python")))
IMAGE = "subject_03"

pytestmark = [
    pytest.mark.monailabel,
    pytest.mark.skipif(
        not ML_PYTHON.is_file(),
        reason=f"MONAI Label environment not found at {ML_PYTHON}: run `bash scripts/make_monailabel_env.sh` "
        "(or set RAN_MONAILABEL_PYTHON)",
    ),
]


def mean_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean Dice over the non-zero labels of ``ref``."""
    return float(np.mean([dice(pred == v, ref == v) for v in np.unique(ref) if v != 0]))


def test_bundle_infer_task_propagates_the_atlas(tiny_ct: Path, tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(tiny_ct / "images" / f"{IMAGE}.nii.gz", studies)
    out = tmp_path / "label.nii.gz"
    cmd = [str(ML_PYTHON), "apps/monailabel/run_task.py", "--studies", str(studies), "--image", IMAGE]
    cmd += ["--out", str(out), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(summary), file=sys.stderr)

    assert summary["task_class"] == "monailabel.tasks.infer.bundle.BundleInferTask"
    assert Path(summary["config"]).name == "atlas_inference.json"
    names = json.loads((tiny_ct / "datalist.json").read_text())["labels"]
    assert summary["label_names"] == {name: int(v) for v, name in names.items()}

    image = nib.load(tiny_ct / "images" / f"{IMAGE}.nii.gz")
    label = nib.load(out)
    pred = np.asarray(label.dataobj)
    atlas = np.asarray(nib.load(tiny_ct / "labels" / "subject_00.nii.gz").dataobj)
    ref = np.asarray(nib.load(tiny_ct / "labels" / f"{IMAGE}.nii.gz").dataobj)
    assert pred.shape == image.shape
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
    assert set(np.unique(pred)) <= set(np.unique(atlas))

    # the same config without MONAI Label (main environment, torch 2.13 instead of 2.14.1)
    parser = ConfigParser()
    parser.read_config(REPO_ROOT / "configs" / "atlas_inference.json")
    parser.config["bundle_root"] = str(REPO_ROOT)
    data = parser.get_parsed_content("preprocessing")({"image": str(tiny_ct / "images" / f"{IMAGE}.nii.gz")})
    with torch.no_grad():
        data["pred"] = load_network(REPO_ROOT / "models" / "model.pt")(data["image"][None])[0]
    direct = parser.get_parsed_content("postprocessing")(data)["pred"][0].numpy()
    agreement = float((direct == pred).mean())

    d_prop, d_id = mean_dice(pred, ref), mean_dice(atlas, ref)
    print(
        f"MONAI Label BundleInferTask, atlas -> {IMAGE}: mean Dice {d_prop:.4f} (identity {d_id:.4f}); "
        f"voxels equal to the run without MONAI Label: {agreement:.5f}",
        file=sys.stderr,
    )
    assert agreement > 0.999
    # the shipped weights were trained on brain MR: on this CT they give about the identity's overlap
    assert d_prop > 0.5
