"""Pointing game: does a word's alignment map peak inside the box of the object it names?

Uses datasets whose caption entries carry ``groundings`` (character spans naming ``objects``
with pixel ``box`` es), like Tux Paint Scenes. For every content word of a grounded phrase, the
peak of that level's word → region attention map is projected back to the original image through
the evaluation crop; a hit is a peak inside the object's box. Baselines: a uniformly random point
(its hit rate is the box's area fraction) and the image centre.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from hat.alignment_maps import alignment_maps
from hat.artifacts import display_peak, modified_z, outlier_tokens
from hat.encoder import Encoder
from hat.model import ImageFeatures, TextFeatures
from hat.transforms import eval_resize

FUNCTION_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "some",
        "of",
        "and",
        "with",
        "on",
        "in",
        "at",
        "to",
        "two",
        "three",
        "one",
        "four",
        "five",
        "its",
        "this",
        "that",
        "is",
        "are",
    ]
)


def split_entries(json_path: str | Path, split: str) -> list[dict]:
    """The JSON entries of one split, in the order :func:`read_karpathy` returns them."""
    data = json.loads(Path(json_path).read_text())
    return [e for e in data["images"] if e["split"] == split]


def grounded_tokens(tokenizer, caption: str, groundings: list[dict], max_len: int):
    """``(token index, object index)`` for every content-word token inside a grounded span."""
    enc = tokenizer(caption, truncation=True, max_length=max_len, return_offsets_mapping=True)
    out = []
    for index, (start, end) in enumerate(enc["offset_mapping"]):
        if start == end:
            continue  # [CLS], [SEP]
        left = caption.rfind(" ", 0, start) + 1
        right = caption.find(" ", end)
        word = caption[left : right if right >= 0 else len(caption)].strip(",.:;").lower()
        if word in FUNCTION_WORDS:
            continue
        for g in groundings:
            if g["span"][0] <= start and end <= g["span"][1]:
                out.append((index, g["object"]))
                break
    return out


def peak_to_pixel(
    word_map: np.ndarray, image_size: tuple[int, int], crop: int, resize: int
) -> tuple[float, float]:
    """Centre of the map's peak cell in original image pixels (inverse of Resize + CenterCrop)."""
    h, w = word_map.shape
    row, col = np.unravel_index(int(np.argmax(word_map)), word_map.shape)
    width, height = image_size
    scale = resize / min(width, height)
    left = (width * scale - crop) / 2
    top = (height * scale - crop) / 2
    x = ((col + 0.5) * crop / w + left) / scale
    y = ((row + 0.5) * crop / h + top) / scale
    return x, y


def _inside(box, x: float, y: float) -> bool:
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def _grounded_maps(encoder: Encoder, entries, image_root, images, texts):
    """``(image size, box, maps of the pair, token)`` for every grounded content word, in order.

    ``images`` and ``texts`` are the encoded split in :func:`read_karpathy` order.
    """
    model, cfg = encoder.model, encoder.model.config
    caption_index = 0
    for image_index, entry in enumerate(entries):
        path = Path(image_root) / entry.get("filepath", "") / entry["filename"]
        with Image.open(path) as im:
            size = im.size
        for sentence in entry["sentences"]:
            tokens = grounded_tokens(
                encoder.tokenizer, sentence["raw"], sentence.get("groundings", []), cfg.max_text_len
            )
            if tokens:
                maps = alignment_maps(
                    model,
                    images[image_index : image_index + 1],
                    texts[caption_index : caption_index + 1],
                )
                for token, obj in tokens:
                    yield size, entry["objects"][obj]["box"], maps, token
            caption_index += 1


def _peak_pixel(row, col, grid, image_size, crop, resize) -> tuple[float, float]:
    one_hot = np.zeros(grid)
    one_hot[row, col] = 1.0
    return peak_to_pixel(one_hot, image_size, crop, resize)


def pointing_game(
    encoder: Encoder,
    entries: list[dict],
    image_root: str | Path,
    images: ImageFeatures,
    texts: TextFeatures,
) -> dict:
    """Per-level pointing accuracy with random and centre baselines.

    ``images`` and ``texts`` are the encoded split in :func:`read_karpathy` order.
    """
    cfg = encoder.model.config
    crop, resize = cfg.image_size, eval_resize(cfg.image_size)
    hits = np.zeros(cfg.num_levels)
    total = 0
    random_hits = centre_hits = 0.0
    for size, box, maps, token in _grounded_maps(encoder, entries, image_root, images, texts):
        for level, level_maps in enumerate(maps):
            x, y = peak_to_pixel(level_maps.word_maps[token], size, crop, resize)
            hits[level] += _inside(box, x, y)
        area = (box[2] - box[0]) * (box[3] - box[1])
        random_hits += area / (size[0] * size[1])
        centre_hits += _inside(box, size[0] / 2, size[1] / 2)
        total += 1
    if total == 0:
        raise ValueError("no grounded words found: does the dataset carry groundings?")
    return {
        "words": total,
        "levels": {name: hits[i] / total for i, name in enumerate(cfg.level_names)},
        "random": random_hits / total,
        "centre": centre_hits / total,
    }


def artifact_pointing(
    encoder: Encoder,
    entries: list[dict],
    image_root: str | Path,
    images: ImageFeatures,
    texts: TextFeatures,
) -> dict:
    """Per level: how often a grounded word's map peaks on a high-norm outlier region, and the
    pointing game with the peak taken over all regions (as scored) and over the regions that are
    no outliers (as the maps display it; :func:`hat.artifacts.display_peak`)."""
    cfg = encoder.model.config
    crop, resize = cfg.image_size, eval_resize(cfg.image_size)
    on_outlier, hits_all, hits_shown = (np.zeros(cfg.num_levels) for _ in range(3))
    total = 0
    for size, box, maps, token in _grounded_maps(encoder, entries, image_root, images, texts):
        for level, level_maps in enumerate(maps):
            word_map, outliers = level_maps.word_maps[token], level_maps.outliers
            grid = word_map.shape
            peak = display_peak(word_map)
            shown = display_peak(word_map, outliers)
            on_outlier[level] += bool(outliers[peak])
            hits_all[level] += _inside(box, *_peak_pixel(*peak, grid, size, crop, resize))
            hits_shown[level] += _inside(box, *_peak_pixel(*shown, grid, size, crop, resize))
        total += 1
    if total == 0:
        raise ValueError("no grounded words found: does the dataset carry groundings?")
    return {
        "words": total,
        "levels": {
            name: {
                "peak_on_outlier": on_outlier[i] / total,
                "pointing_all_regions": hits_all[i] / total,
                "pointing_outliers_excluded": hits_shown[i] / total,
            }
            for i, name in enumerate(cfg.level_names)
        },
    }


def regions_in_boxes(
    boxes: list, image_size: tuple[int, int], grid: tuple[int, int], crop: int, resize: int
) -> np.ndarray:
    """``(h * w,)`` mask of the regions whose centre, in original pixels, lies in any box."""
    h, w = grid
    rows, cols = np.divmod(np.arange(h * w), w)
    width, height = image_size
    scale = resize / min(width, height)
    x = ((cols + 0.5) * crop / w + (width * scale - crop) / 2) / scale
    y = ((rows + 0.5) * crop / h + (height * scale - crop) / 2) / scale
    inside = np.zeros(h * w, dtype=bool)
    for box in boxes:
        inside |= (box[0] <= x) & (x <= box[2]) & (box[1] <= y) & (y <= box[3])
    return inside


def outlier_statistics(norms: np.ndarray, in_boxes: np.ndarray | None = None) -> dict:
    """Norm outliers of ``(images, regions)`` token norms: the share of regions that are
    outliers, the share of images with at least one, their mean count there, and (given the
    regions inside object boxes) the share of outliers on objects beside the boxes' share of all
    regions: artifacts sit on background, so a share well above the boxes' marks content."""
    mask = outlier_tokens(norms)
    per_image = mask.sum(axis=1)
    affected = per_image > 0
    out = {
        "outlier_fraction": float(mask.mean()),
        "images_with_outliers": float(affected.mean()),
        "outliers_per_affected_image": float(per_image[affected].mean()) if affected.any() else 0,
        "max_modified_z": float(modified_z(norms).max()),
    }
    if in_boxes is not None:
        out["regions_in_object_boxes"] = float(in_boxes.mean())
        out["outliers_in_object_boxes"] = float(in_boxes[mask].mean()) if mask.any() else None
    return out
