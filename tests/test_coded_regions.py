"""pq-coded regions (a compressed gallery's) score as their decoded coordinates do, decoded or
not: an image → text query's caption scores the codes through a table of its words' products
with the centroids (hat.native), everything else decodes them."""

import pytest
import torch

from hat import native
from hat.alignment import Basis, _coded_kernels, level_scores
from hat.coded_regions import Codebook, CodedRegions
from hat.model import ImageFeatures

SUBS, DSUB, DIM = 8, 3, 40  # 24 coordinates in the PCA basis of 40-d features


def coded_images(count: int = 6, regions: int = 20, own: bool = True, seed: int = 0):
    """Codes, centroids and shifts as a pq segment's, with a basis: 24 shared orthonormal rows
    and (``own``) a row of each image's own orthogonal to them, along which every region has
    the image's ``length``."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (count, regions, SUBS), generator=g).to(torch.uint8)
    centroids = torch.randn(SUBS, 256, DSUB, generator=g) * 0.3
    shift = torch.randn(count, SUBS * DSUB, generator=g)
    q = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))[0].T.float()
    shared, rows, length = q[: SUBS * DSUB], None, None
    if own:
        rows = torch.stack([q[SUBS * DSUB + i % 3] for i in range(count)])[:, None]  # (I, 1, D)
        length = torch.rand(count, generator=g) + 0.5
    return CodedRegions(codes, Codebook.of(centroids), shift, length), Basis(shared, rows)


def reference(regions: CodedRegions, basis: Basis, words, mask, direction="i2t"):
    """Scores of the decoded, expanded features in float64."""
    coordinates, _ = regions.decoded()
    features = basis.expand(coordinates).double()
    return level_scores(features, words.double(), mask, 9.0, direction)


@pytest.mark.parametrize("own", [True, False])
def test_codes_decode_in_c_as_in_pytorch(own):
    regions, _ = coded_images(own=own)
    assert regions.shape == (6, 20, SUBS * DSUB + own) and len(regions[2:5]) == 3
    coordinates, norms = regions.decoded()
    with native.eager():
        in_torch, torch_norms = regions.decoded()
        assert regions[0:0].decoded()[0].shape == (0, 20, SUBS * DSUB + own)
    torch.testing.assert_close(coordinates, in_torch, atol=1e-6, rtol=0)
    torch.testing.assert_close(norms, torch.linalg.vector_norm(in_torch, dim=2))
    torch.testing.assert_close(torch_norms, norms, atol=1e-5, rtol=0)
    part = regions[torch.tensor([4, 1])]
    torch.testing.assert_close(part.float(), coordinates[[4, 1]])
    assert regions.to("cpu") is regions and regions.to("meta").shape == regions.shape


def test_features_of_codes_expand_and_average_as_their_decoded_coordinates():
    regions, basis = coded_images()
    features = ImageFeatures([regions], [basis])
    expanded = basis.expand(regions.decoded()[0])
    torch.testing.assert_close(features.expanded().levels[0], expanded)
    torch.testing.assert_close(features.mean_region(0), expanded.mean(dim=1))
    torch.testing.assert_close(features[1:3].expanded().levels[0], expanded[1:3])


@pytest.mark.parametrize("own", [True, False])
def test_a_query_caption_scores_the_codes_as_their_decoded_features(one_thread, own):
    """One caption at a time (a query) of 1 to 70 words, some padded: the table path (up to
    64 words) and the decoded path give the float64 reference's scores to fp32 rounding."""
    regions, basis = coded_images(own=own)
    g = torch.Generator().manual_seed(1)
    for words, real in [(1, 1), (5, 3), (16, 16), (17, 12), (40, 33), (64, 64), (70, 70)]:
        text = torch.randn(1, words, DIM, generator=g) * torch.logspace(-2, 0.5, DIM)
        mask = torch.arange(words)[None] < real
        want = reference(regions, basis, text, mask)
        assert (_coded_kernels(regions, text, mask, "i2t", basis, None) is not None) == (
            native.kernels() is not None and real <= native.PQ_MAX_WORDS
        )
        got = level_scores(regions, text, mask, 9.0, "i2t", basis=basis)
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=0)
        with native.eager():
            eager = level_scores(regions, text, mask, 9.0, "i2t", basis=basis)
        torch.testing.assert_close(eager.double(), want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_codes_against_many_captions_or_words_attending_are_decoded(one_thread, direction):
    regions, basis = coded_images()
    g = torch.Generator().manual_seed(2)
    text = torch.randn(5, 9, DIM, generator=g)
    mask = torch.arange(9)[None] < torch.tensor([9, 4, 7, 1, 6])[:, None]
    assert _coded_kernels(regions, text, mask, direction, basis, None) is None
    if direction == "t2i":
        assert _coded_kernels(regions, text[:1], mask[:1], direction, basis, None) is None
    want = reference(regions, basis, text, mask, direction)
    got = level_scores(regions, text, mask, 9.0, direction, basis=basis)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=0)


def test_the_table_kernel_refuses_what_it_cannot_score(one_thread):
    kernels = native.kernels()
    if kernels is None:
        pytest.skip("no C compiler: the fused kernels are not built")
    regions, _ = coded_images()
    codes = (regions.codes, regions.shift, regions.codebook.by_dimension, regions.codebook.squares)
    for words, width in [(0, 16), (3, 32), (65, 80)]:
        tables = torch.zeros(SUBS, 256, width), torch.zeros(6, width), torch.zeros(6)
        with pytest.raises(ValueError, match="pq scores take"):
            native.i2t_pq_scores(kernels, *codes, *tables, torch.eye(words), 9.0, 0.1, 1e-8)
