"""Gallery cache: what is stored, when it is reused, invalidated, rebuilt, and extended."""

import io
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from hat import create_model, native
from hat.alignment import level_scores
from hat.encoder import Encoder
from hat.gallery import (
    BuildSettings,
    CacheError,
    FileEntry,
    Manifest,
    build_gallery,
    build_index,
    builder,
    dequantize,
    folder_collection,
    karpathy_collection,
    open_gallery,
    quantize,
    reader,
    search_index,
)
from hat.gallery.codecs import PQ_BYTES, PQCodec, new_codec, training_sample
from hat.gallery.first_stage import IVF_PROBES, ivf_lists
from hat.gallery.storage import PREFETCH_GAP, _merged, row_digests

ROOT = Path(__file__).resolve().parents[1]
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 20), (200, 40, 200)]


def write_image(path, colour, seed=0):
    """A small image: a coloured square on a noisy background (any content works)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 80, (40, 48, 3), dtype=np.uint8)
    pixels[8:28, 10:30] = colour
    Image.fromarray(pixels).save(path)


def write_folder(root, count=5):
    """Images ``img{i}.png`` (one in a subfolder) and a JSON captions file with two per image."""
    (root / "sub").mkdir(parents=True)
    captions = {}
    for i in range(count):
        name = f"img{i}.png" if i else "sub/img0.png"
        write_image(root / name, COLOURS[i % len(COLOURS)], seed=i)
        captions[name] = [f"a square of colour {i}", f"picture number {i}"]
    captions_file = root.parent / f"{root.name}-captions.json"
    captions_file.write_text(json.dumps(captions))
    return captions_file


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model, tokenizer = create_model("hat-tiny")
    return model.eval().save_pretrained(tmp_path_factory.mktemp("ckpt") / "m", tokenizer)


@pytest.fixture()
def folder(tmp_path):
    captions = write_folder(tmp_path / "images")
    return tmp_path / "images", captions


def build(checkpoint, folder, cache, **kwargs):
    return build_gallery(checkpoint, folder_collection(*folder), cache, **kwargs)


def test_stored_features_match_direct_encoding(checkpoint, folder, tmp_path):
    gallery = build(checkpoint, folder, tmp_path / "cache", settings=BuildSettings("fp32"))
    assert gallery.num_images == 5 and gallery.num_captions == 10 and not gallery.skipped
    assert gallery.paths[0] == "img1.png" and "sub/img0.png" in gallery.paths
    encoder = Encoder.from_pretrained(checkpoint)
    direct = encoder.encode_images([gallery.image_path(i) for i in range(5)])
    stored = gallery.image_features(range(5))
    for a, b in zip(direct.levels, stored.levels, strict=True):
        torch.testing.assert_close(a, b)
    assert gallery.captions[:2] == ["a square of colour 1", "picture number 1"]
    assert gallery.caption_image.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    texts = gallery.text_features([3, 0])
    assert texts.mask.shape[0] == 2 and texts.levels[0].shape[1] == texts.mask.shape[1]


def test_int8_storage_keeps_vectors_within_a_percent_and_its_rounding_bound():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(70, 5, 32, generator=generator) * torch.rand(70, 5, 1, generator=generator)
    x *= 10
    values, scales = quantize(x, "int8")
    assert values.dtype == np.int8 and scales.dtype == np.float16 and scales.shape == (70, 5)
    back = dequantize(values, scales)
    error = torch.linalg.vector_norm(back - x, dim=-1) / torch.linalg.vector_norm(x, dim=-1)
    assert error.mean() < 1e-2
    # each value is off by at most half a step (absmax / 127, in fp16): a vector by at most
    # sqrt(32) half steps, while its norm is at least its absmax
    assert error.max() <= 32**0.5 / 254 * (1 + 2**-11)
    assert (
        quantize(x, "fp16")[1] is None and dequantize(*quantize(x, "fp16")).dtype == torch.float32
    )


def low_rank(count: int, dim: int = 256, rank: int = 48, seed: int = 0) -> np.ndarray:
    """Vectors near a low-dimensional subspace, as projected backbone features are."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, dim)) / np.sqrt(rank)
    spread = np.linspace(3, 0.3, rank)
    x = (rng.standard_normal((count, rank)) * spread) @ basis
    return (x + 0.02 * rng.standard_normal((count, dim))).astype(np.float32)


def structured_images(count: int, regions: int = 10, seed: int = 0) -> np.ndarray:
    """Images ``(count, regions, 256)`` as the model gives them: regions near a low-dimensional
    subspace, around a mean of each image's own that mostly lies outside it."""
    x = low_rank(count * regions, seed=seed).reshape(count, regions, 256)
    means = np.random.default_rng(seed + 1).standard_normal((count, 1, 256)).astype(np.float32)
    return x + 0.5 * means


def relative_errors(back: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(back - x, axis=-1) / np.linalg.norm(x, axis=-1)


def test_pq_codec_keeps_structured_images_close_in_32_bytes_per_region():
    """32 bytes per 256-d region (1/32 of fp32) and one fp16 mean per image: much closer than
    plain PQ, or the PCA + PQ of the regions themselves, at the same code size."""
    x = structured_images(600)
    codec = new_codec("pq", 256)
    codec.train(training_sample(codec.training_vectors(torch.from_numpy(x))))
    test = x[:50]
    codes, means = codec.encode(torch.from_numpy(test))
    assert codes.shape == (50, 10, PQ_BYTES) and codes.dtype == np.uint8
    assert means.shape == (50, 256) and means.dtype == np.float16
    back = codec.decode(codes, means).numpy()
    error = relative_errors(back, test)
    cosine = (back * test).sum(-1) / np.linalg.norm(back, axis=-1) / np.linalg.norm(test, axis=-1)
    assert cosine.min() > 0.9
    flat = x.reshape(-1, 256)
    for spec in (f"PQ{PQ_BYTES}np", f"PCAR96,PQ{PQ_BYTES}np"):
        other = faiss.index_factory(256, spec)
        other.train(flat)
        other_back = other.sa_decode(other.sa_encode(test.reshape(-1, 256))).reshape(test.shape)
        assert np.median(error) < 0.7 * np.median(relative_errors(other_back, test)), spec
    # The decoder's BLAS path is faiss's own decoder plus the mean; a stored codec decodes the same.
    differences = codec.index.sa_decode(codes.reshape(-1, PQ_BYTES)).reshape(test.shape)
    np.testing.assert_allclose(back, differences + means[:, None].astype(np.float32), atol=1e-4)
    again = PQCodec.from_array(256, codec.to_array())
    assert torch.equal(again.decode(codes, means), codec.decode(codes, means))


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_pq_coordinates_score_exactly_as_the_decoded_regions(direction):
    """256-d regions: 96 PCA coordinates plus one along each image's own row (its mean's part
    outside the PCA), orthonormal per image, score as the decoded features do."""
    x = torch.from_numpy(structured_images(300))
    codec = new_codec("pq", 256)
    codec.train(training_sample(codec.training_vectors(x)))
    coordinates, basis = codec.coordinates(*codec.encode(x[:6]))
    assert coordinates.shape == (6, 10, 97) and basis.own.shape == (6, 1, 256)
    rows = torch.cat([basis.shared.expand(6, -1, -1), basis.own], dim=1)  # (6, 97, 256)
    torch.testing.assert_close(rows @ rows.transpose(1, 2), torch.eye(97).expand(6, -1, -1))
    words = torch.randn(4, 7, 256)
    mask = torch.arange(7) < torch.tensor([7, 5, 3, 6])[:, None]
    want = level_scores(basis.expand(coordinates), words, mask, 9.0, direction)
    got = level_scores(coordinates, words, mask, 9.0, direction, basis=basis)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_pq_codec_stores_a_tiny_sample_closely_and_refuses_odd_widths():
    x = torch.from_numpy(structured_images(4))
    codec = new_codec("pq", 256)
    codec.train(codec.training_vectors(x))  # fewer points than centroids: they become centroids
    back = codec.decode(*codec.encode(x)).numpy()
    assert relative_errors(back, x.numpy()).max() < 0.05  # a big sample's are ~0.2 off (above)
    with pytest.raises(ValueError, match="divisible by 32"):
        new_codec("pq", 100)
    with pytest.raises(ValueError, match="precision must be one of"):
        new_codec("int4", 256)


def test_pq_gallery_stores_codes_and_searches_like_fp32(checkpoint, folder, tmp_path):
    from hat.search import Searcher

    exact = build(checkpoint, folder, tmp_path / "a", settings=BuildSettings("fp32"))
    small = build(checkpoint, folder, tmp_path / "b", settings=BuildSettings("pq"))
    segment = small.segments[0]
    codes, means = segment.image[0]
    assert codes.dtype == np.uint8 and codes.shape[-1] == PQ_BYTES
    assert means.dtype == np.float16 and means.shape == (codes.shape[0], small.manifest.dim)
    assert [type(c).__name__ for c in segment.codecs["image"]] == ["PQCodec"] * 3
    assert [type(c).__name__ for c in segment.codecs["text"]] == ["Int8Codec"] * 3
    exact_levels, small_levels = (g.image_features(range(5)).levels for g in (exact, small))
    for a, b in zip(exact_levels, small_levels, strict=True):
        error = (a - b).norm(dim=-1) / a.norm(dim=-1)
        assert float(error.max()) < 0.05  # the tiny width: one dimension per code
    reopened = open_gallery(small.directory, verify=True)
    model_a, model_b = Searcher.open(exact.directory), Searcher.open(reopened.directory)
    for caption in ("a square of colour 3", "picture number 0"):
        want = [h.index for h in model_a.text_to_image(caption, k=5, exact=True).hits]
        assert [h.index for h in model_b.text_to_image(caption, k=5, exact=True).hits] == want
    # The re-rank scores pq regions as coordinates, never expanded: the same scores as the
    # decoded features give. This tiny model's 32-d PCA keeps every dimension: no own rows.
    text = model_b.encoder.encode_caption("a square of colour 3")
    ids = [4, 0, 2]
    parts = reopened.image_parts(ids)
    dim = reopened.manifest.dim
    assert [(tuple(b.shared.shape), b.own) for _, f in parts for b in f.bases] == [
        ((dim, dim), None)
    ] * 3
    decoded = model_b.model.level_scores(reopened.image_features(ids), text)[:, :, 0]
    torch.testing.assert_close(model_b.score_images(ids, text), decoded, atol=1e-5, rtol=0)


def test_the_manifest_is_typed_and_refuses_what_it_cannot_read(checkpoint, folder, tmp_path):
    gallery = build(checkpoint, folder, tmp_path / "cache")
    manifest = gallery.manifest
    assert isinstance(manifest, Manifest) and manifest.settings == BuildSettings()
    assert manifest.num_images == gallery.num_images and manifest.segments
    assert all(isinstance(f, FileEntry) and f.size > 0 for f in manifest.files.values())
    written = json.loads((gallery.directory / "manifest.json").read_text())
    assert Manifest.from_dict(written) == manifest and json.loads(manifest.to_json()) == written
    for damage, message in (
        ({**written, "format": 99}, "storage format 99 is not supported"),
        ({k: v for k, v in written.items() if k != "dim"}, "is not a gallery manifest"),
        ({**written, "settings": {"precision": "int4"}}, "is not a gallery manifest"),
    ):
        (gallery.directory / "manifest.json").write_text(json.dumps(damage))
        with pytest.raises(CacheError, match=message):
            open_gallery(gallery.directory)


def test_damaged_pq_codebooks_are_never_used(checkpoint, folder, tmp_path):
    gallery = build(checkpoint, folder, tmp_path / "cache", settings=BuildSettings("pq"))
    (codec_file,) = gallery.directory.glob("segments/*/image.1.codec.npy")
    data = bytearray(codec_file.read_bytes())
    data[-9] ^= 0xFF  # same size: only the digest can tell
    codec_file.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"image\.1\.codec\.npy"):
        open_gallery(gallery.directory)
    rebuilt = build(checkpoint, folder, tmp_path / "cache", settings=BuildSettings("pq"))
    assert not rebuilt.report.cache_hit and rebuilt.report.encoded_images == 5


def test_prefetch_asks_for_nearby_rows_in_one_call_and_covers_every_row():
    rng = np.random.default_rng(0)
    for row, rows in ((512, 1000), (65536, 1000), (512, 1_000_000)):
        starts = np.sort(rng.choice(rows, 100, replace=False))
        counts = rng.integers(1, 3, 100)
        ranges = _merged(starts, counts, row)
        for start, count in zip(starts, counts, strict=True):
            assert any(b <= start * row and (start + count) * row <= e for b, e in ranges)
        gaps = [b - e for (_, e), (b, _) in itertools.pairwise(ranges)]
        assert all(gap > PREFETCH_GAP for gap in gaps)  # as few calls as the gap allows
        if (row, rows) == (512, 1000):  # a small gallery's scales or norms: one call
            assert len(ranges) == 1


def test_ivf_index_above_the_flat_limit_finds_the_nearest_vectors():
    """Clustered vectors (like real embeddings): probing a fraction of the lists finds the
    exact top-10. The IVF index holds the vectors as fp16 codes, 2 bytes per value, as they are:
    the same numbers as the segments' fp16 vectors."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((200, 16))
    vectors = centres[rng.integers(0, 200, 20_000)] + 0.3 * rng.standard_normal((20_000, 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    vectors = vectors.astype(np.float32)
    flat, ivf = build_index(vectors, flat_max=30_000), build_index(vectors, flat_max=10_000)
    assert type(flat).__name__ == "IndexFlatIP"
    assert type(ivf).__name__ == "IndexIVFScalarQuantizer" and ivf.code_size == 2 * 16
    ivf.make_direct_map()
    np.testing.assert_array_equal(ivf.reconstruct_n(0, 100), vectors[:100])
    assert ivf.nlist == ivf_lists(20_000) > 2 * IVF_PROBES  # a real approximation
    want, got = search_index(flat, vectors[:50], 10), search_index(ivf, vectors[:50], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got, strict=True)])
    assert recall >= 0.95
    assert search_index(flat, vectors[:1], 30_000).shape == (1, 20_000)


def test_unchanged_gallery_is_a_cache_hit_without_encoding(checkpoint, folder, tmp_path):
    first = build(checkpoint, folder, tmp_path / "cache")
    assert not first.report.cache_hit and first.report.encoded_images == 5
    manifest = first.directory / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    again = build(checkpoint, folder, tmp_path / "cache")
    assert again.report.cache_hit and again.report.encoded_images == 0
    assert again.directory == first.directory and manifest.stat().st_mtime_ns == stamp
    assert again.bytes_per_image() > 0


def test_changed_checkpoint_invalidates_the_cache(checkpoint, folder, tmp_path):
    first = build(checkpoint, folder, tmp_path / "cache")
    torch.manual_seed(1)
    model, tokenizer = create_model("hat-tiny")
    other = model.save_pretrained(tmp_path / "other", tokenizer)
    second = build(other, folder, tmp_path / "cache")
    assert second.directory != first.directory
    assert second.report.encoded_images == 5 and not second.report.cache_hit
    assert first.directory.exists()  # another checkpoint's gallery is not superseded


def test_changed_image_is_encoded_again_and_the_old_gallery_removed(checkpoint, folder, tmp_path):
    first = build(checkpoint, folder, tmp_path / "cache")
    write_image(folder[0] / "img3.png", (0, 0, 0), seed=99)
    os.utime(folder[0] / "img3.png", ns=(1, 1))  # a different mtime even on coarse clocks
    second = build(checkpoint, folder, tmp_path / "cache")
    assert second.directory != first.directory and not first.directory.exists()
    assert (second.report.encoded_images, second.report.reused_images) == (1, 4)


def test_truncated_cache_file_is_detected_and_rebuilt(checkpoint, folder, tmp_path):
    first = build(checkpoint, folder, tmp_path / "cache")
    before = first.image_features(range(5))
    victim = next((first.directory / "segments").glob("*/image.1.npy"))
    with victim.open("r+b") as fh:
        fh.truncate(victim.stat().st_size - 100)
    with pytest.raises(CacheError, match="bytes"):
        open_gallery(first.directory)
    rebuilt = build(checkpoint, folder, tmp_path / "cache")
    assert rebuilt.directory == first.directory
    assert "image.1.npy" in rebuilt.report.rebuilt_because
    assert rebuilt.report.encoded_images == 5  # the damaged gallery is never a donor
    for a, b in zip(before.levels, rebuilt.image_features(range(5)).levels, strict=True):
        torch.testing.assert_close(a, b)


def test_corrupted_file_of_the_right_size_fails_verification(checkpoint, folder, tmp_path):
    gallery = build(checkpoint, folder, tmp_path / "cache")
    victim = next((gallery.directory / "segments").glob("*/image.embedding.npy"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    open_gallery(gallery.directory)  # sizes still match
    with pytest.raises(CacheError, match="does not match its checksum"):
        open_gallery(gallery.directory, verify=True)
    assert build(checkpoint, folder, tmp_path / "cache", verify=True).report.encoded_images == 5


def test_a_gallery_removed_while_it_is_verified_is_reported_missing(
    checkpoint, folder, tmp_path, monkeypatch
):
    # the app's background check reads a gallery that a rebuild may remove under it: that is
    # damage found (CacheError, which the app handles), not an error that kills the check
    gallery = build(checkpoint, folder, tmp_path / "cache")
    digest = reader.file_digest

    def removed_before_it_is_read(path):
        shutil.rmtree(gallery.directory)
        return digest(path)

    monkeypatch.setattr(reader, "file_digest", removed_before_it_is_read)
    with pytest.raises(CacheError, match="is missing or unreadable"):
        gallery.verify()


def overwrite(path, offset: int, data: bytes) -> None:
    """Bytes written inside ``path``, its size and mtime kept (what a size check cannot see)."""
    stat = path.stat()
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def invert(path, offset: int, count: int) -> None:
    with path.open("rb") as fh:
        fh.seek(offset)
        data = fh.read(count)
    overwrite(path, offset, bytes(b ^ 0xFF for b in data))


def all_images(gallery):
    return gallery.image_features(range(gallery.num_images))


def in_python(read):
    """``read`` with rows copied and hashed by numpy and xxhash's Python binding instead of
    hat.native's kernel (where no compiler built it)."""

    def read_in_python(gallery):
        with native.eager():
            return read(gallery)

    return read_in_python


def re_rank_read(gallery):
    """All images as a re-rank reads them: int8 values left where they lie where AMX is."""
    return gallery.image_parts(range(gallery.num_images), in_place=True)


def all_captions(gallery):
    return gallery.text_features(range(gallery.num_captions))


@pytest.mark.parametrize(
    ("victim", "read"),
    [
        ("image.1.npy", all_images),
        ("image.1.npy", in_python(all_images)),
        ("image.1.npy", re_rank_read),
        ("image.2.scale.npy", all_images),
        ("image.0.norm.npy", all_images),
        ("text.0.npy", all_captions),
        ("text.0.npy", in_python(all_captions)),
        ("text.1.scale.npy", all_captions),
        ("image.embedding.npy", lambda gallery: gallery.embeddings("image")),
    ],
)
def test_same_size_damage_to_features_is_never_served(checkpoint, folder, tmp_path, victim, read):
    first = build(checkpoint, folder, tmp_path / "cache")
    reference = all_images(first)
    path = next((first.directory / "segments").glob(f"*/{victim}"))
    invert(path, path.stat().st_size - 6, 4)  # inside the file's last row
    again = build(checkpoint, folder, tmp_path / "cache")
    assert again.report.cache_hit  # opening checks sizes only: it stays cheap
    with pytest.raises(CacheError, match="do not match their checksums"):
        read(again)
    if read is all_images:  # the other rows are still served, and right
        last = int(np.flatnonzero(again.image_rows[:, 1] == again.num_images - 1)[0])
        others = [i for i in range(again.num_images) if i != last]
        for a, b in zip(again.image_features(others).levels, reference.levels, strict=True):
            torch.testing.assert_close(a, b[others], rtol=0, atol=0)


def swap_rows(path) -> None:
    """Two rows of an .npy array swapped: a valid array that maps items to the wrong features."""
    array = np.load(path)
    array[[0, 1]] = array[[1, 0]]
    buffer = io.BytesIO()
    np.save(buffer, array)
    overwrite(path, 0, buffer.getvalue())


def swap_names(path) -> None:
    text = path.read_text()
    overwrite(
        path,
        0,
        text.replace("img1", "tmp#").replace("img2", "img1").replace("tmp#", "img2").encode(),
    )


@pytest.mark.parametrize(
    ("victim", "tamper"),
    [
        ("image_rows.npy", swap_rows),
        ("items.json", swap_names),
        ("segments/*/text.offsets.npy", swap_rows),
    ],
)
def test_same_size_damage_to_what_opening_reads_is_rebuilt(
    checkpoint, folder, tmp_path, victim, tamper
):
    first = build(checkpoint, folder, tmp_path / "cache")
    path = next(first.directory.glob(victim))
    tamper(path)
    with pytest.raises(CacheError, match=f"{path.name} does not match its checksum"):
        open_gallery(first.directory)
    rebuilt = build(checkpoint, folder, tmp_path / "cache")
    assert path.name in rebuilt.report.rebuilt_because and rebuilt.paths == first.paths


def test_same_size_damage_to_an_index_is_never_served(checkpoint, folder, tmp_path):
    gallery = build(checkpoint, folder, tmp_path / "cache")
    path = gallery.directory / "image.faiss"
    invert(path, path.stat().st_size - 24, 16)  # a vector of the last image
    with pytest.raises(CacheError, match=r"image\.faiss does not match its checksum"):
        _ = open_gallery(gallery.directory).image_index


KILLED_BUILD = """
import sys, time
import hat.gallery.builder as builder
from hat.gallery import folder_collection

encode = builder.encode_segment

def encode_then_hang(*args, **kwargs):
    rows = encode(*args, **kwargs)
    print("staged", flush=True)
    time.sleep(600)
    return rows

builder.encode_segment = encode_then_hang
checkpoint, images, captions, cache = sys.argv[1:]
builder.build_gallery(checkpoint, folder_collection(images, captions), cache)
"""


def test_a_killed_build_leaves_nothing_once_its_process_is_gone(checkpoint, folder, tmp_path):
    cache = tmp_path / "cache"
    arguments = [str(checkpoint), *map(str, folder), str(cache)]
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, *arguments],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline() == "staged\n"
        (staging,) = (p for p in cache.iterdir() if p.is_dir())
        built = build(checkpoint, folder, cache)  # while the other build still runs
        assert staging.is_dir()  # in use: left alone
    finally:
        child.kill()  # SIGKILL: no clean-up of its own runs
        child.wait()
    assert build(checkpoint, folder, cache).report.cache_hit
    assert list(cache.iterdir()) == [built.directory]


def test_a_gallery_of_an_older_storage_format_is_replaced(checkpoint, folder, tmp_path):
    first = build(checkpoint, folder, tmp_path / "cache")
    manifest = json.loads((first.directory / "manifest.json").read_text())
    manifest["format"] = 1  # as written before the rows had digests
    old = first.directory.rename(first.directory.with_name("0" * 32))
    (old / "manifest.json").write_text(json.dumps(manifest))
    rebuilt = build(checkpoint, folder, tmp_path / "cache")
    assert rebuilt.report.encoded_images == 5  # its segments are not reused
    assert not old.exists()


def test_unreadable_images_are_skipped_counted_and_listed(checkpoint, folder, tmp_path):
    (folder[0] / "empty.jpg").write_bytes(b"")
    (folder[0] / "notes.jpg").write_text("not an image at all")
    gallery = build(checkpoint, folder, tmp_path / "cache")
    assert gallery.num_images == 5
    assert sorted(s["path"] for s in gallery.skipped) == ["empty.jpg", "notes.jpg"]
    assert all(s["reason"] for s in gallery.skipped)
    assert gallery.image_index.ntotal == 5 and gallery.text_index.ntotal == 10


def test_added_images_are_encoded_and_old_features_untouched(checkpoint, folder, tmp_path):
    first = build(checkpoint, folder, tmp_path / "cache")
    old_files = {p.name: p.stat().st_ino for p in (first.directory / "segments").glob("*/*")}
    old = first.image_features(range(5))
    write_image(folder[0] / "zz_new1.png", (10, 10, 10), seed=7)
    write_image(folder[0] / "sub" / "new2.png", (250, 250, 250), seed=8)
    second = build(checkpoint, folder, tmp_path / "cache")
    assert (second.report.encoded_images, second.report.reused_images) == (2, 5)
    assert second.num_images == 7 and len(second.segments) == 2
    old_segment = second.directory / "segments" / first.manifest.segments[0]
    assert {p.name: p.stat().st_ino for p in old_segment.iterdir()} == old_files  # hard links
    ids = [second.paths.index(p) for p in first.paths]
    for a, b in zip(old.levels, second.image_features(ids).levels, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert second.image_index.ntotal == 7 and second.num_captions == 10  # new ones uncaptioned


def test_a_reused_gallery_removed_while_new_images_encode_is_not_needed(
    checkpoint, folder, tmp_path, monkeypatch
):
    # a build beside this one (the app and `hat index build` on one cache) may finish first and
    # remove the earlier gallery as superseded: its segments were linked before encoding began
    first = build(checkpoint, folder, tmp_path / "cache")
    old = first.image_features(range(5))
    write_image(folder[0] / "zz_new1.png", (10, 10, 10), seed=7)
    encode = builder.encode_segment

    def superseded_meanwhile(*args, **kwargs):
        shutil.rmtree(first.directory, ignore_errors=True)
        return encode(*args, **kwargs)

    monkeypatch.setattr(builder, "encode_segment", superseded_meanwhile)
    second = build(checkpoint, folder, tmp_path / "cache")
    assert not first.directory.exists()
    assert (second.report.encoded_images, second.report.reused_images) == (1, 5)
    ids = [second.paths.index(p) for p in first.paths]
    for a, b in zip(old.levels, second.image_features(ids).levels, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_moved_folder_gets_its_own_gallery_without_encoding_again(checkpoint, folder, tmp_path):
    first = build(checkpoint, folder, tmp_path / "cache")
    moved = tmp_path / "elsewhere"
    folder[0].rename(moved)  # mtimes survive a move: the fingerprints (relative paths) match
    second = build(checkpoint, (moved, folder[1]), tmp_path / "cache")
    assert (second.report.encoded_images, second.report.reused_images) == (0, 5)
    assert second.directory != first.directory
    assert all(second.image_path(i).parent.is_relative_to(moved) for i in range(5))
    assert all(second.image_path(i).is_file() for i in range(5))
    for a, b in zip(
        first.image_features(range(5)).levels, second.image_features(range(5)).levels, strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_karpathy_collection_builds_a_gallery(checkpoint, folder, tmp_path):
    root, _ = folder
    entries = [
        {"filename": name, "split": "test", "sentences": [{"raw": f"caption {i}"}]}
        for i, name in enumerate(["img1.png", "img2.png", "missing.png"])
    ]
    data = tmp_path / "dataset.json"
    data.write_text(json.dumps({"images": entries}))
    gallery = build_gallery(checkpoint, karpathy_collection(data, root, "test"), tmp_path / "c")
    assert gallery.paths == ["img1.png", "img2.png"] and gallery.captions == [
        "caption 0",
        "caption 1",
    ]
    assert [s["path"] for s in gallery.skipped] == ["missing.png"]


def test_rows_hashed_as_they_are_copied_match_their_digests(tmp_path):
    if native.kernels() is None or not native.hashes_rows():
        pytest.skip("no C compiler: rows are copied and hashed in Python")
    rng = np.random.default_rng(0)
    arrays = []
    for i, (shape, dtype) in enumerate(
        [((9, 5, 3), np.int8), ((9, 5), np.float16), ((9,), np.float32)]
    ):
        np.save(tmp_path / f"{i}.npy", rng.standard_normal(shape).astype(dtype))
        arrays.append(np.load(tmp_path / f"{i}.npy", mmap_mode="r"))
    rows = np.array([7, 0, 3, 3, 8])
    gathered, digests = native.gather_rows(native.kernels(), arrays, rows, digest=True)
    for got, array in zip(gathered, arrays, strict=True):
        np.testing.assert_array_equal(got, array[rows])
    expected = row_digests([a[rows] for a in arrays], np.arange(len(rows) + 1))
    np.testing.assert_array_equal(digests, expected)
    kept, in_place = native.gather_rows(
        native.kernels(), arrays, rows, digest=True, in_place=[True, False]
    )
    assert kept[0] is None and np.array_equal(kept[1], arrays[1][rows])  # hashed where it lies
    np.testing.assert_array_equal(in_place, expected)
    copies, none = native.gather_rows(native.kernels(), arrays, rows[:0])
    assert none is None and [c.shape[0] for c in copies] == [0, 0, 0]
    starts, counts = np.array([4, 0, 6]), np.array([2, 3, 0])  # ragged rows: captions' tokens
    gathered, digests = native.gather_rows(native.kernels(), arrays, starts, counts, digest=True)
    tokens = np.concatenate([np.arange(s, s + c) for s, c in zip(starts, counts, strict=True)])
    for got, array in zip(gathered, arrays, strict=True):
        np.testing.assert_array_equal(got, array[tokens])
    bounds = np.concatenate([[0], np.cumsum(counts)])
    np.testing.assert_array_equal(digests, row_digests([a[tokens] for a in arrays], bounds))
