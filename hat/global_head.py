"""One vector per image or caption for the first stage of a search.

HAT scores a pair by cross-attention, so no dot-product index can hold the score itself. The
first stage of a search therefore ranks by the inner product of one unit vector per side and
keeps K candidates for exact HAT re-ranking; these vectors only have to agree with HAT on what
the top results are. Two embeddings exist:

- :class:`GlobalHead`, trained to rank like the HAT score by distillation from it
  (:func:`hat.loss.first_stage_distillation_loss`), for models with ``global_dim > 0``;
- the parameter-free pooled embedding, for models without a head (e.g. converted official
  checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hat.pooling import pool_words

# Attention logits are cosines times this: a query of norm ~1 then spans a useful softmax range.
ATTENTION_SCALE = 10.0


class GlobalHead(nn.Module):
    """Attention pooling of each level's unit features, levels concatenated, one linear map.

    Per level a learned query weighs the regions (or real words), so the pooled vector can dwell
    on what HAT's cross-attention finds relevant instead of counting every region alike. With the
    queries at zero and the map at identity (``dim == num_levels * width``, the initialisation)
    the image side equals :func:`pooled_image_embedding`, so training starts from the
    parameter-free embedding.
    """

    def __init__(self, num_levels: int, width: int, dim: int):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(num_levels, width))
        self.proj = nn.Linear(num_levels * width, dim)
        if dim == num_levels * width:
            nn.init.eye_(self.proj.weight)
        else:
            nn.init.orthogonal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(
        self, levels: Sequence[torch.Tensor], mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Unit vectors ``(N, dim)`` from ``(N, K, width)`` features per level (``mask``: real
        words of captions, ``(N, K)``)."""
        pooled = []
        for query, x in zip(self.queries, levels, strict=True):
            units = F.normalize(x.to(query.dtype), dim=-1)
            logits = units @ (ATTENTION_SCALE * query)
            if mask is not None:
                logits = logits.masked_fill(~mask.bool(), float("-inf"))
            weights = logits.softmax(dim=1).unsqueeze(-1)
            pooled.append(F.normalize((weights * units).sum(dim=1), dim=-1))
        joined = torch.cat(pooled, dim=1) / math.sqrt(len(pooled))
        return F.normalize(self.proj(joined), dim=-1)


def pooled_image_embedding(levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Parameter-free image vector ``(N, levels * D)``: per level the unit-length mean of the
    regions' unit vectors; levels concatenated and scaled to unit length.

    Its inner product with :func:`pooled_text_embedding` is the mean over levels of one cosine per
    level, mirroring the HAT score (mean over regions of a cosine, summed over levels).
    The region vectors are made unit length before averaging because that per-region cosine
    weighs every region alike: a plain mean would let the regions of largest norm dominate.
    """
    pooled = [F.normalize(F.normalize(x.float(), dim=-1).mean(dim=1), dim=-1) for x in levels]
    return torch.cat(pooled, dim=1) / math.sqrt(len(levels))


def pooled_text_embedding(levels: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Parameter-free caption vector, the counterpart of :func:`pooled_image_embedding`."""
    return torch.cat([pool_words(x, mask) for x in levels], dim=1) / math.sqrt(len(levels))
