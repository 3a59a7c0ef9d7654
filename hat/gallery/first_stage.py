"""First stage of a search: the model's global vector per image and per caption
(``HATModel.image_embedding`` / ``text_embedding``), in a faiss index.

The final ranking is always the HAT score; this stage only has to keep the exact top results
among its K candidates (benchmarks/retrieval_quality.py measures how often it does). Up to
``FLAT_INDEX_MAX`` vectors the index is an exact scan, whose cost grows with the gallery; above,
an inverted-file index (IVF) scans only the ``IVF_PROBES`` lists nearest the query. IVF was
chosen over HNSW because building it is one k-means on a sample and one pass that files every
vector in a list, where HNSW links every vector into a graph one search at a time, and because
a small fixed number of probes keeps close to the exact scan's recall
(benchmarks/million_gallery.py measures both against the exact top-100). Segments store the
vectors in fp16, and an IVF index keeps them as fp16 codes (not by residual: the same numbers),
so a million-image gallery holds each vector twice in 4 KiB, not 8 (it has 32 KiB per image).
"""

from __future__ import annotations

import math

import faiss
import numpy as np

# First-stage embedding: bump the name when its definition changes (it is part of the cache key).
EMBEDDING = "model-global-head-v3"
FLAT_INDEX_MAX = 200_000
# Lists and probes, chosen at a million images (session 12, 100 caption queries, the exact
# top-100, one thread): 4 √n lists with 128 probed keep 0.996 of it in 8.7 ms, where √n lists
# with 64 probed kept 0.993 in 14.8 ms (finer lists: fewer vectors scanned for the same recall).
IVF_LISTS_PER_ROOT = 4
IVF_PROBES = 128
IVF_TRAINING_PER_LIST = 64  # k-means sample per list: enough for stable centroids, fast to fit
IVF_SEED = 1234


def ivf_lists(count: int) -> int:
    """Inverted lists for ``count`` vectors: ~4 sqrt(n), so a probe scans ~sqrt(n) / 4."""
    return max(1, int(IVF_LISTS_PER_ROOT * math.sqrt(count)))


def build_index(vectors: np.ndarray, flat_max: int = FLAT_INDEX_MAX) -> faiss.Index:
    """Inner-product index: exact up to ``flat_max`` vectors, IVF (fp16 codes) above."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    if len(vectors) <= flat_max:
        index = faiss.IndexFlatIP(dim)
    else:
        lists = ivf_lists(len(vectors))
        index = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(dim),
            dim,
            lists,
            faiss.ScalarQuantizer.QT_fp16,
            faiss.METRIC_INNER_PRODUCT,
            False,  # codes are the vectors themselves, not their offsets from a list's centre
        )
        index.cp.seed = IVF_SEED
        step = max(1, len(vectors) // (lists * IVF_TRAINING_PER_LIST))
        index.train(vectors[::step])
    index.add(vectors)
    return index


def search_index(index: faiss.Index, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids ``(Q, k')`` of the best inner products, k' = min(k, size) (-1 where an IVF probe
    found fewer)."""
    k = min(k, index.ntotal)
    if k == 0:
        return np.empty((len(queries), 0), dtype=np.int64)
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(IVF_PROBES, index.nlist)
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return ids
