"""The MONAI Deploy application ``deploy/app.py``, end to end, against :class:`RegistrationPipeline` in-process.

The app runs in its own virtual environment (``bash scripts/make_deploy_env.sh``: the MONAI Deploy App
SDK stays out of the main one), found through ``RAN_DEPLOY_PYTHON`` (default
``deploy/.venv/bin/python``); the tests skip, naming the script, when that python does not exist.

The pair is two Mindboggle brains of ``../shared/data`` (``conftest.shared_data``; skipped when absent):
subject 01 (moving, with its labels) registered to subject 14 (fixed, with its labels), both resampled to
3 mm so that the test stays short on 2 CPU cores, with a 3 mm network grid and 5 + 5 instance-optimisation
iterations. The app registers the pair with the exported TorchScript network ``models/model.ts``; then the
same pipeline runs in this process (the same ``model.ts`` through ``torch.jit.load``) starting from the
affine stage the app found (its ``affine.tfm``): the affine stage's random metric sampling is not
repeatable from run to run, so it is taken from the app, and every later step must give the same files.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ran_bundle.pipeline import RegistrationPipeline

REPO = Path(__file__).resolve().parents[1]
DEPLOY_PYTHON = Path(os.environ.get("RAN_DEPLOY_PYTHON", str(REPO / "deploy" / ".venv" / "bin" / "python")))
MODEL_TS = REPO / "models" / "model.ts"
SPACING = 3.0  # mm, of the resampled pair and of the network grid
IO_ITERATIONS = (5, 5)
TIMEOUT = 300  # s per app run
#: (role in the app's input folder, Mindboggle subject, file)
FILES = (
    ("fixed", "oasis_trt_14", "image"),
    ("fixed_label", "oasis_trt_14", "label"),
    ("moving", "oasis_trt_01", "image"),
    ("moving_label", "oasis_trt_01", "label"),
)

pytestmark = [pytest.mark.deploy, pytest.mark.slow]


def run_app(deploy_python: Path, args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``deploy/app.py *args`` in the deploy environment with one OpenMP thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [str(deploy_python), str(REPO / "deploy" / "app.py"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    return proc, time.perf_counter() - start


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
def pair_dir(shared_data: Path, tmp_path_factory: pytest.TempPathFactory, resample_isotropic) -> Path:
    """Folder holding ``fixed``, ``fixed_label``, ``moving``, ``moving_label`` ``.nii.gz`` (see the module doc)."""
    src = shared_data / "mindboggle_oasis_trt20"
    if not all((src / subject / f"{name}.nii.gz").is_file() for _, subject, name in FILES):
        pytest.skip(f"Mindboggle subjects 01 and 14 not found under {src}")
    out = tmp_path_factory.mktemp("deploy_pair")
    for role, subject, name in FILES:
        resample_isotropic(src / subject / f"{name}.nii.gz", out / f"{role}.nii.gz", SPACING, name == "label")
    return out


def test_app_matches_the_pipeline_in_process(deploy_python: Path, pair_dir: Path, tmp_path: Path) -> None:
    app_out, ref_out = tmp_path / "app", tmp_path / "in_process"
    options = ["--spacing", str(SPACING), "--io-iterations", *map(str, IO_ITERATIONS), "--device", "cpu", "--quiet"]
    proc, app_s = run_app(
        deploy_python, ["-i", str(pair_dir), "-o", str(app_out), "-m", str(MODEL_TS), *options], tmp_path
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]

    # the same single thread as the app: other thread counts sum in another order, and instance optimisation's
    # Adam steps (about the learning rate whatever a gradient's size) turn those rounding differences into
    # tenths of a millimetre
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    pipeline = RegistrationPipeline(
        weights=MODEL_TS,
        network=torch.jit.load(str(MODEL_TS), map_location="cpu").eval(),
        device="cpu",
        spacing=SPACING,
        affine="none",
        initial_transform=app_out / "affine.tfm",  # the app's affine stage (see the module doc)
        io_iterations=IO_ITERATIONS,
        progress=False,
    )
    registration = pipeline.register(
        *(pair_dir / f"{role}.nii.gz" for role in ("fixed", "moving", "fixed_label", "moving_label"))
    )
    ref_out.mkdir()
    names = pipeline.write(registration, ref_out)
    ref_s = time.perf_counter() - start
    torch.set_num_threads(threads)

    files = sorted(p.name for p in app_out.iterdir())
    assert (
        files
        == sorted(names.values())
        == sorted(
            ["warped.nii.gz", "ddf.nii.gz", "affine.tfm", "jacobian.nii.gz", "warped_label.nii.gz", "report.json"]
        )
    )
    fixed = nib.load(pair_dir / "fixed.nii.gz")
    diffs, ranges = {}, {}
    for name in files:
        if not name.endswith(".nii.gz"):
            continue
        app_img, ref_img = nib.load(app_out / name), nib.load(ref_out / name)
        assert app_img.shape[:3] == fixed.shape, name  # on the fixed image's own grid
        np.testing.assert_allclose(app_img.affine, fixed.affine, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(ref_img.affine, fixed.affine, atol=1e-5, err_msg=name)
        diffs[name] = float(np.abs(app_img.get_fdata() - ref_img.get_fdata()).max())
        ranges[name] = float(np.ptp(ref_img.get_fdata()))
    report = json.loads((app_out / "report.json").read_text())
    dice = report["field"]["dice"]
    print(
        f"\nMONAI Deploy app {app_s:.1f} s, pipeline in-process {ref_s:.1f} s (from the app's affine); grid "
        f"{list(fixed.shape)} at {SPACING} mm; max |app - in-process| per file: {diffs}; app's mean Dice (labels "
        f">= 100 voxels) {dice['mean_affine_100']:.4f} affine only, {dice['mean_registered_100']:.4f} registered"
    )
    assert report["network"]["weights"] == str(MODEL_TS)
    assert report["field"]["displacement_mm_mean"] > 1.0  # a field that moves voxels: the comparison means something
    # TorchScript and eager fields differ by float rounding (1e-5 mm); the warped image by that times its
    # intensity gradient, so its bound is relative to its intensity range
    assert diffs["ddf.nii.gz"] <= 1e-4 and diffs["jacobian.nii.gz"] <= 1e-4
    assert diffs["warped.nii.gz"] <= 1e-4 * ranges["warped.nii.gz"], (diffs, ranges)
    assert diffs["warped_label.nii.gz"] == 0.0
    assert dice["mean_registered_100"] == pytest.approx(registration.stats["dice"]["mean_registered_100"], abs=1e-6)
    assert dice["mean_registered_100"] > dice["mean_affine_100"]


def test_app_refuses_a_missing_input_before_any_work(deploy_python: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "fixed.nii.gz").write_bytes(b"")  # never read: moving.nii.gz is missing
    out = tmp_path / "out"
    proc, _ = run_app(deploy_python, ["-i", str(inputs), "-o", str(out), "-m", str(MODEL_TS)], tmp_path)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ran-deploy-app: error:") and "moving.nii.gz" in last and str(inputs) in last
    assert not out.exists() or not any(out.iterdir())  # the SDK's option parser may create the empty folder
