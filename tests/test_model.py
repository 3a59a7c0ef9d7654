import json
import pickle

import pytest
import torch

from hat import HATConfig, HATModel, create_model, get_preset, list_presets, load_model
from hat.encode import concat_text_features, score_matrix
from hat.encoder import Encoder
from hat.hub import PretrainedUnavailableError
from hat.model import CheckpointFormatError
from hat.tokenization import tokenize

CAPTIONS = ["a red circle on the left", "one blue square", "a green triangle at the top of a box"]


def _encode(model, tokenizer, captions=CAPTIONS, seed=0):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    batch = tokenize(tokenizer, captions, model.config.max_text_len)
    return model.encode_image(images), model.encode_text(**batch)


def test_presets_are_data_and_round_trip_through_json(tmp_path):
    assert {"hat-b", "hat-tiny"} <= set(list_presets())
    paper = get_preset("hat-b")
    assert paper.image_levels == [1, 2, 3] and paper.text_levels == [4, 10, 12]
    assert (paper.embed_dim, paper.lambda_softmax, paper.margin, paper.max_text_len) == (
        768,
        9.0,
        0.2,
        32,
    )
    paper.save(tmp_path / "c.json")
    assert HATConfig.load(tmp_path / "c.json") == paper
    with pytest.raises(ValueError, match="unknown HAT config keys"):
        HATConfig.from_dict({**paper.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="pair up"):
        HATConfig(image_levels=[1, 2], text_levels=[4])
    with pytest.raises(ValueError, match="unknown HAT preset"):
        get_preset("nope")


@torch.no_grad()
def test_feature_shapes_and_projection_init(tiny_model):
    model, tokenizer = tiny_model
    images, texts = _encode(model, tokenizer)
    grids = model.image_tower.grid_sizes(64)
    assert [x.shape for x in images.levels] == [(2, h * w, 32) for h, w in grids]
    assert grids == [(8, 8), (4, 4), (2, 2)]
    assert all(x.shape[:2] == texts.mask.shape for x in texts.levels)
    assert texts.lengths().tolist() == [8, 5, 11]  # [CLS] + words + [SEP]
    for proj in [*model.image_proj, *model.text_proj]:
        assert proj.bias.abs().max() == 0
        assert 0.01 < proj.weight.std() < 0.03
    # the last image level reuses the backbone's final norm, the others get new ones
    assert isinstance(model.image_tower.level_norms[2], torch.nn.Identity)
    assert isinstance(model.image_tower.level_norms[0], torch.nn.LayerNorm)


@torch.no_grad()
def test_independent_encoders_give_the_forward_scores(tiny_model):
    model, tokenizer = tiny_model
    images = torch.randn(3, 3, 64, 64)
    batch = tokenize(tokenizer, CAPTIONS, 32)
    out = model(images, **batch)
    full = out.hat
    image, text = model.encode_image(images), model.encode_text(**batch)
    torch.testing.assert_close(full, model.score(image, text))
    global_sims = model.image_embedding(image) @ model.text_embedding(text).T
    torch.testing.assert_close(out.first_stage, model.global_logit_scale.exp() * global_sims)
    per_level = model.level_scores(model.encode_image(images), model.encode_text(**batch))
    torch.testing.assert_close(per_level.sum(0), full)


@torch.no_grad()
def test_padding_in_a_batch_has_no_effect_on_scores(tiny_model):
    model, tokenizer = tiny_model
    images, texts = _encode(model, tokenizer)
    alone = [model.score(images, _encode(model, tokenizer, [c])[1]) for c in CAPTIONS]
    torch.testing.assert_close(
        model.score(images, texts), torch.cat(alone, dim=1), atol=1e-5, rtol=0
    )
    # batches padded to different widths concatenate into the same scores
    parts = [_encode(model, tokenizer, CAPTIONS[:2])[1], _encode(model, tokenizer, CAPTIONS[2:])[1]]
    merged = concat_text_features(parts)
    assert parts[0].mask.shape[1] < merged.mask.shape[1]
    torch.testing.assert_close(
        model.score(images, merged), model.score(images, texts), atol=1e-5, rtol=0
    )


@torch.no_grad()
def test_save_load_reproduces_scores_bit_for_bit(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    before = model.score(*_encode(model, tokenizer))
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".ckpt")) for f in files)
    loaded, tok2 = load_model(tmp_path / "ckpt")
    loaded.eval()
    after = loaded.score(*_encode(loaded, tok2))
    assert torch.equal(before, after)
    assert tok2(CAPTIONS)["input_ids"] == tokenizer(CAPTIONS)["input_ids"]
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["text_backbone_config"]["hidden_size"] == 32


def test_saving_replaces_a_checkpoint_atomically(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    target = tmp_path / "ckpt"
    model.save_pretrained(target, tokenizer=tokenizer)
    (target / "stale.txt").write_text("old")
    model.save_pretrained(target, tokenizer=tokenizer)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_loading_a_non_checkpoint_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a HAT checkpoint"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (None, "a zip archive"),  # torch.save's format
        (pickle.dumps({"weight": [0.0]}, protocol=2), "a pickle"),
        (b"version https://git-lfs.github.com/spec/v1\nsize 1\n", "a Git LFS pointer"),
        (b"<!DOCTYPE html><html>Quota exceeded</html>", "an HTML page"),
        (b"", "empty"),
    ],
    ids=["torch-save", "pickle", "lfs-pointer", "html", "empty"],
)
def test_weights_that_are_no_safetensors_are_named_for_what_they_are(
    tiny_model, tmp_path, content, kind
):
    model, tokenizer = tiny_model
    folder = model.save_pretrained(tmp_path / "ckpt", tokenizer)
    weights = folder / "model.safetensors"
    if content is None:
        torch.save(model.state_dict(), weights)
    else:
        weights.write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=f"not a safetensors file: it is {kind}") as e:
        load_model(folder)
    assert "config.json, model.safetensors" in str(e.value)


def test_truncated_weights_are_named_as_such(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    folder = model.save_pretrained(tmp_path / "ckpt", tokenizer)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointFormatError, match="a damaged or truncated safetensors file"):
        load_model(folder)


@torch.no_grad()
def test_exact_scoring_of_stored_features_in_blocks(tiny_model):
    model, tokenizer = tiny_model
    images = model.encode_image(torch.randn(5, 3, 64, 64))
    texts = Encoder(model, tokenizer).encode_captions(CAPTIONS * 3, batch_size=2)
    blocked = score_matrix(model, images, texts, image_block=2)
    assert blocked.shape == (3, 5, 9)
    torch.testing.assert_close(blocked, model.level_scores(images, texts))


def test_paper_preset_builds_offline_with_the_official_shapes():
    model = HATModel(get_preset("hat-b"))
    assert model.image_tower.channels == [256, 512, 1024]
    assert model.image_tower.grid_sizes(224) == [(28, 28), (14, 14), (7, 7)]
    assert model.text_tower.channels == [768, 768, 768]
    assert len(model.text_tower.backbone.encoder.layer) == 12


def test_pretrained_weights_fail_fast_and_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedUnavailableError, match="--pretrained-image"):
        create_model("hat-tiny", pretrained_image="hub")
    with pytest.raises(PretrainedUnavailableError, match="--pretrained-text"):
        create_model("hat-tiny", pretrained_text="hub")
    with pytest.raises(PretrainedUnavailableError, match="not found"):
        create_model("hat-tiny", pretrained_image="/no/such/file.safetensors")


def test_building_a_model_leaves_the_given_config_alone():
    config = get_preset("hat-tiny")
    before, architecture = config.to_dict(), config.text_backbone_config
    model = HATModel(config)
    assert config.to_dict() == before and config.text_backbone_config is architecture
    assert model.config.text_backbone_config["hidden_size"] == 32
    model.config.image_levels.append(99)  # the model's config is its own, lists included
    assert config.to_dict() == before
    model, tokenizer = create_model(config, tokenizer="bert-base-uncased-vocab.txt")
    assert config.to_dict() == before
    assert model.config.tokenizer == "bert-base-uncased-vocab.txt"
    assert tokenizer.vocab_size > 30000  # the bundled BERT vocabulary, not the tiny one
