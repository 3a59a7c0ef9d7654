"""Hierarchical alignment: SCAN-style cross-attention scores, vectorised over blocks of pairs.

For one level with regions v_k (k = 1..K) and words t_l (real tokens only):

    s_kl = v_k · t_l
    image → text (default, regions attend to words):
        s̄_kl = LeakyReLU(s_kl) / ‖LeakyReLU(s_·l)‖₂        (norm over regions)
        α_kl = softmax_l(λ s̄_kl);  a_k = Σ_l α_kl t_l;  S = mean_k cos(v_k, a_k)
    text → image (words attend to regions):
        s̄_kl = LeakyReLU(s_kl) / ‖LeakyReLU(s_k·)‖₂        (norm over real words)
        α_kl = softmax_k(λ s̄_kl);  a_l = Σ_k α_kl v_k;  S = mean_l cos(t_l, a_l)

The pair score is the sum of the level scores. All pairs of a block come from one matrix product;
for image → text the attended vector is never materialised: v_k · a_k = Σ_l α_kl s_kl and
‖a_k‖² = α_k G α_kᵀ with G the caption's word Gram matrix, which costs L² instead of D per region.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-8
DEFAULT_BLOCK_ELEMENTS = 1 << 24  # size of one (images, captions, regions, words) score block


@dataclass
class PairAlignment:
    """Everything the alignment of one image–caption pair at one level computed.

    ``attention[k, l]`` is α_kl: for i2t each region's distribution over words, for t2i each word's
    distribution over regions; column ``l`` is word l's map over the regions either way.
    ``local_scores`` holds the cosines averaged into ``score`` (per region for i2t, per word
    for t2i).
    """

    score: torch.Tensor
    attention: torch.Tensor
    local_scores: torch.Tensor


def _as_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _block_scores(
    regions: torch.Tensor,
    words: torch.Tensor,
    word_mask: torch.Tensor,
    lambda_softmax: float,
    direction: str,
    slope: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores ``(I, T)``, attention ``(I, T, K, L)`` and local cosines for a block of pairs."""
    n_img, n_reg, dim = regions.shape
    n_txt, n_words, _ = words.shape
    mask = word_mask.bool()[None, :, None, :]  # (1, T, 1, L)
    sims = (regions.reshape(-1, dim) @ words.reshape(-1, dim).T).view(n_img, n_reg, n_txt, n_words)
    sims = sims.permute(0, 2, 1, 3)  # (I, T, K, L)
    leaky = F.leaky_relu(sims, slope)
    if direction == "i2t":
        normed = leaky / (leaky.norm(dim=2, keepdim=True) + EPS)
        attn = torch.softmax((lambda_softmax * normed).masked_fill(~mask, float("-inf")), dim=3)
        dots = (attn * sims).sum(dim=3)  # v_k · a_k, (I, T, K)
        gram = words @ words.transpose(1, 2)  # (T, L, L)
        attended_sq = (torch.einsum("itkl,tlm->itkm", attn, gram) * attn).sum(dim=3)
        attended_norm = attended_sq.clamp(min=0).sqrt()
        query_norm = regions.norm(dim=2)[:, None, :]  # (I, 1, K)
        local = dots / (query_norm * attended_norm).clamp(min=EPS)
        return local.mean(dim=2), attn, local
    if direction == "t2i":
        leaky = leaky.masked_fill(~mask, 0.0)
        normed = leaky / (leaky.norm(dim=3, keepdim=True) + EPS)
        attn = torch.softmax(lambda_softmax * normed, dim=2)
        dots = (attn * sims).sum(dim=2)  # t_l · a_l, (I, T, L)
        attended = torch.einsum("itkl,ikd->itld", attn, regions)
        query_norm = words.norm(dim=2)[None, :, :]  # (1, T, L)
        local = dots / (query_norm * attended.norm(dim=3)).clamp(min=EPS)
        real = word_mask.to(local.dtype)[None]
        local = local * real
        return local.sum(dim=2) / real.sum(dim=2).clamp(min=1), attn, local
    raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")


def level_scores(
    regions: torch.Tensor,
    words: torch.Tensor,
    word_mask: torch.Tensor,
    lambda_softmax: float = 9.0,
    direction: str = "i2t",
    slope: float = 0.1,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Score every image against every caption at one level: ``(I, K, D) × (T, L, D) → (I, T)``.

    Pairs are processed in blocks of at most ``block_elements`` region–word similarities so that
    memory stays bounded for any gallery size.
    """
    regions, words = _as_compute_dtype(regions), _as_compute_dtype(words)
    n_img, n_reg, _ = regions.shape
    n_txt, n_words, _ = words.shape
    per_pair = max(n_reg * n_words, 1)
    txt_step = max(1, min(n_txt, block_elements // per_pair))
    img_step = max(1, block_elements // (per_pair * txt_step))
    rows = []
    for i in range(0, n_img, img_step):
        cols = [
            _block_scores(
                regions[i : i + img_step],
                words[t : t + txt_step],
                word_mask[t : t + txt_step],
                lambda_softmax,
                direction,
                slope,
            )[0]
            for t in range(0, n_txt, txt_step)
        ]
        rows.append(torch.cat(cols, dim=1))
    return torch.cat(rows, dim=0)


def hierarchical_scores(
    image_levels: list[torch.Tensor],
    text_levels: list[torch.Tensor],
    word_mask: torch.Tensor,
    lambda_softmax: float = 9.0,
    direction: str = "i2t",
    slope: float = 0.1,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Per-level scores ``(num_levels, I, T)``; the HAT pair score is their sum over levels."""
    if len(image_levels) != len(text_levels):
        raise ValueError(f"{len(image_levels)} image levels but {len(text_levels)} text levels")
    return torch.stack(
        [
            level_scores(v, t, word_mask, lambda_softmax, direction, slope, block_elements)
            for v, t in zip(image_levels, text_levels, strict=True)
        ]
    )


def align_pair(
    regions: torch.Tensor,
    words: torch.Tensor,
    lambda_softmax: float = 9.0,
    direction: str = "i2t",
    slope: float = 0.1,
) -> PairAlignment:
    """Alignment details of one pair at one level: ``(K, D)`` regions and ``(L, D)`` real words."""
    regions, words = _as_compute_dtype(regions), _as_compute_dtype(words)
    mask = torch.ones(1, words.shape[0], dtype=torch.bool, device=words.device)
    score, attn, local = _block_scores(
        regions[None], words[None], mask, lambda_softmax, direction, slope
    )
    return PairAlignment(score=score[0, 0], attention=attn[0, 0], local_scores=local[0, 0])
