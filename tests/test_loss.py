import pytest
import torch

from hat.loss import first_stage_distillation_loss, hardest_negative_triplet_loss


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


def test_distillation_hand_computed_on_one_row_and_one_column():
    # 1 × 2 matrix: the row is one ranking of two captions; each column holds a single image,
    # so its softmax is certain on both sides and contributes nothing.
    teacher = torch.tensor([[0.3, 0.1]])
    student = torch.tensor([[2.0, 1.0]])
    spread = 0.1  # the population standard deviation of the row
    p = torch.softmax(teacher[0] * 3.0 / spread, dim=0)
    q = torch.softmax(student[0], dim=0)
    expected = (p * (p.log() - q.log())).sum() / 2
    got = first_stage_distillation_loss(student, teacher, sharpness=3.0)
    torch.testing.assert_close(got, expected)


def test_distillation_ignores_the_scale_and_offset_of_teacher_scores():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    loss = first_stage_distillation_loss(student, teacher)
    torch.testing.assert_close(first_stage_distillation_loss(student, 0.01 * teacher + 4), loss)


def test_distillation_teaches_the_teachers_ranking_without_touching_the_teacher():
    # circulant: every row and column is a rotation of one ranking, so both directions agree
    values = 0.02 * torch.randn(6, generator=torch.Generator().manual_seed(1))
    shift = (torch.arange(6)[None, :] - torch.arange(6)[:, None]) % 6
    teacher = values[shift].requires_grad_()
    student = torch.zeros(6, 6, requires_grad=True)
    optimizer = torch.optim.Adam([student], lr=0.1)
    for _ in range(300):
        loss = first_stage_distillation_loss(student, teacher)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert teacher.grad is None
    assert torch.equal(student.argsort(dim=1), teacher.argsort(dim=1))
    assert torch.equal(student.argsort(dim=0), teacher.argsort(dim=0))


def test_distillation_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one 2-d shape"):
        first_stage_distillation_loss(torch.zeros(2, 3), torch.zeros(3, 2))
