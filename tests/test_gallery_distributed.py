"""Distributed gallery builds: ``torchrun -m hat index build`` with two gloo processes on CPU."""

import json
import os

import numpy as np
import pytest
import torch

from hat import create_model, load_model
from hat.encoder import Encoder
from hat.gallery import build_gallery, folder_collection
from hat.gallery.shards import chunk
from hat.search import Searcher
from tests.multiprocess import PROBE, ROOT, ended_cleanly, torchrun
from tests.test_gallery import write_folder, write_image

QUERIES = ["a square of colour 3", "picture number 7", "a red square", "something else entirely"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model, tokenizer = create_model("hat-tiny")
    return model.eval().save_pretrained(tmp_path_factory.mktemp("ckpt") / "m", tokenizer)


def index_build(*args, script=PROBE, timeout=180):
    """Two processes of ``hat index build`` (or of ``script``) under torchrun, on the CPU."""
    return torchrun("index", "build", *args, script=script, timeout=timeout)


def build_args(checkpoint, images, captions, cache) -> list:
    """``hat index build`` arguments of a quiet CPU build of ``images`` into ``cache``."""
    args = ["--checkpoint", checkpoint, "--images", images, "--captions", captions]
    return [*args, "--cache", cache, "--device", "cpu", "--quiet"]


def build_both_ways(checkpoint, images, captions, tmp_path):
    """The gallery built by torchrun (its printed summary too) and by one process."""
    cache = os.path.relpath(tmp_path / "dist", ROOT)  # relative: the ranks must agree on it
    args = [*build_args(checkpoint, images, captions, cache), "--workers", 0, "--json"]
    run = index_build(*args)
    assert ended_cleanly(run), run.stderr[-3000:] + run.stdout[-500:]
    info = json.loads(run.stdout[run.stdout.index("{") : run.stdout.rindex("}") + 1])
    assert run.stdout.count('"gallery"') == 1  # the summary is printed by rank 0 only
    single = build_gallery(checkpoint, folder_collection(images, captions), tmp_path / "single")
    return info, single


def step(features: torch.Tensor) -> torch.Tensor:
    """One int8 quantisation step of each stored vector (absmax / 127), broadcast to its values."""
    return features.abs().amax(dim=-1, keepdim=True) / 127


def assert_same_gallery(distributed, single, model, tokenizer):
    assert distributed.directory.name == single.directory.name  # same key: same gallery
    assert distributed.paths == single.paths and distributed.captions == single.captions
    assert np.array_equal(distributed.caption_image, single.caption_image)
    # Batches of another size may move a float by an ulp, hence an int8 value by one step.
    images = range(single.num_images)
    captions = range(single.num_captions)
    for kind, a, b in [
        ("image", distributed.image_features(images), single.image_features(images)),
        ("text", distributed.text_features(captions), single.text_features(captions)),
    ]:
        if kind == "text":
            assert torch.equal(a.mask, b.mask)
        for x, y in zip(a.levels, b.levels, strict=True):
            assert x.shape == y.shape
            assert bool(((x - y).abs() <= torch.maximum(step(x), step(y)) * 1.001 + 1e-7).all())
        np.testing.assert_allclose(
            distributed.embeddings(kind), single.embeddings(kind), rtol=1e-4, atol=1e-5
        )
    searchers = [Searcher(g, Encoder(model, tokenizer)) for g in (distributed, single)]
    for query in QUERIES:
        a, b = (s.text_to_image(query, k=5) for s in searchers)
        assert [h.index for h in a.hits] == [h.index for h in b.hits]
        np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in b.hits], atol=1e-4)
    for image in [single.image_path(0), single.image_path(single.num_images - 1)]:
        a, b = (s.image_to_text(image, k=5) for s in searchers)
        assert [h.index for h in a.hits] == [h.index for h in b.hits]


def test_chunks_are_contiguous_and_cover_everything_once():
    items = list(range(11))
    parts = [chunk(items, rank, 3) for rank in range(3)]
    assert parts == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10]]
    assert [chunk([1], rank, 2) for rank in range(2)] == [[], [1]]


@pytest.mark.slow
def test_torchrun_build_equals_one_process_and_reuses_images(tiny_checkpoint, tmp_path):
    images = tmp_path / "images"
    captions = write_folder(images, count=10)
    model, tokenizer = load_model(tiny_checkpoint, "cpu")

    info, single = build_both_ways(tiny_checkpoint, images, captions, tmp_path)
    first = ROOT / info["gallery"]
    assert (info["images"], info["captions"], info["encoded_images"]) == (10, 20, 10)
    distributed = Searcher.open(first, "cpu").gallery
    assert len(distributed.segments) == 2  # one per rank, five images each
    assert np.bincount(distributed.image_rows[:, 0]).tolist() == [5, 5]
    assert_same_gallery(distributed, single, model, tokenizer)

    again = index_build(*build_args(tiny_checkpoint, images, captions, tmp_path / "dist"), "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    hit = json.loads(again.stdout[again.stdout.index("{") : again.stdout.rindex("}") + 1])
    assert hit["cache_hit"] and hit["encoded_images"] == 0
    assert (ROOT / hit["gallery"]).resolve() == first.resolve()

    write_image(images / "zz_new1.png", (10, 10, 10), seed=7)
    write_image(images / "sub" / "new2.png", (250, 250, 250), seed=8)
    info, single = build_both_ways(tiny_checkpoint, images, captions, tmp_path)
    assert (info["encoded_images"], info["reused_images"]) == (2, 10)
    assert single.report.encoded_images == 2
    distributed = Searcher.open(ROOT / info["gallery"], "cpu").gallery
    assert len(distributed.segments) == 4  # the first build's two, linked, and one new per rank
    assert not first.exists()  # superseded by the new gallery, as in a one-process build
    assert_same_gallery(distributed, single, model, tokenizer)


FAILING_RANK = """
import os, sys
import hat.gallery.builder as builder
from hat.cli.index import main

encode = builder.encode_segment

def fail_on_rank_1(*args, **kwargs):
    if os.environ["RANK"] == "1":
        raise OSError("no space left on device (injected)")
    return encode(*args, **kwargs)

builder.encode_segment = fail_on_rank_1
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_a_rank_that_fails_stops_every_rank_and_leaves_nothing(tiny_checkpoint, tmp_path):
    images = tmp_path / "images"
    captions = write_folder(images, count=4)
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    cache = tmp_path / "cache"
    run = index_build(
        *build_args(tiny_checkpoint, images, captions, cache), script=script, timeout=120
    )
    assert run.returncode != 0
    # rank 0 names the rank and its error; rank 1 hears of it from rank 0 and stops too
    assert "encoding failed on rank 1: OSError: no space left on device" in run.stderr
    assert "TeamError: rank 0 failed" in run.stderr
    assert list(cache.iterdir()) == []  # the staging folder, with rank 0's segment, is gone
