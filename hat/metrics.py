"""Retrieval metrics from a full image × caption similarity matrix (pure NumPy)."""

from __future__ import annotations

import numpy as np

RECALL_AT = (1, 5, 10)


def _recalls(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    """R@K in percent plus median and mean rank (1-based) of the first correct item."""
    out = {f"{prefix}_r{k}": float(100.0 * np.mean(ranks < k)) for k in RECALL_AT}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)) + 1)
    out[f"{prefix}_meanr"] = float(np.mean(ranks) + 1)
    return out


def image_to_text_ranks(sims: np.ndarray, caption_to_image: np.ndarray) -> np.ndarray:
    """0-based rank of the best-ranked correct caption of every image (any caption counts)."""
    order = np.argsort(-sims, axis=1, kind="stable")
    correct = caption_to_image[order] == np.arange(sims.shape[0])[:, None]
    if not correct.any(axis=1).all():
        raise ValueError("every image needs at least one caption")
    return correct.argmax(axis=1)


def text_to_image_ranks(sims: np.ndarray, caption_to_image: np.ndarray) -> np.ndarray:
    """0-based rank of the correct image for every caption."""
    order = np.argsort(-sims.T, axis=1, kind="stable")
    return (order == caption_to_image[:, None]).argmax(axis=1)


def retrieval_metrics(
    sims: np.ndarray, caption_to_image: np.ndarray, queries: np.ndarray | None = None
) -> dict[str, float]:
    """R@1/5/10 both directions, RSUM, median and mean rank.

    ``sims`` is ``(num_images, num_captions)``; ``caption_to_image[j]`` is caption j's image index.
    ``queries`` (a boolean mask over images) keeps only the queries that concern those images:
    they as image queries, their captions as text queries. The searched gallery stays whole, so
    the figures of a subset (e.g. held-out concepts) are comparable with the whole set's.
    """
    sims = np.asarray(sims, dtype=np.float64)
    caption_to_image = np.asarray(caption_to_image, dtype=np.int64)
    if sims.shape != (sims.shape[0], caption_to_image.shape[0]):
        raise ValueError(f"sims {sims.shape} do not match {caption_to_image.shape[0]} captions")
    i2t = image_to_text_ranks(sims, caption_to_image)
    t2i = text_to_image_ranks(sims, caption_to_image)
    if queries is not None:
        queries = np.asarray(queries, dtype=bool)
        if not queries.any():
            raise ValueError("the query subset is empty")
        i2t, t2i = i2t[queries], t2i[queries[caption_to_image]]
    out = _recalls(i2t, "i2t")
    out.update(_recalls(t2i, "t2i"))
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_AT)
    return out


def fold_metrics(
    sims: np.ndarray, caption_to_image: np.ndarray, num_folds: int
) -> dict[str, float]:
    """Average of :func:`retrieval_metrics` over contiguous image folds (MSCOCO 1K: 5 folds of 5K).

    Each fold keeps its images and their captions only, as in the standard COCO 1K protocol.
    """
    num_images = sims.shape[0]
    if num_folds < 1 or num_images % num_folds:
        raise ValueError(f"{num_images} images do not split into {num_folds} equal folds")
    size = num_images // num_folds
    folds = []
    for f in range(num_folds):
        caps = np.flatnonzero((caption_to_image >= f * size) & (caption_to_image < (f + 1) * size))
        block = sims[f * size : (f + 1) * size][:, caps]
        folds.append(retrieval_metrics(block, caption_to_image[caps] - f * size))
    return {key: float(np.mean([m[key] for m in folds])) for key in folds[0]}


def candidate_recall(
    exact: np.ndarray, first_stage: np.ndarray, ks: tuple[int, ...] = (50, 100), top: int = 10
) -> dict[str, float]:
    """Mean fraction of each query's exact top-``top`` found in its first-stage top-K.

    Rows are queries and columns the searched items, in both matrices. When it is 1, re-ranking
    K first-stage candidates with the exact score returns exactly the exact top-``top``.
    """
    truth = np.argsort(-exact, axis=1, kind="stable")[:, :top]
    order = np.argsort(-first_stage, axis=1, kind="stable")
    out = {}
    for k in ks:
        if k > exact.shape[1]:
            continue
        found = (order[:, :k, None] == truth[:, None, :]).any(axis=1)
        out[f"K={k}"] = float(found.mean())
    return out


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A fixed-width table: one row per named result; other entries as ``name: key value``."""
    cols = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_AT] + ["rsum"]
    head = f"{'':<16}" + "".join(f"{c:>9}" for c in cols)
    rows, extra = [], []
    for name, m in results.items():
        if all(c in m for c in cols):
            rows.append(f"{name:<16}" + "".join(f"{m[c]:>9.2f}" for c in cols))
        else:
            extra.append(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
    return "\n".join([head, *rows, *extra])
