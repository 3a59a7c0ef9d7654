"""Training losses: the hinge triplet loss with the hardest negative in the batch (VSE++
max-violation) for HAT, and distillation from HAT for the first-stage global head."""

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


def first_stage_distillation_loss(
    student_logits: torch.Tensor, teacher_scores: torch.Tensor, sharpness: float = 3.0
) -> torch.Tensor:
    """Teach a dot-product first stage to rank like HAT: KL(teacher ‖ student), both directions.

    ``student_logits[i, j]`` is the scaled inner product of image i's and caption j's global
    vectors, ``teacher_scores`` the HAT scores of the same pairs (no gradient flows into them).
    Every row (captions for an image) and every column (images for a caption) is a ranking
    problem; the teacher's distribution is a softmax over its scores divided by their standard
    deviation along that row or column, times ``sharpness``. Dividing by the spread makes the
    target independent of the scale of HAT scores, which differs between models (the demo's
    scores vary by ~0.02 across a gallery) while ``sharpness`` sets how much the top of each
    ranking dominates.
    """
    if student_logits.shape != teacher_scores.shape or student_logits.ndim != 2:
        raise ValueError(
            f"expected two score matrices of one 2-d shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_scores.shape)}"
        )
    teacher = teacher_scores.detach().float()
    student = student_logits.float()
    total = student.new_zeros(())
    for dim in (1, 0):
        spread = teacher.std(dim=dim, correction=0, keepdim=True).clamp(min=1e-8)
        target = (teacher * (sharpness / spread)).log_softmax(dim=dim)
        log_student = student.log_softmax(dim=dim)
        total = total + (target.exp() * (target - log_student)).sum(dim=dim).mean()
    return total / 2


def training_loss(
    hat_scores: torch.Tensor,
    first_stage_logits: torch.Tensor | None,
    margin: float,
    sharpness: float,
) -> torch.Tensor:
    """HAT's hinge loss, plus the global head's distillation loss when the model has one."""
    loss = hardest_negative_triplet_loss(hat_scores.float(), margin)
    if first_stage_logits is not None:
        loss = loss + first_stage_distillation_loss(first_stage_logits, hat_scores, sharpness)
    return loss
