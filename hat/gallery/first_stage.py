"""First stage of a search: the model's global vector per image and per caption
(``HATModel.image_embedding`` / ``text_embedding``), in a faiss index.

The final ranking is always the HAT score; this stage only has to keep the exact top results
among its K candidates (benchmarks/retrieval_quality.py measures how often it does).
"""

from __future__ import annotations

import faiss
import numpy as np

# First-stage embedding: bump the name when its definition changes (it is part of the cache key).
EMBEDDING = "model-global-head-v3"
# Up to this many vectors a first-stage index is exact (IndexFlatIP): a scan of 768-d vectors
# takes ~23 ms per 100k on one core (~42 ms at 200k). HNSW (M=32) answers in a few ms but, on
# unstructured 768-d vectors, found only 64 % of the exact top-100 at 20k with efSearch 200 and
# 82 % at 100k with efSearch 800, after a 3-minute build (benchmarks/query_latency.py).
FLAT_INDEX_MAX = 200_000
HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 80


def build_index(vectors: np.ndarray, flat_max: int = FLAT_INDEX_MAX) -> faiss.Index:
    """Inner-product index: exact up to ``flat_max`` vectors, HNSW above."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    if len(vectors) <= flat_max:
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(vectors)
    return index


def search_index(index: faiss.Index, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids ``(Q, k')`` of the best inner products, k' = min(k, size); HNSW searches 8k wide."""
    k = min(k, index.ntotal)
    if k == 0:
        return np.empty((len(queries), 0), dtype=np.int64)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = max(8 * k, 256)
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return ids
