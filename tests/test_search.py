"""Two-stage search equals exact scoring when it should, adapts its blocks, and works end to end."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from hat import cli, create_model, get_preset, load_model, native, runtime
from hat.alignment import RaggedWords
from hat.coded_regions import CodedRegions
from hat.encoder import Encoder
from hat.gallery import (
    PRECISIONS,
    BuildSettings,
    CacheError,
    build_gallery,
    collection_from_spec,
    folder_collection,
    open_gallery,
)
from hat.mapped_rows import MappedRows
from hat.runtime import run_in_pieces
from hat.search import Searcher, top_hits
from tests.test_gallery import checkpoint, folder, write_folder, write_image  # noqa: F401  (fixtures)


@pytest.fixture()
def searcher(checkpoint, folder, tmp_path):  # noqa: F811
    gallery = build_gallery(checkpoint, folder_collection(*folder), tmp_path / "cache")
    return Searcher(gallery, Encoder.from_pretrained(checkpoint))


def same_hits(a, b):
    assert [h.index for h in a.hits] == [h.index for h in b.hits]
    np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in b.hits], atol=1e-6)


def test_two_stage_equals_exact_when_candidates_cover_the_gallery(searcher):
    for query in ("a square of colour 2", "picture number 4", "something else"):
        two_stage = searcher.text_to_image(query, k=5, candidates=100)
        exact = searcher.text_to_image(query, k=5, exact=True)
        assert two_stage.scored == exact.scored == 5
        same_hits(two_stage, exact)
    image = searcher.gallery.image_path(1)
    same_hits(searcher.image_to_text(image, k=10), searcher.image_to_text(image, k=10, exact=True))


def test_scores_are_the_models_hierarchical_scores(searcher):
    result = searcher.text_to_image("a square of colour 3", k=3)
    text = searcher.encoder.encode_caption("a square of colour 3")
    ids = [h.index for h in result.hits]
    want = searcher.model.level_scores(searcher.gallery.image_features(ids), text)[:, :, 0]
    got = torch.tensor([h.level_scores for h in result.hits]).T
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert [h.score for h in result.hits] == sorted((h.score for h in result.hits), reverse=True)
    assert all(abs(h.score - sum(h.level_scores)) < 1e-5 for h in result.hits)


STORED_AS = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8, "pq": torch.float32}


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_rerank_scores_stored_values_as_their_decoded_features(
    folder,  # noqa: F811
    tmp_path,
    precision,
    direction,
    one_thread,
):
    """The re-rank takes the candidates as stored (int8 with scales, fp16, pq codes) and
    decodes them a block at a time while scoring (a caption scores pq codes undecoded; image →
    text attention in the fused kernels where they are built): the scores are those of the
    candidates decoded to fp32 first and scored in PyTorch, text → image and image → text (the
    stored image against the caption bank).
    64 wide, int8 levels of 64 and 16 regions cut into AMX tiles: where the CPU has them, those
    are read where they lie, the 4-region level is copied out."""
    torch.manual_seed(0)
    config = replace(get_preset("hat-tiny"), direction=direction, embed_dim=64)
    model, tokenizer = create_model(config)
    ckpt = model.eval().save_pretrained(tmp_path / "ckpt", tokenizer)
    settings = BuildSettings(precision)
    gallery = build_gallery(ckpt, folder_collection(*folder), tmp_path / "cache", settings=settings)
    searcher = Searcher(gallery, Encoder.from_pretrained(ckpt))
    ids = [4, 0, 2, 1]
    ((positions, stored),) = gallery.image_parts(ids)  # in file order
    assert [x.dtype for x in stored.levels] == [STORED_AS[precision]] * gallery.num_levels
    assert (stored.scales is not None) == (precision == "int8")
    decoded = gallery.image_features(ids)
    coded = [isinstance(x, CodedRegions) for x in stored.levels]
    assert coded == [precision == "pq"] * gallery.num_levels  # pq: codes, decoded where needed
    if precision != "int8":
        assert stored.norms is None  # normed as they are scored
    else:  # the norms of the regions as they score, stored
        for norms, regions in zip(stored.norms, decoded[positions].levels, strict=True):
            torch.testing.assert_close(norms, torch.linalg.vector_norm(regions, dim=2))
    kernels = native.kernels()
    if precision == "int8" and kernels is not None and kernels.amx:
        ((_, in_place),) = gallery.image_parts(ids, in_place=True)
        assert [isinstance(x, MappedRows) for x in in_place.levels] == [True] * 3
        assert [native.tiles_fit(x) for x in in_place.levels] == [True, True, False]
    text = searcher.encoder.encode_caption("a square of colour 3")
    with native.eager():  # decoded and scored in PyTorch; the re-rank in the fused kernel
        want = searcher.model.level_scores(decoded, text)[:, :, 0]
    torch.testing.assert_close(searcher.score_images(ids, text), want, atol=1e-5, rtol=0)
    captions = range(gallery.num_captions)
    ((_, image),) = gallery.image_parts([1])
    with native.eager():
        want = searcher.model.level_scores(decoded[3:4], gallery.text_features(captions))[:, 0, :]
    got = searcher.score_captions(captions, image)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_fewer_candidates_rerank_only_those(searcher):
    result = searcher.text_to_image("a square of colour 1", k=2, candidates=3)
    assert result.scored == 3 and len(result.hits) == 2
    assert set(result.seconds) == {"encode", "candidates", "rerank"}


def test_blocks_shrink_with_memory_and_scores_do_not_change(searcher, monkeypatch):
    reference = searcher.text_to_image("picture number 2", k=5, exact=True)
    monkeypatch.setattr(runtime, "free_memory", lambda device: 4 * 4096)
    assert runtime.block_size(4096, torch.device("cpu")) == 1
    same_hits(searcher.text_to_image("picture number 2", k=5, exact=True), reference)
    image = searcher.gallery.image_path(0)
    same_hits(searcher.image_to_text(image, k=4, exact=True), searcher.image_to_text(image, k=4))


def test_pieces_halve_when_the_gpu_runs_out_of_memory():
    seen = []

    def fn(piece):
        seen.append(len(piece))
        if len(piece) > 2:
            raise torch.OutOfMemoryError("out of memory")
        return piece.sum()

    pieces = list(run_in_pieces(fn, torch.arange(7), 8))
    assert seen[:3] == [7, 4, 2] and sum(int(r) for _, r in pieces) == 21
    assert [s.stop - s.start for s, _ in pieces] == [2, 2, 2, 1]


def test_top_hits_breaks_ties_by_candidate_order():
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    hits = top_hits(scores, np.array([10, 11, 12, 13]), 3)
    assert [h[0] for h in hits] == [11, 12, 10] and hits[0][2] == [2.0, 0.0]


def test_searcher_refuses_a_gallery_whose_checkpoint_changed(checkpoint, folder, tmp_path):  # noqa: F811
    model, tokenizer = load_model(checkpoint)
    ckpt = model.save_pretrained(tmp_path / "ckpt", tokenizer)
    gallery = build_gallery(ckpt, folder_collection(*folder), tmp_path / "cache")
    assert Searcher.open(gallery.directory).gallery.num_images == 5
    model.image_proj[0].bias.data.add_(1.0)
    model.save_pretrained(ckpt, tokenizer)
    with pytest.raises(CacheError, match="index build"):
        Searcher.open(gallery.directory)


def test_cli_index_build_then_search(checkpoint, folder, tmp_path, capsys):  # noqa: F811
    images, captions = folder
    write_image(images / "broken.jpg", (0, 0, 0))
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    build = ["index", "build", "--checkpoint", str(checkpoint), "--images", str(images)]
    build += ["--captions", str(captions), "--cache", str(tmp_path / "cache"), "--quiet"]
    assert cli.main([*build, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["images"], info["captions"], info["encoded_images"]) == (5, 10, 5)
    assert [s["path"] for s in info["skipped"]] == ["broken.jpg"]
    assert cli.main(build) == 0
    assert "cache hit: 5 images (0 encoded, 5 reused)" in capsys.readouterr().out

    query = ["search", "--gallery", info["gallery"], "-k", "3", "--json"]
    assert cli.main([*query, "--text", "a square of colour 2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["hits"]) == 3 and result["scored"] == 5
    assert all(len(h["level_scores"]) == 3 and h["caption"] is None for h in result["hits"])
    assert cli.main([*query, "--image", str(images / "img2.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["hits"]) == 3 and all(h["caption"] for h in result["hits"])
    assert cli.main(["search", "--gallery", info["gallery"], "--text", "x", "--exact"]) == 0
    assert "scored 5 exactly" in capsys.readouterr().out


def test_a_global_head_narrower_than_the_levels_builds_and_searches(folder, tmp_path):  # noqa: F811
    """hat-b's head is 1024-d, its levels 3 x 768: a gallery stores the head's width."""
    assert get_preset("hat-b").first_stage_dim == 1024
    config = replace(get_preset("hat-tiny"), global_dim=40)
    assert config.first_stage_dim == 40 != config.num_levels * config.embed_dim
    torch.manual_seed(0)
    model, tokenizer = create_model(config)
    ckpt = model.eval().save_pretrained(tmp_path / "ckpt", tokenizer)
    gallery = build_gallery(ckpt, folder_collection(*folder), tmp_path / "cache")
    assert gallery.manifest.embedding_dim == 40 == gallery.image_index.d == gallery.text_index.d
    assert gallery.embeddings("image").shape == (5, 40)
    searcher = Searcher.open(gallery.directory)
    query = "a square of colour 2"
    same_hits(searcher.text_to_image(query, k=3), searcher.text_to_image(query, k=3, exact=True))
    image = gallery.image_path(0)
    same_hits(searcher.image_to_text(image, k=4), searcher.image_to_text(image, k=4, exact=True))


def test_a_searcher_leaves_malloc_alone(checkpoint, folder, tmp_path, monkeypatch):  # noqa: F811
    from tests.test_runtime import FakeLibc

    libc = FakeLibc()
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(runtime, "_freed_memory_kept", False)
    gallery = build_gallery(checkpoint, folder_collection(*folder), tmp_path / "cache")
    Searcher(gallery, Encoder.from_pretrained(checkpoint))
    assert libc.calls == []


UNPAIRED = ["a photo of a tabby cat", "a cup of espresso", "a photo of a tabby cat"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_captions_without_images_join_the_caption_bank_only(
    checkpoint,  # noqa: F811
    folder,  # noqa: F811
    tmp_path,
    precision,
):
    images, captions = folder
    unpaired = tmp_path / "captions_without_images.txt"
    unpaired.write_text("\n".join(UNPAIRED) + "\n\n")
    collection = folder_collection(images, captions, unpaired)
    settings = BuildSettings(precision)
    gallery = build_gallery(checkpoint, collection, tmp_path / "cache", settings=settings)
    plain = build_gallery(checkpoint, folder_collection(images, captions), tmp_path / "cache")
    assert gallery.directory != plain.directory  # its own cache key
    assert (gallery.num_images, gallery.num_captions) == (5, 12)  # the repeat is kept once
    assert gallery.captions[-2:] == UNPAIRED[:2] and gallery.caption_image[-2:].tolist() == [-1, -1]
    searcher = Searcher(gallery, Encoder.from_pretrained(checkpoint))
    image = gallery.image_path(2)
    hits = searcher.image_to_text(image, k=12, exact=True).hits
    assert len(hits) == 12
    by_caption = {h.caption: h for h in hits}
    assert {by_caption[c].image for c in UNPAIRED} == {None}
    own = gallery.captions[gallery.caption_image.tolist().index(2)]
    assert by_caption[own].image == gallery.paths[2]
    # their scores are the model's own, as for any bank caption
    encoder = searcher.encoder
    want = encoder.model.level_scores(
        encoder.encode_image(image), encoder.encode_captions(UNPAIRED[:2])
    )
    got = torch.tensor([by_caption[c].level_scores for c in UNPAIRED[:2]]).T
    torch.testing.assert_close(
        got, want[:, 0, :], atol=2e-2 if precision != "fp32" else 1e-5, rtol=0
    )
    # words read ragged (a query image's re-rank) from both segments, out of order: as padded
    ids = [11, 0, 10, 3]
    padded, ragged = gallery.text_features(ids), gallery.text_features(ids, ragged=True)
    assert all(isinstance(x, RaggedWords) for x in ragged.levels)
    for a, b in zip(padded.levels, ragged.padded().levels, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # text → image never answers with them
    assert all(h.image is not None for h in searcher.text_to_image("a tabby cat", k=5).hits)
    open_gallery(gallery.directory, verify=True)  # every row's digest, the text-only segment's too
    again = build_gallery(checkpoint, collection, tmp_path / "cache", settings=settings)
    assert again.report.cache_hit and again.captions == gallery.captions


def test_a_gallery_folder_reads_its_captions_without_images(tmp_path):
    root = tmp_path / "gallery"
    write_folder(root / "images", count=2)
    (root / "images-captions.json").rename(root / "captions.json")
    (root / "captions_without_images.txt").write_text("a red square\n  \na blue square\n")
    collection = collection_from_spec(root)
    assert collection.captions_without_images == ("a red square", "a blue square")
    (root / "captions_without_images.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        collection_from_spec(root)
