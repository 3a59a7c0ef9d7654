"""Reading a built gallery: manifest checks, then features gathered from memory-mapped segments.

Opening checks every file's size; the files read whole (metadata, indexes, offsets, row digests)
are checked against their digests as they are read, and the memory-mapped features row by row
as a query gathers them (:mod:`hat.gallery.storage`). ``verify`` checks every byte up front.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import xxhash

from hat.alignment import RaggedWords
from hat.gallery.errors import CacheError, CorruptionError
from hat.gallery.manifest import MANIFEST, Manifest
from hat.gallery.storage import Segment, ranges
from hat.model import ImageFeatures, TextFeatures

ITEMS = "items.json"
CHUNK = 1 << 22


def file_digest(path: Path) -> str:
    """xxh3-64 of a file's bytes (hex): faster than a disk reads, so the disk sets the pace."""
    digest = xxhash.xxh3_64()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_checked(directory: Path, manifest: Manifest, name: str) -> bytes:
    """The bytes of ``directory/name``, if their digest is the manifest's."""
    try:
        data = (directory / name).read_bytes()
    except OSError as exc:  # a gallery read lazily (its indexes) may be gone by then
        raise CacheError(f"{directory / name} is missing or unreadable ({exc.strerror})") from None
    if xxhash.xxh3_64_hexdigest(data) != manifest.files[name].xxh3:
        raise CorruptionError(directory, name, "does not match its checksum in the manifest")
    return data


def load_array(directory: Path, manifest: Manifest, name: str) -> np.ndarray:
    return np.load(io.BytesIO(read_checked(directory, manifest, name)))


def load_json(directory: Path, manifest: Manifest, name: str) -> Any:
    return json.loads(read_checked(directory, manifest, name))


def _by_segment(rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """For each segment that ``(segment, row)`` pairs touch: the positions, in file order."""
    for seg in np.unique(rows[:, 0]).tolist():
        positions = np.flatnonzero(rows[:, 0] == seg)
        yield seg, positions[np.argsort(rows[positions, 1], kind="stable")]


@dataclass
class BuildReport:
    """What a build did: ``encoded_images == 0`` on a cache hit."""

    cache_hit: bool
    encoded_images: int = 0
    reused_images: int = 0
    rebuilt_because: str = ""
    seconds: float = 0.0


@dataclass
class Gallery:
    """An opened gallery: metadata in memory, features memory-mapped, indexes loaded lazily."""

    directory: Path
    manifest: Manifest
    paths: list[str]
    captions: list[str]
    caption_image: np.ndarray
    skipped: list[dict[str, str]]
    image_rows: np.ndarray
    caption_rows: np.ndarray
    segments: list[Segment]
    report: BuildReport | None = field(default=None, repr=False)
    checked: bool = field(default=True, repr=False)  # rows checked as read; off only to time it

    @property
    def num_images(self) -> int:
        return len(self.paths)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    @property
    def num_levels(self) -> int:
        return self.manifest.num_levels

    def image_path(self, index: int) -> Path:
        return Path(self.manifest.root) / self.paths[index]

    def caption_path(self, index: int) -> str | None:
        """The gallery path of caption ``index``'s image; None for a caption without one."""
        owner = int(self.caption_image[index])
        return self.paths[owner] if owner >= 0 else None

    def image_features(self, ids: Sequence[int]) -> ImageFeatures:
        """fp32 region features of images ``ids`` (in that order), one tensor per level, with
        their stored concept gates."""
        parts = [(positions, part.expanded()) for positions, part in self.image_parts(ids)]
        if len(parts) == 1 and np.array_equal(parts[0][0], np.arange(len(ids))):
            return parts[0][1]  # ids in file order: no copy
        levels = [torch.empty(len(ids), regions, self.manifest.dim) for regions in self.regions()]
        gates = torch.empty(len(ids)) if self.manifest.gated else None
        for positions, part in parts:
            index = torch.from_numpy(positions)
            for out, values in zip(levels, part.levels, strict=True):
                out[index] = values
            if gates is not None:
                gates[index] = part.gates
        return ImageFeatures(levels, gates=gates)

    def image_parts(
        self, ids: Sequence[int], in_place: bool = False
    ) -> list[tuple[np.ndarray, ImageFeatures]]:
        """Images ``ids`` per segment as scoring wants them: (positions in ``ids``, features),
        the values as stored (int8 with ``ImageFeatures.scales``, fp16, or a compressed
        segment's codes, coordinates in its own ``ImageFeatures.bases``), with the region norms
        the gallery stores: scoring decodes them a cache-sized block at a time (int8, and a
        caption's pq codes, not at all), so the candidates never pass through memory in fp32;
        and their concept gates where the gallery stores them. With ``in_place`` (a re-rank)
        int8 values may stay where they lie (:meth:`hat.gallery.storage.Segment.read_images`).
        """
        rows = self.image_rows[np.asarray(ids, dtype=np.int64)]
        by_segment = list(_by_segment(rows))
        for seg, positions in by_segment:
            self.segments[seg].prefetch("image", rows[positions, 1], np.ones(len(positions), int))
        return [
            (
                positions,
                self.segments[seg].images_as_scored(rows[positions, 1], self.checked, in_place),
            )
            for seg, positions in by_segment
        ]

    def text_features(self, ids: Sequence[int], ragged: bool = False) -> TextFeatures:
        """fp32 word features of captions ``ids``, right-padded, with the real-token mask; with
        ``ragged`` each level's real words back to back (:class:`~hat.alignment.RaggedWords`,
        as stored: one image against them is scored without padding them)."""
        rows = self.caption_rows[np.asarray(ids, dtype=np.int64)]
        lengths = np.zeros(len(rows), dtype=np.int64)
        for seg, positions in _by_segment(rows):
            offsets, seg_rows = self.segments[seg].offsets, rows[positions, 1]
            lengths[positions] = offsets[seg_rows + 1] - offsets[seg_rows]
            self.segments[seg].prefetch("text", offsets[seg_rows], lengths[positions])
        width = max(int(lengths.max(initial=0)), 1)
        mask = torch.from_numpy(np.arange(width)[None] < lengths[:, None])
        firsts = np.cumsum(lengths) - lengths  # each caption's first real word, back to back
        tokens = [
            torch.empty(int(lengths.sum()), self.manifest.dim) for _ in range(self.num_levels)
        ]
        for seg, positions in _by_segment(rows):
            segment, seg_rows = self.segments[seg], rows[positions, 1]
            stored = segment.read_captions(seg_rows, self.checked)
            slots = torch.from_numpy(ranges(firsts[positions], lengths[positions]))
            for level, out in enumerate(tokens):
                out.index_copy_(0, slots, segment.decode("text", level, stored[level]))
        levels = [RaggedWords(t, mask) for t in tokens]
        return TextFeatures(levels if ragged else [x.padded() for x in levels], mask)

    def embeddings(self, kind: str) -> np.ndarray:
        """First-stage vectors of every image (``kind="image"``) or caption (``"text"``)."""
        rows = self.image_rows if kind == "image" else self.caption_rows
        out = np.empty((len(rows), self.manifest.embedding_dim), dtype=np.float32)
        for seg, positions in _by_segment(rows):
            segment = self.segments[seg]
            out[positions] = segment.read_embeddings(kind, rows[positions, 1], self.checked)
        return out

    def regions(self) -> list[int]:
        """Regions per level of every image (0s for a gallery without images)."""
        if not self.segments:
            return [0] * self.num_levels
        return [values.shape[1] for values, _ in self.segments[0].image]

    def bytes_per_image(self) -> float:
        """Stored bytes of the image side (region features, embeddings, index) per image."""
        files = self.manifest.files
        total = sum(v.size for k, v in files.items() if k.rpartition("/")[2].startswith("image."))
        return total / max(self.num_images, 1)

    def _index(self, kind: str) -> faiss.Index:
        data = read_checked(self.directory, self.manifest, f"{kind}.faiss")
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))

    @cached_property
    def image_index(self) -> faiss.Index:
        return self._index("image")

    @cached_property
    def text_index(self) -> faiss.Index:
        return self._index("text")

    def verify(self) -> None:
        """Check every byte of every file; raises :class:`CorruptionError`. Reads the whole
        gallery, which takes as long as reading it from disk: a server runs it in the background."""
        check_files(self.directory, self.manifest, verify=True)


def check_files(directory: Path, manifest: Manifest, verify: bool) -> None:
    """Every file of the manifest is there with its size (and, with ``verify``, its digest).
    A file that goes while it is checked (a rebuild replacing the gallery) is missing too."""
    for name, info in manifest.files.items():
        path = directory / name
        try:
            size = path.stat().st_size
            if size != info.size:
                raise CacheError(f"{path} has {size} bytes, the manifest says {info.size}")
            if verify and file_digest(path) != info.xxh3:
                problem = "does not match its checksum in the manifest"
                raise CorruptionError(directory, name, problem)
        except OSError as exc:
            raise CacheError(f"{path} is missing or unreadable ({exc.strerror})") from None


def read_manifest(directory: Path) -> Manifest:
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheError(f"{directory} has no readable {MANIFEST}: {exc}") from None
    try:
        return Manifest.from_dict(data)
    except CacheError as exc:
        raise CacheError(f"{directory}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"{directory}: {MANIFEST} is not a gallery manifest ({exc!r})") from None


def load_gallery(directory: Path, manifest: Manifest) -> Gallery:
    """The gallery at ``directory`` as ``manifest`` describes it, every file read whole checked
    against its digest."""

    def load(name: str) -> np.ndarray:
        return load_array(directory, manifest, name)

    def segment(name: str) -> Segment:
        return Segment(
            directory / "segments" / name, name, manifest, lambda f: load(f"segments/{name}/{f}")
        )

    try:
        items = load_json(directory, manifest, ITEMS)
        segments = [segment(name) for name in manifest.segments]
        arrays = {
            name: load(f"{name}.npy") for name in ("caption_image", "image_rows", "caption_rows")
        }
    except CacheError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise CacheError(f"{directory}: unreadable gallery file ({exc})") from None
    return Gallery(
        directory=directory,
        manifest=manifest,
        paths=items["paths"],
        captions=items["captions"],
        skipped=items["skipped"],
        segments=segments,
        **arrays,
    )


def open_gallery(directory: str | Path, verify: bool = False) -> Gallery:
    """Open a built gallery; raises :class:`CacheError` if any file is missing, truncated or
    (for the files read whole) changed. ``verify`` also checks every byte of the others."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    check_files(directory, manifest, verify)
    return load_gallery(directory, manifest)
