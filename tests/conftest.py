"""Shared pytest fixtures: repository root and the shared real-data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


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
