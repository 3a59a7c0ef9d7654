"""Tests for the Tux Paint Scenes builder on a tiny fake copy of the Debian package."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from hat.cli.data import main as data_main
from hat.demo_build import packages
from hat.demo_build import tuxpaint_scenes as tps

SIZES = {"train": 30, "val": 6, "test": 6, "test_unseen": 10}
HELDOUT = 0.3
# Saturated colours far from every background palette colour, so a stamp is recognisable.
STAMPS = {
    "animals/birds/hen": ("A brown hen.", (0, 255, 255)),
    "animals/mammals/cow": ("A cow.", (255, 0, 255)),
    "food/fruit/grapes": ("A bunch of grapes.", (0, 255, 0)),
    "food/fruit/apple_red": ("A “Red” apple (fresh).", (0, 0, 255)),
    "plants/trees/pinecone": ("A pinecone.", (128, 255, 0)),
    "sports/soccer": ("A soccer ball.", (0, 128, 255)),
    "household/key": ("A key.", (255, 0, 128)),
    "vehicles/auto/sedan": ("A sedan car.", (0, 255, 128)),
    "town/flags/greenflag": ("A green flag.", (0, 128, 128)),
    "space/moon/moon_full": ("The full moon—so bright!", (255, 255, 255)),
}
COLOURS = {
    tps.clean_description(text): rgb for text, rgb in STAMPS.values() if rgb != (255, 255, 255)
}


def _stamp_png(path: Path, rgb: tuple[int, int, int], size: tuple[int, int]) -> None:
    """An opaque ellipse inside a transparent margin, like a real cut-out."""
    img = Image.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse((4, 3, size[0] - 5, size[1] - 4), fill=(*rgb, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _stamp(root: Path, stamp_id: str, text: str | None, rgb=(90, 90, 90), size=(40, 30)) -> None:
    _stamp_png(root / f"{stamp_id}.png", rgb, size)
    if text is not None:
        (root / f"{stamp_id}.txt").write_text(f"{text}\nfr.utf8=Traduction.\n", encoding="utf-8")


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake unpacked .deb: clean stamps plus every kind of stamp that must be dropped."""
    pkg = tmp_path_factory.mktemp("pkg")
    root = pkg / tps.STAMPS_SUBDIR
    for k, (stamp_id, (text, rgb)) in enumerate(sorted(STAMPS.items())):
        _stamp(root, stamp_id, text, rgb, size=(30 + 7 * k, 60 - 3 * k))
    _stamp(root, "symbols/alphabets/english/a_filled", "The letter a.")
    _stamp(root, "symbols/alphabets/asl/asl_b", "The sign for the letter B in ASL.")
    _stamp(root, "animals/birds/zz_hen_again", "A brown hen.")
    _stamp(root, "vehicles/auto/sedan_mirror", None)
    _stamp(root, "medical/stethoscope", "A stethoscope lets your doctor listen to your heart.")
    (root / "plants/trees/tree.svg").write_text("<svg/>", encoding="utf-8")
    doc = pkg / tps.DOC_SUBDIR
    doc.mkdir(parents=True)
    (doc / "copyright").write_text("Files: *\nLicense: GPL-2\n", encoding="utf-8")
    with gzip.open(doc / "changelog.Debian.gz", "wt", encoding="utf-8") as fh:
        fh.write("tuxpaint-stamps (2022.06.04-1) unstable; urgency=medium\n")
    return pkg


@pytest.fixture(scope="module")
def built(package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out")
    tps.build_scenes(package, out, seed=0, sizes=SIZES, heldout_fraction=HELDOUT)
    tps.build_stamp_set(package, out, seed=0, heldout_fraction=HELDOUT)
    return out


def _load(out: Path, name: str = tps.SCENES_JSON) -> dict:
    return json.loads((out / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("line", "phrase"),
    [
        ("A brown hen.", "a brown hen"),
        ("A chocolate easter egg. Yum!", "a chocolate easter egg"),
        ("An albino peahen (a female peafowl, or peacock).", "an albino peahen"),
        ("A “Fuji” apple.", "a fuji apple"),
        ("Mercury—the planet closest to the Sun.", "mercury"),
        ("“Hospital”.", "a hospital sign"),
        ("A knight’s helmet.", "a knight's helmet"),
        ("A ripe, red tomato!", None),
        ("Boom!!!", None),
        ("A stethoscope lets your doctor listen to your heart and lungs.", None),
    ],
)
def test_clean_description(line: str, phrase: str | None) -> None:
    assert tps.clean_description(line) == phrase


def test_scan_keeps_clean_stamps_only(package: Path) -> None:
    scan = tps.scan_stamps(package)
    assert sorted(s.id for s in scan.kept) == sorted(STAMPS)
    assert scan.dropped == {
        "duplicate description": ["animals/birds/zz_hen_again"],
        "excluded folder": ["symbols/alphabets/asl/asl_b", "symbols/alphabets/english/a_filled"],
        "no description": ["vehicles/auto/sedan_mirror"],
        "not a noun phrase": ["medical/stethoscope"],
    }
    assert (scan.svg_total, scan.svg_without_png, scan.version) == (1, 1, "2022.06.04-1")
    hen = next(s for s in scan.kept if s.id == "animals/birds/hen")
    assert hen.image.mode == "RGBA"
    assert np.asarray(hen.image)[..., 3].any(axis=0).all()  # cropped to the ellipse


def test_build_is_deterministic(package: Path, built: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    tps.build_scenes(package, again, seed=0, sizes=SIZES, heldout_fraction=HELDOUT)
    assert (again / tps.SCENES_JSON).read_bytes() == (built / tps.SCENES_JSON).read_bytes()
    for img in _load(built)["images"]:
        name = Path("images") / img["filepath"] / img["filename"]
        assert (again / name).read_bytes() == (built / name).read_bytes()
    other = tmp_path / "other"
    tps.build_scenes(package, other, seed=1, sizes=SIZES, heldout_fraction=HELDOUT)
    assert (other / tps.SCENES_JSON).read_bytes() != (built / tps.SCENES_JSON).read_bytes()


def test_splits_keep_unseen_stamps_apart(built: Path) -> None:
    data = _load(built)
    assert data["source"]["license"] == "GPL-2+"
    assert (built / tps.LICENSE_FILE).read_text(encoding="utf-8").startswith("Files: *")
    heldout = set(data["source"]["stamps_heldout"])
    assert len(heldout) == round(HELDOUT * len(STAMPS))
    counts: dict[str, int] = {}
    for img in data["images"]:
        counts[img["split"]] = counts.get(img["split"], 0) + 1
        used = {o["stamp"] for o in img["objects"]}
        assert used and (used <= heldout if img["split"] == "test_unseen" else not used & heldout)
    assert counts == SIZES
    assert [img["imgid"] for img in data["images"]] == list(range(sum(SIZES.values())))
    assert len({img["filename"] for img in data["images"]}) == sum(SIZES.values())


def test_captions_ground_their_objects(built: Path) -> None:
    sentids = []
    for img in _load(built)["images"]:
        raws = [s["raw"] for s in img["sentences"]]
        assert len(raws) == len(set(raws)) == 5
        assert img["sentids"] == [s["sentid"] for s in img["sentences"]]
        sentids += img["sentids"]
        for sentence in img["sentences"]:
            assert sentence["imgid"] == img["imgid"]
            assert sentence["tokens"] == re.sub(r"[^a-z0-9]+", " ", sentence["raw"].lower()).split()
            assert sentence["groundings"]
            for g in sentence["groundings"]:
                start, end = g["span"]
                assert sentence["raw"][start:end] == img["objects"][g["object"]]["description"]
    assert sentids == list(range(len(sentids)))


def test_boxes_hold_the_objects(built: Path) -> None:
    for img in _load(built)["images"]:
        pixels = np.asarray(Image.open(built / "images" / img["filename"]), dtype=np.int16)
        assert pixels.shape == (256, 256, 3)
        boxes = [o["box"] for o in img["objects"]]
        for obj in img["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
            rgb = COLOURS.get(obj["description"])
            if rgb is None:
                continue
            near = np.abs(pixels[y0:y1, x0:x1] - np.array(rgb)).max(axis=2) < 40
            assert near.mean() > 0.5, (img["filename"], obj)
            alone = all(b == obj["box"] or tps._overlap(obj["box"], tuple(b)) == 0 for b in boxes)
            if alone:  # a tight box: the object reaches all four sides
                assert near[:, :3].any() and near[:, -3:].any()
                assert near[:3].any() and near[-3:].any()


def test_stamp_set_has_one_caption_each(built: Path) -> None:
    data = _load(built, tps.STAMPS_JSON)
    heldout = set(data["source"]["stamps_heldout"])
    assert len(data["images"]) == len(STAMPS)
    for img in data["images"]:
        (sentence,) = img["sentences"]
        (obj,) = img["objects"]
        assert img["split"] == "test" and img["filename"] == f"stamps/{obj['stamp']}.jpg"
        assert sentence["raw"] == obj["description"]
        assert sentence["groundings"] == [{"object": 0, "span": [0, len(sentence["raw"])]}]
        assert img["unseen"] == (obj["stamp"] in heldout)
        assert Image.open(built / "images" / img["filename"]).size == (256, 256)


def test_demo_gallery(built: Path, tmp_path: Path) -> None:
    path = tps.build_demo_gallery(built / tps.SCENES_JSON, tmp_path / "gallery", n_images=4)
    gallery = json.loads(path.read_text(encoding="utf-8"))
    assert [img["imgid"] for img in gallery["images"]] == [0, 1, 2, 3]
    assert all(img["split"] == "test" for img in gallery["images"])
    assert all(
        (tmp_path / "gallery/images" / img["filename"]).is_file() for img in gallery["images"]
    )
    from hat.data.captions import read_folder

    folder = read_folder(tmp_path / "gallery/images", tmp_path / "gallery/captions.json")
    assert folder.num_images == 4 and len(folder.captions) == 20
    assert folder.captions_of(0) == [s["raw"] for s in gallery["images"][0]["sentences"]]
    with pytest.raises(ValueError, match="MB"):
        tps.build_demo_gallery(built / tps.SCENES_JSON, tmp_path / "big", max_mb=1e-6)


def test_main_builds_both_sets(package: Path, tmp_path: Path, capsys) -> None:
    sizes = ["--train", "3", "--val", "1", "--test", "1", "--test-unseen", "2"]
    data_main(["tuxpaint", "--out", str(tmp_path), "--stamps-root", str(package), *sizes])
    assert len(_load(tmp_path)["images"]) == 7
    assert len(_load(tmp_path, tps.STAMPS_JSON)["images"]) == len(STAMPS)
    assert "stamps kept 10" in capsys.readouterr().out


def test_fetch_explains_missing_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packages.shutil, "which", lambda _: None)
    with pytest.raises(RuntimeError, match="apt-get download tuxpaint-stamps-default"):
        tps.fetch_stamps_package(tmp_path)


def test_relations_and_regions() -> None:
    left, right, top = (0, 100, 40, 140), (150, 100, 190, 140), (150, 0, 190, 40)
    assert tps.relation(left, right) == "to the left of"
    assert tps.relation(right, left) == "to the right of"
    assert tps.relation(top, right) == "above"
    assert tps.relation(right, top) == "below"
    assert tps.relation(left, (10, 105, 50, 145)) == "next to"
    assert tps.region(left, 256) == "on the left"
    assert tps.region(top, 256) == "at the top"
    assert tps.region((200, 200, 250, 250), 256) == "in the bottom right corner"
