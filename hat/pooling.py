"""Global pooled embeddings: the no-cross-attention baseline, and a cheap first-stage vector."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_regions(regions: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of the region features: ``(N, K, D) → (N, D)``."""
    return F.normalize(regions.float().mean(dim=1), dim=-1)


def pool_words(words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of the real word features: ``(N, L, D), (N, L) → (N, D)``."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    total = (words.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    return F.normalize(total, dim=-1)


def pooled_level_scores(
    image_levels: list[torch.Tensor], text_levels: list[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """Cosine of pooled features per level, ``(num_levels, I, T)``: no cross-attention at all."""
    return torch.stack(
        [
            pool_regions(v) @ pool_words(t, mask).T
            for v, t in zip(image_levels, text_levels, strict=True)
        ]
    )
