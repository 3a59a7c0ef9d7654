"""A small synthetic captioned-shapes dataset in Karpathy layout, for tests and smoke runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 180),
    "orange": (250, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
PLACES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
TEMPLATES = (
    "a {c} {s} on the {p}",
    "a picture of a {c} {s}",
    "there is a {c} {s} at the {p}",
    "a {s} that is {c} near the {p} side",
    "one {c} {s} on a {b} background",
)
BACKGROUNDS = {"white": (250, 250, 250), "gray": (150, 150, 150), "black": (20, 20, 20)}


def _draw(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], r: float, fill):
    x, y = centre
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)


def _example(rng: random.Random, size: int) -> tuple[Image.Image, list[str]]:
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    place, background = rng.choice(list(PLACES)), rng.choice(list(BACKGROUNDS))
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    cx, cy = PLACES[place]
    jitter = size * 0.05
    centre = (cx * size + rng.uniform(-jitter, jitter), cy * size + rng.uniform(-jitter, jitter))
    _draw(ImageDraw.Draw(image), shape, centre, size * rng.uniform(0.12, 0.2), COLOURS[colour])
    captions = [t.format(c=colour, s=shape, p=place, b=background) for t in TEMPLATES]
    return image, captions


def write_synthetic_dataset(
    out_dir: str | Path,
    sizes: dict[str, int] | None = None,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write ``images/`` and ``dataset_synthetic.json``; returns the JSON path.

    Each image shows one coloured shape at one of four places; its 5 captions name the colour,
    shape, place and background, so a model can learn them in a few hundred steps.
    """
    sizes = sizes or {"train": 200, "val": 40, "test": 40}
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    entries, sentid = [], 0
    for split, count in sizes.items():
        for _ in range(count):
            imgid = len(entries)
            image, captions = _example(rng, image_size)
            name = f"{split}_{imgid:05d}.png"
            image.save(out_dir / "images" / name)
            sentences = [
                {"raw": c, "tokens": c.split(), "imgid": imgid, "sentid": sentid + k}
                for k, c in enumerate(captions)
            ]
            entries.append(
                {
                    "filename": name,
                    "imgid": imgid,
                    "split": split,
                    "sentids": [s["sentid"] for s in sentences],
                    "sentences": sentences,
                }
            )
            sentid += len(sentences)
    path = out_dir / "dataset_synthetic.json"
    path.write_text(json.dumps({"dataset": "synthetic", "images": entries}))
    return path
