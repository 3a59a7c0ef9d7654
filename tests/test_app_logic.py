"""The demo's logic without a server: caption clean-up, safe uploads, map pictures, the engine."""

import io
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hat import create_model
from hat.demo import InputError
from hat.demo.caption_input import MAX_CAPTION_CHARS, REFUSED_CAPTION_CHARS, clean_caption
from hat.demo.engine import BUILTIN, MINE, DemoEngine
from hat.demo.rendering import CELL, GAP, LABEL_WIDTH, MARGIN, colormap, model_view, upsample
from hat.demo.uploads import (
    GONE,
    MAX_IMAGE_BYTES,
    MAX_ZIP_MEMBERS,
    MB,
    collect_uploads,
    safe_member_path,
    write_captions,
)
from hat.demo_build.examples import choose_examples, spread
from hat.gallery import CacheError, CorruptionError

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


def png_bytes(colour=(200, 30, 30), size=(48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def write_demo_assets(root):
    """A tiny random checkpoint and a five-image captioned gallery (``images/``, captions.json)."""
    torch.manual_seed(0)
    model, tokenizer = create_model("hat-tiny")
    model.save_pretrained(root / "checkpoint", tokenizer=tokenizer)
    images = root / "gallery" / "images"
    images.mkdir(parents=True)
    captions = {}
    for i, colour in enumerate(COLOURS):
        picture = Image.new("RGB", (80, 60), colour)
        picture.paste((255, 255, 255), (10 + 6 * i, 10, 40 + 6 * i, 40))
        picture.save(images / f"{i}.png")
        captions[f"{i}.png"] = [f"a square of colour {i}", f"<b>picture</b> number {i}"]
    (root / "gallery" / "captions.json").write_text(json.dumps(captions))
    return root / "checkpoint", root / "gallery"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    checkpoint, gallery = write_demo_assets(root)
    engine = DemoEngine(checkpoint, gallery, root / "cache", root / "tmp", progress=False)
    yield engine
    engine.close()


# ---------------------------------------------------------------- captions
@pytest.mark.parametrize("text", ["", "   \n\t ", "\x00\x01\x1b\u200b", None, 42])
def test_empty_or_non_text_captions_are_refused(text):
    with pytest.raises(InputError, match="caption"):
        clean_caption(text)


def test_captions_lose_control_characters_and_keep_html_literally():
    assert clean_caption(" a\x00 red\tcar\u200b\n<b>x</b> ") == "a red car <b>x</b>"


def test_long_captions_are_cut_at_a_word():
    caption = clean_caption("word " * (REFUSED_CAPTION_CHARS // 5))
    assert len(caption) <= MAX_CAPTION_CHARS and caption.endswith("word")


def test_captions_far_too_long_are_refused_before_anything_reads_them(engine):
    with pytest.raises(InputError, match="at most 10,000 are accepted"):
        clean_caption("x" * (REFUSED_CAPTION_CHARS + 1))
    tokenize, engine.encoder.tokenize = engine.encoder.tokenize, None  # must not be reached
    try:
        with pytest.raises(InputError, match="is 50,000 characters long"):
            engine.search_text("red " * 12_500, 3, BUILTIN)
    finally:
        engine.encoder.tokenize = tokenize


# ---------------------------------------------------------------- uploads
@pytest.mark.parametrize(
    "name", ["../evil.png", "a/../../evil.png", "/etc/evil.png", "C:\\evil.png", "a\0.png", ""]
)
def test_unsafe_member_paths_are_refused(name):
    assert safe_member_path(name) is None


def test_safe_member_paths_are_normalised():
    assert str(safe_member_path("./sub\\dir//a.png")) == "sub/dir/a.png"


def make_zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_zip_upload_keeps_images_inside_the_folder_and_says_why_others_are_left(tmp_path):
    upload = make_zip(
        tmp_path / "up.zip",
        {
            "sub/a.png": png_bytes(),
            "../../evil.png": png_bytes(),
            "/abs.png": png_bytes(),
            "notes.txt": b"hello",
            "__MACOSX/._a.png": b"junk",
            "huge.png": bytes(MAX_IMAGE_BYTES + 1),
        },
    )
    loose = tmp_path / "a.png"
    loose.write_bytes(png_bytes())
    report = collect_uploads([upload, loose], tmp_path / "session" / "images")
    assert report.images == ["sub/a.png", "a.png"]
    why = dict(report.ignored)
    assert why["../../evil.png"].startswith("unsafe path") and why["/abs.png"].startswith("unsafe")
    assert why["notes.txt"] == "not an image file type"
    assert why["__MACOSX/._a.png"] == "hidden or system file"
    assert "over the limit" in why["huge.png"]
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert written == ["a.png", "session/images/a.png", "session/images/sub/a.png"]


def test_two_files_with_one_name_are_both_kept(tmp_path):
    first, second = tmp_path / "x" / "a.png", tmp_path / "y" / "a.png"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(png_bytes())
    assert collect_uploads([first, second], tmp_path / "out").images == ["a.png", "a-1.png"]


LIMIT_BREAKERS = {
    "too-many-members": ({f"{i}.png": b"" for i in range(MAX_ZIP_MEMBERS + 1)}, "may hold at most"),
    "zip-bomb": ({f"{i}.png": bytes(30 * MB) for i in range(9)}, "MB are accepted"),
}


@pytest.mark.parametrize("kind", sorted(LIMIT_BREAKERS))
def test_a_zip_that_breaks_a_limit_is_left_out_unread_and_the_rest_kept(tmp_path, kind):
    members, message = LIMIT_BREAKERS[kind]
    upload = make_zip(tmp_path / "bad.zip", members)
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes())
    report = collect_uploads([upload, good], tmp_path / "out")
    assert report.images == ["good.png"]
    assert [name for name, _ in report.ignored] == ["bad.zip"]
    assert message in dict(report.ignored)["bad.zip"]
    with pytest.raises(InputError, match=message):  # alone, the reason is in the refusal
        collect_uploads([upload], tmp_path / "alone")
    assert not list((tmp_path / "alone").rglob("*.png"))


def test_an_upload_without_images_is_refused(tmp_path):
    upload = make_zip(tmp_path / "up.zip", {"notes.txt": b"hi"})
    with pytest.raises(InputError, match="None of the uploaded files is an image"):
        collect_uploads([upload], tmp_path / "out")


def test_a_file_named_zip_that_is_no_zip_is_left_out(tmp_path):
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"not a zip")
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes())
    report = collect_uploads([fake, good], tmp_path / "out")
    assert report.images == ["good.png"]
    assert report.ignored == [("fake.zip", "not a readable zip file")]


def test_empty_files_are_left_out_as_empty(tmp_path):
    upload = make_zip(tmp_path / "up.zip", {"inside.png": b"", "ok.png": png_bytes()})
    loose = tmp_path / "loose.jpg"
    loose.write_bytes(b"")
    report = collect_uploads([upload, loose], tmp_path / "out")
    assert report.images == ["ok.png"]
    assert dict(report.ignored) == {"inside.png": "empty (0 bytes)", "loose.jpg": "empty (0 bytes)"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok.png"]


def test_captions_match_by_path_or_name_and_are_cleaned(tmp_path):
    table = tmp_path / "captions.json"
    table.write_text(json.dumps({"sub/a.png": ["one\x00", "   "], "b.png": "two <i>x</i>"}))
    target = tmp_path / "out.json"
    assert write_captions(table, ["sub/a.png", "deep/b.png", "c.png"], target) == 2
    assert json.loads(target.read_text()) == {"sub/a.png": ["one"], "deep/b.png": ["two <i>x</i>"]}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("captions.json", "{not json", "could not be read"),
        ("captions.json", "[1, 2]", "could not be read"),
        ("captions.csv", "only-one-column\n", "could not be read"),
        ("captions.txt", "a.png,x", "must be .json or .csv"),
    ],
)
def test_bad_captions_files_are_refused_without_server_paths(tmp_path, name, content, message):
    table = tmp_path / name
    table.write_text(content)
    with pytest.raises(InputError, match=message) as error:
        write_captions(table, ["a.png"], tmp_path / "out.json")
    assert str(tmp_path) not in str(error.value)


# ---------------------------------------------------------------- pictures
def test_colormap_runs_from_dark_blue_to_yellow():
    ends = colormap(np.array([0.0, 1.0]))
    assert tuple(ends[0]) == (68, 1, 84) and tuple(ends[1]) == (253, 231, 37)


def test_upsampling_is_smooth_and_keeps_the_hot_region_in_place():
    grid = np.zeros((4, 4), dtype=np.float32)
    grid[1, 2] = 1.0
    heat = upsample(grid, 64)
    assert heat.shape == (64, 64) and heat.min() >= 0.0 and heat.max() <= 1.0
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    assert 16 <= row < 32 and 32 <= col < 48  # inside cell (1, 2)
    assert len(np.unique(heat.round(3))) > 16  # a gradient, not four blocks


def test_model_view_is_the_centre_crop_the_model_sees():
    image = Image.new("RGB", (300, 100), (0, 0, 255))
    image.paste((255, 0, 0), (100, 0, 200, 100))  # red middle third
    view = np.asarray(model_view(image, crop=224, size=32))
    assert (view[:, :, 0] > 200).all()  # short side 256, centre 224 of a 768-wide resize


# ---------------------------------------------------------------- engine
def test_text_search_ranks_by_the_sum_of_level_scores(engine):
    results = engine.search_text("a square of colour 2", 3, BUILTIN)
    assert len(results.hits) == 3 and results.headers == engine.image_headers()
    scores = [h.score for h in results.hits]
    assert scores == sorted(scores, reverse=True)
    assert all(abs(h.score - sum(h.level_scores)) < 1e-5 for h in results.hits)
    assert all(path.is_file() for path, _ in results.pictures)


def test_the_demo_searches_the_same_gallery_in_bf16_as_in_fp32(tmp_path, monkeypatch):
    """The app's default on AMX CPUs: its queries (and a gallery built so) encode in bf16."""
    checkpoint, gallery = write_demo_assets(tmp_path)
    results = {}
    for precision in ("fp32", "bf16"):
        monkeypatch.setenv("HAT_ENCODE_PRECISION", precision)
        engine = DemoEngine(checkpoint, gallery, tmp_path / precision, tmp_path / "tmp", False)
        try:
            assert engine.describe()["encode_precision"] == precision
            hits = engine.search_text("a square of colour 2", 5, BUILTIN).hits
            results[precision] = {h.caption: h.score for h in hits}
        finally:
            engine.close()
    assert results["bf16"].keys() == results["fp32"].keys()
    for key, score in results["fp32"].items():
        assert abs(results["bf16"][key] - score) < 0.05 * max(1.0, abs(score))


def test_maps_of_a_result_come_from_the_computation_that_scored_it(engine):
    hit = engine.search_text("picture number 3", 1, BUILTIN).hits[0]
    maps = engine.maps_for_gallery_image(engine.gallery, hit.index, "picture number 3")
    assert maps.details["score"] == pytest.approx(hit.score, abs=1e-5)
    words = maps.details["words"]
    assert words[0] == "[CLS]" and words[-1] == "[SEP]"
    assert maps.picture.width == LABEL_WIDTH + GAP + MARGIN + (len(words) + 1) * CELL
    assert "level 3" in maps.legend and "layers.3" in maps.legend
    pair = maps.pair  # kept for the word and region views: the same levels and score
    assert pair.score == pytest.approx(hit.score, abs=1e-5) and pair.view.size == (448, 448)
    assert [w.text for w in pair.words] == [w["text"] for w in maps.details["whole_words"]]
    assert [lv["score"] for lv in maps.details["levels"]] == [lv.score for lv in pair.levels]


def test_the_session_gallery_is_searched_and_removed(engine, tmp_path):
    upload = make_zip(tmp_path / "up.zip", {"x.png": png_bytes(), "bad.png": b"not a png"})
    table = tmp_path / "captions.csv"
    table.write_text("image,caption\nx.png,a red picture\n")
    with pytest.raises(InputError, match="no gallery yet"):
        engine.search_text("red", 3, MINE)
    mine, status = engine.build_session_gallery([upload], table)
    assert "1 images, 1 captions" in status and "bad.png: cannot identify" in status
    assert str(mine.directory) not in status
    assert engine.search_text("red", 5, MINE, mine).hits[0].image == "x.png"
    query = tmp_path / "query.png"
    query.write_bytes(png_bytes())
    assert engine.search_image(query, 5, MINE, mine).hits[0].caption == "a red picture"
    mine.remove()
    assert not mine.directory.exists()


def test_a_session_gallery_whose_files_are_cleared_under_it_says_so(engine, tmp_path):
    # Gradio clears old uploads, and a visitor's gallery goes with its session: a request that
    # finds its files gone gets a message, never a raw error
    upload = tmp_path / "x.png"
    upload.write_bytes(png_bytes())
    table = tmp_path / "captions.csv"
    table.write_text("image,caption\nx.png,a red picture\n")
    mine, _ = engine.build_session_gallery([upload], table)
    (mine.gallery.directory / "image.faiss").unlink()  # read on the first search
    with pytest.raises(InputError, match="found damaged: build it again"):
        engine.search_text("red", 3, MINE, mine)
    mine.gallery.image_path(0).unlink()
    with pytest.raises(InputError, match="can no longer be read: build the gallery again"):
        engine.maps_for_gallery_image(mine.gallery, 0, "red")
    gone = tmp_path / "gone.png"
    report = collect_uploads([gone, upload], tmp_path / "again")
    assert report.images == ["x.png"] and dict(report.ignored) == {"gone.png": GONE}
    with pytest.raises(InputError, match="no longer on the server"):
        write_captions(tmp_path / "gone.csv", ["x.png"], tmp_path / "out.json")
    mine.remove()


def test_examples_come_from_the_gallery_list_or_spread_over_it(engine):
    captions, images = engine.examples(3)
    assert len(captions) == 3 and len(set(captions)) == 3
    assert all(c in engine.gallery.captions for c in captions)
    assert len(images) == 3 and all(Path(p).is_file() for p in images)
    listed = engine.gallery_dir / "examples.json"
    listed.write_text(json.dumps({"captions": ["a square of colour 4"], "images": ["1.png"]}))
    try:
        assert engine.examples(3) == (
            ["a square of colour 4"],
            [str(engine.gallery_dir / "images" / "1.png")],
        )
    finally:
        listed.unlink()


def test_chosen_examples_are_answered_correctly(engine):
    chosen, counts = choose_examples(engine.searcher, per_kind=2, kinds=("",))
    gallery = engine.gallery
    assert counts[""]["images"] == gallery.num_images
    assert len(chosen["captions"]) == min(2, counts[""]["text_to_image"])
    for caption in chosen["captions"]:
        best = engine.searcher.text_to_image(caption, 1).hits[0].index
        owners = {
            int(gallery.caption_image[j]) for j, c in enumerate(gallery.captions) if c == caption
        }
        assert best in owners
    for path in chosen["images"]:
        index = gallery.paths.index(path)
        hit = engine.searcher.image_to_text(gallery.image_path(index), 1).hits[0]
        assert gallery.caption_image[hit.index] == index


def test_spread_takes_evenly_spaced_items():
    assert spread(list(range(10)), 3) == [0, 3, 6]
    assert spread([1, 2], 3) == [1, 2]


# ---------------------------------------------------------------- damaged built-in gallery
def invert_middle(path) -> None:
    """Eight bytes in the middle of ``path`` inverted, its size and mtime kept."""
    stat = path.stat()
    with path.open("r+b") as fh:
        fh.seek(stat.st_size // 2)
        data = fh.read(8)
        fh.seek(stat.st_size // 2)
        fh.write(bytes(b ^ 0xFF for b in data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def wait_for(condition, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_damaged_builtin_gallery_is_never_served_but_rebuilt(tmp_path):
    checkpoint, gallery = write_demo_assets(tmp_path)

    def start():
        return DemoEngine(checkpoint, gallery, tmp_path / "cache", tmp_path / "tmp", progress=False)

    first = start()
    caption = "a square of colour 2"
    expected = first.search_text(caption, 5, BUILTIN).rows
    victim = next((first.gallery.directory / "segments").glob("*/image.2.npy"))
    first.close()
    invert_middle(victim)
    engine = start()  # a cache hit: opening checks sizes only
    try:
        assert engine.startup["cache_hit"]
        try:  # the query's own row checks, or the check of every file after start-up, find it
            assert engine.search_text(caption, 5, BUILTIN).rows == expected  # already rebuilt
        except InputError as refusal:
            assert "damaged" in str(refusal) and "being rebuilt" in str(refusal)
        wait_for(lambda: engine.describe()["gallery_status"].startswith("rebuilt"))
        status = engine.describe()["gallery_status"]  # public (/info): no server paths
        assert "changed after it was built" in status and str(tmp_path) not in status
        assert engine.search_text(caption, 5, BUILTIN).rows == expected
    finally:
        engine.close()


def test_a_closed_demo_starts_no_repair_and_finishes_the_one_under_way(tmp_path):
    """A closed engine's background check may still find damage (a new engine may be using the
    cache by then): it must rebuild nothing; a rebuild started before the close is waited for."""
    checkpoint, gallery = write_demo_assets(tmp_path)

    def start():
        return DemoEngine(checkpoint, gallery, tmp_path / "cache", tmp_path / "tmp", progress=False)

    def damage(engine):
        directory = engine.gallery.directory
        victim = next((directory / "segments").glob("*/image.2.npy"))
        return CorruptionError(directory, victim.relative_to(directory).as_posix(), "changed")

    engine = start()
    engine.close()
    engine.builtin.damaged(engine.gallery, damage(engine))
    assert not engine.builtin.status.startswith("rebuild") and engine.gallery.directory.is_dir()
    engine = start()
    engine.builtin.damaged(engine.gallery, damage(engine))
    engine.close()
    assert engine.builtin.status.startswith("rebuilt")
    assert engine.gallery.directory.is_dir()


def test_a_gallery_another_app_rebuilt_first_is_reopened_not_deleted(tmp_path):
    # two apps on one cache: B rebuilt the damaged gallery before A's repair began; A must
    # reopen B's build (a cache hit), not delete it and encode everything again
    checkpoint, gallery = write_demo_assets(tmp_path)
    engine = DemoEngine(checkpoint, gallery, tmp_path / "cache", tmp_path / "tmp", progress=False)
    try:
        wait_for(lambda: engine.describe()["gallery_status"] != "checking its files")
        old = engine.gallery
        other = DemoEngine(
            checkpoint, gallery, tmp_path / "other", tmp_path / "tmp2", progress=False
        )
        other.close()
        shutil.rmtree(old.directory)  # B's repair: the damaged gallery out, its build in
        shutil.copytree(other.gallery.directory, old.directory)
        engine.builtin.damaged(old, CacheError(f"{old.directory}/image.faiss is missing"))
        wait_for(lambda: engine.builtin.status.startswith("rebuilt"))
        assert engine.gallery.report.cache_hit and engine.gallery.report.encoded_images == 0
        assert engine.gallery.manifest == other.gallery.manifest
    finally:
        engine.close()


def test_every_file_is_checked_in_the_background_after_start_up(engine):
    wait_for(lambda: engine.describe()["gallery_status"] != "checking its files")
    assert engine.describe()["gallery_status"] == "files verified"
