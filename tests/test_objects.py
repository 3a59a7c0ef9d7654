"""Tests for the object datasets (``hat.demo_build.objects``): naming helpers, view rendering, the
composited training set and the real-photo evaluation set, read back by the dataset readers."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hat.cli.data import main as data_main
from hat.data.captions import karpathy_groups, read_karpathy
from hat.demo_build import names, objects
from hat.demo_build.sources import LabelledImage

RED = (220, 20, 20)
BLUE = (20, 40, 220)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _cutout_image(side: int = 64) -> Image.Image:
    """A red square on a transparent margin (like a furniture render)."""
    image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    image.paste((*RED, 255), (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    return image


def _drawing(size: tuple[int, int] = (80, 60)) -> Image.Image:
    """An opaque drawing: left half green, right half yellow."""
    image = Image.new("RGB", size, (30, 180, 30))
    image.paste((230, 230, 40), (size[0] // 2, 0, *size))
    return image


@pytest.fixture()
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "wallpaper.jpg"
    Image.new("RGB", (320, 200), BLUE).save(path, "JPEG")
    return path


def _item(key: str, name: str, source: str, data: bytes, category: str = "things") -> LabelledImage:
    return LabelledImage(key, name, category, source, f"{source} licence", data, f"by {key}")


# ------------------------------------------------------------------ naming


@pytest.mark.parametrize(
    ("phrase", "expected"),
    [
        ("hammer", "a hammer"),
        ("owl", "an owl"),
        ("ice cream", "an ice cream"),
        ("glass", "a glass"),
        ("pliers", "pliers"),
        ("solar panels", "solar panels"),
        ("a dam", "a dam"),
        ("the moon", "the moon"),
    ],
)
def test_article(phrase: str, expected: str) -> None:
    assert names.article(phrase) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("A Hammer", "hammer"),
        ("Solar panels", "solar panel"),
        ("the Glass", "glass"),
        ("bus", "bus"),
        ("Ice-cream 2", "ice cream"),
        ("caf\u00e9 table", "caf\u00e9 table"),
        ("an Owl", "owl"),
    ],
)
def test_concept(name: str, expected: str) -> None:
    """Lower case, letters only, no leading article, a final plural ``s`` dropped."""
    assert names.concept(name) == expected


# ------------------------------------------------------------------ views


def _inside(view: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.asarray(view)[y0 + 5 : y1 - 5, x0 + 5 : x1 - 5].reshape(-1, 3).astype(int)


def _outside(view: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.ones(view.size[::-1], bool)
    x0, y0, x1, y1 = box
    mask[max(0, y0 - 3) : y1 + 3, max(0, x0 - 3) : x1 + 3] = False
    return np.asarray(view)[mask].astype(int)


def test_cutout_view_on_a_procedural_background() -> None:
    """A cut-out is pasted whole (45-90 % of the side) at the returned box, and the background
    is named by a caption phrase."""
    view, box, phrase = objects.render_view(_cutout_image(), random.Random(0), size=128)
    assert view.size == (128, 128) and view.mode == "RGB"
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
    assert x1 - x0 == y1 - y0  # the transparent margin is cropped: the square stays square
    assert 0.45 * 128 - 1 <= x1 - x0 <= 0.9 * 128 + 1
    red = _inside(view, box)
    assert (red[:, 0] > red[:, 1] + 60).all() and (red[:, 0] > red[:, 2] + 60).all()
    assert phrase.endswith("background")


def test_cutout_view_on_a_photo(photo: Path) -> None:
    """Given a photo, the cut-out goes on a crop of it, and no background phrase is returned."""
    for seed in range(3):
        view, box, phrase = objects.render_view(_cutout_image(), random.Random(seed), 96, photo)
        assert phrase is None and view.size == (96, 96)
        red, blue = _inside(view, box), _outside(view, box)
        assert (red[:, 0] > red[:, 2] + 60).all()
        assert len(blue) and (blue[:, 2] > blue[:, 0] + 60).all()


@pytest.mark.parametrize("use_photo", [False, True])
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_opaque_picture_is_cropped_not_pasted(mode: str, use_photo: bool, photo: Path) -> None:
    """An opaque picture (even an RGBA one without transparency) is cropped to a square view:
    no box, no background phrase, photo or not."""
    image = _drawing().convert(mode)
    chosen = photo if use_photo else None
    view, box, phrase = objects.render_view(image, random.Random(1), size=64, photo=chosen)
    assert (view.size, box, phrase) == ((64, 64), None, None)
    pixels = np.asarray(view).reshape(-1, 3).astype(int)
    assert (pixels[:, 1] > pixels[:, 2] + 60).mean() > 0.9  # green and yellow, never blue


def test_captions_for_cutouts_and_pictures() -> None:
    pasted = objects.object_captions("owl", "birds", (0, 0, 40, 40), "a red background", 256)
    assert pasted == [
        "an owl",
        "a photo of an owl",
        "an owl in the top left corner",
        "an owl on a red background",
        "an owl in the top left corner on a red background",
    ]
    drawn = objects.object_captions("pliers", "tools", None, None, 256)
    assert drawn == [
        "pliers",
        "a picture of pliers",
        "a close-up of pliers",
        "pliers",
        "pliers, tools",
    ]


# ------------------------------------------------------------------ training set


def test_build_object_set_reads_back_as_karpathy(tmp_path: Path, photo: Path) -> None:
    """Every item gets ``views`` JPEG views with 5 captions each; cut-outs alternate between
    procedural (even views) and photo (odd views) backgrounds, drawings have none."""
    items = [
        _item("Contributions/1", "Kitchen cabinet", "sweethome3d", _png(_cutout_image())),
        _item("animals/owl", "owl", "art4apps", _png(_drawing()), category="animals"),
        _item("food/ice", "ice creams", "art4apps", _png(_drawing()), category="food"),
    ]
    out = tmp_path / "out"
    path = objects.build_object_set(items, out, views=2, seed=3, photos=[photo])
    assert path == out / objects.OBJECTS_JSON
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["concepts"] == ["ice cream", "kitchen cabinet", "owl"]
    assert data["licences"] == ["art4apps: art4apps licence", "sweethome3d: sweethome3d licence"]
    entries = data["images"]
    assert [(e["name"], e["view"], e["background_kind"]) for e in entries] == [
        ("Kitchen cabinet", 0, "procedural"),
        ("Kitchen cabinet", 1, "photo"),
        ("owl", 0, "none"),
        ("owl", 1, "none"),
        ("ice creams", 0, "none"),
        ("ice creams", 1, "none"),
    ]
    assert entries[0]["filename"] == "objects/sweethome3d/Contributions_1-0.jpg"
    assert entries[1]["box"] is not None and entries[2]["box"] is None
    assert "background" in entries[0]["sentences"][3]["raw"]
    assert entries[4]["sentences"][4]["raw"] == "ice creams, food"

    dataset = read_karpathy(path, out / "images", "train")
    assert dataset.num_images == 6 and len(dataset.captions) == 30
    assert np.bincount(dataset.caption_to_image).tolist() == [5] * 6
    assert dataset.captions_of(2)[0] == "an owl"
    for image_path in dataset.image_paths:
        with Image.open(image_path) as img:
            assert (img.format, img.size) == ("JPEG", (objects.IMAGE_SIZE,) * 2)


def test_build_object_set_is_reproducible(tmp_path: Path) -> None:
    """The same items and seed give the same dataset file, without photos all on procedural
    backgrounds."""
    items = [_item("a", "hammer", "sweethome3d", _png(_cutout_image(32)))]
    first = objects.build_object_set(items, tmp_path / "a", views=2, seed=5)
    second = objects.build_object_set(items, tmp_path / "b", views=2, seed=5)
    assert first.read_bytes() == second.read_bytes()
    kinds = [e["background_kind"] for e in json.loads(first.read_text())["images"]]
    assert kinds == ["procedural", "procedural"]


# ------------------------------------------------------------------ real photos


def test_first_of_each_name_dedupes_by_concept() -> None:
    """The first image of each concept wins; GCompris file-stem names are replaced by what the
    photo shows (``solar`` -> ``solar panels``), other sources keep theirs."""
    data = _png(_drawing())
    items = [
        _item("renewable/solar.webp", "solar", "gcompris", data),
        _item("x/solar-panel", "Solar panel", "art4apps", data),  # same concept: dropped
        _item("tools/plier.webp", "plier", "gcompris", data),
        _item("D001", "brinjal", "ifct", data),
        _item("D002", "Brinjals", "ifct", data),  # plural of the same concept: dropped
        _item("plier-sh3d", "plier", "sweethome3d", data),  # "pliers" is taken
        _item("monuments/dam.webp", "Dam", "gcompris", data),
        _item("H012", "dam", "ifct", data),  # "a dam" has concept "dam"
    ]
    kept = objects.first_of_each_name(items)
    assert [(i.key, i.name) for i in kept] == [
        ("renewable/solar.webp", "solar panels"),
        ("tools/plier.webp", "pliers"),
        ("D001", "brinjal"),
        ("monuments/dam.webp", "a dam"),
    ]
    assert kept[0].credit == "by renewable/solar.webp" and kept[0].data == data
    assert kept[0].licence == "gcompris licence" and kept[0].category == "things"


def test_build_real_photo_set(tmp_path: Path) -> None:
    """Test split, one "a photo of ..." caption each (monuments without article), photos at
    most 384 px, and ``seen_concept`` flags that karpathy_groups returns in read order."""
    big = Image.new("RGB", (800, 600), (120, 80, 40))
    items = [
        _item("renewable/solar.webp", "solar panels", "gcompris", _png(big), "renewable"),
        _item("explore_monuments/taj.webp", "Taj Mahal", "gcompris", _png(_drawing()), "monuments"),
        _item("D001", "brinjal", "ifct", _png(_cutout_image()), "other vegetables"),
        _item("A1", "owl", "gcompris", _png(_drawing((300, 500))), "world animals"),
    ]
    path = objects.build_real_photo_set(items, ["solar panel", "owl", "hammer"], tmp_path)
    assert path == tmp_path / objects.REAL_PHOTOS_JSON
    entries = json.loads(path.read_text(encoding="utf-8"))["images"]
    assert {e["split"] for e in entries} == {"test"}
    assert [e["seen_concept"] for e in entries] == [True, False, False, True]
    assert entries[0]["credit"] == "by renewable/solar.webp"
    assert entries[0]["licence"] == "gcompris licence"

    dataset = read_karpathy(path, tmp_path / "images", "test")
    assert dataset.captions == [
        "a photo of solar panels",
        "a photo of Taj Mahal",
        "a photo of a brinjal",
        "a photo of an owl",
    ]
    sizes = []
    for image_path in dataset.image_paths:
        with Image.open(image_path) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            sizes.append(img.size)
    assert sizes == [(384, 288), (80, 60), (64, 64), (230, 384)]

    groups = karpathy_groups(path, "test", "seen_concept")
    assert sorted(groups) == ["seen_concept=False", "seen_concept=True"]
    assert groups["seen_concept=True"].tolist() == [True, False, False, True]
    assert groups["seen_concept=False"].tolist() == [False, True, True, False]


# ------------------------------------------------------------------ command line


def test_data_cli_objects_help(capsys) -> None:
    """``hat data objects --help`` reaches the objects command's own help."""
    with pytest.raises(SystemExit) as done:
        data_main(["objects", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: hat data objects" in out
    for option in ("--out", "--cache", "--views", "--seed"):
        assert option in out
    assert "dataset_real_photos.json" in out
