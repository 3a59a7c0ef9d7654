"""A build's staging folder: how segments get into it and what it holds.

A segment comes in hard-linked from an earlier gallery (:func:`link_segment`) or encoded anew
(:func:`stage_segment`), by one process or, side by side, by every process of a torchrun group
(:mod:`hat.gallery.shards`); :func:`file_table` lists the sizes and digests the manifest keeps.
The builder and the distributed team both stand on this module, so neither imports the other
for it.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hat.gallery.collection import ImageEntry
from hat.gallery.manifest import FileEntry
from hat.gallery.reader import file_digest

Encode = Callable[[list[ImageEntry], Path], list[int]]
"""``encode(entries, segment_dir) -> rows read``: a new segment of ``entries``' features."""


@dataclass
class ImageLocation:
    """Where an image's features are: a gallery directory, a segment, its row, its caption rows."""

    directory: Path
    segment: str
    image_row: int
    caption_rows: list[int]


Staged = dict[tuple, ImageLocation | None]
"""Where each staged image's features are, by fingerprint (``None``: unreadable)."""


def link_segment(source: Path, target: Path) -> None:
    """Share an immutable segment with a new gallery: hard links, copies where links fail."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        try:
            os.link(path, target / path.name)
        except OSError:
            shutil.copy2(path, target / path.name)


def file_table(directory: Path, known: dict[str, FileEntry]) -> dict[str, FileEntry]:
    """Size and xxh3 digest of every file below ``directory`` (those of linked files are reused:
    a linked file's damage is still found, by its rows' digests or a verify)."""
    table = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        size = path.stat().st_size
        info = known.get(name)
        digest = info.xxh3 if info and info.size == size else file_digest(path)
        table[name] = FileEntry(size, digest)
    return table


def segment_name() -> str:
    """A new segment's folder name: random, so that processes staging side by side never clash."""
    return f"seg-{secrets.token_hex(8)}"


def stage_segment(staging: Path, entries: list[ImageEntry], encode: Encode) -> Staged:
    """``encode(entries, segment_dir) -> rows read`` into a new segment of ``staging``; where each
    entry's features are (``None``: unreadable). Separate so that processes can stage segments
    side by side in one staging folder (:mod:`hat.gallery.shards`)."""
    if not entries:
        return {}
    name = segment_name()
    first = np.cumsum([0] + [len(e.captions) for e in entries]).tolist()
    staged: Staged = {e.fingerprint: None for e in entries}
    for row in encode(entries, staging / "segments" / name):
        rows = list(range(first[row], first[row + 1]))
        staged[entries[row].fingerprint] = ImageLocation(staging, name, row, rows)
    return staged
