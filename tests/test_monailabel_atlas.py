"""The atlas task through MONAI Label's own ``BundleInferTask``, in MONAI Label's virtual environment.

MONAI Label 0.8.5 cannot live in the main environment (it pins numpy < 2 and needs a torchvision that
matches torch), so ``scripts/make_monailabel_env.sh`` builds ``.venv-monailabel``; this test finds
its python through ``RAN_MONAILABEL_PYTHON`` (default ``.venv-monailabel/bin/python``) and skips
without it. It runs ``apps/monailabel/run_task.py`` there: MONAI Label loads the app from
``apps/monailabel/main.py``, whose ``ran_atlas`` task is a ``BundleInferTask`` on
``configs/atlas_inference.json`` (pre-transform: the registration pipeline up to the network input;
MONAI Label's network call; post-transform: instance optimisation and the whole mapping); the label map
MONAI Label writes is checked here.

The atlas and the target are two Mindboggle brains of ``../shared/data`` (skipped when absent), resampled
to 3 mm and registered on a 3 mm network grid with 10 + 10 instance-optimisation iterations (the app's
``--conf`` overrides), so that the test stays short on 2 CPU cores. The same pair then goes through
:meth:`RegistrationPipeline.register` in this process: MONAI Label's labels must score like it (the affine
stage's random metric sampling is not repeatable from run to run, so the two are compared by Dice, not
voxel by voxel) and above the affine stage alone.
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

from ran_bundle.atlas import load_label_names
from ran_bundle.metrics import dice_per_label
from ran_bundle.pipeline import RegistrationPipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
ML_PYTHON = Path(os.environ.get("RAN_MONAILABEL_PYTHON", str(REPO_ROOT / ".venv-monailabel" / "bin" / "python")))
ATLAS, TARGET = "oasis_trt_01", "oasis_trt_14"
SPACING = 3.0
IO_ITERATIONS = (10, 10)

pytestmark = [
    pytest.mark.monailabel,
    pytest.mark.slow,
    pytest.mark.skipif(
        not ML_PYTHON.is_file(),
        reason=f"MONAI Label environment not found at {ML_PYTHON}: run `bash scripts/make_monailabel_env.sh` "
        "(or set RAN_MONAILABEL_PYTHON)",
    ),
]


def mean_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean Dice over the labels of ``ref`` with at least 100 voxels (as the pipeline's ``mean_*_100``)."""
    values, counts = np.unique(ref, return_counts=True)
    labels = [int(v) for v, c in zip(values, counts, strict=True) if v != 0 and c >= 100]
    return float(np.nanmean(list(dice_per_label(pred, ref, labels).values())))


def test_bundle_infer_task_propagates_the_brain_atlas(shared_data: Path, tmp_path: Path, resample_isotropic) -> None:
    src = shared_data / "mindboggle_oasis_trt20"
    if not all((src / s / f).is_file() for s in (ATLAS, TARGET) for f in ("image.nii.gz", "label.nii.gz")):
        pytest.skip(f"Mindboggle subjects {ATLAS} and {TARGET} not found under {src}")
    files = {
        f"{role}_{kind}": resample_isotropic(
            src / subject / f"{kind}.nii.gz", tmp_path / f"{role}_{kind}.nii.gz", SPACING, kind == "label"
        )
        for role, subject in (("atlas", ATLAS), ("target", TARGET))
        for kind in ("image", "label")
    }
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(files["target_image"], studies / f"{TARGET}.nii.gz")
    out = tmp_path / "label.nii.gz"
    conf = {
        "atlas_image": files["atlas_image"],
        "atlas_label": files["atlas_label"],
        "spacing": SPACING,
        "io_iterations": json.dumps(list(IO_ITERATIONS)),
    }
    cmd = [str(ML_PYTHON), "apps/monailabel/run_task.py", "--studies", str(studies), "--image", TARGET]
    cmd += ["--out", str(out), "--device", "cpu"]
    for key, value in conf.items():
        cmd += ["--conf", key, str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])

    assert summary["task_class"] == "monailabel.tasks.infer.bundle.BundleInferTask"
    assert Path(summary["config"]).name == "atlas_inference.json"
    names = load_label_names(REPO_ROOT / "configs" / "datalists" / "brain_mindboggle.json")
    assert summary["label_names"] == {name: value for value, name in names.items()}
    result = summary["result"]
    assert result["atlas_image"] == str(files["atlas_image"]) and result["affine_stage"] == "affine"
    assert result["non_positive_jacobian_percent"] < 1.0 and isinstance(result["warnings"], list)

    image, label = nib.load(files["target_image"]), nib.load(out)
    pred = np.asarray(label.dataobj)
    assert pred.shape == image.shape
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
    atlas = np.asarray(nib.load(files["atlas_label"]).dataobj)
    assert set(np.unique(pred)) <= set(np.unique(atlas))

    # the same pair through the pipeline in this process (main environment, torch 2.13 instead of 2.14.1)
    pipeline = RegistrationPipeline(device="cpu", spacing=SPACING, io_iterations=IO_ITERATIONS, progress=False)
    registration = pipeline.register(
        files["target_image"], files["atlas_image"], files["target_label"], files["atlas_label"]
    )
    dice = registration.stats["dice"]
    ref = np.asarray(nib.load(files["target_label"]).dataobj).astype(int)
    d_ml = mean_dice(pred, ref)
    print(
        f"MONAI Label BundleInferTask, atlas {ATLAS} -> {TARGET} at {SPACING:g} mm: mean Dice {d_ml:.4f}; the "
        f"pipeline in-process: {dice['mean_registered_100']:.4f}, affine stage alone {dice['mean_affine_100']:.4f}; "
        f"latencies {summary['latencies']}",
        file=sys.stderr,
    )
    assert d_ml == pytest.approx(dice["mean_registered_100"], abs=0.03)
    assert d_ml > dice["mean_affine_100"] + 0.03
