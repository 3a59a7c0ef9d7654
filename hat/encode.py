"""Stored per-level features: joining caption batches, full-matrix scoring, first-stage products."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hat.model import HATModel, ImageFeatures, TextFeatures


def concat_text_features(parts: Sequence[TextFeatures]) -> TextFeatures:
    """Concatenate caption batches, right-padding to the longest (padding never affects scores)."""
    width = max(p.mask.shape[1] for p in parts)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return (
            F.pad(x, (0, 0, 0, width - x.shape[1]))
            if x.ndim == 3
            else F.pad(x, (0, width - x.shape[1]))
        )

    levels = [torch.cat([pad(p.levels[i]) for p in parts]) for i in range(len(parts[0].levels))]
    return TextFeatures(levels, torch.cat([pad(p.mask) for p in parts]))


@torch.inference_mode()
def score_matrix(
    model: HATModel,
    images: ImageFeatures,
    texts: TextFeatures,
    image_block: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Exact per-level scores ``(num_levels, num_images, num_texts)`` for stored features.

    Features stay on the CPU and move to the model's device one block of images at a time.
    """
    device = model.device
    texts_on_device = texts.to(device)
    rows = []
    for start in tqdm(range(0, len(images), image_block), desc="scoring", disable=not progress):
        block = images[start : start + image_block].to(device)
        rows.append(model.level_scores(block, texts_on_device).float().cpu())
    return torch.cat(rows, dim=1)


@torch.inference_mode()
def first_stage_matrix(
    model: HATModel, images: ImageFeatures, texts: TextFeatures, block: int = 256
) -> torch.Tensor:
    """Inner products ``(num_images, num_texts)`` of the first-stage vectors of stored features."""
    device = model.device

    def vectors(embed, features) -> torch.Tensor:
        parts = [
            embed(features[s : s + block].to(device)).float().cpu()
            for s in range(0, len(features), block)
        ]
        return torch.cat(parts)

    return vectors(model.image_embedding, images) @ vectors(model.text_embedding, texts).T
