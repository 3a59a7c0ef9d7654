import numpy as np
import pytest
import torch

from hat.heatmaps import alignment_maps
from hat.pointing import grounded_tokens, peak_to_pixel, pointing_game
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
    result = pointing_game(model, tokenizer, entries, tmp_path, image, text)
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
