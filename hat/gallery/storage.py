"""Feature storage: memory-mapped .npy arrays per segment, quantised per vector.

A segment holds the features of one encoding run and is never modified after it is written, so
later galleries can share it through hard links.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hat.model import ImageFeatures, TextFeatures

PRECISIONS = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}


def quantize(x: torch.Tensor, precision: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored values and, for int8, one fp16 scale per vector (symmetric, absmax over D).

    A per-vector scale keeps every region's direction and norm to ~0.5 %, which is all the
    alignment uses; int8 halves fp16's bytes.
    """
    x = x.detach().float().cpu()
    if precision != "int8":
        return x.numpy().astype(PRECISIONS[precision]), None
    scale = (x.abs().amax(dim=-1) / 127).clamp(min=1e-12).half()
    values = torch.round(x / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return values.numpy(), scale.numpy()


def dequantize(values: np.ndarray, scales: np.ndarray | None) -> torch.Tensor:
    """fp32 tensor of stored values (int8: cast, then scale in place: one fp32 allocation)."""
    values = torch.from_numpy(np.ascontiguousarray(values)).float()
    if scales is None:
        return values
    return values.mul_(torch.from_numpy(np.ascontiguousarray(scales)).float()[..., None])


def _npy(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def _prefetch(array: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
    """Ask the kernel to read these row ranges of a memory-mapped array now, all at once.

    Touching rows that are not in the page cache faults them in one page at a time: 100 cold
    candidates took ~1 s, with this ~40 ms (the reads overlap). Rows already cached cost nothing.
    """
    if not isinstance(array, np.memmap) or not hasattr(os, "posix_fadvise"):
        return
    row = array.strides[0]
    fd = os.open(array.filename, os.O_RDONLY)
    try:
        for start, count in zip(starts.tolist(), counts.tolist(), strict=True):
            os.posix_fadvise(fd, array.offset + start * row, count * row, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


class Segment:
    """Read-only, memory-mapped feature arrays of one encoding run."""

    def __init__(self, directory: Path, num_levels: int, quantized: bool):
        def pair(prefix: str, level: int) -> tuple[np.ndarray, np.ndarray | None]:
            scale = directory / f"{prefix}.{level}.scale.npy"
            return _npy(directory / f"{prefix}.{level}.npy"), _npy(scale) if quantized else None

        self.image = [pair("image", i) for i in range(num_levels)]
        self.text = [pair("text", i) for i in range(num_levels)]
        self.offsets = np.load(directory / "text.offsets.npy")
        self.image_embedding = _npy(directory / "image.embedding.npy")
        self.text_embedding = _npy(directory / "text.embedding.npy")

    def prefetch(self, kind: str, starts: np.ndarray, counts: np.ndarray) -> None:
        """Start reading rows ``starts[i] : starts[i] + counts[i]`` of every level of ``kind``."""
        for values, scales in getattr(self, kind):
            for array in (values, scales):
                if array is not None:
                    _prefetch(array, starts, counts)


class SegmentWriter:
    """Creates a new segment's arrays up front and fills them batch by batch (``open_memmap``).

    Rows follow the segment's image list; rows of unreadable images stay zero and unreferenced.
    Captions are stored for every image of the list, tokens back to back.
    """

    def __init__(
        self,
        directory: Path,
        precision: str,
        num_images: int,
        image_shapes: Sequence[tuple[int, int]],
        caption_lengths: np.ndarray,
        embedding_dim: int,
    ):
        directory.mkdir(parents=True)
        self.directory = directory
        self.precision = precision
        self.offsets = np.concatenate([[0], np.cumsum(caption_lengths)]).astype(np.int64)
        np.save(directory / "text.offsets.npy", self.offsets)
        self.arrays: dict[str, np.ndarray] = {}
        num_tokens = int(self.offsets[-1])
        dim = image_shapes[0][1]
        for level, shape in enumerate(image_shapes):
            self._create_level(f"image.{level}", (num_images, *shape))
            self._create_level(f"text.{level}", (num_tokens, dim))
        self._create("image.embedding", np.float32, (num_images, embedding_dim))
        self._create("text.embedding", np.float32, (len(caption_lengths), embedding_dim))

    def _create(self, name: str, dtype, shape: tuple[int, ...]) -> None:
        path = self.directory / f"{name}.npy"
        self.arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def _create_level(self, name: str, shape: tuple[int, ...]) -> None:
        self._create(name, PRECISIONS[self.precision], shape)
        if self.precision == "int8":
            self._create(f"{name}.scale", np.float16, shape[:-1])

    def _put(self, name: str, index, x: torch.Tensor) -> None:
        values, scales = quantize(x, self.precision)
        self.arrays[name][index] = values
        if scales is not None:
            self.arrays[f"{name}.scale"][index] = scales

    def put_images(
        self, rows: np.ndarray, features: ImageFeatures, embedding: torch.Tensor
    ) -> None:
        for level, x in enumerate(features.levels):
            self._put(f"image.{level}", rows, x)
        self.arrays["image.embedding"][rows] = embedding.float().numpy()

    def put_texts(self, start: int, features: TextFeatures, embedding: torch.Tensor) -> None:
        tokens = slice(self.offsets[start], self.offsets[start + len(features)])
        for level, x in enumerate(features.levels):
            self._put(f"text.{level}", tokens, x[features.mask])
        self.arrays["text.embedding"][start : start + len(features)] = embedding.float().numpy()

    def close(self) -> None:
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()
