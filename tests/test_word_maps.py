"""The maps page's readable views: whole words, the word-first and region-first views of α, and
the norm-outlier rule (hat.artifacts)."""

import numpy as np
import pytest
import torch
from PIL import Image

from hat.alignment_maps import alignment_maps
from hat.artifacts import display_peak, modified_z, outlier_tokens
from hat.demo import InputError
from hat.demo.pairmaps import MINOR_MARK, PairMaps, region_view, word_view
from hat.demo.wordmaps import PANEL, colour_ranges, mark_region, region_cell, word_map
from hat.demo.words import Word, group_pieces, word_weights
from hat.tokenization import tokenize


# ---------------------------------------------------------------- words
def test_word_pieces_are_merged_and_minor_words_marked():
    pieces = ["[CLS]", "a", "bul", "##ldo", "##zer", "near", "the", "tree", ",", "[SEP]"]
    words = group_pieces(pieces)
    assert [w.text for w in words] == [
        "[CLS]",
        "a",
        "bulldozer",
        "near",
        "the",
        "tree",
        ",",
        "[SEP]",
    ]
    assert words[2].pieces == (2, 3, 4)
    assert [w.text for w in words if not w.minor] == ["bulldozer", "tree"]
    # a stray continuation after a special token stays its own word
    assert [w.text for w in group_pieces(["[CLS]", "##s"])] == ["[CLS]", "##s"]


def test_a_words_weight_is_the_sum_of_its_pieces():
    words = [Word("x", (0,), False), Word("yz", (1, 2), False)]
    weights = np.array([0.2, 0.3, 0.5])
    np.testing.assert_allclose(word_weights(weights, words), [0.2, 0.8])
    maps = np.arange(12, dtype=float).reshape(3, 2, 2)  # one (2, 2) map per piece
    np.testing.assert_allclose(word_weights(maps, words)[1], maps[1] + maps[2])


# ---------------------------------------------------------------- outliers
def test_only_high_norm_outliers_are_flagged():
    rng = np.random.default_rng(0)
    norms = rng.normal(10.0, 0.5, size=(2, 64))
    norms[0, 5] = 30.0  # an artifact-like token
    norms[1, 7] = 1.0  # a low norm is ordinary
    mask = outlier_tokens(norms)
    assert mask[0].nonzero()[0].tolist() == [5] and not mask[1].any()
    assert modified_z(norms)[0, 5] > 3.5
    assert not outlier_tokens(np.full((1, 16), 4.0)).any()  # no spread, no outlier


def test_the_display_peak_skips_excluded_regions():
    grid = np.array([[0.1, 0.9], [0.5, 0.2]])
    assert display_peak(grid) == (0, 1)
    assert display_peak(grid, np.array([[False, True], [False, False]])) == (1, 0)
    assert display_peak(grid, np.ones((2, 2), bool)) == (0, 1)  # nothing left: the plain peak


def test_colour_ranges_shared_per_level_and_without_outliers():
    a = np.array([[0.0, 0.2], [0.1, 0.9]])
    b = np.array([[0.3, 0.4], [0.5, 0.6]])
    none = np.zeros((2, 2), bool)
    hot = np.array([[False, False], [False, True]])  # a's 0.9 is an outlier
    assert colour_ranges([a, b], [none, none], True, False) == [(0.0, 0.9)] * 2
    assert colour_ranges([a, b], [none, none], False, False) == [(0.0, 0.9), (0.3, 0.6)]
    assert colour_ranges([a, b], [hot, none], True, True) == [(0.0, 0.6)] * 2
    assert colour_ranges([a, b], [hot, none], True, False) == [(0.0, 0.9)] * 2


def test_a_click_lands_in_the_region_under_it():
    assert region_cell(0, 0, 448, (16, 16)) == (0, 0)
    assert region_cell(447.9, 447.9, 448, (16, 16)) == (15, 15)
    assert region_cell(28, 27.9, 448, (16, 16)) == (0, 1)  # 28 px per region
    assert region_cell(300, 100, 448, (2, 2)) == (0, 1)


# ---------------------------------------------------------------- views of a pair
@pytest.fixture()
def pair(tiny_model):
    model, tokenizer = tiny_model
    caption = "a red circle on the left"
    batch = tokenize(tokenizer, [caption], 32)
    with torch.no_grad():
        image = model.encode_image(torch.randn(1, 3, 64, 64))
        levels = alignment_maps(model, image, model.encode_text(**batch))
    length = int(batch["attention_mask"][0].sum())
    pieces = tokenizer.convert_ids_to_tokens(batch["input_ids"][0, :length].tolist())
    view = Image.new("RGB", (448, 448), (120, 120, 120))
    titles = [(f"level {n + 1}", "layers") for n in range(len(levels))]
    return PairMaps(view, levels, group_pieces(pieces), titles, sum(m.score for m in levels))


def test_the_word_view_shows_the_words_column_of_alpha_at_every_level(pair):
    red = pair.find("RED")
    assert pair.words[red].text == "red" and red == pair.first_content_word()
    for level in pair.levels:  # a word's map is its column of the scoring attention
        np.testing.assert_allclose(word_map(level, pair.words[red]), level.word_maps[red])
    picture, note = word_view(pair, red)
    assert picture.width >= 3 * PANEL and PANEL >= 320 and picture.height > PANEL
    assert "softmax over the words for every region" in note and "**red**" in note
    shared, per_level = word_view(pair, red)[0], word_view(pair, red, per_level=True)[0]
    assert shared.size == per_level.size and shared.tobytes() != per_level.tobytes()
    chips = dict(pair.chips())
    assert chips[f"[CLS]{MINOR_MARK}"] == 0 and chips["red"] == red


def test_the_region_view_shows_the_regions_row_of_alpha(pair):
    marked, picture, note, numbers = region_view(pair, 447, 0)  # the top-right region
    assert marked.size == pair.view.size and picture.width > 0 and "sum to 1" in note
    for level, (name, entry) in zip(pair.levels, numbers.items(), strict=True):
        w = level.word_maps.shape[2]
        assert name == level.name and entry["region"] == [0, w - 1]
        weights = [v for _, v in entry["words"]]
        assert sum(weights) == pytest.approx(1.0, abs=1e-5)  # i2t: a softmax over the words
        np.testing.assert_allclose(weights, level.word_maps[:, 0, w - 1], rtol=1e-6)


def test_a_marked_region_is_outlined_where_it_lies():
    view = Image.new("RGB", (64, 64), (0, 0, 255))
    marked = np.asarray(mark_region(view, (1, 0), (2, 2)))
    assert (marked[40, 0] != (0, 0, 255)).any() and (marked[10, 10] == (0, 0, 255)).all()
    assert (marked[40, 50] == (0, 0, 255)).all()  # the other regions stay as they were


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: word_view(None, 0), "Show the alignment maps"),
        (lambda p: word_view(p, 99), "Pick one of the caption's words"),
        (lambda p: word_view(p, "x"), "Pick one of the caption's words"),
        (lambda p: p.find("zebra"), "not a word of the caption; its words: [CLS], a, red"),
        (lambda p: region_view(p, 448, 10), "must lie in the 448-pixel view"),
        (lambda p: region_view(p, float("nan"), 10), "must lie in the 448-pixel view"),
        (lambda p: region_view(p, "left", 10), "Click a point"),
    ],
    ids=["no-pair", "index", "not-a-number", "unknown-word", "outside", "nan", "text"],
)
def test_bad_choices_get_a_clear_message(pair, call, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(pair)
