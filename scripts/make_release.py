"""Build the release zip of this bundle, the archive ``python -m monai.bundle download --url`` installs.

Usage::

    python scripts/make_release.py [--out dist]

writes ``<out>/ran_registration_v<version>.zip`` (version from ``configs/metadata.json``) holding one
folder ``ran_registration/`` with what a user needs to run the bundle: ``configs/``, ``models/``
(``model.pt`` and ``model.ts``), ``docs/``, ``scripts/``, the ``ran_bundle`` package (the configs
import it; ``python -m monai.bundle`` run from the bundle folder finds it there), the embedded
``data/tiny_ct``, ``LICENSE``, ``README.md``, ``metadata.json``, ``large_files.yml`` and
``pyproject.toml``. Files are taken from ``git ls-files`` (tests and CI scripts are left out), the
top-level ``metadata.json`` link is stored as a copy, and the zip is written to a temporary name and
renamed, so a failed build leaves no archive. Install it with::

    python -m monai.bundle download --name ran_registration --url <url of the zip> --bundle_dir <dir>
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

BUNDLE_NAME = "ran_registration"
INCLUDE = (
    "configs/",
    "models/",
    "docs/",
    "scripts/",
    "ran_bundle/",
    "data/tiny_ct/",
    "LICENSE",
    "README.md",
    "metadata.json",
    "large_files.yml",
    "pyproject.toml",
)
REQUIRED = ("models/model.pt", "models/model.ts", "configs/metadata.json", "LICENSE")


def release_files(root: Path) -> list[str]:
    """Tracked files of the repository at ``root`` that belong in the release, sorted."""
    proc = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git ls-files failed in {root}: {proc.stderr.strip()}")
    tracked = proc.stdout.splitlines()
    files = sorted(f for f in tracked if any(f == p or (p.endswith("/") and f.startswith(p)) for p in INCLUDE))
    missing = [f for f in REQUIRED if f not in files]
    if missing:
        raise FileNotFoundError(f"release needs {missing} committed in {root}")
    return files


def build_release(root: Path, out_dir: Path) -> Path:
    """Write the release zip of the bundle at ``root`` into ``out_dir``; return its path."""
    version = json.loads((root / "configs" / "metadata.json").read_text())["version"]
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{BUNDLE_NAME}_v{version}.zip"
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name in release_files(root):
                archive.write((root / name).resolve(), f"{BUNDLE_NAME}/{name}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("dist"), help="output folder (default: dist)")
    parser.add_argument("--bundle-root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args(argv)
    path = build_release(args.bundle_root.resolve(), args.out)
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, md5 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
