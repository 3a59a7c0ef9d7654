"""Feature storage: memory-mapped .npy arrays per segment, in the format of a codec per level.

A segment holds the features of one encoding run and is never modified after it is written, so
later galleries can share it through hard links. Every row (an image's region features of all
levels; a caption's tokens) has an xxh3 digest, written with it, and a read checks the digest of
exactly the rows it gathers: bytes changed on disk are never served, and a query pays only for
hashing its own candidates (benchmarks/row_checks.py measures it); opening only checks file sizes.
A model whose concept level has a novelty gate gets each image's gate stored too, taken from the
stored values as a query would take it (4 bytes per image, read whole and checked at opening).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import xxhash

from hat import native
from hat.gallery.codecs import (
    PQ_TRAINING_VECTORS,
    Codec,
    PQCodec,
    kind_precision,
    new_codec,
    training_sample,
)
from hat.gallery.errors import CorruptionError
from hat.gallery.manifest import Manifest
from hat.mapped_rows import MappedRows
from hat.model import ImageFeatures, TextFeatures

KINDS = ("image", "text")
# Columns of a segment's ``<kind>.xxh3.npy``: one digest over a row's features (every level's
# values and side array, then every level's region norms where stored), one over its
# first-stage vector.
FEATURES, EMBEDDING = 0, 1
Stored = list[tuple[np.ndarray, np.ndarray | None]]  # values and side array of every level
Norms = list[np.ndarray | None]  # region norms of every image level (None: not stored)
CODEBOOKS = "codec.npy"  # suffix of a level's trained codec (serialised faiss), pq only
NORMS = "norm"  # infix of a level's stored region norms: image.<level>.norm.npy
GATES = "image.gate.npy"  # each image's concept gate (HATModel.concept_gate), gated models only
Gate = Callable[[ImageFeatures], torch.Tensor]  # images as scored -> (N,) gates
# Rows to prefetch closer than this many bytes are asked for in one system call (the kernel
# reads ahead about as far anyway): a query's 100 scales or norms of a small gallery, one call.
PREFETCH_GAP = 1 << 17
EMBEDDING_DTYPE = np.float16  # first-stage vectors: unit length; fp16 keeps each value to 5e-4


def row_digests(parts: Sequence[np.ndarray], bounds: np.ndarray) -> np.ndarray:
    """xxh3-64 of every row of ``parts``: row r is items ``bounds[r]:bounds[r + 1]`` along the
    first axis of each part, hashed part after part (parts must be C-contiguous)."""
    edges = bounds.tolist()
    out = np.empty(len(edges) - 1, dtype=np.uint64)
    for row in range(len(out)):
        digest = xxhash.xxh3_64()
        for part in parts:
            digest.update(part[edges[row] : edges[row + 1]])
        out[row] = digest.intdigest()
    return out


def ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Items ``starts[r] : starts[r] + counts[r]`` of every row r back to back (a ragged row's
    flat indices, such as a caption's tokens)."""
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + within


def _flat(stored: Stored, norms: Norms = ()) -> list[np.ndarray]:
    """What a row's feature digest covers, in order."""
    return [a for pair in stored for a in pair if a is not None] + [
        n for n in norms if n is not None
    ]


def _unless_none(per_level: Sequence) -> list | None:
    """``per_level`` as a list, or None where every level has None."""
    return None if all(x is None for x in per_level) else list(per_level)


def as_scored(
    codecs: Sequence[Codec], stored: Stored, norms: Norms, gates: torch.Tensor | None = None
) -> ImageFeatures:
    """Image rows as scoring takes them: every level's stored values through its codec
    (``Codec.for_scoring``), with their region norms and gates where stored."""
    levels, scales, bases = zip(
        *(codec.for_scoring(*pair) for codec, pair in zip(codecs, stored, strict=True)),
        strict=True,
    )
    norms = [None if n is None else torch.from_numpy(n) for n in norms]
    return ImageFeatures(
        list(levels), _unless_none(bases), _unless_none(scales), _unless_none(norms), gates
    )


def _npy(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def _prefetch(array: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
    """Ask the kernel to read these row ranges of a memory-mapped array now, all at once.

    Touching rows that are not in the page cache faults them in one page at a time, each read
    waiting for the one before; asked for all at once, the reads overlap. Rows already cached
    cost nothing.
    Only a hint: a file removed meanwhile (a damaged gallery discarded) is still mapped and read.
    """
    if not isinstance(array, np.memmap) or not hasattr(os, "posix_fadvise") or not len(starts):
        return
    try:
        fd = os.open(array.filename, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        for begin, end in _merged(starts, counts, array.strides[0]):
            os.posix_fadvise(fd, array.offset + begin, end - begin, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def _merged(starts: np.ndarray, counts: np.ndarray, row: int) -> list[tuple[int, int]]:
    """Byte ranges of rows ``starts[i] : starts[i] + counts[i]``, those at most
    :data:`PREFETCH_GAP` apart asked for as one (small rows of a small gallery: one call)."""
    order = np.argsort(starts, kind="stable")
    begins, ends = starts[order] * row, (starts[order] + counts[order]) * row
    reach = np.maximum.accumulate(ends)
    first = np.concatenate([[0], np.flatnonzero(begins[1:] - reach[:-1] > PREFETCH_GAP) + 1])
    last = np.concatenate([first[1:] - 1, [len(begins) - 1]])
    return list(zip(begins[first].tolist(), reach[last].tolist(), strict=True))


class Segment:
    """Read-only, memory-mapped feature arrays of one encoding run.

    ``load`` reads the small arrays held in memory (offsets, row digests), checked by the caller
    against the manifest; the memory-mapped ones must have the layout the manifest implies, so
    that a damaged ``.npy`` header cannot make the same bytes mean other numbers.
    """

    def __init__(
        self,
        directory: Path,
        name: str,
        manifest: Manifest,
        load: Callable[[str], np.ndarray],
    ):
        self.directory, self.name = directory, name
        levels, dim = manifest.num_levels, manifest.dim
        precision = manifest.settings.precision
        self.offsets = load("text.offsets.npy")
        self.digests = {kind: load(f"{kind}.xxh3.npy") for kind in KINDS}
        rows = {"image": len(self.digests["image"]), "text": int(self.offsets[-1])}
        if len(self.offsets) != len(self.digests["text"]) + 1:
            raise self._damaged("text.offsets.npy", "does not match its captions")
        self.gates = load(GATES) if manifest.gated else None
        if self.gates is not None and self.gates.shape != (rows["image"],):
            raise self._damaged(GATES, f"has shape {list(self.gates.shape)}")
        self.codecs: dict[str, list[Codec]] = {}
        for kind in KINDS:
            stored_as = kind_precision(precision, kind)
            self.codecs[kind] = [
                self._codec(stored_as, dim, f"{kind}.{i}", load) for i in range(levels)
            ]

        def pair(kind: str, level: int) -> tuple[np.ndarray, np.ndarray | None]:
            name, codec = f"{kind}.{level}", self.codecs[kind][level]
            values = self._map(f"{name}.npy", codec.value_dtype, rows[kind], codec.value_width)
            side = codec.side_shape(values.shape[:-1])
            if side is None:
                return values, None
            return values, self._map(f"{name}.{codec.side}.npy", np.float16, rows[kind], *side[1:])

        self.image = [pair("image", i) for i in range(levels)]
        self.text = [pair("text", i) for i in range(levels)]
        self.image_norms: Norms = [
            self._map(f"image.{i}.{NORMS}.npy", np.float32, rows["image"], values.shape[1])
            if codec.stores_norms
            else None
            for i, (codec, (values, _)) in enumerate(
                zip(self.codecs["image"], self.image, strict=True)
            )
        ]
        width = manifest.embedding_dim
        self.image_embedding = self._map(
            "image.embedding.npy", EMBEDDING_DTYPE, rows["image"], width
        )
        self.text_embedding = self._map(
            "text.embedding.npy", EMBEDDING_DTYPE, len(self.offsets) - 1, width
        )

    def _codec(self, precision: str, dim: int, name: str, load: Callable) -> Codec:
        if precision != "pq":
            return new_codec(precision, dim)
        try:
            return PQCodec.from_array(dim, load(f"{name}.{CODEBOOKS}"))
        except (RuntimeError, ValueError) as exc:
            raise self._damaged(f"{name}.{CODEBOOKS}", f"is not a codec ({exc})") from None

    def decode(self, kind: str, level: int, stored: tuple[np.ndarray, np.ndarray | None]):
        """fp32 features of ``stored`` values of ``kind`` at ``level``."""
        return self.codecs[kind][level].decode(*stored)

    def images_as_scored(
        self, rows: np.ndarray, check: bool = True, in_place: bool = False
    ) -> ImageFeatures:
        """Image ``rows`` as scoring takes them (:func:`as_scored`), checked row by row; with
        ``in_place`` (a re-rank) int8 values may stay where they lie (:meth:`read_images`)."""
        stored, norms = self.read_images(rows, check, in_place)
        gates = None if self.gates is None else torch.from_numpy(self.gates[rows])
        return as_scored(self.codecs["image"], stored, norms, gates)

    def _damaged(self, file: str | None, problem: str) -> CorruptionError:
        """The error naming ``file`` of this segment, or the segment (``None``)."""
        name = f"segments/{self.name}" + (f"/{file}" if file else "")
        return CorruptionError(self.directory.parent.parent, name, problem)

    def _map(self, file: str, dtype, rows: int, *tail: int) -> np.ndarray:
        """Memory-map ``file``; its header must say ``dtype``, C order, ``rows`` first and
        ``tail`` last (with the size checked, that fixes every dimension)."""
        array = _npy(self.directory / file)
        if (
            array.dtype != dtype
            or not array.flags.c_contiguous
            or array.shape[:1] != (rows,)
            or array.shape[len(array.shape) - len(tail) :] != tail
        ):
            raise self._damaged(file, f"has layout {array.dtype}{list(array.shape)}")
        return array

    def prefetch(self, kind: str, starts: np.ndarray, counts: np.ndarray) -> None:
        """Start reading rows ``starts[i] : starts[i] + counts[i]`` of every level of ``kind``."""
        norms = self.image_norms if kind == "image" else []
        for array in _flat(getattr(self, kind), norms):
            _prefetch(array, starts, counts)

    def _check(self, kind: str, column: int, rows: np.ndarray, parts, bounds: np.ndarray) -> None:
        self._compare(kind, column, rows, row_digests(parts, bounds))

    def _compare(self, kind: str, column: int, rows: np.ndarray, digests: np.ndarray) -> None:
        bad = rows[digests != self.digests[kind][rows, column]]
        if bad.size:
            what = "first-stage vectors" if column == EMBEDDING else "rows"
            raise self._damaged(
                None, f"{kind} {what} {bad[:5].tolist()} do not match their checksums"
            )

    def _gather(
        self,
        kind: str,
        arrays: list[np.ndarray],
        rows: np.ndarray,
        starts,
        counts,
        check: bool,
        in_place: list[bool] | None = None,
    ) -> list[np.ndarray | MappedRows]:
        """Items ``starts[r] : starts[r] + counts[r]`` of ``arrays`` for each of ``rows`` of
        ``kind``, back to back, checked row by row: where :mod:`hat.native` is built, each row
        hashed as it is copied, while it is in cache; there, arrays marked ``in_place`` (one
        item a row) are hashed where they lie and handed out as :class:`MappedRows`."""
        if check and native.hashes_rows():
            kernels = native.kernels()
            gathered, digests = native.gather_rows(
                kernels, arrays, starts, counts, digest=True, in_place=in_place or ()
            )
            self._compare(kind, FEATURES, rows, digests)
            return [
                MappedRows(a, starts) if g is None else g
                for a, g in zip(arrays, gathered, strict=True)
            ]
        gathered = [a[ranges(starts, counts)] for a in arrays]
        if check:
            bounds = np.concatenate([[0], np.cumsum(counts)])
            self._check(kind, FEATURES, rows, gathered, bounds)
        return gathered

    def read_images(
        self, rows: np.ndarray, check: bool = True, in_place: bool = False
    ) -> tuple[Stored, Norms]:
        """Stored values (and side arrays) and region norms of image ``rows``, every level,
        checked row by row. With ``in_place``, where the CPU multiplies int8 in AMX tiles
        (:mod:`hat.native`), int8 levels' values are checked but not copied: scoring reads
        them where they lie (:class:`MappedRows`)."""
        arrays = _flat(self.image, self.image_norms)
        kept = []  # in _flat's order: each level's values, then its side array where it has one
        if in_place and (kernels := native.kernels()) is not None and kernels.amx:
            for (_, side), codec in zip(self.image, self.codecs["image"], strict=True):
                kept += [codec.precision == "int8"] + ([False] if side is not None else [])
        ones = np.ones(len(rows), dtype=np.int64)
        parts = iter(self._gather("image", arrays, rows, rows, ones, check, kept))
        stored = [(next(parts), None if s is None else next(parts)) for _, s in self.image]
        return stored, [None if n is None else next(parts) for n in self.image_norms]

    def read_captions(self, rows: np.ndarray, check: bool = True) -> Stored:
        """Stored token values of captions ``rows``, every level, back to back in row order,
        checked caption by caption."""
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        parts = iter(self._gather("text", _flat(self.text), rows, starts, lengths, check))
        return [(next(parts), None if s is None else next(parts)) for _, s in self.text]

    def read_embeddings(self, kind: str, rows: np.ndarray, check: bool = True) -> np.ndarray:
        """First-stage vectors of ``rows`` of ``kind``, checked row by row."""
        vectors = getattr(self, f"{kind}_embedding")[rows]
        if check:
            self._check(kind, EMBEDDING, rows, [vectors], np.arange(len(rows) + 1))
        return vectors


class SegmentWriter:
    """Creates a new segment's arrays up front and fills them batch by batch (``open_memmap``).

    Rows follow the segment's image list; rows of unreadable images stay zero and unreferenced.
    Captions are stored for every image of the list, tokens back to back. A codec that must be
    trained (``pq``) holds the first batches of its kind in memory until it has seen
    ``PQ_TRAINING_VECTORS`` vectors per level (or the segment closes), trains on them, then
    writes them and everything after (``codecs`` trained elsewhere skip that). ``gate``: a gated
    model's :meth:`~hat.model.HATModel.concept_gate`, taken of every image as stored (so that it
    equals what a query would take of it). :meth:`close` writes the codecs, the gates and the
    rows' digests.
    """

    def __init__(
        self,
        directory: Path,
        precision: str,
        num_images: int,
        image_shapes: Sequence[tuple[int, int]],
        caption_lengths: np.ndarray,
        embedding_dim: int,
        codecs: dict[str, list[Codec]] | None = None,
        gate: Gate | None = None,
    ):
        directory.mkdir(parents=True)
        self.directory = directory
        self.gate = gate
        self.gates = np.zeros(num_images, dtype=np.float32) if gate else None
        self.offsets = np.concatenate([[0], np.cumsum(caption_lengths)]).astype(np.int64)
        np.save(directory / "text.offsets.npy", self.offsets)
        self.arrays: dict[str, np.ndarray] = {}
        num_tokens = int(self.offsets[-1])
        dim = image_shapes[0][1]
        self.codecs = codecs or {
            kind: [new_codec(kind_precision(precision, kind), dim) for _ in image_shapes]
            for kind in KINDS
        }
        self.pending: dict[str, list[tuple]] = {kind: [] for kind in KINDS}
        for level, shape in enumerate(image_shapes):
            self._create_level("image", level, (num_images, shape[0]))
            self._create_level("text", level, (num_tokens,))
        self._create("image.embedding", EMBEDDING_DTYPE, (num_images, embedding_dim))
        self._create("text.embedding", EMBEDDING_DTYPE, (len(caption_lengths), embedding_dim))
        rows = {"image": num_images, "text": len(caption_lengths)}
        self.digests = {kind: np.zeros((rows[kind], 2), dtype=np.uint64) for kind in KINDS}

    def _create(self, name: str, dtype, shape: tuple[int, ...]) -> None:
        path = self.directory / f"{name}.npy"
        self.arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def _create_level(self, kind: str, level: int, leading: tuple[int, ...]) -> None:
        codec = self.codecs[kind][level]
        self._create(f"{kind}.{level}", codec.value_dtype, (*leading, codec.value_width))
        side = codec.side_shape(leading)
        if side is not None:
            self._create(f"{kind}.{level}.{codec.side}", np.float16, side)
        if kind == "image" and codec.stores_norms:
            self._create(f"{kind}.{level}.{NORMS}", np.float32, leading)

    def _ready(self, kind: str) -> bool:
        return all(not c.needs_training or c.trained for c in self.codecs[kind])

    def _train(self, kind: str) -> None:
        """Train ``kind``'s codecs on its pending batches, then write those batches."""
        for level, codec in enumerate(self.codecs[kind]):
            if codec.needs_training and not codec.trained:
                vectors = [codec.training_vectors(p[2][level]) for p in self.pending[kind]]
                sample = np.concatenate(vectors) if vectors else np.zeros((0, codec.dim))
                codec.train(training_sample(sample))
        pending, self.pending[kind] = self.pending[kind], []
        for args in pending:
            self._put_rows(kind, *args)

    def _submit(self, kind: str, rows, items, levels, embedding, bounds) -> None:
        """Write now, or hold until ``kind``'s codecs are trained."""
        if self._ready(kind):
            self._put_rows(kind, rows, items, levels, embedding, bounds)
            return
        self.pending[kind].append((rows, items, [x.float() for x in levels], embedding, bounds))
        held = sum(len(p[2][0].reshape(-1, p[2][0].shape[-1])) for p in self.pending[kind])
        if held >= PQ_TRAINING_VECTORS:
            self._train(kind)

    def _put_rows(self, kind: str, rows, items, levels, embedding: torch.Tensor, bounds) -> None:
        """Encode and store ``rows`` of ``kind`` (see :meth:`_write_rows`)."""
        stored = [codec.encode(x) for codec, x in zip(self.codecs[kind], levels, strict=True)]
        self._write_rows(kind, rows, items, stored, embedding, bounds)

    def _write_rows(self, kind: str, rows, items, stored: Stored, embedding, bounds) -> None:
        """Store ``rows`` of ``kind``: their encoded levels at ``items`` (image rows, or caption
        tokens with row r owning ``bounds[r]:bounds[r + 1]``) with the regions' norms, their
        first-stage vectors, and the digests of both, taken from the bytes as stored."""
        contiguous = [
            tuple(None if a is None else np.ascontiguousarray(a) for a in pair) for pair in stored
        ]
        norms: Norms = []
        for level, (values, side) in enumerate(contiguous):
            codec = self.codecs[kind][level]
            self.arrays[f"{kind}.{level}"][items] = values
            if side is not None:
                self.arrays[f"{kind}.{level}.{codec.side}"][items] = side
            norms.append(None)
            if kind == "image" and codec.stores_norms:
                norms[-1] = codec.norms(values, side)
                self.arrays[f"{kind}.{level}.{NORMS}"][items] = norms[-1]
        if kind == "image" and self.gate is not None:
            scored = as_scored(self.codecs[kind], contiguous, norms)
            self.gates[rows] = self.gate(scored).float().cpu().numpy()
        vectors = np.ascontiguousarray(np.asarray(embedding, dtype=EMBEDDING_DTYPE))
        self.arrays[f"{kind}.embedding"][rows] = vectors
        self.digests[kind][rows, FEATURES] = row_digests(_flat(contiguous, norms), bounds)
        self.digests[kind][rows, EMBEDDING] = row_digests([vectors], np.arange(len(vectors) + 1))

    def put_encoded_images(self, rows: np.ndarray, stored: Stored, embedding: np.ndarray) -> None:
        """Store image rows already encoded by this writer's codecs (values and side arrays of every
        level, as :meth:`Segment.read_images` returns them; their norms are taken from them):
        copies, synthetic galleries."""
        if not self._ready("image"):
            raise ValueError("the image codecs are not trained yet")
        self._write_rows("image", rows, rows, stored, embedding, np.arange(len(rows) + 1))

    def put_images(
        self, rows: np.ndarray, features: ImageFeatures, embedding: torch.Tensor
    ) -> None:
        bounds = np.arange(len(rows) + 1)
        self._submit("image", rows, rows, features.levels, embedding, bounds)

    def put_texts(self, start: int, features: TextFeatures, embedding: torch.Tensor) -> None:
        rows = slice(start, start + len(features))
        tokens = slice(self.offsets[start], self.offsets[rows.stop])
        levels = [x[features.mask] for x in features.levels]
        bounds = self.offsets[start : rows.stop + 1] - self.offsets[start]
        self._submit("text", rows, tokens, levels, embedding, bounds)

    def close(self) -> None:
        for kind in KINDS:
            if not self._ready(kind):
                self._train(kind)
            for level, codec in enumerate(self.codecs[kind]):
                if isinstance(codec, PQCodec):
                    np.save(self.directory / f"{kind}.{level}.{CODEBOOKS}", codec.to_array())
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()
        for kind, digests in self.digests.items():
            np.save(self.directory / f"{kind}.xxh3.npy", digests)
        if self.gates is not None:
            np.save(self.directory / GATES, self.gates)
