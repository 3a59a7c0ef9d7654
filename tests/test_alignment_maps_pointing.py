import numpy as np
import pytest
import torch

from hat.alignment_maps import alignment_maps
from hat.artifacts import outlier_tokens
from hat.encoder import Encoder
from hat.pointing import (
    artifact_pointing,
    grounded_tokens,
    outlier_statistics,
    peak_to_pixel,
    pointing_game,
    regions_in_boxes,
)
from hat.tokenization import tokenize


@torch.no_grad()
def test_maps_come_from_the_scoring_attention(tiny_model):
    model, tokenizer = tiny_model
    image = model.encode_image(torch.randn(1, 3, 64, 64))
    text = model.encode_text(**tokenize(tokenizer, ["a red circle on the left"], 32))
    maps = alignment_maps(model, image, text)
    assert [m.word_maps.shape for m in maps] == [(8, 8, 8), (8, 4, 4), (8, 2, 2)]
    assert [m.caption_map.shape for m in maps] == [(8, 8), (4, 4), (2, 2)]
    # the level scores of the maps are the model's level scores for the pair
    expected = model.level_scores(image, text)[:, 0, 0]
    assert [m.score for m in maps] == pytest.approx(expected.tolist(), abs=1e-6)
    # image -> text: the caption map is the per-region cosine whose mean is the level score
    assert maps[0].caption_map.mean() == pytest.approx(maps[0].score, abs=1e-6)
    # every region distributes its attention over the words (softmax over words)
    np.testing.assert_allclose(maps[1].word_maps.sum(axis=0), 1.0, atol=1e-5)
    # a region's row of α is its weights over the words
    np.testing.assert_allclose(maps[0].region_words(2, 5), maps[0].word_maps[:, 2, 5])
    # norm outliers are flagged on the level features the maps use, per image
    for level, regions in zip(maps, image.levels, strict=True):
        expected = outlier_tokens(regions[0].norm(dim=-1).numpy()).reshape(level.outliers.shape)
        np.testing.assert_array_equal(level.outliers, expected)


def test_peak_is_projected_back_through_resize_and_centre_crop():
    grid = np.zeros((4, 4))
    grid[0, 3] = 1.0  # top-right cell of the crop
    # a 256x256 image: Resize(256) is a no-op, CenterCrop(224) offsets by 16 px
    x, y = peak_to_pixel(grid, (256, 256), crop=224, resize=256)
    assert (x, y) == pytest.approx((16 + 3.5 * 56, 16 + 0.5 * 56))
    # a 512x256 image: scaled by 1, crop offset (128+16... ) -> check x uses the horizontal offset
    x, y = peak_to_pixel(grid, (512, 256), crop=224, resize=256)
    assert x == pytest.approx((512 - 224) / 2 + 3.5 * 56) and y == pytest.approx(16 + 28)


def test_grounded_tokens_skip_function_words(tiny_model):
    _, tokenizer = tiny_model
    caption = "a red circle to the left of a blue square"
    groundings = [{"object": 0, "span": [0, 12]}, {"object": 1, "span": [29, 42]}]
    got = grounded_tokens(tokenizer, caption, groundings, 32)
    words = tokenizer(caption)["input_ids"]
    names = [tokenizer.convert_ids_to_tokens(words[i]) for i, _ in got]
    assert names == ["red", "circle", "blue", "square"]
    assert [obj for _, obj in got] == [0, 0, 1, 1]


@torch.no_grad()
def test_pointing_game_counts_hits_and_baselines(tiny_model, tmp_path):
    from PIL import Image

    model, tokenizer = tiny_model
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    caption = "a red circle"
    entries = [
        {
            "filename": "x.png",
            "split": "test",
            "objects": [{"box": [0, 0, 64, 32]}],  # the top half
            "sentences": [{"raw": caption, "groundings": [{"object": 0, "span": [0, 12]}]}],
        }
    ]
    image = model.encode_image(torch.randn(1, 3, 64, 64))
    text = model.encode_text(**tokenize(tokenizer, [caption], 32))
    result = pointing_game(Encoder(model, tokenizer), entries, tmp_path, image, text)
    assert result["words"] == 2  # "red", "circle"
    assert result["random"] == pytest.approx(0.5)
    assert result["centre"] == 1.0  # (32, 32) lies on the box's edge
    maps = alignment_maps(model, image, text)
    grounded = [
        t for t, _ in grounded_tokens(tokenizer, caption, [{"object": 0, "span": [0, 12]}], 32)
    ]
    assert grounded == [2, 3]  # [CLS] a red circle [SEP]
    for level, value in zip(maps, result["levels"].values(), strict=True):
        peaks = [
            np.unravel_index(level.word_maps[t].argmax(), level.word_maps[t].shape)[0]
            for t in grounded
        ]
        rows = level.word_maps.shape[1]
        assert value == pytest.approx(np.mean([r < rows / 2 for r in peaks]))


def test_regions_in_boxes_follow_the_resize_and_centre_crop():
    # 256x256: Resize(256) is a no-op, CenterCrop(224) drops 16 px each side; 4x4 regions of 56 px
    inside = regions_in_boxes([[16, 16, 72, 72]], (256, 256), (4, 4), crop=224, resize=256)
    assert inside.reshape(4, 4).nonzero() == ((0,), (0,))
    wide = regions_in_boxes([[0, 0, 130, 256]], (512, 256), (4, 4), crop=224, resize=256)
    assert not wide.any()  # the crop starts at x = 144: the box lies left of every region centre
    both = regions_in_boxes([[16, 16, 72, 72], [184, 184, 240, 240]], (256, 256), (4, 4), 224, 256)
    assert both.sum() == 2 and both[0] and both[15]


def test_outlier_statistics_count_outliers_and_where_they_lie():
    norms = np.ones((4, 10)) + np.linspace(0, 0.01, 10)
    norms[0, 3] = norms[1, 3] = norms[1, 4] = 5.0
    in_boxes = np.zeros((4, 10), bool)
    in_boxes[:, 3] = True
    stats = outlier_statistics(norms, in_boxes)
    assert stats["outlier_fraction"] == pytest.approx(3 / 40)
    assert stats["images_with_outliers"] == 0.5 and stats["outliers_per_affected_image"] == 1.5
    assert stats["regions_in_object_boxes"] == 0.1
    assert stats["outliers_in_object_boxes"] == pytest.approx(2 / 3)


@torch.no_grad()
def test_artifact_pointing_agrees_with_the_pointing_game(tiny_model, tmp_path):
    from PIL import Image

    model, tokenizer = tiny_model
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    caption = "a red circle and a blue square"
    spans = [{"object": 0, "span": [0, 12]}, {"object": 1, "span": [17, 30]}]
    entries = [
        {
            "filename": "x.png",
            "split": "test",
            "objects": [{"box": [0, 0, 64, 32]}, {"box": [0, 32, 32, 64]}],
            "sentences": [{"raw": caption, "groundings": spans}],
        }
    ]
    torch.manual_seed(1)
    image = model.encode_image(torch.randn(1, 3, 64, 64))
    image.levels[0][0, 5] *= 20  # one region of the first level becomes a norm outlier
    text = model.encode_text(**tokenize(tokenizer, [caption], 32))
    game = pointing_game(Encoder(model, tokenizer), entries, tmp_path, image, text)
    study = artifact_pointing(Encoder(model, tokenizer), entries, tmp_path, image, text)
    assert study["words"] == game["words"] == 4
    maps = alignment_maps(model, image, text)
    tokens = [t for t, _ in grounded_tokens(tokenizer, caption, spans, 32)]
    for level, (name, entry) in zip(maps, study["levels"].items(), strict=True):
        assert entry["pointing_all_regions"] == pytest.approx(game["levels"][name])
        on_outlier = [level.outliers.flat[level.word_maps[t].argmax()] for t in tokens]
        assert entry["peak_on_outlier"] == pytest.approx(np.mean(on_outlier))
        if not level.outliers.any():  # nothing excluded: the same peaks
            assert entry["pointing_outliers_excluded"] == entry["pointing_all_regions"]
    assert maps[0].outliers.flat[5]
