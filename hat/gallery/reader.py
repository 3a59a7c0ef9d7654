"""Reading a built gallery: manifest checks, then features gathered from memory-mapped segments."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from hat.gallery.collection import FORMAT_VERSION, sha256_file
from hat.gallery.storage import Segment, dequantize
from hat.model import ImageFeatures, TextFeatures

MANIFEST = "manifest.json"
ITEMS = "items.json"


class CacheError(RuntimeError):
    """A gallery directory is incomplete, truncated or does not match its manifest."""


def _by_segment(rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """For each segment that ``(segment, row)`` pairs touch: the positions, in file order."""
    for seg in np.unique(rows[:, 0]).tolist():
        positions = np.flatnonzero(rows[:, 0] == seg)
        yield seg, positions[np.argsort(rows[positions, 1], kind="stable")]


def _read(stored: tuple[np.ndarray, np.ndarray | None], rows: np.ndarray) -> torch.Tensor:
    values, scales = stored
    return dequantize(values[rows], None if scales is None else scales[rows])


def _token_index(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat token indices of captions ``rows`` (ragged storage) and each token's position."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + within, within


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
    manifest: dict[str, Any]
    paths: list[str]
    captions: list[str]
    caption_image: np.ndarray
    skipped: list[dict[str, str]]
    image_rows: np.ndarray
    caption_rows: np.ndarray
    segments: list[Segment]
    report: BuildReport | None = field(default=None, repr=False)

    @property
    def num_images(self) -> int:
        return len(self.paths)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    @property
    def num_levels(self) -> int:
        return int(self.manifest["num_levels"])

    def image_path(self, index: int) -> Path:
        return Path(self.manifest["root"]) / self.paths[index]

    def image_features(self, ids: Sequence[int]) -> ImageFeatures:
        """fp32 region features of images ``ids`` (in that order), one tensor per level."""
        rows = self.image_rows[np.asarray(ids, dtype=np.int64)]
        for seg, positions in _by_segment(rows):
            self.segments[seg].prefetch("image", rows[positions, 1], np.ones(len(positions), int))
        levels = []
        for level, regions in enumerate(self.regions()):
            parts = [
                (positions, _read(self.segments[seg].image[level], rows[positions, 1]))
                for seg, positions in _by_segment(rows)
            ]
            if len(parts) == 1 and np.array_equal(parts[0][0], np.arange(len(rows))):
                levels.append(parts[0][1])  # one segment, ids in file order: no extra copy
                continue
            out = torch.empty(len(rows), regions, int(self.manifest["dim"]))
            for positions, values in parts:
                out[torch.from_numpy(positions)] = values
            levels.append(out)
        return ImageFeatures(levels)

    def text_features(self, ids: Sequence[int]) -> TextFeatures:
        """fp32 word features of captions ``ids``, right-padded, with the real-token mask."""
        rows = self.caption_rows[np.asarray(ids, dtype=np.int64)]
        lengths = np.zeros(len(rows), dtype=np.int64)
        for seg, positions in _by_segment(rows):
            offsets, seg_rows = self.segments[seg].offsets, rows[positions, 1]
            lengths[positions] = offsets[seg_rows + 1] - offsets[seg_rows]
            self.segments[seg].prefetch("text", offsets[seg_rows], lengths[positions])
        width = max(int(lengths.max(initial=0)), 1)
        dim = int(self.manifest["dim"])
        levels = [torch.zeros(len(rows), width, dim) for _ in range(self.num_levels)]
        for seg, positions in _by_segment(rows):
            segment = self.segments[seg]
            tokens, within = _token_index(segment.offsets, rows[positions, 1])
            owner = torch.from_numpy(np.repeat(positions, lengths[positions]))
            for level, out in enumerate(levels):
                out[owner, torch.from_numpy(within)] = _read(segment.text[level], tokens)
        mask = torch.from_numpy(np.arange(width)[None] < lengths[:, None])
        return TextFeatures(levels, mask)

    def embeddings(self, kind: str) -> np.ndarray:
        """First-stage vectors of every image (``kind="image"``) or caption (``"text"``)."""
        rows = self.image_rows if kind == "image" else self.caption_rows
        out = np.empty((len(rows), int(self.manifest["embedding_dim"])), dtype=np.float32)
        for seg, positions in _by_segment(rows):
            stored = getattr(self.segments[seg], f"{kind}_embedding")
            out[positions] = stored[rows[positions, 1]]
        return out

    def regions(self) -> list[int]:
        """Regions per level of every image (0s for a gallery without images)."""
        if not self.segments:
            return [0] * self.num_levels
        return [values.shape[1] for values, _ in self.segments[0].image]

    def bytes_per_image(self) -> float:
        """Stored bytes of the image side (region features, embeddings, index) per image."""
        files = self.manifest["files"]
        total = sum(
            v["size"] for k, v in files.items() if k.rpartition("/")[2].startswith("image.")
        )
        return total / max(self.num_images, 1)

    @cached_property
    def image_index(self) -> faiss.Index:
        return faiss.read_index(str(self.directory / "image.faiss"))

    @cached_property
    def text_index(self) -> faiss.Index:
        return faiss.read_index(str(self.directory / "text.faiss"))


def check_files(directory: Path, manifest: dict[str, Any], verify: bool) -> None:
    for name, info in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CacheError(f"{path} is missing")
        size = path.stat().st_size
        if size != info["size"]:
            raise CacheError(f"{path} has {size} bytes, the manifest says {info['size']}")
        if verify and sha256_file(path) != info["sha256"]:
            raise CacheError(f"{path} does not match its sha256 in the manifest")


def read_manifest(directory: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheError(f"{directory} has no readable {MANIFEST}: {exc}") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CacheError(f"{directory}: storage format {manifest.get('format')} is not supported")
    return manifest


def load_gallery(directory: Path, manifest: dict[str, Any]) -> Gallery:
    items = json.loads((directory / ITEMS).read_text())
    quantized = manifest["settings"]["precision"] == "int8"
    try:
        segments = [
            Segment(directory / "segments" / name, manifest["num_levels"], quantized)
            for name in manifest["segments"]
        ]
    except (OSError, ValueError) as exc:
        raise CacheError(f"{directory}: unreadable feature array ({exc})") from None
    return Gallery(
        directory=directory,
        manifest=manifest,
        paths=items["paths"],
        captions=items["captions"],
        caption_image=np.load(directory / "caption_image.npy"),
        skipped=items["skipped"],
        image_rows=np.load(directory / "image_rows.npy"),
        caption_rows=np.load(directory / "caption_rows.npy"),
        segments=segments,
    )


def open_gallery(directory: str | Path, verify: bool = False) -> Gallery:
    """Open a built gallery; raises :class:`CacheError` if any file is missing or truncated.

    Sizes are always checked (cheap); ``verify`` also re-hashes every file.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    check_files(directory, manifest, verify)
    return load_gallery(directory, manifest)
