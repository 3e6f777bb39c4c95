"""Shared pytest fixtures: repository root, the shared real-data folder, killing a training at its checkpoint."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import SimpleITK as sitk
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_package_logging() -> Iterator[None]:
    """Undo what an in-process ``ran-register`` (``cli._setup_logging``) does to the ``ran_bundle`` logger: its
    handler writes to the test's captured stderr, closed afterwards, and it stops propagation, which would hide
    later tests' records from ``caplog``."""
    log = logging.getLogger("ran_bundle")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """Absolute path of the repository root."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the shared real data sets: ``$RAN_SHARED_DATA``, default ``<repo root>/../shared/data``.

    Skips the test when the folder does not exist.
    """
    path = Path(os.environ.get("RAN_SHARED_DATA", str(REPO_ROOT.parent / "shared" / "data"))).resolve()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}: set RAN_SHARED_DATA")
    return path


@pytest.fixture(scope="session")
def tiny_ct(repo_root: Path) -> Path:
    """Folder of the embedded tiny CT data set (``data/tiny_ct``)."""
    path = repo_root / "data" / "tiny_ct"
    if not (path / "datalist.json").is_file():
        pytest.skip(f"tiny dataset not found at {path}: run scripts/make_tiny_dataset.py")
    return path


def _kill_after_checkpoint(
    command: Sequence[str], checkpoint: Path, env: Mapping[str, str] | None = None, timeout: float = 900
) -> dict[str, Any]:
    """Start the training ``command`` (its own process group, from the repository root), SIGKILL it as soon as
    ``checkpoint`` exists and return that checkpoint's state dict; fails when no checkpoint appears before the
    run ends or ``timeout`` seconds pass."""
    proc = subprocess.Popen(
        list(command),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(env) if env is not None else None,
        start_new_session=True,
    )
    try:
        deadline = time.time() + timeout
        while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert checkpoint.exists(), "no checkpoint appeared before the run ended or timed out"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


@pytest.fixture(scope="session")
def kill_after_checkpoint() -> Callable[..., dict[str, Any]]:
    """``kill_after_checkpoint(command, checkpoint, env=None, timeout=900)``: run a training until it writes
    ``checkpoint``, kill it (SIGKILL) there and return the checkpoint's state, for resume tests."""
    return _kill_after_checkpoint


def _resample_isotropic(src: Path, dst: Path, spacing: float, label: bool) -> Path:
    """Resample the image file ``src`` to ``spacing`` mm over the same extent and write it to ``dst`` (linear;
    nearest neighbour and int16 for label maps)."""
    img = sitk.ReadImage(str(src))
    if label:
        img = sitk.Cast(img, sitk.sitkInt16)
    size = [round(n * s / spacing) for n, s in zip(img.GetSize(), img.GetSpacing(), strict=True)]
    ref = sitk.Image(size, img.GetPixelID())
    ref.SetSpacing([spacing] * 3)
    ref.SetDirection(img.GetDirection())
    ref.SetOrigin(img.GetOrigin())
    mode = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    sitk.WriteImage(sitk.Resample(img, ref, sitk.Transform(), mode, 0), str(dst))
    return dst


@pytest.fixture(scope="session")
def resample_isotropic() -> Callable[[Path, Path, float, bool], Path]:
    """``resample_isotropic(src, dst, spacing, label)``: a real scan made small for front-end tests."""
    return _resample_isotropic


@pytest.fixture(scope="session")
def mindboggle_3mm(shared_data: Path, tmp_path_factory) -> dict[str, Path]:
    """Mindboggle test subjects 14 (moving) and 13 (fixed), images and labels, made 3 mm (``fixed_image``,
    ``fixed_label``, ``moving_image``, ``moving_label``, and ``root``, their folder): a real pair small enough for
    a registration test on one core. Skips without the subjects or the shipped weights."""
    src = shared_data / "mindboggle_oasis_trt20"
    if not (src / "oasis_trt_13" / "image.nii.gz").is_file():
        pytest.skip(f"Mindboggle subjects not found under {src}")
    weights = REPO_ROOT / "models" / "model.pt"
    if not weights.is_file():
        pytest.skip(f"shipped weights not found at {weights}")
    root = tmp_path_factory.mktemp("mindboggle3mm")
    out: dict[str, Path] = {"root": root}
    for role, subject in (("fixed", "13"), ("moving", "14")):
        for kind, label in (("image", False), ("label", True)):
            src_file = src / f"oasis_trt_{subject}" / f"{kind}.nii.gz"
            out[f"{role}_{kind}"] = _resample_isotropic(src_file, root / f"{role}_{kind}.nii.gz", 3.0, label)
    return out
