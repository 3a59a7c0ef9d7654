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
  partition function cancels. |λ s̄| ≤ λ, so exp cannot overflow and needs no max-subtraction.
* Padded words are set to zero vectors once per caption block instead of masking every
  ``(T, L, I, K)`` block: their similarities are 0, so they add nothing to any norm, and
  whatever attention they get multiplies zeros in a_k and v_k · a_k.
* For image → text a_k is never materialised: v_k · a_k ∝ Σ_l e_kl s_kl and ‖a_k‖² ∝ e_k G e_kᵀ
  with G the caption's word Gram matrix, one small batched GEMM instead of K·D work per pair.
* Captions are sorted by length and each block is cut to its longest caption, so padding costs
  (almost) nothing; everything that depends on the words alone (Gram matrices, norms, projection
  into a basis) is computed once per caption block.
* Images are the outer loop, in blocks small enough to stay in a core's L2 cache: each block is
  decoded (int8 or fp16 widened to fp32) and its region norms taken once (or given: a gallery
  stores them), then every caption block is scored against it. Stored per-region scales (int8)
  are never applied to the regions: a scale multiplies the region's similarities, norm and
  weight in a_l instead, L numbers per region and caption rather than D, so a query's
  candidates never pass through memory in fp32.
* int8 regions whose norms are given are not even widened when a query's caption attends to
  them (image → text attention, one caption, a CPU): each word is split into three int8
  pieces, w = c (n₀ + n₁/254 + n₂/254²), and the region–word products are one int8 matrix
  product with exact int32 sums. Three pieces keep 24 bits of each word, as many as fp32 has,
  so the similarities are as close to the exact ones as an fp32 product's, and the query reads
  its candidates' int8 values once instead of widening them to four times their size. Where the
  fused kernel below is built, it weighs each word's pieces together itself, slab by slab.
* On one CPU thread without gradients (a query, evaluation) everything after the similarity
  product runs in fused kernels (:mod:`hat.native`, plain C built at first use), which make the
  ~8 elementwise passes of the steps above over one image's (words × regions) slab while it is
  in cache: image → text (from fp32 similarities, or from the int32 counts of int8 regions),
  text → image, and one image against many captions held ragged (a query image: all their real
  words in one product, no padding). Where no C compiler built them, or PyTorch has more threads
  (the kernels run on one), the same steps run in PyTorch.
* Where the CPU has AMX, image → text products of float regions with many words (evaluation,
  the scorer) are taken in its bfloat16 tiles instead of an fp32 GEMM: each value is cut into
  three bfloat16 pieces that sum to it exactly (3 x 8 bits, fp32's 24), and the six products
  of pieces down to 2⁻¹⁶ of the largest sum to the fp32 product within fp32 rounding, ~1.7x
  faster than the GEMM. Images are the outer loop, one at a time: it is cut into pieces once,
  and its products with each caption block stay in cache while the block is scored.
* Regions stored as coordinates y in an orthonormal basis B (x = y B, a PCA-compressed gallery)
  are scored without expanding them: with the words projected into the basis (w B^T), every
  region–word dot, region norm and attended-vector norm is the same, and the words' Gram matrix
  and norms come from the full words. The score is exactly that of the expanded regions. B may
  end in rows of each image's own (:class:`Basis`); their few coordinates add one broadcast term
  to the similarities.
* Such coordinates that a gallery holds as pq codes (:class:`~hat.coded_regions.CodedRegions`)
  are not even decoded when one caption attends to them (a query, image → text, one CPU
  thread): with y = s + c (the image's shift plus its codes' centroids), w · y = w · s + the
  sum over codes of the word's product with the centroid, one row of a table taken once per
  caption, and ‖y‖² likewise (:func:`hat.native.i2t_pq_scores`). Anything else decodes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hat import native
from hat.coded_regions import CodedRegions
from hat.mapped_rows import MappedRows

EPS = 1e-8
# Size of one (captions, words, images, regions) score block: a few such tensors stay in the
# last-level cache of a CPU, and it is large enough for an efficient GEMM.
DEFAULT_BLOCK_ELEMENTS = 1 << 21
# Captions per block: few enough that cutting a block to its longest caption removes most padding,
# and blocks then grow along the images, which keeps the GEMM wide.
CAPTION_BLOCK = 16
# Regions of one block of images: at most this share of ``block_elements`` fp32 values (2 MiB by
# default, a core's L2 here), so they stay in cache while they are widened, normed and scored
# against every caption block; 1 MiB blocks made smaller products, 8-9 % slower for the 96 x 96
# scorer in fp32 and int8 (session 11). int8 regions multiplied in integers are read once, by one
# product: their block holds as many images as its similarities allow.
REGION_SHARE = 4
# int8 pieces per word value in the integer products (module docstring): 3 x ~8 bits.
WORD_PIECES = 3
# Words (captions x their longest) from which fp32 products go to AMX bfloat16 tiles: cutting
# each image into pieces (~20 us for 256 x 256) is then repaid. 16 images x 256 regions x 256
# deep, tiles against fp32 products: 0.85x at 42 words, 1.04x at 84, 1.28x at 224 (session 12).
TILE_WORDS = 80
PIECE_STEP = 254  # each piece counts the last one's rounding (at most half its step) in 254ths


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


@dataclass(frozen=True)
class RaggedWords:
    """Captions' real words back to back ``(N, D)``, caption after caption, and the ``(T, L)``
    mask of their padded form (each row's real words first): a caption bank's words as a gallery
    stores them. One image against them is scored so (the ragged kernel of :mod:`hat.native`);
    anything else takes :meth:`padded`, the ``(T, L, D)`` words with zero vectors for padding."""

    tokens: torch.Tensor
    mask: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.mask.shape, self.tokens.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def requires_grad(self) -> bool:
        return self.tokens.requires_grad

    def padded(self) -> torch.Tensor:
        out = self.tokens.new_zeros(self.shape)
        out[self.mask] = self.tokens
        return out

    def __getitem__(self, index) -> torch.Tensor:
        return self.padded()[index]

    def to(self, device: torch.device | str) -> RaggedWords:
        return RaggedWords(self.tokens.to(device), self.mask.to(device))


def _as_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _ops(inplace: bool) -> tuple[Callable, Callable]:
    """mul and exp, in place when nothing needs a gradient: fewer allocations and memory traffic."""
    if inplace:
        return torch.Tensor.mul_, torch.Tensor.exp_
    return torch.mul, torch.exp


@dataclass
class _IntegerWords:
    """One caption's words ``(L, D)`` as :data:`WORD_PIECES` int8 pieces each,
    ``w = Σ_p weight_p n_p``, to multiply int8 vectors in integers: the int32 sums are exact, and
    the pieces keep the words to fp32's precision (the last piece's rounding is at most ~2⁻²⁴ of
    a word's largest value). With more captions the fp32 product of widened blocks is faster.
    """

    pieces: torch.Tensor  # (L · P, D) int8, word-major
    piece_weights: torch.Tensor  # (L, P): each word's pieces' weights

    @classmethod
    def of(cls, words: torch.Tensor) -> _IntegerWords:
        rest = words.double()
        step = rest.abs().amax(dim=1, keepdim=True) / 127
        step = torch.where(step > 0, step, torch.ones_like(step))  # an all-zero (padded) word
        pieces, weights = [], []
        for _ in range(WORD_PIECES):
            piece = torch.round(rest / step)
            rest = rest - piece * step
            pieces.append(piece.to(torch.int8))
            weights.append(step)
            step = step / PIECE_STEP
        return cls(torch.stack(pieces, dim=1).flatten(0, 1), torch.cat(weights, dim=1).float())

    def counts(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(M, L · P)`` exact int32 products of int8 ``vectors`` ``(M, D)`` with every piece:
        one int8 product (vectors first: the faster order)."""
        return torch._int_mm(vectors, self.pieces.T)

    def times(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(L, M)`` products with int8 ``vectors`` ``(M, D)``: each word's pieces' products
        weighted together (one product with a matrix whose row l holds word l's weights)."""
        n_words, pieces = self.piece_weights.shape
        own = torch.eye(n_words, device=vectors.device)[:, :, None] * self.piece_weights[:, None]
        return own.view(n_words, n_words * pieces) @ self.counts(vectors).float().T


@dataclass
class _Captions:
    """A block of captions cut to its longest, with everything scoring needs from words alone.

    ``columns``: their columns in the output; ``words`` ``(T, L, D)`` and ``mask`` ``(T, L)``;
    ``probe``: what the regions are multiplied with (the words, or the words in a basis);
    ``gram`` ``(T, L, L)`` for i2t, ``norms`` ``(T, L, 1)`` of the words for t2i.
    """

    columns: torch.Tensor
    words: torch.Tensor
    mask: torch.Tensor
    probe: torch.Tensor
    gram: torch.Tensor | None = None
    norms: torch.Tensor | None = None
    integer: _IntegerWords | None = None  # the probe in int8 pieces, made for int8 regions
    tiles: torch.Tensor | None = None  # the probe in bfloat16 pieces, made for AMX tiles

    def integer_words(self) -> _IntegerWords:
        """The probe (one caption) in int8 pieces, made once."""
        if self.integer is None:
            (words,) = self.probe
            self.integer = _IntegerWords.of(words)
        return self.integer

    def bf16_words(self, kernels: native.Kernels) -> torch.Tensor:
        """The probe's T · L words in bfloat16 pieces (:func:`hat.native.bf16_pieces`), made
        once."""
        if self.tiles is None:
            flat = self.probe.reshape(-1, self.probe.shape[2])
            self.tiles = native.bf16_pieces(kernels, flat, vnni=False)
        return self.tiles

    def similarities(self, regions: torch.Tensor) -> torch.Tensor:
        """``(T, L, I, K)`` products of the probe with regions ``(I, K, d)``: fp32, or int8
        multiplied in integers (one caption)."""
        n_img, n_reg, dim = regions.shape
        flat = regions.reshape(-1, dim)
        if regions.dtype == torch.int8:
            sims = self.integer_words().times(flat)
        else:
            sims = self.probe.reshape(-1, dim) @ flat.T
        return sims.view(*self.probe.shape[:2], n_img, n_reg)

    @classmethod
    def of(cls, columns, words, mask, direction: str, basis: Basis | None = None) -> _Captions:
        """Padded words become zero vectors: their attention weights then multiply zeros in every
        sum (i2t: a_k and v_k · a_k; the cosine ignores the softmax's normaliser), so no mask is
        applied to the ``(T, L, I, K)`` blocks."""
        if not bool(mask.all()):
            words = words * mask[..., None].to(words.dtype)
        probe = words if basis is None else basis.project(words)
        if direction == "i2t":
            return cls(columns, words, mask, probe, gram=words @ words.transpose(1, 2))
        return cls(
            columns, words, mask, probe, norms=torch.linalg.vector_norm(words, dim=2)[..., None]
        )


def _exp_logits(
    sims: torch.Tensor, lambda_softmax: float, direction: str, slope: float, inplace: bool
) -> torch.Tensor:
    """Unnormalised attention e = exp(λ s̄) of ``(T, L, I, K)`` similarities (padded words are
    zero vectors: their similarities are 0, which leaves every norm as over the real words)."""
    mul, exp = _ops(inplace)
    leaky = F.leaky_relu(sims, slope)
    if direction == "i2t" or not inplace:
        dim = 3 if direction == "i2t" else 1  # over regions / over words
        norm = torch.linalg.vector_norm(leaky, dim=dim, keepdim=True)
    else:  # vector_norm over a middle dimension is ~40x slower than this on a CPU
        norm = leaky.square().sum(dim=1, keepdim=True).sqrt_()
    scale = (
        norm.add_(EPS).reciprocal_().mul_(lambda_softmax)
        if inplace
        else lambda_softmax / (norm + EPS)
    )
    return exp(mul(leaky, scale))


def _block_scores(
    regions: torch.Tensor,
    region_norms: torch.Tensor | None,
    captions: _Captions,
    lambda_softmax: float,
    direction: str,
    slope: float,
    own_words: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    details: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Scores ``(I, T)``, unnormalised attention ``(T, L, I, K)`` and local cosines of a block.

    ``regions`` ``(I, K, D)`` are fp32 features or coordinates in a basis (then ``captions.probe``
    holds the words in it, and ``own_words`` ``(T, L, I, e)`` the words along each image's own
    rows), or int8 values (i2t only), times ``scales`` ``(I, K)`` where given: a region's scale
    multiplies its similarities and its part in the attended vectors, far fewer numbers than the
    region's own. ``region_norms`` ``(I, K)`` are the scaled regions' norms (i2t only). Local
    cosines are ``(T, I, K)`` for i2t and ``(T, L, I)`` for t2i. Without ``details`` (the scores
    alone), fp32 or int8 on one CPU thread without gradients runs in the fused kernels of
    :mod:`hat.native` where they are built, and the attention and local cosines are None.
    """
    n_img, n_reg, dim = regions.shape
    n_txt, n_words, _ = captions.words.shape
    inplace = not (
        torch.is_grad_enabled() and (regions.requires_grad or captions.words.requires_grad)
    )
    mul, _ = _ops(inplace)
    fused = not details and inplace and regions.device.type == "cpu"
    kernels = native.kernels() if fused and torch.get_num_threads() == 1 else None
    scoring = (lambda_softmax, slope, EPS)
    if kernels is not None and regions.dtype == torch.int8:  # i2t; the kernel folds the pieces
        integer = captions.integer_words()
        weights, gram = integer.piece_weights, captions.gram[0]
        scores = native.i2t_integer_scores(
            kernels, regions, integer.pieces, weights, scales, gram, region_norms, *scoring
        )
        return scores, None, None
    if isinstance(regions, MappedRows):  # (hat.native reads them where they lie)
        regions = regions.gathered()
    sims = captions.similarities(regions)
    if own_words is not None:  # the own rows' term: word along row j times region coordinate j
        shared = dim - own_words.shape[3]
        for j in range(own_words.shape[3]):
            along, coordinate = own_words[..., j, None], regions[:, :, shared + j]
            sims = sims.addcmul_(along, coordinate) if inplace else sims.addcmul(along, coordinate)
    if kernels is not None and sims.dtype == regions.dtype == torch.float32:
        if direction == "i2t":
            gram = captions.gram
            scores = native.i2t_block_scores(kernels, sims, scales, gram, region_norms, *scoring)
        else:
            norms, real = captions.norms[..., 0], captions.mask
            scores = native.t2i_block_scores(kernels, sims, regions, scales, norms, real, *scoring)
        return scores, None, None
    if scales is not None:
        sims = mul(sims, scales)
    attn = _exp_logits(sims, lambda_softmax, direction, slope, inplace)
    if direction == "i2t":
        weighted = torch.bmm(captions.gram, attn.view(n_txt, n_words, -1)).view_as(attn)
        attended_sq = mul(weighted, attn).sum(dim=1)  # ‖a_k‖², (T, I, K)
        dots = mul(sims, attn).sum(dim=1)  # v_k · a_k
        norms = mul(attended_sq.clamp_(min=0).sqrt_(), region_norms).clamp_(min=EPS)
        local = dots.div_(norms) if inplace else dots / norms
        return local.mean(dim=2).T, attn, local
    # t2i: words attend to regions; a_l is materialised per image (one batched GEMM that reads
    # the attention in place: image i's (T·L, K) matrix has row stride I·K).
    dots = mul(sims, attn).sum(dim=3)  # t_l · a_l, (T, L, I)
    weights = attn if scales is None else attn * scales
    per_image = weights.view(n_txt * n_words, n_img, n_reg).transpose(0, 1)
    attended = torch.bmm(per_image, regions)  # (I, T·L, D)
    attended_norm = torch.linalg.vector_norm(attended, dim=2).T.view(n_txt, n_words, n_img)
    real = captions.mask.to(dots.dtype)[:, :, None]
    local = dots / (captions.norms * attended_norm).clamp(min=EPS) * real
    return (local.sum(dim=1) / real.sum(dim=1).clamp(min=1)).T, attn, local


def _by_length(word_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption order, longest first, and each caption's used width (last real word + 1)."""
    positions = torch.arange(1, word_mask.shape[1] + 1, device=word_mask.device)
    width = (word_mask.bool() * positions).amax(dim=1).clamp(min=1)
    order = torch.argsort(width, descending=True, stable=True)
    return order, width[order]


def _caption_blocks(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    n_reg: int,
    block_elements: int,
    direction: str,
    basis: Basis | None,
) -> list[_Captions]:
    """Captions sorted by length in blocks of at most :data:`CAPTION_BLOCK`, each cut to its
    longest caption and holding at most ``block_elements`` similarities per image."""
    order, widths = _by_length(word_mask)
    words, word_mask = words[order], word_mask[order]
    blocks, t, n_txt = [], 0, len(order)
    while t < n_txt:
        width = int(widths[t])
        step = max(1, min(n_txt - t, CAPTION_BLOCK, block_elements // (n_reg * width)))
        part = slice(t, t + step)
        cut_words, cut_mask = words[part, :width], word_mask[part, :width]
        blocks.append(_Captions.of(order[part], cut_words, cut_mask, direction, basis))
        t += step
    return blocks


def _bf16_kernels(
    regions: torch.Tensor, captions: list[_Captions], direction: str
) -> native.Kernels | None:
    """The kernels where image → text products of fp32 (or widened) regions go to AMX bfloat16
    tiles (:func:`hat.native.i2t_bf16_scores`): a CPU with AMX, one thread, no gradients, whole
    tiles, and captions with at least :data:`TILE_WORDS` words in all."""
    _, n_reg, dim = regions.shape
    if (
        direction != "i2t"
        or regions.device.type != "cpu"
        or regions.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.int8)
        or any(c.probe.dtype != torch.float32 for c in captions)
        or torch.get_num_threads() != 1
        or not native.bf16_fit(n_reg, dim)
        or sum(c.probe.shape[0] * c.probe.shape[1] for c in captions) < TILE_WORDS
    ):
        return None
    if torch.is_grad_enabled() and (
        regions.requires_grad or any(c.probe.requires_grad for c in captions)
    ):
        return None
    kernels = native.kernels()
    return kernels if kernels is not None and kernels.amx else None


def _coded_kernels(
    regions: CodedRegions,
    words: torch.Tensor | RaggedWords,
    word_mask: torch.Tensor,
    direction: str,
    basis: Basis | None,
    scales: torch.Tensor | None,
) -> native.Kernels | None:
    """The kernels where pq codes are scored as they are (:func:`hat.native.i2t_pq_scores`):
    image → text attention from one caption with words (a query), on one CPU thread, without
    gradients, the codes unscaled."""
    if (
        direction != "i2t"
        or basis is None
        or scales is not None
        or isinstance(words, RaggedWords)
        or words.shape[0] != 1
        or not 0 < int(word_mask.sum()) <= native.PQ_MAX_WORDS
        or words.dtype != torch.float32
        or words.device.type != "cpu"
        or regions.device.type != "cpu"
        or (torch.is_grad_enabled() and words.requires_grad)
        or torch.get_num_threads() != 1
    ):
        return None
    return native.kernels()


def _coded_scores(
    kernels: native.Kernels,
    regions: CodedRegions,
    words: torch.Tensor,
    word_mask: torch.Tensor,
    basis: Basis,
    lambda_softmax: float,
    slope: float,
) -> torch.Tensor:
    """Image → text scores ``(I, 1)`` of one caption against pq-coded regions, never decoded:
    with y = shift + c a region's coordinates (c its codes' centroids), each similarity
    w · y is w · shift plus, code by code, the word's product with a centroid, taken once per
    caption into a table (M × 256 × words); ‖y‖² is ‖shift‖² plus, code by code,
    ‖centroid‖² + 2 shift · centroid (the kernel's table of each image). The image's own row
    adds the words' products with it, times its length, to the shift's, and its square to
    ‖shift‖²."""
    real = words[0][word_mask[0].bool()]  # (L, D)
    n_words = len(real)
    book = regions.codebook
    subs, _, dsub = book.centroids.shape
    probe = (real @ basis.shared.T).view(n_words, subs, dsub)  # the words in the PCA basis
    lut = torch.zeros(subs, 256, native.pq_lane_width(n_words))
    lut[:, :, :n_words] = torch.bmm(book.centroids, probe.permute(1, 2, 0))
    offsets = torch.zeros(len(regions), lut.shape[2])
    offsets[:, :n_words] = regions.shift @ probe.view(n_words, -1).T
    base = regions.shift.square().sum(dim=1)
    if regions.length is not None:  # the words along each image's own row, times its length
        along = basis.own[:, 0] @ real.T  # (I, L)
        offsets[:, :n_words] += along * regions.length[:, None]
        base += regions.length.square()
    scores = native.i2t_pq_scores(
        kernels,
        regions.codes,
        regions.shift,
        book.by_dimension,
        book.squares,
        lut,
        offsets,
        base,
        real @ real.T,
        lambda_softmax,
        slope,
        EPS,
    )
    return scores[:, None]


def level_scores(
    regions: torch.Tensor | MappedRows | CodedRegions,
    words: torch.Tensor | RaggedWords,
    word_mask: torch.Tensor,
    lambda_softmax: float = 9.0,
    direction: str = "i2t",
    slope: float = 0.1,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    basis: Basis | None = None,
    scales: torch.Tensor | None = None,
    norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score every image against every caption at one level: ``(I, K, D) × (T, L, D) → (I, T)``.

    Regions may be stored values: any float or int8 dtype, times per-region ``scales`` ``(I, K)``
    where given, and coordinates ``(I, K, d + e)`` in ``basis`` where given; they score exactly as
    their fp32 features do. ``norms`` ``(I, K)``, where given, are the norms of the regions as
    they score (times their scales): image → text attention needs them, and they are not taken
    again. Regions are decoded a block of images at a time, small enough to stay in a core's
    cache (:data:`REGION_SHARE`) while every block of captions is scored against it, so a
    gallery's candidates never pass through memory at full width; int8 regions with their norms
    are not decoded at all (module docstring), and may be :class:`~hat.mapped_rows.MappedRows`
    (read where they lie by AMX tiles, copied out for anything else); coordinates may be
    :class:`~hat.coded_regions.CodedRegions`, pq codes (scored undecoded against one caption,
    image → text; decoded for anything else); words may be :class:`RaggedWords` (padded here
    unless one image is scored against them). Blocks hold at most ``block_elements`` region–word
    similarities, so memory stays bounded for any gallery size.
    """
    if direction not in ("i2t", "t2i"):
        raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")
    words = words if isinstance(words, RaggedWords) else _as_compute_dtype(words)
    if isinstance(regions, CodedRegions):
        kernels = _coded_kernels(regions, words, word_mask, direction, basis, scales)
        if kernels is not None:
            return _coded_scores(kernels, regions, words, word_mask, basis, lambda_softmax, slope)
        regions, taken = regions.decoded()
        norms = taken if norms is None else norms
    n_img, n_reg, dim = regions.shape
    ragged = (  # one image's fp32 regions against captions (a query image): the kernel, unpadded
        n_img == 1
        and direction == "i2t"
        and basis is None
        and scales is None
        and regions.dtype == words.dtype == torch.float32
        and regions.device.type == "cpu"
        and not (torch.is_grad_enabled() and (regions.requires_grad or words.requires_grad))
        and torch.get_num_threads() == 1
    )
    if ragged and (kernels := native.kernels()) is not None:
        region_norms = torch.linalg.vector_norm(regions[0], dim=1) if norms is None else norms[0]
        real = word_mask.bool()
        scores = native.i2t_ragged_scores(
            kernels,
            regions[0],
            region_norms,
            words.tokens if isinstance(words, RaggedWords) else words[real],
            real.sum(dim=1),
            lambda_softmax,
            slope,
            EPS,
        )
        return scores[None]
    if isinstance(words, RaggedWords):
        words = _as_compute_dtype(words.padded())
    captions = _caption_blocks(words, word_mask, n_reg, block_elements, direction, basis)
    widest = max((c.words.shape[0] * c.words.shape[1] * n_reg for c in captions), default=1)
    integer = (  # a query's candidates against its caption (_IntegerWords)
        regions.dtype == torch.int8
        and words.dtype == torch.float32
        and words.shape[0] == 1
        and regions.device.type == "cpu"
        and direction == "i2t"
        and norms is not None
    )
    if isinstance(regions, MappedRows) and not integer:
        regions = regions.gathered()  # only integer products may read rows where they lie
    widen = regions.dtype != words.dtype and not integer
    own = None if basis is None else basis.own
    tile_kernels = None
    if not integer and own is None:
        tile_kernels = _bf16_kernels(regions, captions, direction)
    img_step = n_img if tile_kernels is not None else max(1, block_elements // widest)
    # Blocks of regions that stay in cache while they are widened and scored against every
    # caption block. Regions scored as they are (int8 in integers, floats of the words' dtype)
    # against one caption block, or an image at a time against all of them (bfloat16 tiles),
    # are read once whatever the blocks: one block then.
    if not integer and (widen or (len(captions) > 1 and tile_kernels is None)):
        region_elements = max(1, block_elements // REGION_SHARE)
        img_step = max(1, min(img_step, region_elements // (n_reg * dim)))
    out = words.new_empty(n_img, words.shape[0])
    if tile_kernels is not None:
        tiled_words = [caption.bf16_words(tile_kernels) for caption in captions]
        grams = [caption.gram for caption in captions]
        columns = torch.cat([caption.columns for caption in captions])
    widened = None  # one buffer for every block: its memory stays in cache
    if widen:
        widened = torch.empty(
            (min(img_step, n_img), n_reg, dim), dtype=words.dtype, device=words.device
        )
    for i in range(0, n_img, img_step):
        part = slice(i, i + img_step)
        block = regions[part]
        if widened is not None:  # int8 and fp16 widen here
            block = widened[: len(block)].copy_(block)
        scale = None if scales is None else scales[part].to(words.dtype)
        block_norms = None
        if direction == "i2t" and norms is not None:
            block_norms = norms[part].to(words.dtype)
        elif direction == "i2t":
            block_norms = torch.linalg.vector_norm(block, dim=2)
            block_norms = block_norms if scale is None else block_norms.mul_(scale)
        if tile_kernels is not None:
            scoring = (lambda_softmax, slope, EPS)
            scores = native.i2t_bf16_scores(
                tile_kernels, block, scale, block_norms, tiled_words, grams, *scoring
            )
            out[part, columns] = scores
            continue
        for caption in captions:
            own_words = None
            if own is not None:
                own_words = torch.einsum("tlD,ieD->tlie", caption.words, own[part])
            scoring = (lambda_softmax, direction, slope, own_words, scale)
            scores = _block_scores(block, block_norms, caption, *scoring, details=False)[0]
            out[part, caption.columns] = scores
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
    scales: list[torch.Tensor | None] | None = None,
    norms: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Per-level scores ``(num_levels, I, T)``; the HAT pair score is their sum over levels.

    ``bases``, ``scales`` and ``norms``: per level, the basis that level's regions are
    coordinates in, their per-region scales and their norms (None where there are none); see
    :func:`level_scores`.
    """
    if len(image_levels) != len(text_levels):
        raise ValueError(f"{len(image_levels)} image levels but {len(text_levels)} text levels")
    per_level = [x or [None] * len(text_levels) for x in (bases, scales, norms)]
    return torch.stack(
        [
            level_scores(v, t, word_mask, lambda_softmax, direction, slope, block_elements, b, s, n)
            for v, t, b, s, n in zip(image_levels, text_levels, *per_level, strict=True)
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
    captions = _Captions.of(torch.zeros(1, dtype=torch.long), words[None], mask, direction)
    norms = torch.linalg.vector_norm(regions, dim=1)[None]
    score, attn, local = _block_scores(
        regions[None], norms, captions, lambda_softmax, direction, slope
    )
    attn = attn[:, :, 0].squeeze(0).T  # (K, L)
    attn = attn / attn.sum(dim=1 if direction == "i2t" else 0, keepdim=True)
    local = local[0, :, 0] if direction == "t2i" else local[0, 0]
    return PairAlignment(score=score[0, 0], attention=attn, local_scores=local)
