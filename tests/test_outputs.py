"""The output folder of ``ran-register`` (:mod:`ran_bundle.outputs`): exactly one run's outputs, one writer
at a time, refusal before work, and no staging folders or locks left by dead processes."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ran_bundle import outputs
from ran_bundle.inputs import InputError
from ran_bundle.networks import ResidualAlignerNetwork
from ran_bundle.outputs import COMPLETE_MARKER, KNOWN_OUTPUTS, OutputFolder, write_json
from ran_bundle.pipeline import RegistrationPipeline

REPO = Path(__file__).resolve().parents[1]


#: every name ``ran-register`` writes, by role: :meth:`RegistrationPipeline.files` with a moving label, the inverse
#: and the PNG
PIPELINE = RegistrationPipeline(network=ResidualAlignerNetwork(3, "ref"), device="cpu")
NAMES = PIPELINE.files(SimpleNamespace(warped_label=torch.zeros(1), inverse_field=torch.zeros(1)), png=True)


def run_into(out: Path, files: dict[str, str]) -> OutputFolder:
    """One run: acquire, stage ``files`` (name -> content), release."""
    with OutputFolder(out) as folder:
        with folder.stage() as tmp:
            for name, text in files.items():
                (tmp / name).write_text(text)
    return folder


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def sleeper():
    """A live child process (``sleep``), killed at the end."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield child
    child.kill()
    child.wait()


def test_known_outputs_are_what_ran_register_writes():
    """The folder knows every name the pipeline can write (:meth:`RegistrationPipeline.files` with a moving
    label, the inverse and the PNG), no other, and marks completion with the pipeline's report, written last."""
    least = PIPELINE.files(SimpleNamespace(warped_label=None, inverse_field=None))
    assert set(KNOWN_OUTPUTS) == set(NAMES.values()) and set(least.values()) < set(NAMES.values())
    assert list(least.values())[-1] == list(NAMES.values())[-1] == NAMES["report"] == COMPLETE_MARKER


def test_rerun_leaves_exactly_this_runs_outputs(tmp_path):
    out = tmp_path / "out"
    run_into(out, {NAMES[role]: "old" for role in ("warped", "report", "overview_png", "inverse_ddf")})
    (out / "notes.txt").write_text("mine")
    folder = run_into(out, {NAMES["warped"]: "new", NAMES["report"]: "new"})
    assert listing(out) == {NAMES["warped"], NAMES["report"], "notes.txt"}
    assert (out / NAMES["warped"]).read_text() == "new" and (out / NAMES["report"]).read_text() == "new"
    assert (out / "notes.txt").read_text() == "mine"
    assert folder.written == [NAMES["warped"], NAMES["report"]]
    assert sorted(folder.removed) == [NAMES["inverse_ddf"], NAMES["overview_png"]]
    assert listing(tmp_path) == {"out"}, "staging folder or lock file left behind"


def test_new_folder_with_missing_parents_and_umask_mode(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    run_into(out, {NAMES["report"]: "{}"})
    assert listing(out) == {NAMES["report"]}
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask, "the staging folder's private 0700 mode was kept"
    assert listing(out.parent) == {"out"}


def test_failure_removes_the_parents_it_created(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with OutputFolder(out) as folder, folder.stage() as tmp:
            (tmp / NAMES["report"]).write_text("{}")
            raise RuntimeError("boom")
    assert listing(tmp_path) == set()


def test_report_is_deleted_first_and_moved_in_last(tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_into(out, {NAMES["report"]: "old", NAMES["warped"]: "old"})
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((Path(dst).name, (out / NAMES["report"]).exists()))
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", spy)
    run_into(out, {NAMES["report"]: "new", NAMES["warped"]: "new", NAMES["ddf"]: "new"})
    names = [name for name, _ in replaced if name in KNOWN_OUTPUTS]
    assert names[-1] == NAMES["report"]
    assert not any(report_there for name, report_there in replaced if name != NAMES["report"]), (
        "an old report.json marked the folder complete while it was being updated"
    )


def test_keyboard_interrupt_in_stage_cleans_up_and_releases(tmp_path):
    out = tmp_path / "out"
    run_into(out, {NAMES["report"]: "old", NAMES["warped"]: "old"})
    folder = OutputFolder(out)
    with pytest.raises(KeyboardInterrupt):
        with folder, folder.stage() as tmp:
            (tmp / NAMES["warped"]).write_text("partial")
            raise KeyboardInterrupt
    assert listing(tmp_path) == {"out"}, "staging folder or lock left after KeyboardInterrupt"
    assert not folder.held
    assert (out / NAMES["warped"]).read_text() == "old" and (out / NAMES["report"]).read_text() == "old"
    run_into(out, {NAMES["report"]: "new"})  # the lock is free again


def test_second_writer_is_refused_naming_folder_and_pid(tmp_path):
    out = tmp_path / "out"
    with OutputFolder(out):
        with pytest.raises(InputError) as err:
            OutputFolder(out).acquire()
        message = str(err.value)
        assert str(out) in message and f"pid {os.getpid()}" in message and "ran-register" in message
        assert "\n" not in message
    with OutputFolder(out) as again:  # released: free again
        assert again.held


def test_second_writer_in_another_process(tmp_path):
    """A real second process holds the lock: refused while it runs; after SIGKILL its lock is stale."""
    out = tmp_path / "out"
    code = (
        "import sys, time; from ran_bundle.outputs import OutputFolder; "
        "f = OutputFolder(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=rf"pid {child.pid}\b"):
            OutputFolder(out).acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (out.parent / f".{out.name}.lock").exists(), "the killed process left no lock (nothing tested)"
    run_into(out, {NAMES["report"]: "{}"})
    assert listing(out) == {NAMES["report"]} and listing(tmp_path) == {"out"}


def test_stale_staging_folders_of_dead_processes_are_removed(tmp_path, sleeper):
    out = tmp_path / "out"
    out.mkdir()
    dead = tmp_path / f".out.tmp-{dead_pid()}-k3j_x9"
    dead.mkdir()
    (dead / NAMES["warped"]).write_text("partial")
    live = tmp_path / f".out.tmp-{sleeper.pid}-a8b2cd"
    live.mkdir()
    other = tmp_path / ".other.tmp-123-abc"  # another folder's staging: not ours to judge
    other.mkdir()
    with OutputFolder(out):
        assert not dead.exists()
        assert live.exists(), "removed the staging folder of a live process"
        assert other.exists()


def test_stale_lock_of_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    lock = tmp_path / ".out.lock"
    lock.write_text(json.dumps({"tool": "ran-register", "pid": dead_pid(), "host": socket.gethostname()}))
    with OutputFolder(out) as folder:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert folder.held
    assert not lock.exists()


def test_lock_of_live_process_is_respected(tmp_path, sleeper):
    lock = tmp_path / ".out.lock"
    start = outputs._process_start(sleeper.pid)
    lock.write_text(
        json.dumps({"tool": "ran-register", "pid": sleeper.pid, "host": socket.gethostname(), "start": start})
    )
    with pytest.raises(InputError, match=rf"pid {sleeper.pid}\b.*{lock}"):
        OutputFolder(tmp_path / "out").acquire()
    assert lock.exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_lock_of_a_reused_pid_is_stale(tmp_path, sleeper):
    """The pid runs, but it is another process than the one that wrote the lock (pid reused after a crash)."""
    lock = tmp_path / ".out.lock"
    record = {"tool": "ran-register", "pid": sleeper.pid, "host": socket.gethostname(), "start": "1"}
    lock.write_text(json.dumps(record))
    with OutputFolder(tmp_path / "out"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_unreadable_lock_is_live_while_fresh(tmp_path):
    lock = tmp_path / ".out.lock"
    lock.write_text("")
    with pytest.raises(InputError, match="another process"):
        OutputFolder(tmp_path / "out").acquire()
    old = time.time() - 2 * outputs.UNREADABLE_LOCK_STALE_S
    os.utime(lock, (old, old))
    with OutputFolder(tmp_path / "out") as folder:
        assert folder.held


def test_out_is_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("x")
    with pytest.raises(InputError, match=rf"--out {out}: exists and is not a folder"):
        OutputFolder(out).acquire()
    with pytest.raises(InputError, match="is not a folder"):
        OutputFolder(out / "sub").acquire()


def test_read_only_folder_is_refused_chmod(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("chmod does not deny writes here (running as root)")
        with pytest.raises(InputError, match=rf"--out {out}: cannot write into {out}"):
            OutputFolder(out).acquire()
        parent = tmp_path / "ro"
        parent.mkdir(0o555)
        with pytest.raises(InputError, match="cannot write into"):
            OutputFolder(parent / "new" / "out").acquire()
    finally:
        out.chmod(0o755)
    assert listing(tmp_path) == {"out", "ro"}


@pytest.mark.parametrize("exists", [True, False])
def test_not_writable_is_refused_before_anything_is_created(tmp_path, monkeypatch, exists):
    """Works as root too: ``os.access`` says no for the folder (as it does for a read-only mount)."""
    out = tmp_path / "out"
    denied = out if exists else tmp_path
    if exists:
        out.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        outputs.os, "access", lambda p, mode: False if Path(p) == denied and mode & os.W_OK else real_access(p, mode)
    )
    target = out if exists else out / "x"
    with pytest.raises(InputError, match=rf"--out {target}: cannot write into {denied} \(not writable\)"):
        OutputFolder(target).acquire()
    assert listing(tmp_path) == ({"out"} if exists else set())


def test_release_is_idempotent_and_stage_needs_the_lock(tmp_path):
    folder = OutputFolder(tmp_path / "out")
    with pytest.raises(RuntimeError, match="acquire"):
        with folder.stage():
            pass
    folder.acquire()
    folder.release()
    folder.release()
    assert listing(tmp_path) == set()


def test_symlinked_out_locks_the_real_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with OutputFolder(link):
        with pytest.raises(InputError, match="is writing into this folder"):
            OutputFolder(real).acquire()
    run_into(link, {NAMES["report"]: "{}"})
    assert listing(real) == {NAMES["report"]} and link.is_symlink()


def test_write_json(tmp_path):
    data = {
        "nan": math.nan,
        "inf": [1.0, math.inf],
        "np": np.float32(1.5),
        "int": np.int64(3),
        "bool": np.bool_(True),
        "array": np.array([[1, 2]]),
        "tensor": torch.tensor([0.5, float("nan")]),
        "path": Path("/a/b"),
        "nested": {1: (np.float64("nan"),)},
    }
    path = write_json(tmp_path / "r.json", data)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {
        "nan": None,
        "inf": [1.0, None],
        "np": 1.5,
        "int": 3,
        "bool": True,
        "array": [[1, 2]],
        "tensor": [0.5, None],
        "path": "/a/b",
        "nested": {"1": [None]},
    }
    assert listing(tmp_path) == {"r.json"}


def test_a_failing_write_is_refused_even_when_access_says_yes(tmp_path, monkeypatch):
    """``os.access`` can say yes where writes fail (read-only network shares, root on some mounts)."""
    import errno

    out = tmp_path / "out"
    out.mkdir()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only)
    with pytest.raises(InputError, match=rf"cannot write into {out} \(Read-only file system\)"):
        OutputFolder(out).acquire()
    assert listing(tmp_path) == {"out"}
