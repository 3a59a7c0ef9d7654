"""Training differentiates through the alignment: gradients must match the per-pair reference."""

import pytest
import torch

from hat.alignment import level_scores
from tests.test_alignment import random_batch, reference_pair_score


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_gradients_match_the_per_pair_reference(direction):
    images, texts, mask, lengths = random_batch(seed=8)
    images.requires_grad_(True)
    texts.requires_grad_(True)
    weights = torch.randn(images.shape[0], texts.shape[0], dtype=torch.float64)
    (level_scores(images, texts, mask, 9.0, direction) * weights).sum().backward()
    got = images.grad.clone(), texts.grad.clone()
    images.grad, texts.grad = None, None
    total = sum(
        weights[i, j] * reference_pair_score(images[i], texts[j, : lengths[j]], 9.0, direction)
        for i in range(images.shape[0])
        for j in range(texts.shape[0])
    )
    total.backward()
    torch.testing.assert_close(got[0], images.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1], texts.grad, atol=1e-6, rtol=0)
