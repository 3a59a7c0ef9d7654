import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from hat import get_preset
from hat.data.captions import DatasetFormatError, read_captions_file, read_folder, read_karpathy
from hat.data.images import ImageLoadError, load_image
from hat.data.loader import PairCollator, PairDataset
from hat.transforms import eval_transform, train_transform


def _karpathy(tmp_path, entries):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": entries}))
    return path


def _entry(name, split, n=5, filepath=None):
    e = {
        "filename": name,
        "split": split,
        "sentences": [{"raw": f" {name} caption {k} "} for k in range(n)],
    }
    if filepath:
        e["filepath"] = filepath
    return e


def test_karpathy_splits_restval_and_filepath(tmp_path):
    path = _karpathy(
        tmp_path,
        [
            _entry("a.jpg", "train", filepath="train2014"),
            _entry("b.jpg", "restval"),
            _entry("c.jpg", "test"),
        ],
    )
    train = read_karpathy(path, tmp_path / "imgs", "train")
    assert train.image_paths == [tmp_path / "imgs" / "train2014" / "a.jpg"]
    assert train.captions[0] == "a.jpg caption 0"
    both = read_karpathy(path, tmp_path, "train", include_restval=True)
    assert both.num_images == 2 and both.caption_to_image.tolist() == [0] * 5 + [1] * 5
    assert both.captions_of(1)[0] == "b.jpg caption 0"


def test_malformed_dataset_files_name_file_and_entry(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetFormatError, match=r"bad\.json is not valid JSON"):
        read_karpathy(bad, tmp_path, "test")
    path = _karpathy(tmp_path, [_entry("a.jpg", "test"), {"split": "test", "sentences": []}])
    with pytest.raises(
        DatasetFormatError, match=r"dataset.json: image entry 1 is malformed.*filename"
    ):
        read_karpathy(path, tmp_path, "test")
    with pytest.raises(DatasetFormatError, match="no images in split"):
        read_karpathy(_karpathy(tmp_path, [_entry("a.jpg", "train")]), tmp_path, "test")
    with pytest.raises(DatasetFormatError, match="not found"):
        read_karpathy(tmp_path / "missing.json", tmp_path, "test")


def test_folder_with_json_or_csv_captions(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("x.png", "sub/y.jpg", "z.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "caps.json").write_text(
        json.dumps({"x.png": ["an x", "another x"], "sub/y.jpg": "a y"})
    )
    data = read_folder(tmp_path, tmp_path / "caps.json")
    assert [p.name for p in data.image_paths] == ["y.jpg", "x.png"]
    assert data.captions == ["a y", "an x", "another x"]
    assert data.caption_to_image.tolist() == [0, 1, 1]
    gallery = read_folder(tmp_path, tmp_path / "caps.json", require_captions=False)
    assert gallery.num_images == 3
    (tmp_path / "caps.csv").write_text("image,caption\nz.png,a zed\nz.png,a z again\n")
    assert read_captions_file(tmp_path / "caps.csv") == {"z.png": ["a zed", "a z again"]}
    (tmp_path / "bad.csv").write_text("z.png\n")
    with pytest.raises(DatasetFormatError, match="line 1"):
        read_captions_file(tmp_path / "bad.csv")


def _png_bytes(image, **kw):
    buf = io.BytesIO()
    image.save(buf, **kw)
    return buf.getvalue()


def test_odd_but_valid_images_load_as_rgb(tmp_path):
    cases = {
        "gray16.png": Image.fromarray(np.full((12, 10), 40000, dtype=np.uint16)),
        "cmyk.jpg": Image.new("CMYK", (10, 12), (0, 255, 0, 0)),
        "rgba.png": Image.new("RGBA", (10, 12), (255, 0, 0, 0)),
        "palette.gif": Image.new("P", (10, 12)),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
    frames = [Image.new("RGB", (10, 12), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    for name in [*cases, "anim.gif"]:
        out = load_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == (10, 12), name
    assert load_image(tmp_path / "rgba.png").getpixel((0, 0)) == (
        255,
        255,
        255,
    )  # transparent -> white
    assert load_image(tmp_path / "gray16.png").getpixel((0, 0))[0] == 255  # rescaled, not clipped


def test_a_query_jpeg_decodes_at_a_reduced_scale_no_smaller_than_asked(tmp_path):
    """libjpeg's DCT scaling: a 1600 x 1200 JPEG asked for sides of at least 256 decodes at 1/4
    (1/8 would leave 150), its EXIF orientation still applied; a PNG decodes whole."""
    photo = Image.linear_gradient("L").resize((1600, 1200)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: shown 1200 x 1600
    photo.save(tmp_path / "photo.jpg", exif=exif, quality=90)
    photo.save(tmp_path / "photo.png")
    full = load_image(tmp_path / "photo.jpg")
    small = load_image(tmp_path / "photo.jpg", min_side=256)
    assert full.size == (1200, 1600) and small.size == (300, 400) and small.mode == "RGB"
    assert load_image(tmp_path / "photo.png", min_side=256).size == (1600, 1200)
    upscaled = np.asarray(small.resize(full.size), dtype=np.float32)
    assert np.abs(upscaled - np.asarray(full, dtype=np.float32)).mean() < 3  # the same picture


def test_bad_images_raise_an_error_naming_the_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    data = _png_bytes(Image.new("RGB", (64, 64), "red"), format="PNG")
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    for name in ("empty.jpg", "text.png", "truncated.png", "missing.png"):
        with pytest.raises(ImageLoadError, match=name):
            load_image(tmp_path / name)


def test_decompression_bomb_is_refused(tmp_path):
    # a 1-bit 10000x10000 PNG is tiny on disk but 100 M pixels decoded
    Image.new("1", (10_000, 10_000)).save(tmp_path / "bomb.png")
    with pytest.raises(ImageLoadError, match=r"bomb\.png"):
        load_image(tmp_path / "bomb.png")


def test_skip_bad_counts_instead_of_failing(synthetic_dataset, tmp_path):
    from hat.tokenization import load_tokenizer

    json_path, root = synthetic_dataset
    data = read_karpathy(json_path, root, "val")
    data.image_paths[1] = tmp_path / "gone.png"
    config = get_preset("hat-tiny")
    collate = PairCollator(load_tokenizer(config), config.max_text_len)
    strict = PairDataset(data, eval_transform(config))
    with pytest.raises(ImageLoadError, match=r"gone\.png"):
        strict[5]  # caption 5 belongs to image 1
    lenient = PairDataset(data, train_transform(config), skip_bad=True)
    batch = collate([lenient[i] for i in range(10)])
    assert batch.skipped == 5 and batch.pixel_values.shape == (5, 3, 64, 64)
    assert batch.input_ids.shape[0] == 5 and torch.all(batch.image_index == 0)
