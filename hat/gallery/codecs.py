"""How a segment stores feature vectors (image regions, caption tokens): one codec per level.

- ``fp32`` / ``fp16``: the floats.
- ``int8``: symmetric int8 with one fp16 scale per vector (absmax over D). A per-vector scale
  keeps every vector's direction and norm, which is all the alignment uses.
- ``pq`` (image regions; caption tokens stay ``int8``): each image keeps its mean region (fp16),
  and each region's difference from it becomes ``PQ_BYTES`` one-byte codes: faiss product
  quantisation (a sub-vector's nearest of 256 centroids) after a PCA to ``PQ_DIMS`` dimensions
  with a random rotation. The projection and codebooks are trained on the segment's own vectors
  when it is written and stored beside them, so any checkpoint's features compress without a
  separate training step, and a segment reused by a later gallery keeps its codebooks. Scoring
  takes the codes as they are (:class:`~hat.coded_regions.CodedRegions`): a query's caption
  scores them through a table of its words' products with the centroids, anything else decodes
  them (a table lookup) to their PCA coordinates, with the part of the mean outside the PCA as
  one more coordinate along a row of the image's own, and scores those (:mod:`hat.alignment`).

Why these choices (reports/README.md): at a fixed 32 bytes per region, dropping the weakest PCA
directions and quantising 3 dimensions per code keeps retrieval much closer to fp32 than 8
dimensions per code on all 256 (plain PQ), and the PCA trains far faster than an OPQ rotation.
The mean matters most: a PCA of the regions themselves drops part of every image's mean, an
error shared by all its regions that shifts all its scores alike and costs far more retrieval
than the per-region noise. Caption tokens lose more to quantisation than regions do and are few
next to them, so they keep int8.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

from hat.alignment import Basis
from hat.coded_regions import Codebook, CodedRegions
from hat.mapped_rows import MappedRows

PRECISIONS = ("fp32", "fp16", "int8", "pq")
# What scoring takes of a level (Codec.for_scoring): values, per-vector scales, basis.
Scorable = tuple[torch.Tensor | MappedRows | CodedRegions, torch.Tensor | None, Basis | None]
FLOATS = {"fp32": np.float32, "fp16": np.float16}
PQ_BYTES = 32  # codes per region
PQ_DIMS = 3 * PQ_BYTES  # PCA output: 3 dimensions per code
PQ_CENTROIDS = 256  # one byte per code
# Vectors the codebooks are fitted on: far more than k-means needs for 256 centroids (~40 each).
PQ_TRAINING_VECTORS = 65_536
PQ_SEED = 1234


class Codec:
    """Storage of ``(..., dim)`` tensors: ``encode`` → (values per vector, side array or None).

    The side array (``side`` names it, fp16) holds what a codec keeps beside the values: int8's
    per-vector scales, pq's per-image mean.
    """

    precision: str
    value_dtype: type
    side: str | None = None
    needs_training = False
    # Image regions' norms as scored, stored beside them: int8 only, where they let a query's
    # candidates be scored without widening them (floats are normed in cache as they are scored).
    stores_norms = False

    def __init__(self, dim: int):
        self.dim = dim

    @property
    def value_width(self) -> int:
        """Stored values per vector."""
        return self.dim

    def side_shape(self, leading: tuple[int, ...]) -> tuple[int, ...] | None:
        """Shape of the side array of values ``(*leading, value_width)``; None: no side array."""
        return None

    def training_vectors(self, x: torch.Tensor) -> np.ndarray:
        """The vectors ``(n, dim)`` of ``x`` that a codec which needs training is fitted on."""
        return x.float().reshape(-1, self.dim).numpy()

    def encode(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def decode(self, values: np.ndarray, side: np.ndarray | None) -> torch.Tensor:
        """fp32 tensor ``(..., dim)`` of stored values."""
        raise NotImplementedError

    def for_scoring(self, values: np.ndarray, side: np.ndarray | None) -> Scorable:
        """Stored values as :func:`hat.alignment.level_scores` takes them, which decodes them a
        cache-sized block at a time while it scores: (values, per-vector scales or None,
        :class:`~hat.alignment.Basis` of coordinates or None)."""
        return self.decode(values, side), None, None


class FloatCodec(Codec):
    def __init__(self, dim: int, precision: str):
        super().__init__(dim)
        self.precision, self.value_dtype = precision, FLOATS[precision]

    def encode(self, x: torch.Tensor) -> tuple[np.ndarray, None]:
        return x.detach().float().cpu().numpy().astype(self.value_dtype), None

    def decode(self, values: np.ndarray, scales: None) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values)).float()

    def for_scoring(self, values: np.ndarray, scales: None) -> Scorable:
        """The floats as stored (fp16 is widened block by block as it is scored)."""
        return torch.from_numpy(np.ascontiguousarray(values)), None, None


class Int8Codec(Codec):
    precision, value_dtype, side, stores_norms = "int8", np.int8, "scale", True

    def side_shape(self, leading: tuple[int, ...]) -> tuple[int, ...]:
        return leading

    def encode(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = x.detach().float().cpu()
        scale = (x.abs().amax(dim=-1) / 127).clamp(min=1e-12).half()
        values = torch.round(x / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
        return values.numpy(), scale.numpy()

    def decode(self, values: np.ndarray, scales: np.ndarray) -> torch.Tensor:
        """Cast, then scale in place: one fp32 allocation."""
        out = torch.from_numpy(np.ascontiguousarray(values)).float()
        return out.mul_(torch.from_numpy(np.ascontiguousarray(scales)).float()[..., None])

    def for_scoring(self, values: np.ndarray | MappedRows, scales: np.ndarray) -> Scorable:
        """The int8 values (copied out, or where they lie) and their scales, as stored
        (decoded block by block as scored, or multiplied in integers)."""
        if not isinstance(values, MappedRows):
            values = torch.from_numpy(np.ascontiguousarray(values))
        return values, torch.from_numpy(np.ascontiguousarray(scales)), None

    def norms(self, values: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """fp32 norms ``(...)`` of the vectors as scored: of their values, times their scales,
        computed as :func:`hat.alignment.level_scores` takes them when they are not given, so
        that stored norms leave every score as it was."""
        values, scales = (torch.from_numpy(np.ascontiguousarray(a)) for a in (values, scales))
        return torch.linalg.vector_norm(values.float(), dim=-1).mul_(scales.float()).numpy()


class PQCodec(Codec):
    """Per-image mean + PCA, random rotation and product quantiser (faiss ``PCAR<d>,PQ<m>``) of
    the regions' differences from it. Encodes images ``(..., regions, dim)``; trained before use.
    """

    precision, value_dtype, side, needs_training = "pq", np.uint8, "mean", True

    def __init__(self, dim: int, index: faiss.Index | None = None):
        super().__init__(dim)
        self.index = None
        if index is not None:
            self._use(index)

    def _use(self, index: faiss.IndexPreTransform) -> None:
        """Keep the trained index, and its PCA as a matrix: the PCA maps x to ``A x + b`` with
        orthonormal rows, so ``x ≈ (y - b) A``: coordinates ``y - b`` in the basis ``A``."""
        self.index = index
        pca = faiss.downcast_VectorTransform(index.chain.at(0))
        matrix = faiss.vector_to_array(pca.A).reshape(pca.d_out, pca.d_in)
        self.matrix = torch.from_numpy(matrix.astype(np.float32))
        pq = faiss.downcast_index(index.index).pq
        centroids = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
        self.codebook = Codebook.of(torch.from_numpy(centroids))
        self.bias = torch.from_numpy(faiss.vector_to_array(pca.b).astype(np.float32))

    @property
    def value_width(self) -> int:
        return PQ_BYTES

    def side_shape(self, leading: tuple[int, ...]) -> tuple[int, ...]:
        return (*leading[:-1], self.dim)

    @property
    def trained(self) -> bool:
        return self.index is not None

    @staticmethod
    def _mean(x: torch.Tensor) -> torch.Tensor:
        """Each image's mean region ``(..., dim)`` as stored (fp16)."""
        return x.float().mean(dim=-2).half()

    def training_vectors(self, x: torch.Tensor) -> np.ndarray:
        """What the codebooks model: the regions' differences from their image's stored mean."""
        residuals = x.float() - self._mean(x).float().unsqueeze(-2)
        return residuals.reshape(-1, self.dim).numpy()

    def train(self, sample: np.ndarray) -> None:
        """Fit the rotation and codebooks on ``sample`` ``(n, dim)`` (:meth:`training_vectors`).
        k-means needs at least as many points as centroids: a smaller sample is repeated, so its
        points become centroids (a tiny segment is then stored almost exactly); an empty one
        trains on a zero vector."""
        sample = np.asarray(sample, dtype=np.float32).reshape(-1, self.dim)
        if len(sample) == 0:
            sample = np.zeros((1, self.dim), dtype=np.float32)
        if len(sample) < PQ_CENTROIDS:
            sample = np.resize(sample, (PQ_CENTROIDS, self.dim))
        # "np": no polysemous code reordering, which only serves Hamming pre-filters.
        spec = f"PCAR{min(self.dim, PQ_DIMS)},PQ{PQ_BYTES}np"
        index = faiss.index_factory(self.dim, spec)
        quantizer = faiss.downcast_index(index.index)
        quantizer.pq.cp.seed = PQ_SEED
        index.train(np.ascontiguousarray(sample))
        self._use(index)

    def encode(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = x.detach().float().cpu()
        mean = self._mean(x)
        residuals = np.ascontiguousarray((x - mean.float().unsqueeze(-2)).numpy())
        codes = self.index.sa_encode(residuals.reshape(-1, self.dim))
        return codes.reshape(*x.shape[:-1], PQ_BYTES), mean.numpy()

    def decode(self, values: np.ndarray, side: np.ndarray) -> torch.Tensor:
        coordinates, basis = self.coordinates(values, side)
        return basis.expand(coordinates)

    def for_scoring(self, values: np.ndarray, side: np.ndarray) -> Scorable:
        """The codes as they are (:class:`~hat.coded_regions.CodedRegions`), in the basis of
        :meth:`coordinates`."""
        regions, basis = self.coded(values, side)
        return regions, None, basis

    def coordinates(self, values: np.ndarray, side: np.ndarray) -> tuple[torch.Tensor, Basis]:
        """Coordinates ``(..., regions, d + 1)``: the decoded difference plus the mean's part in
        the PCA, then the length of the mean's remaining part, along a row of the image's own.
        A PCA that keeps every dimension leaves no remaining part: ``d`` coordinates, no own row.
        """
        regions, basis = self.coded(values, side)
        return regions.decoded()[0], basis

    def coded(self, values: np.ndarray, side: np.ndarray) -> tuple[CodedRegions, Basis]:
        """Codes of images ``(I, regions, PQ_BYTES)`` and means ``(I, dim)`` as the regions
        they stand for, not decoded, in the basis of :meth:`coordinates`."""
        kept = self.matrix.shape[0]
        mean = torch.from_numpy(np.ascontiguousarray(side)).float()
        inside = mean @ self.matrix.T
        length, own = None, None
        if kept < self.dim:
            outside = mean - inside @ self.matrix
            outside -= (outside @ self.matrix.T) @ self.matrix  # again: orthogonal to rounding
            length = torch.linalg.vector_norm(outside, dim=-1, keepdim=True)
            own = (outside / length.clamp(min=torch.finfo(torch.float32).tiny)).unsqueeze(-2)
            length = length[..., 0]
        codes = torch.from_numpy(np.ascontiguousarray(values, dtype=np.uint8))
        return CodedRegions(codes, self.codebook, inside - self.bias, length), Basis(
            self.matrix, own
        )

    def to_array(self) -> np.ndarray:
        return faiss.serialize_index(self.index)

    @classmethod
    def from_array(cls, dim: int, data: np.ndarray) -> PQCodec:
        index = faiss.deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))
        if not isinstance(index, faiss.IndexPreTransform):
            raise ValueError(f"codec is a {type(index).__name__}, not PCA + PQ")
        if index.d != dim or index.sa_code_size() != PQ_BYTES:
            raise ValueError(f"codec is {index.d}-d, {index.sa_code_size()} bytes per vector")
        return cls(dim, index)


def kind_precision(precision: str, kind: str) -> str:
    """The precision ``kind`` ("image" or "text") is stored at in a gallery of ``precision``."""
    return "int8" if precision == "pq" and kind == "text" else precision


def new_codec(precision: str, dim: int) -> Codec:
    """An empty codec of ``precision`` (``pq`` must be trained before it encodes)."""
    if precision in FLOATS:
        return FloatCodec(dim, precision)
    if precision == "int8":
        return Int8Codec(dim)
    if precision == "pq":
        if dim % PQ_BYTES:
            raise ValueError(f"pq needs a feature width divisible by {PQ_BYTES}, not {dim}")
        return PQCodec(dim)
    raise ValueError(f"precision must be one of {list(PRECISIONS)}, not {precision!r}")


def training_sample(vectors: np.ndarray, limit: int = PQ_TRAINING_VECTORS) -> np.ndarray:
    """At most ``limit`` of ``vectors`` ``(n, dim)``, evenly spaced (deterministic)."""
    if len(vectors) <= limit:
        return vectors
    return vectors[np.linspace(0, len(vectors) - 1, limit).astype(np.int64)]


def quantize(x: torch.Tensor, precision: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored values (and int8 scales) of ``x`` at a precision that needs no training."""
    return new_codec(precision, x.shape[-1]).encode(x)


def dequantize(values: np.ndarray, scales: np.ndarray | None) -> torch.Tensor:
    """fp32 tensor of values stored by :func:`quantize`."""
    if scales is not None:
        return Int8Codec(values.shape[-1]).decode(values, scales)
    return FloatCodec(values.shape[-1], "fp32").decode(values, None)
