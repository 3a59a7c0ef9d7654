"""Evaluate a HAT checkpoint: exact full-matrix scoring, R@1/5/10 both ways, RSUM, ranks, and
how much of the exact top-10 a search's first stage keeps among its K candidates.

hat eval --checkpoint runs/x/best --data dataset_flickr30k.json --image-root flickr30k-images
hat eval ... --data dataset_coco.json --split test --folds 5      # MSCOCO 5K and 1K (5 folds)
"""

from __future__ import annotations

import numpy as np
import torch

from hat.data.captions import CaptionedImages
from hat.encode import encode_captions, encode_images, first_stage_matrix, score_matrix
from hat.metrics import candidate_recall, fold_metrics, retrieval_metrics
from hat.model import HATModel, ImageFeatures, TextFeatures

FIRST_STAGE_RECALL = "first-stage recall of top-10"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate(
    model: HATModel,
    tokenizer,
    data: CaptionedImages,
    folds: int = 1,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = False,
    groups: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of the whole split, of each level alone and, with ``folds > 1``, the fold average;
    ``groups`` as in :func:`evaluate_features`."""
    images, _ = encode_images(
        model, data.image_paths, batch_size, num_workers, skip_bad=False, progress=progress
    )
    texts = encode_captions(model, tokenizer, data.captions, progress=progress)
    return evaluate_features(model, images, texts, data.caption_to_image, folds, progress, groups)


def evaluate_features(
    model: HATModel,
    images: ImageFeatures,
    texts: TextFeatures,
    caption_to_image: np.ndarray,
    folds: int = 1,
    progress: bool = False,
    groups: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """:func:`evaluate` on already encoded features (whole split first, then folds, then query
    ``groups`` (name -> image mask, searched against the whole split), then levels, then the
    first stage's candidate recall of the exact top-10 in both directions)."""
    per_level = score_matrix(model, images, texts, progress=progress).numpy()
    sims = per_level.sum(axis=0)
    n = images.levels[0].shape[0]
    results = {f"all {n}": retrieval_metrics(sims, caption_to_image)}
    if folds > 1:
        results[f"{folds}-fold {n // folds}"] = fold_metrics(sims, caption_to_image, folds)
    for name, mask in (groups or {}).items():
        results[f"{name} ({int(np.sum(mask))})"] = retrieval_metrics(sims, caption_to_image, mask)
    if len(per_level) > 1:
        for i, name in enumerate(model.config.level_names):
            results[f"level {i} ({name})"] = retrieval_metrics(per_level[i], caption_to_image)
    first = first_stage_matrix(model, images, texts).numpy()
    recall = {f"t2i_{k}": v for k, v in candidate_recall(sims.T, first.T).items()}
    recall.update({f"i2t_{k}": v for k, v in candidate_recall(sims, first).items()})
    results[FIRST_STAGE_RECALL] = recall
    return results
