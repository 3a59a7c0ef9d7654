"""Files: atomic writes (readers see the old file or folder or the new one, never half of one),
content hashes and the cache folder."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hat.owners import Owner, sweep


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a staging folder next to ``directory``; on success it replaces ``directory``.

    The staging folder is owned (:mod:`hat.owners`): one that a killed process left behind is
    removed by the next ``atomic_directory`` of the same target.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    sweep(directory.parent, f".{directory.name}.")
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    owner = Owner(staging)
    try:
        yield staging
        backup = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        if directory.exists():
            os.replace(directory, backup)
        os.replace(staging, directory)
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        owner.release()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file through a temporary file and a rename, so a reader never sees half of
    it; readable by all, like any file written in place (mkstemp creates it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def cache_home() -> Path:
    """``$XDG_CACHE_HOME/hat`` (default ``~/.cache/hat``): galleries and fetched checkpoints."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hat"
