"""The demo recipe's data plumbing: group-aware batches, merging and subsetting cached splits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hat import create_model
from hat.concepts import reference_sample
from hat.data.captions import CaptionedImages
from hat.demo_build import recipe
from hat.demo_build.recipe import CachedSplit, PairSampler, merge_splits
from hat.factory import gate_descriptors
from hat.metrics import retrieval_metrics


def _split(num_images: int, width: int, offset: float, groups=None) -> CachedSplit:
    """A cached split whose features encode (image index + offset), two captions per image."""
    caption_to_image = np.repeat(np.arange(num_images), 2)
    data = CaptionedImages(
        [Path(f"{offset}-{i}.jpg") for i in range(num_images)],
        [f"caption {offset} {j}" for j in range(2 * num_images)],
        caption_to_image,
    )
    image = torch.arange(num_images, dtype=torch.float16)[:, None, None] + offset
    text = torch.from_numpy(caption_to_image).half()[:, None, None].expand(-1, width, 3) + offset
    mask = torch.ones(2 * num_images, width, dtype=torch.bool)
    mask[::2, -1] = False  # every first caption is one token shorter
    levels = [image.expand(-1, 4, 3).clone(), image.expand(-1, 4, 3).clone()]
    return CachedSplit(data, levels, [text.clone(), text.clone()], mask, groups)


def test_sampler_keeps_one_image_per_group_in_every_batch():
    groups = np.array([0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8])
    data = CaptionedImages([Path(f"{i}") for i in range(12)], ["c"] * 12, np.arange(12))
    sampler = PairSampler(data, batch_size=4, seed=0, groups=groups)
    seen = 0
    for _ in range(20):
        for images, captions in sampler.epoch():
            assert len(images) == 4
            assert len(set(groups[images.numpy()])) == 4  # no two images of one group
            assert torch.equal(captions, images)  # one caption each: its own
            seen += 1
    assert seen >= 20 * 2  # the waiting images do not starve the epoch


def test_sampler_without_groups_covers_every_image_once_per_epoch():
    data = CaptionedImages(
        [Path(f"{i}") for i in range(10)], ["c"] * 20, np.repeat(np.arange(10), 2)
    )
    sampler = PairSampler(data, batch_size=5, seed=1)
    batches = list(sampler.epoch())
    images = torch.cat([b[0] for b in batches])
    assert sorted(images.tolist()) == list(range(10))
    for image_ids, caption_ids in batches:
        assert torch.equal(torch.from_numpy(data.caption_to_image)[caption_ids], image_ids)


def test_merge_pads_captions_and_renumbers_images_and_groups():
    """The merge also releases its inputs' tensors as it goes (memory peaks near one copy)."""
    first = _split(3, width=5, offset=0.0)
    second = _split(2, width=3, offset=100.0, groups=np.array([7, 7]))
    merged = merge_splits(first, second)
    assert first.image_levels == [] and second.text_levels == []
    assert merged.data.num_images == 5 and len(merged.data.captions) == 10
    assert merged.data.caption_to_image.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert merged.text_mask.shape == (10, 5) and merged.text_levels[0].shape == (10, 5, 3)
    assert not merged.text_mask[6:, 3:].any()  # padding of the narrower split is masked
    assert merged.groups.tolist() == [0, 1, 2, 3, 3]  # both views of group 7 stay together
    # Features travel with their images: image 3 of the merge is image 0 of the second split.
    assert merged.image_levels[1][3, 0, 0].item() == 100.0
    assert merged.text_levels[0][6, 0, 0].item() == 100.0


def test_sampler_draws_only_from_its_pool():
    data = CaptionedImages([Path(f"{i}") for i in range(12)], ["c"] * 12, np.arange(12))
    pool = np.array([1, 3, 5, 7, 9, 11])
    sampler = PairSampler(data, batch_size=3, seed=0, pool=pool)
    assert len(sampler) == 2
    drawn = torch.cat([images for images, _ in sampler.epoch()])
    assert sorted(drawn.tolist()) == pool.tolist()


def test_query_subsets_search_the_whole_gallery():
    c2i = np.array([0, 1, 2])
    sims = np.array([[0.9, 0.1, 0.8], [0.2, 0.5, 0.1], [0.95, 0.3, 0.7]])
    # Text -> image: caption 0 prefers image 2, caption 2 prefers image 0; image -> text: image
    # 2 prefers caption 0. A subset's queries still rank against all three items.
    whole = retrieval_metrics(sims, c2i)
    subset = retrieval_metrics(sims, c2i, np.array([False, True, True]))
    assert subset["t2i_r1"] == pytest.approx(50.0) and subset["i2t_r1"] == pytest.approx(50.0)
    assert whole["t2i_r1"] == pytest.approx(100 / 3) and whole["i2t_r1"] == pytest.approx(200 / 3)
    only_two = retrieval_metrics(sims, c2i, np.array([False, False, True]))
    assert only_two["t2i_r1"] == 0.0 and only_two["t2i_medr"] == 2.0
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(sims, c2i, np.zeros(3, dtype=bool))


def test_the_gate_references_from_the_cache_are_the_benchmarks(monkeypatch):
    """The recipe takes the concept gate's references from cached backbone outputs; they equal
    the descriptors of the same training images encoded whole, sampled as the benchmark does."""
    torch.manual_seed(0)
    model, _ = create_model("hat-tiny")
    model.eval()
    size = model.config.image_size
    pixels = torch.randn(8, 3, size, size)  # 5 scenes, then 3 objects
    with torch.no_grad():
        cached = [x.half() for x in model.image_tower.backbone_levels(pixels)]
    data = CaptionedImages([Path(f"{i}.jpg") for i in range(8)], ["c"] * 8, np.arange(8))
    union = CachedSplit(data, cached, [], torch.ones(8, 1, dtype=torch.bool))
    train_sets = {
        "scenes only": replace(union, pool=np.arange(5)),
        "+ objects, 2 views (shipped data)": union,
    }
    monkeypatch.setattr(recipe, "GATE_REFERENCES", 2)
    monkeypatch.setitem(recipe.CONCEPT_LEVEL, "gate_level", 2)
    got = recipe.gate_reference(model, train_sets, seed=3)
    scenes, objects = reference_sample([5, 3], 2, seed=3)
    rows = torch.from_numpy(np.concatenate([scenes, 5 + objects]))
    with torch.no_grad():
        whole = model.image_head(
            [x[rows].half().float() for x in model.image_tower.backbone_levels(pixels)]
        )
    torch.testing.assert_close(got, gate_descriptors(whole, 2))
    monkeypatch.setitem(recipe.CONCEPT_LEVEL, "gate_level", None)
    assert recipe.gate_reference(model, train_sets, seed=3) is None
