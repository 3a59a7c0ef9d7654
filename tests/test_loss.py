import pytest
import torch

from hat.loss import hardest_negative_triplet_loss


def test_hand_computed_value_uses_the_hardest_negative_in_both_directions():
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.1],
            [0.3, 0.5, 0.6],
            [0.2, 0.1, 0.7],
        ]
    )
    # caption retrieval (rows), worst negative per image:
    #   image0 0.8 -> 0.2+0.8-0.9 = 0.1; image1 0.6 -> 0.3; image2 0.2 -> 0
    # image retrieval (columns), worst negative per caption:
    #   caption0 0.3 -> 0.2+0.3-0.9 = 0; caption1 0.8 -> 0.5; caption2 0.6 -> 0.1
    expected = (0.1 + 0.3 + 0.0) + (0.0 + 0.5 + 0.1)
    loss = hardest_negative_triplet_loss(scores, margin=0.2)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_gradient_reaches_only_the_hardest_negatives_and_positives():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.3, 0.5, 0.6], [0.2, 0.1, 0.7]], requires_grad=True)
    hardest_negative_triplet_loss(scores, margin=0.2).backward()
    grad = scores.grad
    # non-hardest negatives get no gradient at all
    for i, j in [(0, 2), (2, 0), (2, 1)]:
        assert grad[i, j] == 0
    assert grad[0, 1] == 2  # hardest for image 0 (row) and for caption 1 (column)
    assert grad[1, 2] == 2  # hardest for image 1 and for caption 2
    assert grad[1, 1] == -2  # positive pushed up by both violated directions


def test_no_loss_when_every_positive_wins_by_the_margin():
    scores = torch.eye(4) + 0.1 * torch.rand(4, 4).clamp(max=0.5)
    scores.fill_diagonal_(2.0)
    assert hardest_negative_triplet_loss(scores).item() == 0


def test_rejects_non_square_scores():
    with pytest.raises(ValueError, match="square"):
        hardest_negative_triplet_loss(torch.zeros(2, 3))
