"""Folders owned by a running process, and sweeping those whose owner is gone.

The owner of ``<folder>`` holds an exclusive ``flock`` on ``<folder>.owner`` for as long as it
uses the folder. The kernel drops the lock when the process ends, however it ends (SIGKILL, a
crash, a power cut), so a later process can tell an abandoned folder from one in use and remove
it. No PIDs are compared: a reused PID cannot keep a dead owner's folder alive. Folders without
an owner file (written by older versions) are left alone: nothing tells whether they are in use.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: folders are not claimed, so none is ever swept
    fcntl = None

SUFFIX = ".owner"


def _lock_path(folder: Path) -> Path:
    return folder.with_name(folder.name + SUFFIX)


class Owner:
    """This process's claim on ``folder`` (which must exist); held until :meth:`release`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.lock = _lock_path(self.folder)
        self._fd: int | None = None
        if fcntl is None:
            return
        # Locked before it gets its name, so that no sweep ever sees it unlocked.
        fd, claim = tempfile.mkstemp(prefix=f"{self.lock.name}.", dir=self.folder.parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, f"{os.getpid()}\n".encode())  # for people; sweeps use the lock only
            os.replace(claim, self.lock)
        except BaseException:
            os.close(fd)
            Path(claim).unlink(missing_ok=True)
            raise
        self._fd = fd

    def release(self) -> None:
        """Give the claim up: call it once the folder is removed or renamed."""
        if self._fd is not None:
            self.lock.unlink(missing_ok=True)  # still locked here: no sweep can act on it
            os.close(self._fd)
            self._fd = None


def _abandoned(lock: Path) -> int | None:
    """A locked file descriptor of ``lock`` if its owner is gone, else ``None``."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.stat(lock).st_ino:  # not released and renamed meanwhile
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def sweep(parent: str | Path, prefix: str) -> list[Path]:
    """Remove the folders ``parent/<prefix>*`` whose owner is gone; returns them."""
    parent = Path(parent)
    if fcntl is None or not parent.is_dir():
        return []
    removed = []
    locks = [p for p in parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(SUFFIX)]
    for lock in locks:
        fd = _abandoned(lock)
        if fd is None:
            continue
        try:
            folder = lock.with_name(lock.name[: -len(SUFFIX)])
            shutil.rmtree(folder, ignore_errors=True)
            lock.unlink(missing_ok=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed
