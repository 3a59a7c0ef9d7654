"""The first-stage global head: what it computes, what it learns, and what it leaves alone."""

import pytest
import torch
import torch.nn.functional as F

from hat.data.captions import read_karpathy
from hat.demo_build.recipe import Schedule, cache_split, evaluate_cached, train_global_head
from hat.encoder import Encoder
from hat.global_head import GlobalHead, pooled_image_embedding, pooled_text_embedding
from hat.pooling import pool_words


def test_pooled_embedding_is_the_mean_of_pooled_level_cosines():
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, k, 8, generator=g) for k in (16, 4)]
    words = [torch.randn(2, 6, 8, generator=g) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    got = pooled_image_embedding(images) @ pooled_text_embedding(words, mask).T
    cosines = [
        F.cosine_similarity(F.normalize(v, dim=-1).mean(1)[:, None], pool_words(t, mask)[None], -1)
        for v, t in zip(images, words, strict=True)
    ]
    torch.testing.assert_close(got, sum(cosines) / 2)
    torch.testing.assert_close(pooled_image_embedding(images).norm(dim=1), torch.ones(3))


def test_untrained_head_is_the_pooled_image_embedding():
    g = torch.Generator().manual_seed(1)
    levels = [torch.randn(3, k, 8, generator=g) for k in (16, 4)]
    torch.testing.assert_close(GlobalHead(2, 8, 16)(levels), pooled_image_embedding(levels))


def test_head_gives_unit_vectors_and_ignores_padding():
    torch.manual_seed(2)
    head = GlobalHead(2, 8, 5)
    torch.nn.init.normal_(head.queries)
    words = [torch.randn(2, 6, 8) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    padded = [x.masked_fill(~mask[..., None], 1e3) for x in words]
    out = head(padded, mask)
    torch.testing.assert_close(out, head(words, mask))
    torch.testing.assert_close(out[:1], head([x[:1, :3] for x in words], mask[:1, :3]))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_head_learns_from_detached_features(tiny_model):
    model, tokenizer = tiny_model
    images = model.encode_image(torch.randn(3, 3, 64, 64))
    batch = tokenizer(
        ["a red circle", "a blue square on the left", "two"], return_tensors="pt", padding=True
    )
    texts = model.encode_text(batch["input_ids"], batch["attention_mask"])
    model.first_stage_logits(images, texts).sum().backward()
    assert (
        model.image_global.queries.grad is not None
        and model.text_global.proj.weight.grad is not None
    )
    assert model.global_logit_scale.grad is not None
    tower_and_projections = [*model.image_proj.parameters(), *model.text_proj.parameters()]
    tower_and_projections += list(model.text_tower.parameters())
    assert all(p.grad is None for p in tower_and_projections)


def test_model_without_head_pools_and_cannot_train_one(tiny_model):
    from dataclasses import replace

    from hat.model import HATModel

    model, _ = tiny_model
    plain = HATModel(replace(model.config, global_dim=0))
    images = plain.encode_image(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(plain.image_embedding(images), pooled_image_embedding(images.levels))
    assert plain.first_stage_dim == 3 * model.config.embed_dim
    assert not any("global" in k for k in plain.state_dict())
    with pytest.raises(ValueError, match="no global head"):
        plain.first_stage_logits(
            images, plain.encode_text(torch.tensor([[2, 5, 3]]), torch.ones(1, 3))
        )


def test_distilling_raises_candidate_recall_and_leaves_hat_alone(
    tiny_model, synthetic_dataset, tmp_path
):
    model, tokenizer = tiny_model
    json_path, image_root = synthetic_dataset
    data = read_karpathy(json_path, image_root, "train")  # 48 images, 240 captions
    cached = cache_split(Encoder(model, tokenizer), data, tmp_path / "train.safetensors")
    hat_state = {k: v.clone() for k, v in model.state_dict().items() if "global" not in k}
    before = evaluate_cached(model, cached)
    schedule = Schedule(epochs=30, batch_size=16, lr=1e-2, seed=0)
    history = train_global_head(model, cached, cached, schedule, tmp_path / "log.jsonl")
    after = evaluate_cached(model, cached)
    assert after.headline == before.headline  # HAT's own scores did not move
    for key, value in model.state_dict().items():
        if key in hat_state:
            torch.testing.assert_close(value, hat_state[key], rtol=0, atol=0)
    assert history[-1]["loss"] < history[0]["loss"]
    assert after.first_stage_recall["i2t_K=50"] > before.first_stage_recall["i2t_K=50"] + 0.1
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 30
