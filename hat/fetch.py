"""``hat fetch``: the paper's checkpoints, downloaded, checked, converted once and cached.

    hat fetch official-f30k                      # Flickr30K model -> ~/.cache/hat/checkpoints/
    hat fetch official-coco --file hat_coco.ckpt  # a file downloaded by hand: same checks

The official LuminosityX/HAT checkpoints are on Google Drive (the links of its README). A
download is resumable (running the command again continues it) and checked by converting it: it
must read under the allow-list of :mod:`hat.safe_load` and fill every tensor of a ``hat-b`` model,
or it is refused. The result is a normal checkpoint folder whose ``source.json`` records the
sha256 of the file it came from; the download itself is then deleted. Anywhere a checkpoint is
asked for (``app.py``, ``hat search``, ``hat eval``, ``hat index build``), the names
``official-f30k`` / ``official-coco`` resolve to that folder, fetching it first if needed.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from hat.convert import ConversionError, convert_checkpoint
from hat.download import RETRIES, DownloadError, HostUnreachableError, download
from hat.fileio import atomic_directory, cache_home, sha256_file
from hat.model import CONFIG_NAME
from hat.safe_load import CheckpointReadError

SOURCE_NAME = "source.json"  # written last: a folder without it is an unfinished conversion
MIRROR_ENV = "HAT_FETCH_MIRROR"


class FetchError(RuntimeError):
    """An official checkpoint could not be fetched or is not what it should be."""


@dataclass(frozen=True)
class Official:
    """One official checkpoint: its Google Drive file and the name it is saved under."""

    name: str
    dataset: str
    drive_id: str
    filename: str

    @property
    def page(self) -> str:
        return f"https://drive.google.com/file/d/{self.drive_id}/view"

    def url(self, mirror: str | None = None) -> str:
        """Google Drive, or ``<mirror>/<filename>`` (any HTTP server holding a copy)."""
        if mirror:
            return f"{mirror.rstrip('/')}/{self.filename}"
        return f"https://drive.google.com/uc?id={self.drive_id}"


# The links of the official README (https://github.com/LuminosityX/HAT).
OFFICIAL = {
    o.name: o
    for o in (
        Official(
            "official-f30k", "Flickr30K", "11Zax1FTNnq0rcer8PxZFlx1mf7d-S67n", "hat_f30k.ckpt"
        ),
        Official("official-coco", "MSCOCO", "1lQDeGvipaREZcwd7-owfgPidft6f4lHo", "hat_coco.ckpt"),
    )
}


def default_checkpoint_cache() -> Path:
    return cache_home() / "checkpoints"


def official(name: str) -> Official:
    try:
        return OFFICIAL[name]
    except KeyError:
        raise FetchError(f"no official checkpoint {name!r}; known: {', '.join(OFFICIAL)}") from None


def cached(name: str, cache_dir: str | Path | None = None) -> Path | None:
    """The converted folder of official checkpoint ``name``, if it is complete."""
    folder = Path(cache_dir or default_checkpoint_cache()) / name
    complete = (folder / SOURCE_NAME).is_file() and (folder / CONFIG_NAME).is_file()
    return folder if complete else None


def manual_route(entry: Official) -> str:
    return (
        f"Download it by hand from {entry.page} (the {entry.dataset} link of the official "
        f"README), then run `hat fetch {entry.name} --file FILE`, or convert it yourself with "
        "`hat convert FILE DIR` and pass DIR as the checkpoint."
    )


def install(entry: Official, file: Path, cache_dir: Path, url: str) -> Path:
    """Check ``file`` by converting it into ``cache_dir/<name>`` with its provenance."""
    print(f"checking and converting {file} ...", file=sys.stderr, flush=True)
    digest = sha256_file(file)
    folder = cache_dir / entry.name
    with atomic_directory(folder) as staging:
        report = convert_checkpoint(file, staging)
        source = {
            "name": entry.name,
            "dataset": entry.dataset,
            "url": url,
            "file": file.name,
            "bytes": file.stat().st_size,
            "sha256": digest,
            "converted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (staging / SOURCE_NAME).write_text(json.dumps(source, indent=1) + "\n")
    print(report.summary(), file=sys.stderr)
    return folder


def fetch(
    name: str,
    cache_dir: str | Path | None = None,
    *,
    file: str | Path | None = None,
    mirror: str | None = None,
    progress: bool = True,
    retries: int = RETRIES,
) -> Path:
    """The converted folder of official checkpoint ``name``: cached, or downloaded (from Google
    Drive, or ``mirror`` / ``$HAT_FETCH_MIRROR``), or taken from a local ``file``, then checked,
    converted and cached. A download that fails the checks is deleted."""
    entry = official(name)
    cache_dir = Path(cache_dir or default_checkpoint_cache())
    if file is None and (folder := cached(name, cache_dir)):
        return folder
    url = entry.url(mirror or os.environ.get(MIRROR_ENV))
    if file is not None:
        source, url = Path(file), Path(file).resolve().as_uri()
        if not source.is_file():
            raise FetchError(f"{source} not found")
    else:
        source = cache_dir / "downloads" / entry.filename
        if not source.is_file():  # complete from an earlier run that stopped while converting
            try:
                download(url, source, progress, retries)
            except HostUnreachableError as err:
                message = f"{name} cannot be downloaded: {err}. {manual_route(entry)}"
                raise FetchError(message) from err
            except DownloadError as err:
                raise FetchError(f"{err}\nIf it keeps failing: {manual_route(entry)}") from err
    try:
        folder = install(entry, source, cache_dir, url)
    except (CheckpointReadError, ConversionError) as err:
        if file is None:
            source.unlink()
        what = "the downloaded file was deleted" if file is None else "the file was left as it is"
        raise FetchError(
            f"{url} is not the official {entry.dataset} checkpoint ({what}):\n{err}"
        ) from err
    if file is None:
        source.unlink()
    return folder


def resolve_checkpoint(spec: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A checkpoint argument as a folder: an existing path as it is, an official name as its
    cached conversion (fetched first when missing)."""
    if str(spec) in OFFICIAL and not Path(spec).exists():
        return fetch(str(spec), cache_dir)
    return Path(spec)
