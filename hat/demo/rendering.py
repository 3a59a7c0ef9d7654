"""Alignment maps as a picture: one row per level, one column per word (plus the whole caption).

Each cell is a word's attention over the image regions, upsampled smoothly from the level's
region grid and blended over the part of the image the model saw (resize + centre crop), so a
hot spot sits exactly over the regions that drew the word's attention. No matplotlib: a small
viridis table and PIL do the colouring and drawing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hat.alignment_maps import LevelMaps
from hat.transforms import eval_resize

# Viridis at nine evenly spaced points (matplotlib's table, rounded): dark blue → yellow.
VIRIDIS_ANCHORS = np.array(
    [
        (68, 1, 84),
        (72, 40, 120),
        (62, 73, 137),
        (49, 104, 142),
        (38, 130, 142),
        (31, 158, 137),
        (53, 183, 121),
        (110, 206, 88),
        (253, 231, 37),
    ],
    dtype=np.float32,
)
CELL = 128  # pixels per map
LABEL_WIDTH = 190  # left column with the level names
HEADER = 30  # top row with the words
FOOTER = 34  # colour bar
GAP = 8  # between the whole-caption column and the word columns
MARGIN = 64  # right of the last column, under the image viewer's buttons
FONT_SIZE = 13
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
WHOLE_CAPTION = "whole caption"


def colormap(values: np.ndarray, anchors: np.ndarray = VIRIDIS_ANCHORS) -> np.ndarray:
    """RGB (uint8) of values in [0, 1], interpolated linearly between the anchor colours."""
    position = np.clip(values, 0.0, 1.0) * (len(anchors) - 1)
    low = np.minimum(position.astype(np.int64), len(anchors) - 2)
    frac = (position - low)[..., None]
    return np.round(anchors[low] * (1 - frac) + anchors[low + 1] * frac).astype(np.uint8)


def normalise(grid: np.ndarray) -> np.ndarray:
    """Scale a map to [0, 1] (a flat map becomes 0): each cell shows where its attention goes."""
    grid = np.asarray(grid, dtype=np.float32)
    span = float(grid.max() - grid.min())
    return (grid - grid.min()) / span if span > 1e-12 else np.zeros_like(grid)


def scale(grid: np.ndarray, low: float, high: float) -> np.ndarray:
    """``grid`` mapped linearly from [low, high] to [0, 1] and clipped (a flat range becomes 0)."""
    grid = np.asarray(grid, dtype=np.float32)
    if high - low <= 1e-12:
        return np.zeros_like(grid)
    return np.clip((grid - low) / (high - low), 0.0, 1.0)


def smooth(grid: np.ndarray, size: int) -> np.ndarray:
    """A ``(h, w)`` map with values in [0, 1] as a smooth ``(size, size)`` map (bicubic)."""
    image = Image.fromarray(np.asarray(grid, dtype=np.float32), mode="F")
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(image), 0.0, 1.0)


def upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """A normalised ``(h, w)`` map as a smooth ``(size, size)`` map in [0, 1] (bicubic)."""
    return smooth(normalise(grid), size)


def model_view(image: Image.Image, crop: int, size: int) -> Image.Image:
    """The part of ``image`` the model sees (short side to 8/7 of ``crop``, centre ``crop``),
    resampled to ``size`` pixels square in one step."""
    width, height = image.size
    scale = eval_resize(crop) / min(width, height)
    side = crop / scale
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)
    return image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC, box=box)


def overlay(view: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Blend the colour of ``heat`` over ``view`` (uint8 RGB), more opaque where it is hot."""
    alpha = (0.25 + 0.6 * heat)[..., None]
    blended = view.astype(np.float32) * (1 - alpha) + colormap(heat).astype(np.float32) * alpha
    return np.round(blended).astype(np.uint8)


def label_font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """``text`` cut with an ellipsis so that it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _colour_bar(draw: ImageDraw.ImageDraw, canvas: Image.Image, top: int, font) -> None:
    bar = colormap(np.linspace(0, 1, 160, dtype=np.float32))[None].repeat(10, axis=0)
    canvas.paste(Image.fromarray(bar), (LABEL_WIDTH, top + 12))
    draw.text((LABEL_WIDTH - 6, top + 17), "low", fill=INK, font=font, anchor="rm")
    note = "high   (each cell scaled to its own range)"
    draw.text((LABEL_WIDTH + 166, top + 17), note, fill=INK, font=font, anchor="lm")


def render_grid(
    image: Image.Image,
    levels: Sequence[LevelMaps],
    words: Sequence[str],
    row_labels: Sequence[Sequence[str]],
    crop: int,
    cell: int = CELL,
) -> Image.Image:
    """The grid of alignment maps of one image–caption pair.

    ``levels`` come from :func:`hat.alignment_maps.alignment_maps`, ``words`` label their word maps,
    ``row_labels`` holds a few short lines per level, ``crop`` is the model's input size.
    """
    view = np.asarray(model_view(image, crop, cell))
    columns = 1 + len(words)
    width = LABEL_WIDTH + columns * cell + GAP + MARGIN
    height = HEADER + len(levels) * cell + FOOTER
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = label_font()
    x_of = [LABEL_WIDTH] + [LABEL_WIDTH + GAP + (i + 1) * cell for i in range(len(words))]
    for x, word in zip(x_of, [WHOLE_CAPTION, *words], strict=True):
        label = fit_text(draw, word, cell - 6, font)
        draw.text((x + cell / 2, HEADER / 2), label, fill=INK, font=font, anchor="mm")
    for row, (level, lines) in enumerate(zip(levels, row_labels, strict=True)):
        y = HEADER + row * cell
        maps = [level.caption_map, *level.word_maps]
        for x, grid in zip(x_of, maps, strict=True):
            canvas.paste(Image.fromarray(overlay(view, upsample(grid, cell))), (x, y))
        for n, line in enumerate(lines):
            text = fit_text(draw, line, LABEL_WIDTH - 12, font)
            draw.text((6, y + 8 + n * (FONT_SIZE + 5)), text, fill=INK, font=font)
    _colour_bar(draw, canvas, HEADER + len(levels) * cell, font)
    return canvas
