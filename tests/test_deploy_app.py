"""The MONAI Deploy application ``deploy/app.py``, end to end, against ``configs/inference.json``.

The app runs in its own virtual environment (``bash scripts/make_deploy_env.sh``: the MONAI Deploy App
SDK stays out of the main one), found through ``RAN_DEPLOY_PYTHON`` (default
``deploy/.venv/bin/python``); the test skips, naming the script, when that python does not exist.

The pair is the OASIS brain pair of ``../shared/data`` (``conftest.shared_data``; skipped when absent):
subject B (moving) registered to subject A (fixed) with the shipped weights. To keep the test fast on
2 CPU cores, both images are first resampled (SimpleITK, linear) to central 48 x 48 x 32 grids of 4 mm,
already RAS and divisible by 16, so the bundle's preprocessing neither resamples nor pads and its
output grid is the fixed file's grid. The same files then go through

* the app: ``python deploy/app.py -i IN -o OUT -m models/model.ts --intensity mr`` (the exported
  TorchScript bundle through MONAI Deploy's ``MonaiBundleInferenceOperator``), and
* the bundle: ``python -m monai.bundle run inference --config_file configs/inference.json
  --intensity mr`` (the checkpoint ``models/model.pt`` in eager PyTorch),

and the warped images and displacement fields must agree within :data:`TOLERANCE` on the same affine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
DEPLOY_PYTHON = Path(os.environ.get("RAN_DEPLOY_PYTHON", str(REPO / "deploy" / ".venv" / "bin" / "python")))
SIZE = (48, 48, 32)  # voxels of the resampled pair
SPACING = 4.0  # mm
TOLERANCE = 1e-4  # max abs difference: mm for the DDF, intensity ([0, 1] after preprocessing) for the warped image
TIMEOUT = 300  # s per subprocess

pytestmark = pytest.mark.deploy


def resample_centre(src: Path, dst: Path) -> Path:
    """Resample ``src`` (linear) to :data:`SIZE` voxels of :data:`SPACING` mm centred on its centre."""
    img = sitk.ReadImage(str(src))
    ref = sitk.Image(list(SIZE), img.GetPixelID())
    ref.SetSpacing([SPACING] * 3)
    ref.SetDirection(img.GetDirection())
    centre = np.asarray(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()]))
    half = np.reshape(img.GetDirection(), (3, 3)) @ ((np.asarray(SIZE) - 1) * SPACING / 2)
    ref.SetOrigin(tuple(centre - half))
    sitk.WriteImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0), str(dst))
    return dst


def run(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``args`` with one OpenMP thread; fail the test with the output's tail unless it exits with 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args[:3])} ... failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-5000:]}")
    return proc, seconds


@pytest.fixture(scope="module")
def deploy_python() -> Path:
    """The deploy environment's python, or skip."""
    if not DEPLOY_PYTHON.is_file():
        pytest.skip(
            f"MONAI Deploy environment not found at {DEPLOY_PYTHON}: run `bash scripts/make_deploy_env.sh` "
            "(or point RAN_DEPLOY_PYTHON at its python)"
        )
    return DEPLOY_PYTHON


@pytest.fixture(scope="module")
def pair_dir(shared_data: Path, tmp_path_factory) -> Path:
    """Folder holding ``moving.nii.gz`` (OASIS B) and ``fixed.nii.gz`` (OASIS A), resampled (see module doc)."""
    src = shared_data / "oasis_brain_mr"
    if not (src / "lapirn_image_A" / "image.nii.gz").is_file():
        pytest.skip(f"OASIS pair not found under {src}")
    out = tmp_path_factory.mktemp("deploy_pair")
    for role, subject in (("fixed", "lapirn_image_A"), ("moving", "lapirn_image_B")):
        resample_centre(src / subject / "image.nii.gz", out / f"{role}.nii.gz")
    return out


def test_app_matches_inference_json(deploy_python: Path, pair_dir: Path, tmp_path: Path) -> None:
    app_out, ref_out = tmp_path / "app", tmp_path / "bundle"
    _, app_s = run(
        [
            str(deploy_python), str(REPO / "deploy" / "app.py"),
            "-i", str(pair_dir), "-o", str(app_out), "-m", str(REPO / "models" / "model.ts"), "--intensity", "mr",
        ],
        cwd=tmp_path,
    )  # fmt: skip
    datalist = tmp_path / "datalist.json"
    subjects = [{"image": str(pair_dir / f"{role}.nii.gz")} for role in ("moving", "fixed")]
    datalist.write_text(json.dumps({"test": subjects, "test_pairs": [[0, 1]]}))
    _, ref_s = run(
        [
            sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
            "--datalist", str(datalist), "--pairs_key", "test_pairs", "--intensity", "mr",
            "--output_dir", str(ref_out),
        ],
        cwd=REPO,
    )  # fmt: skip

    fixed = nib.load(str(pair_dir / "fixed.nii.gz"))
    warped, warped_ref = (
        nib.load(str(p)) for p in (app_out / "warped.nii.gz", ref_out / "moving_to_fixed_warped.nii.gz")
    )
    ddf, ddf_ref = (
        sitk.GetArrayFromImage(sitk.ReadImage(str(p), sitk.sitkVectorFloat64))
        for p in (app_out / "ddf.nii.gz", ref_out / "moving_to_fixed_ddf.nii.gz")
    )
    ddf_affines = [nib.load(str(p)).affine for p in (app_out / "ddf.nii.gz", ref_out / "moving_to_fixed_ddf.nii.gz")]
    warped_diff = float(np.abs(warped.get_fdata() - warped_ref.get_fdata()).max())
    ddf_diff = float(np.abs(ddf - ddf_ref).max())
    print(
        f"\nMONAI Deploy app {app_s:.1f} s, monai.bundle run inference {ref_s:.1f} s; grid {SIZE} at {SPACING} mm; "
        f"max |warped - ref| = {warped_diff:.2e}, max |ddf - ref| = {ddf_diff:.2e} mm "
        f"(mean |ddf| {np.abs(ddf_ref).mean():.2f} mm); tolerance {TOLERANCE:g}"
    )
    assert warped.shape == warped_ref.shape == fixed.shape and warped.get_data_dtype() == np.float32
    assert ddf.shape == ddf_ref.shape == (*SIZE[::-1], 3)
    assert np.abs(ddf_ref).mean() > 0.1  # a field that moves voxels, so the comparison means something
    for affine in (warped.affine, warped_ref.affine, *ddf_affines):
        np.testing.assert_allclose(affine, fixed.affine, atol=1e-5)
    assert warped_diff <= TOLERANCE and ddf_diff <= TOLERANCE
