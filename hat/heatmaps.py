"""Per-level, per-word alignment maps of one image–caption pair, from the scoring itself.

No saliency method is involved: the maps are the cross-attention weights α that produced the pair's
HAT score, reshaped to each level's region grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hat.alignment import align_pair
from hat.model import HATModel, ImageFeatures, TextFeatures


@dataclass
class LevelMaps:
    """One level's alignment of one pair.

    ``word_maps[l]`` is word l's attention over the regions (grid ``(h, w)``), ``caption_map`` the
    whole caption's map: per-region cosine with its attended caption vector for image → text,
    mean word attention for text → image.
    """

    name: str
    score: float
    word_maps: np.ndarray
    caption_map: np.ndarray


@torch.inference_mode()
def alignment_maps(
    model: HATModel, image: ImageFeatures, text: TextFeatures, image_size: int | None = None
) -> list[LevelMaps]:
    """Maps of every level for the first image of ``image`` and first caption of ``text``."""
    cfg = model.config
    grids = model.image_tower.grid_sizes(image_size or cfg.image_size)
    length = int(text.mask[0].sum())
    out = []
    for regions, words, (h, w), name in zip(
        image.levels, text.levels, grids, cfg.level_names, strict=True
    ):
        detail = align_pair(
            regions[0], words[0, :length], cfg.lambda_softmax, cfg.direction, cfg.leaky_relu_slope
        )
        attention = detail.attention.float().cpu()  # (K, L)
        word_maps = attention.T.reshape(length, h, w).numpy()
        if cfg.direction == "i2t":
            caption_map = detail.local_scores.float().cpu().reshape(h, w).numpy()
        else:
            caption_map = word_maps.mean(axis=0)
        out.append(LevelMaps(name, float(detail.score), word_maps, caption_map))
    return out
