"""The output folder of ``ran-register``: checked before any work, locked against a second run, written
through a staging folder, and holding exactly one run's outputs afterwards.

:class:`OutputFolder` is used in three steps::

    with OutputFolder(out) as folder:      # acquire(): refuses a bad or busy folder before any work
        result = long_work()
        with folder.stage() as tmp:        # a fresh folder next to ``out``
            write_files(tmp, result)       # on success the files move into ``out``
    # release(): the lock is gone, whatever happened

What it guarantees:

* **exactly this run's outputs**: the files of :data:`KNOWN_OUTPUTS` that an earlier run wrote and this
  run did not (an old ``overview.png``, ``inverse_ddf.nii.gz``, ...) are deleted; files the tool never
  writes (a user's ``notes.txt``) are left alone.
* **one writer**: a lock file ``.<name>.lock`` next to ``out`` holds the writer's pid, host and start time;
  a second run into the same folder is refused with a message naming the folder and the other process.
  Locks of dead processes are removed.
* **refusal before work**: ``out`` existing as a file, or not writable (or, when it does not exist yet, its
  nearest existing parent), is an :class:`~ran_bundle.inputs.InputError` from :meth:`OutputFolder.acquire`.
* **no half-written folder**: a new ``out`` appears by one ``rename`` of the staging folder (complete or not
  at all); into an existing ``out`` the old ``report.json`` is deleted first and the new one is moved in
  last, so ``report.json`` is present only when the folder is complete. Staging folders
  (``.<name>.tmp-<pid>-*``) of processes that died (``SIGKILL``, power loss) are removed by the next run.

POSIX only for the liveness test of a lock's process (``os.kill(pid, 0)``, ``/proc``); elsewhere a lock of
another process is always taken as live and the message names the lock file to delete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ran_bundle.fields import atomic_write
from ran_bundle.inputs import InputError

__all__ = ["KNOWN_OUTPUTS", "OutputFolder", "write_json"]

#: every file name ``ran-register`` can write into its output folder
KNOWN_OUTPUTS: tuple[str, ...] = (
    "warped.nii.gz",
    "warped_label.nii.gz",
    "ddf.nii.gz",
    "affine.tfm",
    "jacobian.nii.gz",
    "inverse_ddf.nii.gz",
    "overview.png",
    "report.json",
)
#: the file moved in last (and deleted first) when an existing folder is updated: it marks a complete folder
COMPLETE_MARKER = "report.json"
#: a lock file that cannot be parsed (its writer died between creating and filling it) is stale after this
UNREADABLE_LOCK_STALE_S = 60.0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, from ``/proc/<pid>/stat``), ``"zombie"`` for
    a process that has exited but is not reaped yet, ``None`` where it cannot be told (no ``/proc``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state is field 3, starttime field 22
    if not fields:
        return None
    if fields[0] in ("Z", "X"):
        return "zombie"
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, host: str | None = None, start: str | None = None) -> bool:
    """Whether process ``pid`` (of ``host``, started at ``start``) still runs. Conservative: ``True`` where
    it cannot be told (another host, no ``os.kill`` probe)."""
    if host is not None and host != socket.gethostname():
        return True
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by another user
        pass
    now = _process_start(pid)
    if now == "zombie":
        return False
    return not (start is not None and now is not None and now != start)  # a different process reuses the pid


def _writable(folder: Path) -> str | None:
    """``None`` when files can be created in ``folder``, else the reason (``os.access`` first, then a real
    file: ``access`` can say yes where a write fails, e.g. on a read-only network share)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "not writable" if os.access(folder, os.F_OK) else "not accessible"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
    except OSError as e:
        return e.strerror or type(e).__name__
    os.close(fd)
    os.unlink(probe)
    return None


class OutputFolder:
    """The output folder of one run: checked, locked, staged and cleaned (see the module docstring).

    Args:
        out: the output folder (created when missing, parents included).
        tool: the command's name, used in messages and recorded in the lock file.
        known: the names the tool can write; those of an earlier run that this run does not write are
            deleted when a staging folder is moved in.

    Attributes:
        path: ``out`` as absolute path (as the user named it; messages use it).
        target: the real folder written (``path`` with symbolic links resolved); the lock file and the
            staging folders live in its parent.
        lock_path: ``<target parent>/.<name>.lock``.
        written: the file names moved into ``out`` by the last successful :meth:`stage`.
        removed: the earlier run's outputs that it deleted.
    """

    def __init__(self, out: str | os.PathLike, tool: str = "ran-register", known: Sequence[str] = KNOWN_OUTPUTS):
        self.path = Path(out).absolute()
        self.target = Path(os.path.realpath(self.path))
        self.tool = tool
        self.known = tuple(known)
        self.lock_path = self.target.parent / f".{self.target.name}.lock"
        self.written: list[str] = []
        self.removed: list[str] = []
        self._held = False
        self._created: list[Path] = []  # parents created by acquire(), innermost first

    # ---- lock ----
    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._held

    def acquire(self) -> OutputFolder:
        """Check the folder and take its lock; call it before any long work.

        Creates missing parent folders (removed again by :meth:`release` when they stay empty), removes a
        stale lock and the stale staging folders of dead processes.

        Raises:
            InputError: ``out`` (or a parent) exists and is not a folder; ``out`` (or, when it does not exist
                yet, its nearest existing parent) or the folder holding the lock is not writable; another live
                process holds the lock.
        """
        if self._held:
            return self
        where = f"--out {self.path}"
        if self.target.exists() and not self.target.is_dir():
            raise InputError(f"{where}: exists and is not a folder.")
        missing = []
        parent = self.target.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        if not parent.is_dir():
            raise InputError(f"{where}: {parent} is not a folder.")
        check = self.target if self.target.exists() else parent
        reason = _writable(check)
        if reason is None and check != self.target.parent and self.target.parent.exists():
            reason = _writable(self.target.parent)  # the lock and the staging folders live there
            check = self.target.parent
        if reason is not None:
            raise InputError(f"{where}: cannot write into {check} ({reason}); choose a writable --out.")
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue  # made by someone else meanwhile
            except OSError as e:
                self._remove_created()
                raise InputError(f"{where}: cannot create {d} ({e.strerror}).") from None
            self._created.insert(0, d)
        try:
            self._take_lock()
        except BaseException:
            self._remove_created()
            raise
        self._held = True
        self._remove_stale_staging()
        return self

    def _lock_record(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "out": str(self.path),
        }

    def _read_lock(self) -> dict[str, Any] | None:
        """The lock file's record; ``{}`` when it cannot be parsed; ``None`` when there is none."""
        try:
            text = self.lock_path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            record = json.loads(text)
        except ValueError:
            return {}
        return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else {}

    def _take_lock(self) -> None:
        with _folder_guard(self.lock_path.parent):
            for _ in range(3):
                record = self._read_lock()
                if record is not None and self._lock_is_live(record):
                    raise InputError(self._busy_message(record))
                if record is not None:
                    with contextlib.suppress(FileNotFoundError):
                        self.lock_path.unlink()  # stale: its process is gone
                try:
                    fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_umask())
                except FileExistsError:
                    continue  # another process was faster (no folder guard on this system): look again
                except OSError as e:
                    reason = e.strerror or type(e).__name__
                    raise InputError(
                        f"--out {self.path}: cannot create the lock file {self.lock_path} ({reason})."
                    ) from None
                with os.fdopen(fd, "w") as f:
                    json.dump(self._lock_record(), f)
                return
            raise InputError(self._busy_message(self._read_lock() or {}))

    def _lock_is_live(self, record: Mapping[str, Any]) -> bool:
        if not record:  # unreadable: live while it is fresh (its writer may be filling it in)
            try:
                return time.time() - self.lock_path.stat().st_mtime < UNREADABLE_LOCK_STALE_S
            except FileNotFoundError:
                return False
        return _alive(int(record["pid"]), record.get("host"), record.get("start"))

    def _busy_message(self, record: Mapping[str, Any]) -> str:
        if record:
            who = f"{record.get('tool', 'a process')} (pid {record['pid']} on {record.get('host', '?')}"
            who += f", since {record['since']})" if record.get("since") else ")"
        else:
            who = "another process"
        return (
            f"--out {self.path}: {who} is writing into this folder; wait for it to finish or choose another --out "
            f"(if that process is gone, delete the lock file {self.lock_path})."
        )

    def release(self) -> None:
        """Remove the lock (only this process's own) and the parent folders :meth:`acquire` created that
        stayed empty. Idempotent."""
        if self._held:
            self._held = False
            record = self._read_lock()
            if record and record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
                with contextlib.suppress(FileNotFoundError):
                    self.lock_path.unlink()
        self._remove_created()

    def _remove_created(self) -> None:
        while self._created:
            try:
                self._created[0].rmdir()
            except OSError:  # not empty (it holds the outputs now) or gone
                self._created.clear()
                return
            self._created.pop(0)

    def __enter__(self) -> OutputFolder:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---- staging ----
    def _staging_prefix(self) -> str:
        return f".{self.target.name}.tmp-"

    def _remove_stale_staging(self) -> list[Path]:
        """Remove the staging folders next to ``out`` whose process is dead; returns them."""
        pattern = re.compile(re.escape(self._staging_prefix()) + r"(\d+)-[A-Za-z0-9_]+")
        removed = []
        try:
            entries = list(self.target.parent.iterdir())
        except OSError:
            return removed
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if match is None or not entry.is_dir() or entry.is_symlink() or _alive(int(match.group(1))):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        return removed

    @contextlib.contextmanager
    def stage(self) -> Iterator[Path]:
        """Yield a fresh, empty staging folder ``.<name>.tmp-<pid>-<random>`` next to ``out``.

        On success its files move into ``out`` (a new ``out``: the folder itself is renamed; an existing one:
        the old ``report.json`` and the earlier outputs this run did not write are deleted, then each file is
        moved with ``os.replace``, ``report.json`` last), and :attr:`written` / :attr:`removed` say what
        changed. On any exception (``KeyboardInterrupt`` included) the staging folder is removed and the
        exception re-raised.

        Raises:
            RuntimeError: the lock is not held (call :meth:`acquire` first).
        """
        if not self._held:
            raise RuntimeError(f"OutputFolder({self.path}): acquire() before stage().")
        tmp = Path(tempfile.mkdtemp(prefix=f"{self._staging_prefix()}{os.getpid()}-", dir=self.target.parent))
        try:
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes a private (0700) folder: give it the usual mode
            yield tmp
            self._commit(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _commit(self, tmp: Path) -> None:
        names = sorted(p.name for p in tmp.iterdir())
        names.sort(key=lambda n: n == COMPLETE_MARKER)  # the marker last
        if not self.target.exists():
            try:
                os.rename(tmp, self.target)
                self._created.clear()  # the parents now hold the outputs
                self.written, self.removed = names, []
                return
            except OSError:
                if not self.target.is_dir():
                    raise
                # someone made the folder meanwhile: move the files in one by one
        marker = [COMPLETE_MARKER] if COMPLETE_MARKER in self.known else []
        removed = []
        for name in dict.fromkeys([*marker, *(n for n in self.known if n not in names)]):
            old = self.target / name
            if old.is_file() or old.is_symlink():
                old.unlink()
                if name not in names:
                    removed.append(name)
        for name in names:
            os.replace(tmp / name, self.target / name)
        tmp.rmdir()
        self._created.clear()
        self.written, self.removed = names, removed


@contextlib.contextmanager
def _folder_guard(folder: Path) -> Iterator[None]:
    """Serialise the lock-file test-and-create of concurrent processes with ``flock`` on ``folder`` (released
    by the kernel when a process dies). A no-op where ``flock`` is missing or refused (Windows, some network
    file systems): the ``O_EXCL`` creation of the lock file still lets only one process win."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return np.asarray(o.detach().cpu() if isinstance(o, torch.Tensor) else o).tolist()
    return str(o)  # Path and anything else: its text


def _json_clean(o: Any) -> Any:
    """JSON has no NaN or infinity: write ``null``; arrays become (cleaned) lists."""
    if isinstance(o, (np.ndarray, torch.Tensor)):
        o = _json_default(o)
    if isinstance(o, (float, np.floating)) and not math.isfinite(float(o)):
        return None
    if isinstance(o, Mapping):
        return {str(k): _json_clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_clean(v) for v in o]
    return o


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON, atomically (a temporary file next to ``path``, then ``os.replace``).

    NaN and infinite floats are written as ``null``; numpy scalars and arrays, torch tensors (lists),
    :class:`~pathlib.Path` (text) and other objects (``str``) are converted.

    Returns:
        ``path``.
    """
    text = json.dumps(_json_clean(data), indent=2, default=_json_default) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
