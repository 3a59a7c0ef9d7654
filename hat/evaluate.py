"""Evaluate a HAT checkpoint: exact full-matrix scoring, R@1/5/10 both ways, RSUM, ranks, and
how much of the exact top-10 a search's first stage keeps among its K candidates.

hat eval --checkpoint runs/x/best --data dataset_flickr30k.json --image-root flickr30k-images
hat eval ... --data dataset_coco.json --split test --folds 5      # MSCOCO 5K and 1K (5 folds)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hat.data.captions import CaptionedImages
from hat.encode import first_stage_matrix, score_matrix
from hat.encoder import Encoder
from hat.metrics import candidate_recall, fold_metrics, retrieval_metrics
from hat.model import HATModel, ImageFeatures, TextFeatures

FIRST_STAGE_RECALL = "first-stage recall of top-10"


@dataclass
class Evaluation:
    """What :func:`evaluate` measures, by kind; :meth:`table` lays it out as reports store it."""

    name: str
    """The headline's row name, ``all <images>``."""
    headline: dict[str, float]
    """The whole split, all levels summed: what model selection and summaries read."""
    folds: dict[str, dict[str, float]] = field(default_factory=dict)
    """``<k>-fold <images>``: the average over image folds (empty with one fold)."""
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    """``<group> (<images>)``: the queries of each group, searched against the whole split."""
    levels: dict[str, dict[str, float]] = field(default_factory=dict)
    """``level <i> (<name>)``: each level alone (empty for a one-level model)."""
    first_stage_recall: dict[str, float] = field(default_factory=dict)
    """Share of the exact top-10 among the first stage's K candidates, ``t2i_K=..``/``i2t_K=..``."""

    def table(self) -> dict[str, dict[str, float]]:
        """Every result by row name, the headline first (``hat eval --out``, the demo reports)."""
        return {
            self.name: self.headline,
            **self.folds,
            **self.groups,
            **self.levels,
            FIRST_STAGE_RECALL: self.first_stage_recall,
        }


def evaluate(
    encoder: Encoder,
    data: CaptionedImages,
    folds: int = 1,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = False,
    groups: dict[str, np.ndarray] | None = None,
) -> Evaluation:
    """Metrics of the whole split, of each level alone and, with ``folds > 1``, the fold average;
    ``groups`` as in :func:`evaluate_features`."""
    images = encoder.encode_images(data.image_paths, batch_size, num_workers, progress=progress)
    texts = encoder.encode_captions(data.captions, progress=progress)
    return evaluate_features(
        encoder.model, images, texts, data.caption_to_image, folds, progress, groups
    )


def evaluate_features(
    model: HATModel,
    images: ImageFeatures,
    texts: TextFeatures,
    caption_to_image: np.ndarray,
    folds: int = 1,
    progress: bool = False,
    groups: dict[str, np.ndarray] | None = None,
) -> Evaluation:
    """:func:`evaluate` on already encoded features; ``groups``: name -> image mask, whose
    images' queries are also reported alone (searched against the whole split)."""
    per_level = score_matrix(model, images, texts, progress=progress).numpy()
    sims = per_level.sum(axis=0)
    n = images.levels[0].shape[0]
    result = Evaluation(f"all {n}", retrieval_metrics(sims, caption_to_image))
    if folds > 1:
        result.folds[f"{folds}-fold {n // folds}"] = fold_metrics(sims, caption_to_image, folds)
    for name, mask in (groups or {}).items():
        metrics = retrieval_metrics(sims, caption_to_image, mask)
        result.groups[f"{name} ({int(np.sum(mask))})"] = metrics
    if len(per_level) > 1:
        for i, name in enumerate(model.config.level_names):
            metrics = retrieval_metrics(per_level[i], caption_to_image)
            result.levels[f"level {i + 1} ({name})"] = metrics
    first = first_stage_matrix(model, images, texts).numpy()
    recall = {f"t2i_{k}": v for k, v in candidate_recall(sims.T, first.T).items()}
    recall.update({f"i2t_{k}": v for k, v in candidate_recall(sims, first).items()})
    result.first_stage_recall = recall
    return result
