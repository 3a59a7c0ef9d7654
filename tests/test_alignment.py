"""The vectorised alignment equals a straightforward per-pair version of the paper's formulas."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hat import native
from hat.alignment import (
    Basis,
    RaggedWords,
    _bf16_kernels,
    _block_scores,
    _caption_blocks,
    _Captions,
    align_pair,
    hierarchical_scores,
    level_scores,
)
from hat.mapped_rows import MappedRows


def reference_pair_score(regions, words, lam, direction, slope=0.1):
    """One pair, real words only, explicit attended vectors (as in the official code)."""
    sims = regions @ words.T  # (K, L)
    leaky = F.leaky_relu(sims, slope)
    if direction == "i2t":
        normed = leaky / (leaky.norm(dim=0, keepdim=True) + 1e-8)  # over regions
        attn = torch.softmax(lam * normed, dim=1)  # over words
        attended = attn @ words  # (K, D)
        query = regions
    else:
        normed = leaky / (leaky.norm(dim=1, keepdim=True) + 1e-8)  # over words
        attn = torch.softmax(lam * normed, dim=0)  # over regions
        attended = attn.T @ regions  # (L, D)
        query = words
    cos = (query * attended).sum(1) / (query.norm(dim=1) * attended.norm(dim=1)).clamp(min=1e-8)
    return cos.mean()


def random_batch(n_img=3, n_txt=4, regions=7, max_words=6, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_img, regions, dim, generator=g, dtype=torch.float64)
    lengths = torch.tensor([max_words, 3, 5, 2][:n_txt])
    texts = torch.randn(n_txt, max_words, dim, generator=g, dtype=torch.float64)
    mask = torch.arange(max_words)[None] < lengths[:, None]
    return images, texts, mask, lengths


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
@pytest.mark.parametrize("lam", [9.0, 4.0])
def test_matches_per_pair_reference_with_ragged_captions(direction, lam):
    images, texts, mask, lengths = random_batch()
    got = level_scores(images, texts, mask, lam, direction)
    want = torch.tensor(
        [
            [
                reference_pair_score(v, t[:n], lam, direction).item()
                for t, n in zip(texts, lengths, strict=True)
            ]
            for v in images
        ],
        dtype=torch.float64,
    )
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_float32_matches_float64_reference(direction):
    images, texts, mask, _ = random_batch(dim=16, seed=3)
    got = level_scores(images.float(), texts.float(), mask, 9.0, direction).double()
    want = level_scores(images, texts, mask, 9.0, direction)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_padding_never_changes_a_score(direction):
    images, texts, mask, _ = random_batch(seed=1)
    base = level_scores(images, texts, mask, 9.0, direction)
    # Add 4 more padded positions holding large garbage, and scramble existing padded positions.
    garbage = 1e3 * torch.randn(texts.shape[0], 4, texts.shape[2], dtype=texts.dtype)
    padded = torch.cat([texts, garbage], dim=1)
    padded[:, : texts.shape[1]][~mask] = 77.0
    padded_mask = torch.cat([mask, torch.zeros(mask.shape[0], 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(
        level_scores(images, padded, padded_mask, 9.0, direction), base, atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_blocking_does_not_change_scores(direction):
    images, texts, mask, _ = random_batch(n_img=3, n_txt=4, seed=2)
    whole = level_scores(images, texts, mask, 9.0, direction, block_elements=1 << 30)
    for block in (1, 7 * 6, 7 * 6 * 3, 7 * 6 * 5):
        chunked = level_scores(images, texts, mask, 9.0, direction, block_elements=block)
        torch.testing.assert_close(chunked, whole, atol=1e-12, rtol=0)


def test_hierarchical_scores_stack_levels_and_sum_is_the_pair_score():
    a = random_batch(seed=4)
    b = random_batch(regions=3, seed=5)
    mask = a[2]
    per_level = hierarchical_scores([a[0], b[0]], [a[1], b[1]], mask)
    assert per_level.shape == (2, 3, 4)
    torch.testing.assert_close(per_level[0], level_scores(a[0], a[1], mask))
    torch.testing.assert_close(per_level[1], level_scores(b[0], b[1], mask))
    with pytest.raises(ValueError, match="levels"):
        hierarchical_scores([a[0]], [a[1], b[1]], mask)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_regions_given_as_coordinates_in_a_basis_score_exactly_as_expanded(direction):
    """A compressed gallery's regions: coordinates y along rows B (orthonormal, d < D) shared by
    all images, then one row u_i of each image's own (orthogonal to B), scored with the words
    projected into them, give exactly the scores of x = y B + y' u_i; the words' own Gram and
    norms stay full."""
    images, texts, mask, _ = random_batch(dim=9, seed=6)
    shared = torch.linalg.qr(torch.randn(9, 4, dtype=torch.float64))[0].T  # (4, 9)
    outside = torch.randn(images.shape[0], 9, dtype=torch.float64)
    outside -= outside @ shared.T @ shared
    own = (outside / outside.norm(dim=1, keepdim=True))[:, None]  # (I, 1, 9)
    along_own = torch.randn(images.shape[0], 1, 1, dtype=torch.float64).expand(
        -1, images.shape[1], 1
    )
    coordinates = torch.cat([images @ shared.T, along_own], dim=2)  # (I, K, 5)
    basis = Basis(shared, own)
    expanded = basis.expand(coordinates)
    torch.testing.assert_close(
        expanded, images @ shared.T @ shared + along_own * own, atol=1e-12, rtol=0
    )
    want = level_scores(expanded, texts, mask, 9.0, direction)
    got = level_scores(coordinates, texts, mask, 9.0, direction, basis=basis)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # Every part counts: the own rows' term ...
    shared_only = level_scores(
        coordinates[..., :4], texts, mask, 9.0, direction, basis=Basis(shared)
    )
    assert not torch.allclose(shared_only, want)
    torch.testing.assert_close(
        shared_only, level_scores(images @ shared.T @ shared, texts, mask, 9.0, direction)
    )
    # ... and the full words: their parts outside the basis change the Gram matrix and norms.
    projected_only = texts @ shared.T @ shared
    assert not torch.allclose(level_scores(expanded, projected_only, mask, 9.0, direction), want)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_int8_regions_with_their_norms_score_as_their_decoded_features(direction):
    """int8 regions with per-region scales and norms, against many captions and against one
    caption at a time (a query: for i2t multiplied in integers with the words in int8 pieces,
    never widened): the scores are the decoded regions' (float64) as closely as fp32 features
    score, words of very unequal sizes included, in blocks of any size."""
    g = torch.Generator().manual_seed(7)
    regions = torch.randn(6, 20, 64, generator=g) + 2 * torch.randn(6, 1, 64, generator=g)
    scales = (regions.abs().amax(dim=2) / 127).half()
    values = torch.round(regions / scales.float()[..., None]).clamp(-127, 127).to(torch.int8)
    decoded = values.double() * scales.double()[..., None]
    norms = torch.linalg.vector_norm(decoded, dim=2).float()
    words = torch.randn(40, 9, 64, generator=g) * torch.logspace(-3, 1, 64)
    mask = torch.arange(9)[None] < torch.randint(1, 10, (40, 1), generator=g)
    want = level_scores(decoded, words.double(), mask, 9.0, direction)
    as_fp32 = level_scores(decoded.float(), words, mask, 9.0, direction)
    tolerance = 2 * max(float((as_fp32 - want).abs().max()), 1e-6)

    def stored(words, mask, **kwargs):
        return level_scores(
            values, words, mask, 9.0, direction, scales=scales, norms=norms, **kwargs
        )

    torch.testing.assert_close(stored(words, mask).double(), want, atol=tolerance, rtol=0)
    for block in (20 * 9, 20 * 9 * 2, 1 << 21):  # blocks of one, of two and of all images
        each = torch.cat(
            [stored(words[t, None], mask[t, None], block_elements=block) for t in range(40)], 1
        )
        torch.testing.assert_close(each.double(), want, atol=tolerance, rtol=0)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_align_pair_exposes_the_attention_that_made_the_score(direction):
    images, texts, mask, lengths = random_batch(seed=6)
    words = texts[1, : lengths[1]]
    detail = align_pair(images[0], words, 9.0, direction)
    assert detail.attention.shape == (images.shape[1], int(lengths[1]))
    softmax_dim = 1 if direction == "i2t" else 0
    torch.testing.assert_close(
        detail.attention.sum(softmax_dim),
        torch.ones(detail.attention.shape[1 - softmax_dim], dtype=torch.float64),
    )
    torch.testing.assert_close(
        detail.score, level_scores(images, texts, mask, 9.0, direction)[0, 1]
    )
    torch.testing.assert_close(detail.local_scores.mean(), detail.score)


def test_half_precision_inputs_are_scored_in_float32():
    images, texts, mask, _ = random_batch(dim=8, seed=7)
    got = level_scores(images.half(), texts.half(), mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), level_scores(images, texts, mask), atol=5e-3, rtol=0)


def test_no_captions_score_to_an_empty_matrix(one_thread):
    images, words, mask = torch.randn(2, 32, 64), torch.zeros(0, 5, 64), torch.zeros(0, 5) > 0
    for direction in ("i2t", "t2i"):
        assert level_scores(images, words, mask, direction=direction).shape == (2, 0)


def test_unknown_direction_is_rejected():
    images, texts, mask, _ = random_batch()
    with pytest.raises(ValueError, match="direction"):
        level_scores(images, texts, mask, direction="both")


def int8_in_tiles(g: torch.Generator, words: int = 11):
    """int8 regions that cut into whole AMX tiles (32 regions, 128 deep) against one caption of
    ``words`` (3 pieces each: more than one block of 16), with scales and norms."""
    images = torch.randn(4, 32, 128, generator=g) + torch.randn(4, 1, 128, generator=g)
    scales = (images.abs().amax(dim=2) / 127).half()
    values = torch.round(images / scales.float()[..., None]).to(torch.int8)
    norms = torch.linalg.vector_norm(values.float() * scales.float()[..., None], dim=2)
    texts = torch.randn(1, words, 128, generator=g)
    mask = torch.arange(words)[None] < max(words - 2, 1)
    return values, texts, mask, {"scales": scales, "norms": norms}


def fused_cases():
    """Image → text inputs that take every path into the fused kernels: ragged captions, one
    image against them (a query image: its captions' words back to back, no padding; one of
    them without a real word), int8 regions with scales and norms against one caption (integer
    products), coordinates with rows of each image's own, and regions both fewer and more than
    the kernel's register block."""
    g = torch.Generator().manual_seed(8)
    for regions in (7, 2 * 128 + 5):
        images = torch.randn(5, regions, 24, generator=g) + torch.randn(5, 1, 24, generator=g)
        texts = torch.randn(4, 9, 24, generator=g)
        mask = torch.arange(9)[None] < torch.tensor([[9], [3], [6], [1]])
        yield images, texts, mask, {}
        without_words = torch.cat([mask, torch.zeros(1, 9, dtype=torch.bool)])
        yield images[:1], torch.cat([texts, texts[:1]]), without_words, {}
        scales = (images.abs().amax(dim=2) / 127).half()
        values = torch.round(images / scales.float()[..., None]).to(torch.int8)
        norms = torch.linalg.vector_norm(values.float() * scales.float()[..., None], dim=2)
        yield values, texts[:1], mask[:1], {"scales": scales, "norms": norms}
    yield int8_in_tiles(g)
    shared = torch.linalg.qr(torch.randn(24, 6, generator=g))[0].T
    own = F.normalize(
        torch.randn(5, 1, 24, generator=g) @ (torch.eye(24) - shared.T @ shared), dim=2
    )
    yield torch.randn(5, 7, 7, generator=g), texts, mask, {"basis": Basis(shared, own)}


def test_the_fused_kernels_score_as_pytorch_does(one_thread):
    if native._compiler() is None:
        pytest.skip("no C compiler: scoring stays in PyTorch")
    assert native.kernels() is not None
    images, texts, mask, _ = next(fused_cases())
    norms = torch.linalg.vector_norm(images, dim=2)
    captions = _Captions.of(torch.arange(4), texts, mask, "i2t")
    _, attention, _ = _block_scores(images, norms, captions, 9.0, "i2t", 0.1, details=False)
    assert attention is None  # the kernel gave the scores alone
    for direction in ("i2t", "t2i"):  # the t2i kernel: words attend to regions
        for regions, words, mask, stored in fused_cases():
            fused = level_scores(regions, words, mask, direction=direction, **stored)
            with native.eager():
                eager = level_scores(regions, words, mask, direction=direction, **stored)
            torch.testing.assert_close(fused, eager, atol=2e-6, rtol=0)


@pytest.mark.parametrize("n_reg", [20, 130])
def test_padding_between_words_never_reaches_a_fused_score(one_thread, n_reg):
    """A caption with padding between its real words (a mask that is not a prefix): the fused
    image → text kernel skips the padded words' attention rows, which its sums later multiply
    by their zero Gram entries; whatever its scratch memory held (NaN here), the score is
    PyTorch's. 20 regions take the kernel's one-at-a-time tail, 130 its vector blocks too."""
    kernels = native.kernels()
    if kernels is None:
        pytest.skip("no C compiler: the fused kernels are not built")
    g = torch.Generator().manual_seed(3)
    regions = torch.randn(3, n_reg, 16, generator=g)
    mask = torch.tensor([[True, False, True, True, False]])
    words = torch.randn(1, 5, 16, generator=g) * mask[..., None]
    n_txt, n_words, n_img = 1, 5, 3
    sims = (words @ regions.reshape(-1, 16).T).view(n_txt, n_words, n_img, n_reg).contiguous()
    gram = words @ words.transpose(1, 2)
    norms = torch.linalg.vector_norm(regions, dim=2)
    work = torch.full((2 * n_words * n_reg + 2 * n_reg + n_words,), float("nan"))
    out = torch.empty(n_txt, n_img)
    kernels.block_scores(
        sims.data_ptr(),
        None,
        gram.data_ptr(),
        norms.data_ptr(),
        n_txt,
        n_words,
        n_img,
        n_reg,
        9.0,
        0.1,
        1e-8,
        work.data_ptr(),
        out.data_ptr(),
    )
    with native.eager():
        want = level_scores(regions, words, mask, 9.0, "i2t")
    torch.testing.assert_close(out.T, want, atol=2e-6, rtol=0)


def test_products_in_amx_tiles_are_the_integer_products_bit_for_bit(one_thread):
    """Where the CPU has AMX tiles, int8 regions against a caption are multiplied there: the
    same exact integer sums as PyTorch's int8 product, so the same scores to the last bit."""
    kernels = native.kernels()
    if kernels is None or not kernels.amx:
        pytest.skip("no AMX tiles here (or no C compiler)")
    g = torch.Generator().manual_seed(9)
    for words in (1, 5, 11):  # one block of 16 pieces, one full, three
        values, texts, mask, stored = int8_in_tiles(g, words)
        assert native.tiles_fit(values)
        captions = _Captions.of(torch.arange(1), texts, mask, "i2t")
        integer = captions.integer_words()
        args = (integer.pieces, integer.piece_weights, stored["scales"], captions.gram[0])
        args += (stored["norms"], 9.0, 0.1, 1e-8)
        tiles = native.i2t_integer_scores(kernels, values, *args)
        counts = native.i2t_integer_scores(replace(kernels, amx=False), values, *args)
        torch.testing.assert_close(tiles, counts, atol=0, rtol=0)


def test_bfloat16_pieces_sum_to_each_value_exactly():
    """fp32 rows cut into three bfloat16 pieces for the AMX tiles: the first is the value's
    nearest bfloat16 (as PyTorch rounds), and the three sum to it exactly, at any magnitude, in
    either tile layout; rows are padded to whole tiles with zeros."""
    kernels = native.kernels()
    if kernels is None or not kernels.amx:
        pytest.skip("no AMX tiles here (or no C compiler)")
    g = torch.Generator().manual_seed(12)
    magnitudes = 10 ** torch.empty(40, 64).uniform_(-6, 6, generator=g)
    rows = torch.randn(40, 64, generator=g) * magnitudes
    for vnni in (False, True):
        pieces = native.bf16_pieces(kernels, rows, vnni)
        assert pieces.shape == (3, 48, 64)
        values = (pieces.to(torch.int32) << 16).view(torch.float32)  # each bfloat16, exactly
        tiles = values.view(3, 3, 2, 16, 32)  # piece, row tile, 32 deep, 16 rows, their values
        if vnni:  # row p of a tile: each row's values 2p and 2p + 1 side by side
            tiles = tiles.view(3, 3, 2, 16, 16, 2).transpose(3, 4).reshape(3, 3, 2, 16, 32)
        whole = tiles.transpose(2, 3).reshape(3, 48, 64)
        assert torch.equal(whole[0, :40], rows.bfloat16().float())
        assert torch.equal(whole.double().sum(0)[:40], rows.double())
        assert not whole[:, 40:].any()


def tiled_cases(g: torch.Generator):
    """Image → text inputs whose products go to AMX bfloat16 tiles: 12 captions of up to 11
    words against 3 images of 48 regions 64 deep (a pair of region tiles and one more): fp32,
    fp16 and int8 regions (widened), the int8 with scales and norms, and coordinates in a
    basis without rows of their own."""
    texts = torch.randn(12, 11, 64, generator=g)
    mask = torch.arange(11)[None] < torch.tensor([11, 3, 7, 1, 11, 5, 9, 2, 6, 10, 4, 8])[:, None]
    images = torch.randn(3, 48, 64, generator=g) + torch.randn(3, 1, 64, generator=g)
    yield images, texts, mask, {}
    yield images.half(), texts, mask, {}
    scales = (images.abs().amax(dim=2) / 127).half()
    values = torch.round(images / scales.float()[..., None]).to(torch.int8)
    norms = torch.linalg.vector_norm(values.float() * scales.float()[..., None], dim=2)
    yield values, texts, mask, {"scales": scales, "norms": norms}
    shared = torch.linalg.qr(torch.randn(64, 32, generator=g))[0].T
    yield torch.randn(3, 48, 32, generator=g), texts, mask, {"basis": Basis(shared)}


def test_products_in_bfloat16_tiles_score_as_fp32_products(one_thread):
    """Where the CPU has AMX, an image's fp32 products with many words are taken in bfloat16
    tiles from three pieces of each value: the scores are the fp32 products' (the same kernel
    without the tiles, and PyTorch's) within fp32 rounding, for any blocking of the captions
    (blocks of 3, 4 and 12 captions: odd and even numbers of word tiles)."""
    kernels = native.kernels()
    if kernels is None or not kernels.amx:
        pytest.skip("no AMX tiles here (or no C compiler)")
    for regions, texts, mask, stored in tiled_cases(torch.Generator().manual_seed(13)):
        for block_elements in (48 * 11 * 3, 48 * 11 * 4, 1 << 21):
            basis = stored.get("basis")
            blocks = _caption_blocks(texts, mask, 48, block_elements, "i2t", basis)
            assert _bf16_kernels(regions, blocks, "i2t") is kernels
            args = (texts, mask, 9.0, "i2t", 0.1, block_elements)
            tiled = level_scores(regions, *args, **stored)
            with native.without_amx():
                assert _bf16_kernels(regions, blocks, "i2t") is None
                fused = level_scores(regions, *args, **stored)
            with native.eager():
                eager = level_scores(regions, *args, **stored)
            torch.testing.assert_close(tiled, fused, atol=2e-6, rtol=0)
            torch.testing.assert_close(tiled, eager, atol=2e-6, rtol=0)


def test_rows_read_where_they_lie_score_as_the_rows_copied_out(one_thread):
    """int8 regions handed over as rows of an array (a gallery's, memory-mapped), read in
    place by the tile kernel where it runs and copied out otherwise: the same scores."""
    g = torch.Generator().manual_seed(10)
    values, texts, mask, stored = int8_in_tiles(g)
    array = np.concatenate([values.numpy(), values.numpy()[::-1]])  # 8 rows
    rows = np.array([5, 0, 3])
    taken = {name: torch.cat([x, x.flip(0)])[rows] for name, x in stored.items()}
    for n_reg in (32, 20):  # in tiles, and not
        regions = np.ascontiguousarray(array[:, :n_reg])
        taken = {name: x[:, :n_reg] for name, x in taken.items()}
        for direction in ("i2t", "t2i"):
            got = level_scores(MappedRows(regions, rows), texts, mask, 9.0, direction, **taken)
            copied = torch.from_numpy(regions[rows])
            want = level_scores(copied, texts, mask, 9.0, direction, **taken)
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_words_held_ragged_score_as_the_padded_words(one_thread):
    """A caption bank's words back to back (RaggedWords): one image against them (the ragged
    kernel, where it is built) and anything else (padded here) score as the padded words."""
    images, texts, mask, _ = random_batch(n_img=3, dim=16, seed=11)
    images, texts = images.float(), texts.float() * mask[..., None]
    ragged = RaggedWords(texts[mask], mask)
    torch.testing.assert_close(ragged.padded(), texts, atol=0, rtol=0)
    for regions in (images[:1], images):
        for direction in ("i2t", "t2i"):
            got = level_scores(regions, ragged, mask, 9.0, direction)
            want = level_scores(regions, texts, mask, 9.0, direction)
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_without_a_compiler_scoring_stays_in_pytorch(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built yet
    monkeypatch.setattr(native, "_kernels", None)  # (restored after the test)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    assert native.kernels() is None and "could not be built" in caplog.text
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("PATH", str(tmp_path))  # none at all
    assert native._compiler() is None and native.kernels() is None
    images, texts, mask, _ = random_batch(dim=16, seed=3)
    got = level_scores(images.float(), texts.float(), mask)
    torch.testing.assert_close(got.double(), level_scores(images, texts, mask), atol=1e-5, rtol=0)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("HAT_NATIVE", "0")
    assert native.kernels() is None and not native._tried
