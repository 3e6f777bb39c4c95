"""Model-zoo readiness: the zoo's checks, weights in ``large_files.yml``, and the release zip.

The round trips serve files from ``python -m http.server`` bound to 127.0.0.1 (started and stopped
here) and run the real CLI (``python -m monai.bundle download_large_files`` with the manifest's urls
rewritten to that server, ``python -m monai.bundle download --url`` of the release zip built by
``scripts/make_release.py``). Nothing leaves the machine.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # subprocesses or training runs: not in `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "large_files.yml"
# a script, not a package: loaded from its file, without putting scripts/ on sys.path
_spec = importlib.util.spec_from_file_location("check_model_zoo", REPO / "scripts" / "check_model_zoo.py")
check_model_zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_model_zoo)
md5 = check_model_zoo.md5


def entries() -> list[dict[str, str]]:
    return yaml.safe_load(MANIFEST.read_text())["large_files"]


@pytest.fixture(scope="module")
def loopback_server(tmp_path_factory) -> Iterator[str]:
    """``python -m http.server`` on a free 127.0.0.1 port; yields its base url.

    It serves a temporary folder holding a link to the repository's ``models/`` and, in ``dist/``,
    the release zip that ``scripts/make_release.py`` builds.
    """
    served = tmp_path_factory.mktemp("served")
    (served / "models").symlink_to(REPO / "models", target_is_directory=True)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_release.py"), "--out", str(served / "dist")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(served)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("loopback http.server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def bundle_with_manifest(root: Path, base_url: str, hash_override: str | None = None) -> Path:
    """A bundle folder holding only ``large_files.yml`` whose urls point at ``base_url``."""
    root.mkdir(parents=True)
    items = []
    for entry in entries():
        item = dict(entry, url=f"{base_url}/{entry['path']}")
        if hash_override is not None:
            item["hash_val"] = hash_override
        items.append(item)
    (root / "large_files.yml").write_text(yaml.safe_dump({"large_files": items}))
    return root


def download_large_files(bundle_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path", str(bundle_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_manifest_format_and_hashes_match_committed_files():
    items = entries()
    assert items, "large_files.yml lists no file"
    for item in items:
        assert set(item) == {"path", "url", "hash_val", "hash_type"}, item
        assert item["hash_type"] == "md5"
        assert item["url"].startswith("https://") and item["url"].endswith(Path(item["path"]).name)
        path = REPO / item["path"]
        assert path.is_file(), f"{item['path']} listed in large_files.yml but not committed"
        assert md5(path) == item["hash_val"], f"md5 of {item['path']} differs from large_files.yml: update the hash"


def test_download_large_files_round_trip(loopback_server, tmp_path):
    root = bundle_with_manifest(tmp_path / "bundle", loopback_server)
    proc = download_large_files(root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for item in entries():
        assert md5(root / item["path"]) == item["hash_val"]
        assert (root / item["path"]).read_bytes() == (REPO / item["path"]).read_bytes()


def test_download_large_files_refuses_wrong_hash(loopback_server, tmp_path):
    root = bundle_with_manifest(tmp_path / "bundle", loopback_server, hash_override="0" * 32)
    proc = download_large_files(root)
    assert proc.returncode != 0
    assert "hash check" in (proc.stdout + proc.stderr)
    for item in entries():
        assert not (root / item["path"]).exists(), "a file that failed the hash check was kept"


def test_release_zip_installs_with_monai_bundle_download(loopback_server, tmp_path):
    zip_name = f"ran_registration_v{json.loads((REPO / 'configs' / 'metadata.json').read_text())['version']}.zip"
    bundles = tmp_path / "bundles"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "download",
            "--name",
            "ran_registration",
            "--url",
            f"{loopback_server}/dist/{zip_name}",
            "--bundle_dir",
            str(bundles),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    root = bundles / "ran_registration"
    for item in entries():
        assert md5(root / item["path"]) == item["hash_val"]
    assert not (root / "metadata.json").is_symlink()
    assert (root / "metadata.json").read_text() == (REPO / "configs" / "metadata.json").read_text()
    assert (root / "ran_bundle" / "networks" / "ran.py").is_file() and not (root / "tests").exists()
    verify = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_metadata",
            "--meta_file",
            "configs/metadata.json",
            "--filepath",
            "configs/schema/metadata_schema.json",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert verify.returncode == 0 and "verified with no error" in verify.stdout + verify.stderr


def test_model_zoo_check_script_passes():
    """scripts/check_model_zoo.py: schema, files, hashes, verify_net_in_out, traced export vs checkpoint."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_model_zoo.py")], capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "6/6 model-zoo checks passed" in proc.stdout
    assert "model.ts equals the checkpoint" in proc.stdout


def test_model_zoo_check_script_reports_a_wrong_hash(tmp_path):
    """The check fails, naming the file, when a large file does not match its md5 (no export is run)."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"not the weights")
    (tmp_path / "large_files.yml").write_text(MANIFEST.read_text())
    with pytest.raises(check_model_zoo.CheckFailed, match="md5 of models/model.pt"):
        check_model_zoo.check_large_files(tmp_path)
