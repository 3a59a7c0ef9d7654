"""Hinge triplet loss with the hardest negative in the batch (VSE++ max-violation)."""

from __future__ import annotations

import torch


def hardest_negative_triplet_loss(scores: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Sum over the batch of the largest hinge violation in both retrieval directions.

    ``scores[i, j]`` scores image i against caption j and the diagonal holds the positive pairs.
    As in the reference code, every off-diagonal entry is a negative, including another caption of
    the same image when one image appears twice in a batch.
    """
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"expected a square score matrix, got shape {tuple(scores.shape)}")
    positives = scores.diagonal()
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    # caption retrieval: each image against every other caption (rows)
    cost_caption = (margin + scores - positives[:, None]).clamp(min=0).masked_fill(eye, 0)
    # image retrieval: each caption against every other image (columns)
    cost_image = (margin + scores - positives[None, :]).clamp(min=0).masked_fill(eye, 0)
    return cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
