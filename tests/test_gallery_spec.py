"""Galleries named on a command line (``app.py --gallery``, ``hat search --gallery``): a folder or
``karpathy:JSON:IMAGE_ROOT:SPLIT``, one split of a Karpathy file with its real captions."""

import json

import pytest

from hat import cli
from hat.demo.engine import BUILTIN, DemoEngine
from hat.gallery import collection_from_spec
from tests.test_gallery import COLOURS, checkpoint, write_image  # noqa: F401  (fixture)


def write_karpathy(root):
    """Four images, two in a COCO-style ``filepath`` folder; three are in the test split."""
    entries = []
    for i in range(4):
        folder = "val2014" if i % 2 else ""
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        write_image(root / "images" / folder / f"im{i}.jpg", COLOURS[i], seed=i)
        sentences = [{"raw": f"a square of colour {i}"}, {"raw": f"picture number {i}"}]
        entry = {"filename": f"im{i}.jpg", "split": "train" if i == 3 else "test"}
        if folder:
            entry["filepath"] = folder
        entries.append({**entry, "sentences": sentences})
    path = root / "dataset_tiny.json"
    path.write_text(json.dumps({"images": entries}))
    return f"karpathy:{path}:{root / 'images'}:test"


def test_a_karpathy_spec_is_one_split_with_its_captions(tmp_path):
    collection = collection_from_spec(write_karpathy(tmp_path))
    assert [e.path for e in collection.entries] == ["im0.jpg", "val2014/im1.jpg", "im2.jpg"]
    assert collection.entries[1].captions == ("a square of colour 1", "picture number 1")
    assert (collection.source["kind"], collection.source["split"]) == ("karpathy", "test")
    assert collection.root == (tmp_path / "images").resolve()


@pytest.mark.parametrize("spec", ["karpathy:a.json:images", "karpathy:a.json::test", "karpathy:"])
def test_a_malformed_karpathy_spec_shows_the_form(spec):
    with pytest.raises(ValueError, match="write karpathy:JSON:IMAGE_ROOT:SPLIT"):
        collection_from_spec(spec)


def test_the_app_engine_serves_a_karpathy_split(checkpoint, tmp_path):  # noqa: F811
    spec = write_karpathy(tmp_path)
    engine = DemoEngine(checkpoint, spec, tmp_path / "cache", tmp_path / "tmp", progress=False)
    try:
        assert (engine.gallery.num_images, engine.gallery.num_captions) == (3, 6)
        assert engine.gallery_root == (tmp_path / "images").resolve()
        hits = engine.search_text("a square of colour 1", 3, BUILTIN).hits
        assert sorted(h.image for h in hits) == ["im0.jpg", "im2.jpg", "val2014/im1.jpg"]
        image = tmp_path / "images" / "val2014" / "im1.jpg"
        captions = {h.caption for h in engine.search_image(image, 6, BUILTIN).hits}
        assert "picture number 2" in captions and "picture number 3" not in captions  # test only
    finally:
        engine.close()


def test_hat_search_builds_then_reopens_the_gallery_of_a_spec(checkpoint, tmp_path, capsys):  # noqa: F811
    cache = tmp_path / "cache"
    query = ["search", "--checkpoint", str(checkpoint), "--gallery", write_karpathy(tmp_path)]
    query += ["--cache", str(cache), "-k", "2", "--json"]
    assert cli.main([*query, "--text", "picture number 2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["hits"]) == 2 and result["scored"] == 3
    assert cli.main([*query, "--image", str(tmp_path / "images" / "im0.jpg")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["hits"]) == 2 and all(h["caption"] for h in result["hits"])
    (gallery,) = cache.iterdir()  # the second search reopened the same gallery
    with pytest.raises(SystemExit):
        cli.main([*query[:3], "--gallery", str(gallery), "--text", "x"])
    assert "is a built gallery: search it without --checkpoint" in capsys.readouterr().err
