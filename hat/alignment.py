"""Hierarchical alignment: SCAN-style cross-attention scores, vectorised over blocks of pairs.

For one level with regions v_k (k = 1..K) and words t_l (real tokens only):

    s_kl = v_k · t_l
    image → text (default, regions attend to words):
        s̄_kl = LeakyReLU(s_kl) / ‖LeakyReLU(s_·l)‖₂        (norm over regions)
        α_kl = softmax_l(λ s̄_kl);  a_k = Σ_l α_kl t_l;  S = mean_k cos(v_k, a_k)
    text → image (words attend to regions):
        s̄_kl = LeakyReLU(s_kl) / ‖LeakyReLU(s_k·)‖₂        (norm over real words)
        α_kl = softmax_k(λ s̄_kl);  a_l = Σ_k α_kl v_k;  S = mean_l cos(t_l, a_l)

The pair score is the sum of the level scores. How it is computed fast:

* All pairs of a block come from one matrix product laid out ``(T, L, I, K)`` (captions, words,
  images, regions), so every later reduction runs over contiguous memory and no permute is needed.
* The softmax is never normalised: a cosine ignores the scale of a_k, so with e = exp(λ s̄) the
  partition function cancels. |λ s̄| ≤ λ, so exp cannot overflow and needs no max-subtraction;
  padded words get e = 0, exactly what a -inf logit gives.
* For image → text a_k is never materialised: v_k · a_k ∝ Σ_l e_kl s_kl and ‖a_k‖² ∝ e_k G e_kᵀ
  with G the caption's word Gram matrix, one small batched GEMM instead of K·D work per pair.
* Captions are sorted by length and each block is cut to its longest caption, so padding costs
  (almost) nothing.
* Regions stored as coordinates y in an orthonormal basis B (x = y B, a PCA-compressed gallery)
  are scored without expanding them: with the words projected into the basis (w B^T), every
  region–word dot, region norm and attended-vector norm is the same, and the words' Gram matrix
  and norms come from the full words. The score is exactly that of the expanded regions. B may
  end in rows of each image's own (:class:`Basis`); their few coordinates add one broadcast term
  to the similarities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-8
# Size of one (captions, words, images, regions) score block: a few such tensors stay in the
# last-level cache of a CPU, and it is large enough for an efficient GEMM.
DEFAULT_BLOCK_ELEMENTS = 1 << 21
# Captions per block: few enough that cutting a block to its longest caption removes most padding,
# and blocks then grow along the images, which keeps the GEMM wide.
CAPTION_BLOCK = 16


@dataclass
class Basis:
    """Orthonormal rows that a level's region coordinates ``(I, K, d + e)`` are taken in.

    The first d coordinates are along ``shared`` ``(d, D)``, rows common to every image (a
    compressed segment's PCA); the last e along ``own`` ``(I, e, D)``, rows of each image's own
    (the part of its stored mean region outside the PCA). Each image's d + e rows are orthonormal,
    so dot products and norms of coordinates are those of the features.
    """

    shared: torch.Tensor
    own: torch.Tensor | None = None

    def __getitem__(self, index) -> Basis:
        return Basis(self.shared, None if self.own is None else self.own[index])

    def to(self, device: torch.device | str) -> Basis:
        own = None if self.own is None else self.own.to(device)
        return Basis(self.shared.to(device), own)

    def expand(self, coordinates: torch.Tensor) -> torch.Tensor:
        """Features ``(I, K, D)`` of coordinates ``(I, K, d + e)``."""
        shared = self.shared.shape[0]
        features = coordinates[..., :shared] @ self.shared
        if self.own is not None:
            features += coordinates[..., shared:] @ self.own
        return features

    def project(self, words: torch.Tensor) -> torch.Tensor:
        """Words ``(T, L, D)`` along the shared rows, zero along the own ones: ``(T, L, d + e)``."""
        projected = words @ self.shared.T
        return projected if self.own is None else F.pad(projected, (0, self.own.shape[1]))


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


def _ops(inplace: bool) -> tuple[Callable, Callable]:
    """mul and exp, in place when nothing needs a gradient: fewer allocations and memory traffic."""
    if inplace:
        return torch.Tensor.mul_, torch.Tensor.exp_
    return torch.mul, torch.exp


def _exp_logits(
    sims: torch.Tensor,
    word_mask: torch.Tensor,
    lambda_softmax: float,
    direction: str,
    slope: float,
    inplace: bool,
) -> torch.Tensor:
    """Unnormalised attention e = exp(λ s̄) of ``(T, L, I, K)`` similarities; 0 on padded words."""
    mul, exp = _ops(inplace)
    leaky = F.leaky_relu(sims, slope)
    real = word_mask.to(sims.dtype)[:, :, None, None]  # (T, L, 1, 1)
    padded = not bool(word_mask.all())
    if direction == "i2t":
        norm = torch.linalg.vector_norm(leaky, dim=3, keepdim=True)  # over regions
        attn = exp(mul(leaky, lambda_softmax / (norm + EPS)))
        return mul(attn, real) if padded else attn
    if direction == "t2i":
        if padded:
            leaky = mul(leaky, real)
        norm = torch.linalg.vector_norm(leaky, dim=1, keepdim=True)  # over real words
        return exp(mul(leaky, lambda_softmax / (norm + EPS)))
    raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")


def _block_scores(
    regions: torch.Tensor,
    words: torch.Tensor,
    word_mask: torch.Tensor,
    lambda_softmax: float,
    direction: str,
    slope: float,
    projected_words: torch.Tensor | None = None,
    own_words: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores ``(I, T)``, unnormalised attention ``(T, L, I, K)`` and local cosines of a block.

    Local cosines are ``(T, I, K)`` for i2t and ``(T, L, I)`` for t2i. Regions given as
    coordinates in a :class:`Basis` take ``projected_words`` (``Basis.project``) and, where the
    basis has rows of each image's own, ``own_words`` ``(T, L, I, e)``: the words along them.
    """
    n_img, n_reg, dim = regions.shape
    n_txt, n_words, _ = words.shape
    inplace = not (torch.is_grad_enabled() and (regions.requires_grad or words.requires_grad))
    mul, _ = _ops(inplace)
    probe = words if projected_words is None else projected_words
    sims = (probe.reshape(-1, dim) @ regions.reshape(-1, dim).T).view(n_txt, n_words, n_img, n_reg)
    if own_words is not None:  # the own rows' term: word along row j times region coordinate j
        shared = dim - own_words.shape[3]
        for j in range(own_words.shape[3]):
            along, coordinate = own_words[..., j, None], regions[:, :, shared + j]
            sims = sims.addcmul_(along, coordinate) if inplace else sims.addcmul(along, coordinate)
    attn = _exp_logits(sims, word_mask, lambda_softmax, direction, slope, inplace)
    if direction == "i2t":
        gram = words @ words.transpose(1, 2)  # (T, L, L)
        weighted = torch.bmm(gram, attn.view(n_txt, n_words, -1)).view_as(attn)
        attended_sq = mul(weighted, attn).sum(dim=1)  # ‖a_k‖², (T, I, K)
        dots = mul(sims, attn).sum(dim=1)  # v_k · a_k
        query_norm = torch.linalg.vector_norm(regions, dim=2)  # (I, K)
        local = dots / (query_norm * attended_sq.clamp(min=0).sqrt()).clamp(min=EPS)
        return local.mean(dim=2).T, attn, local
    # t2i: words attend to regions; a_l is materialised per image (one batched GEMM).
    dots = mul(sims, attn).sum(dim=3)  # t_l · a_l, (T, L, I)
    per_image = attn.permute(2, 0, 1, 3).reshape(n_img, n_txt * n_words, n_reg)
    attended = torch.bmm(per_image, regions).view(n_img, n_txt, n_words, dim)
    attended_norm = torch.linalg.vector_norm(attended, dim=3).permute(1, 2, 0)  # (T, L, I)
    query_norm = torch.linalg.vector_norm(words, dim=2)[:, :, None]  # (T, L, 1)
    real = word_mask.to(dots.dtype)[:, :, None]
    local = dots / (query_norm * attended_norm).clamp(min=EPS) * real
    return (local.sum(dim=1) / real.sum(dim=1).clamp(min=1)).T, attn, local


def _by_length(word_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption order, longest first, and each caption's used width (last real word + 1)."""
    positions = torch.arange(1, word_mask.shape[1] + 1, device=word_mask.device)
    width = (word_mask.bool() * positions).amax(dim=1).clamp(min=1)
    order = torch.argsort(width, descending=True, stable=True)
    return order, width[order]


def level_scores(
    regions: torch.Tensor,
    words: torch.Tensor,
    word_mask: torch.Tensor,
    lambda_softmax: float = 9.0,
    direction: str = "i2t",
    slope: float = 0.1,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    basis: Basis | None = None,
) -> torch.Tensor:
    """Score every image against every caption at one level: ``(I, K, D) × (T, L, D) → (I, T)``.

    Pairs are processed in blocks of at most ``block_elements`` region–word similarities so that
    memory stays bounded for any gallery size. Regions may be coordinates ``(I, K, d + e)`` in
    ``basis``; they score exactly as ``basis.expand(regions)`` does.
    """
    if direction not in ("i2t", "t2i"):
        raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")
    regions, words = _as_compute_dtype(regions), _as_compute_dtype(words)
    n_img, n_reg, _ = regions.shape
    n_txt = words.shape[0]
    order, widths = _by_length(word_mask)
    words, word_mask = words[order], word_mask[order]
    projected_words = own = None
    if basis is not None:
        projected_words, own = basis.project(words), basis.own
    out = regions.new_empty(n_img, n_txt)
    t = 0
    while t < n_txt:
        width = int(widths[t])
        per_caption = n_reg * width
        txt_step = max(1, min(n_txt - t, CAPTION_BLOCK, block_elements // per_caption))
        img_step = max(1, block_elements // (per_caption * txt_step))
        cols = order[t : t + txt_step]
        block_words = words[t : t + txt_step, :width]
        block_mask = word_mask[t : t + txt_step, :width]
        block_projected = None
        if projected_words is not None:
            block_projected = projected_words[t : t + txt_step, :width]
        for i in range(0, n_img, img_step):
            own_words = None
            if own is not None:
                own_words = torch.einsum("tlD,ieD->tlie", block_words, own[i : i + img_step])
            out[i : i + img_step, cols] = _block_scores(
                regions[i : i + img_step],
                block_words,
                block_mask,
                lambda_softmax,
                direction,
                slope,
                block_projected,
                own_words,
            )[0]
        t += txt_step
    return out


def hierarchical_scores(
    image_levels: list[torch.Tensor],
    text_levels: list[torch.Tensor],
    word_mask: torch.Tensor,
    lambda_softmax: float = 9.0,
    direction: str = "i2t",
    slope: float = 0.1,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    bases: list[Basis | None] | None = None,
) -> torch.Tensor:
    """Per-level scores ``(num_levels, I, T)``; the HAT pair score is their sum over levels.

    ``bases``: per level, the basis that level's regions are coordinates in (None where they are
    plain features); see :func:`level_scores`.
    """
    if len(image_levels) != len(text_levels):
        raise ValueError(f"{len(image_levels)} image levels but {len(text_levels)} text levels")
    bases = bases or [None] * len(text_levels)
    return torch.stack(
        [
            level_scores(v, t, word_mask, lambda_softmax, direction, slope, block_elements, b)
            for v, t, b in zip(image_levels, text_levels, bases, strict=True)
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
    attn = attn[:, :, 0].squeeze(0).T  # (K, L)
    attn = attn / attn.sum(dim=1 if direction == "i2t" else 0, keepdim=True)
    local = local[0, :, 0] if direction == "t2i" else local[0, 0]
    return PairAlignment(score=score[0, 0], attention=attn, local_scores=local)
