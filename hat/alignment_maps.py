"""Per-level, per-word alignment maps of one image–caption pair, from the scoring itself.

No saliency method is involved: the maps are the cross-attention weights α that produced the pair's
HAT score, reshaped to each level's region grid. α is one matrix per level, regions × words; which
of its axes sums to 1 depends on the model's direction (see :mod:`hat.alignment`):

* image → text (``i2t``, the shipped model): each region's softmax over the words. A word's map
  (a column of α) is the share of every region's attention that the word receives; a region's
  row is a distribution over the words.
* text → image (``t2i``): each word's softmax over the regions. A word's map is a distribution
  over the regions; a region's row is the share of every word's attention it receives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hat.alignment import align_pair
from hat.artifacts import outlier_tokens
from hat.model import HATModel, ImageFeatures, TextFeatures


@dataclass
class LevelMaps:
    """One level's alignment of one pair.

    ``word_maps[l]`` is column l of α on the region grid ``(h, w)``, so ``word_maps[:, r, c]`` is
    region (r, c)'s row; ``caption_map`` the whole caption's map: per-region cosine with its
    attended caption vector for image → text, mean word attention for text → image.
    ``outliers`` marks the high-norm regions (:func:`hat.artifacts.outlier_tokens`).
    """

    name: str
    score: float
    word_maps: np.ndarray
    caption_map: np.ndarray
    outliers: np.ndarray
    direction: str = "i2t"

    def region_words(self, row: int, col: int) -> np.ndarray:
        """Region (row, col)'s row of α: its weights over the words."""
        return self.word_maps[:, row, col]


@torch.inference_mode()
def alignment_maps(
    model: HATModel, image: ImageFeatures, text: TextFeatures, image_size: int | None = None
) -> list[LevelMaps]:
    """Maps of every level for the first image of ``image`` and first caption of ``text``."""
    cfg = model.config
    grids = model.grid_sizes(image_size or cfg.image_size)
    length = int(text.mask[0].sum())
    out = []
    levels = zip(
        image.levels,
        text.levels,
        grids,
        cfg.level_names,
        model.level_directions,
        model.image_level_weights(image[:1])[:, 0].tolist(),
        strict=True,
    )
    for regions, words, (h, w), name, direction, weight in levels:
        detail = align_pair(
            regions[0], words[0, :length], cfg.lambda_softmax, direction, cfg.leaky_relu_slope
        )
        attention = detail.attention.float().cpu()  # (K, L)
        word_maps = attention.T.reshape(length, h, w).numpy()
        if direction == "i2t":
            caption_map = detail.local_scores.float().cpu().reshape(h, w).numpy()
        else:
            caption_map = word_maps.mean(axis=0)
        norms = regions[0].float().norm(dim=-1).cpu().numpy()
        outliers = outlier_tokens(norms).reshape(h, w)
        out.append(
            LevelMaps(
                name, weight * float(detail.score), word_maps, caption_map, outliers, direction
            )
        )
    return out
