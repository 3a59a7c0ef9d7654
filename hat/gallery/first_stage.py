"""First stage of a search: one pooled vector per image and per caption, in a faiss index.

The final ranking is always the HAT score; this stage only has to keep the exact top results
among its K candidates (benchmarks/retrieval_quality.py measures how often it does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from hat.pooling import pool_words

# First-stage embedding: bump the name when its definition changes (it is part of the cache key).
EMBEDDING = "unit-mean-regions-mean-words-v2"
# Up to this many vectors a first-stage index is exact (IndexFlatIP): a scan of 768-d vectors
# takes ~23 ms per 100k on one core (~42 ms at 200k). HNSW (M=32) answers in a few ms but, on
# unstructured 768-d vectors, found only 64 % of the exact top-100 at 20k with efSearch 200 and
# 82 % at 100k with efSearch 800, after a 3-minute build (benchmarks/query_latency.py).
FLAT_INDEX_MAX = 200_000
HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 80


def image_embedding(levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """First-stage vector of images ``(N, levels * D)``: per level, the unit-length mean of the
    regions' unit vectors; levels concatenated and scaled so the vector has unit length.

    Its inner product with :func:`text_embedding` is the mean over levels of one cosine per
    level, mirroring the HAT score (mean over regions of a cosine, summed over levels).
    Averaging unit region vectors, as that per-region cosine weighs every region alike, kept
    more of the exact top-10 than a plain mean (K=100 on the demo's val split: text → image
    0.992 vs 0.966, image → text 0.896 vs 0.813). Replace this pair of functions by a trained
    global head to raise recall further; the final ranking is always the HAT score.
    """
    pooled = [F.normalize(F.normalize(x.float(), dim=-1).mean(dim=1), dim=-1) for x in levels]
    return torch.cat(pooled, dim=1) / math.sqrt(len(levels))


def text_embedding(levels: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """First-stage vector of captions ``(N, levels * D)``, the counterpart of image_embedding."""
    return torch.cat([pool_words(x, mask) for x in levels], dim=1) / math.sqrt(len(levels))


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
