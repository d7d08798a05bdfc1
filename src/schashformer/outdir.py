"""The output folder of a command-line run: a writability probe, a lock, and recovery after a crash.

* :func:`check_writable` finds an unwritable ``--out`` (read-only parent, a folder without write
  permission, a path under a file, a read-only file system) before anything is read or trained, by
  ``os.access`` and then by creating and deleting a real file (``os.access`` says yes to root
  even where a read-only mount refuses the write).
* :class:`OutLock` holds an exclusive ``fcntl.flock`` on ``.OUT.lock`` beside ``OUT`` for the
  whole run, taken before the input is read: a second run on the same folder is refused at once
  with the process id of the first. The lock file is removed when the run ends; one left by a
  killed run holds no lock (the kernel drops it with the process) and is reused.
* :func:`recover` (called under the lock) puts back the old results that a run killed while
  swapping ``--overwrite`` results left in ``.OUT.old-*``, and deletes those that were already
  replaced and staging folders (``.OUT.partial-*``) of killed runs; it deletes only folders that
  hold nothing but scHashFormer results.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputError, OutputExistsError

log = logging.getLogger(__name__)


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_writable(out: Path) -> None:
    """Refuse ``out`` when its results could not be written there (checked before any work).

    The folder that will receive ``out`` (the nearest existing ancestor) and ``out`` itself when it
    exists must be folders where a file can be created; ``OutputError`` names the reason.
    """
    out = Path(out)
    base = _nearest_existing(out.parent if not out.is_dir() else out)
    targets = [base] if not out.is_dir() else [out, _nearest_existing(out.parent)]
    for folder in targets:
        if not folder.is_dir():
            raise OutputError(f"--out {out}: cannot be created, {folder} is a file, not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"--out {out}: cannot write in {folder} (permission denied); choose a folder you "
                              "can write to")
        try:
            fd, probe = tempfile.mkstemp(prefix=".schashformer-probe-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise OutputError(f"--out {out}: cannot write in {folder} ({type(exc).__name__}: {reason}); choose a "
                              "folder you can write to") from None


def lock_path(out: Path) -> Path:
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.lock"


class OutLock:
    """Exclusive lock on the output folder ``out`` for one run (a context manager).

    ``fcntl.flock`` on ``.OUT.lock`` beside ``out`` (not inside: results are renamed onto ``out``);
    the file holds the owner's process id for the refusal message.
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = lock_path(self.out)
        self.fd: int | None = None
        self.created: list[Path] = []  # parent folders made for the lock file, removed again if left empty

    def acquire(self) -> OutLock:
        folder = self.path.parent
        while not folder.exists():
            self.created.append(folder)
            folder = folder.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                self._remove_created()
                raise OutputExistsError(f"--out {self.out} is in use by another scHashFormer run "
                                        f"({self._owner()}); wait for it to finish or choose another --out") from None
            try:  # the holder may have removed the file between our open and flock: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def _owner(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f"process {pid}" if pid.isdigit() else "process id unknown"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiting run re-opens the new file (see acquire)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self.created:  # deepest first; one that now holds results stays
            try:
                folder.rmdir()
            except OSError:
                break
        self.created = []

    def __enter__(self) -> OutLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _only_results(folder: Path, names: tuple[str, ...]) -> bool:
    try:
        return all(p.name in names for p in folder.iterdir())
    except OSError:
        return False


def recover(out: Path, names: tuple[str, ...]) -> list[str]:
    """Clean up after a run killed while publishing into ``out``; call it holding :class:`OutLock`.

    ``names``: the file names a results folder may hold (results and the checkpoint folder).
    Returns one line per action taken, for the caller to print.
    """
    out = Path(os.path.abspath(out))
    parent = out.parent
    if not parent.is_dir():
        return []
    done = []
    for old in sorted(parent.glob(f".{out.name}.old-*")):
        if not old.is_dir() or not _only_results(old, names):
            log.warning("%s was left by an interrupted run and holds other files; it is left alone", old)
            continue
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            if out.is_dir():
                out.rmdir()
            os.replace(old, out)  # killed between moving the old results aside and the new ones in
            done.append(f"restored the results of an earlier run from {old} to {out}")
        else:  # killed after the new results were in place: the old ones were to be deleted
            shutil.rmtree(old)
            done.append(f"removed {old}, the replaced results of an earlier run")
    for partial in sorted(parent.glob(f".{out.name}.partial-*")):
        if partial.is_dir() and _only_results(partial, names):
            shutil.rmtree(partial)
            done.append(f"removed {partial}, the unfinished results of a killed run")
    return done
