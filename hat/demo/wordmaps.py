"""The maps page's two readable views of one pair's attention α (see :mod:`hat.alignment_maps`).

* Word first: one word's map at every level, side by side and large, on one colour scale across
  the levels (or each level on its own), with a colour bar that gives the range in α.
* Region first: for one region of the image, its row of α, summed over each word's pieces, per
  level, as bars.

High-norm regions (:mod:`hat.artifacts`) are outlined in the word maps; optionally they are left
out of the colour range, so that one very bright region does not wash out the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from hat.alignment_maps import LevelMaps
from hat.demo.rendering import (
    BACKGROUND,
    INK,
    colormap,
    fit_text,
    label_font,
    overlay,
    scale,
    smooth,
)
from hat.demo.words import Word, word_weights

PANEL = 336  # pixels per level's map (readable: the 16 × 16 cells are 21 px each)
PAD = 16
TITLE = 44  # two lines: level and score, layers
BAR = 34  # colour bar and its range under each map
MINOR_INK = (130, 130, 130)
MARK = (255, 255, 255)
MARK_EDGE = (0, 0, 0)
ROW = 22  # one word in the region view
BAR_WIDTH = 130


def word_map(level: LevelMaps, word: Word) -> np.ndarray:
    """The word's map at one level: its pieces' columns of α summed."""
    return level.word_maps[list(word.pieces)].sum(axis=0)


def colour_ranges(
    maps: Sequence[np.ndarray],
    outliers: Sequence[np.ndarray],
    shared: bool,
    skip_outliers: bool,
) -> list[tuple[float, float]]:
    """(low, high) of each map's colour scale: one range over all levels when ``shared``, and,
    when ``skip_outliers``, over the regions that are no norm outliers (they then show at the
    top colour if above it)."""

    def values(grid, mask):
        kept = grid[~mask] if skip_outliers and not mask.all() else grid
        return float(kept.min()), float(kept.max())

    ranges = [values(g, m) for g, m in zip(maps, outliers, strict=True)]
    if shared:
        low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
        return [(low, high)] * len(ranges)
    return ranges


def _mark_outliers(draw: ImageDraw.ImageDraw, mask: np.ndarray, x0: int, y0: int) -> None:
    h, w = mask.shape
    cell_h, cell_w = PANEL / h, PANEL / w
    for row, col in zip(*np.nonzero(mask), strict=True):
        box = (x0 + col * cell_w + 2, y0 + row * cell_h + 2)
        box += (x0 + (col + 1) * cell_w - 2, y0 + (row + 1) * cell_h - 2)
        draw.rectangle(box, outline=MARK_EDGE, width=3)
        draw.rectangle(box, outline=MARK, width=1)


def _bar(canvas: Image.Image, draw, x: int, y: int, low: float, high: float, font) -> None:
    strip = colormap(np.linspace(0, 1, PANEL - 120, dtype=np.float32))[None].repeat(10, axis=0)
    canvas.paste(Image.fromarray(strip), (x + 60, y + 8))
    draw.text((x + 56, y + 13), f"{low:.3f}", fill=INK, font=font, anchor="rm")
    draw.text((x + PANEL - 56, y + 13), f"{high:.3f}", fill=INK, font=font, anchor="lm")
    draw.text((x + PANEL / 2, y + 27), "alpha", fill=INK, font=font, anchor="mm")


def render_word_levels(
    view: Image.Image,
    levels: Sequence[LevelMaps],
    word: Word,
    titles: Sequence[Sequence[str]],
    shared: bool = True,
    skip_outliers: bool = False,
) -> Image.Image:
    """``word``'s map at every level side by side over ``view`` (the model's crop, any size).

    ``titles`` holds two short lines per level; outlined cells are norm outliers.
    """
    maps = [word_map(level, word) for level in levels]
    masks = [level.outliers for level in levels]
    ranges = colour_ranges(maps, masks, shared, skip_outliers)
    base = np.asarray(view.convert("RGB").resize((PANEL, PANEL), Image.Resampling.BICUBIC))
    width = PAD + len(levels) * (PANEL + PAD)
    canvas = Image.new("RGB", (width, TITLE + PANEL + BAR + PAD), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = label_font()
    for n, (grid, mask, (low, high), lines) in enumerate(
        zip(maps, masks, ranges, titles, strict=True)
    ):
        x = PAD + n * (PANEL + PAD)
        for i, line in enumerate(lines[:2]):
            draw.text((x, 6 + i * 18), fit_text(draw, line, PANEL, font), fill=INK, font=font)
        heat = smooth(scale(grid, low, high), PANEL)
        canvas.paste(Image.fromarray(overlay(base, heat)), (x, TITLE))
        _mark_outliers(draw, mask, x, TITLE)
        _bar(canvas, draw, x, TITLE + PANEL, low, high, font)
    return canvas


def region_cell(x: float, y: float, view_size: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The ``(row, col)`` of the region under pixel (x, y) of a square view of the model's crop."""
    h, w = grid
    col = min(w - 1, max(0, int(x * w / view_size)))
    row = min(h - 1, max(0, int(y * h / view_size)))
    return row, col


def region_weights(
    levels: Sequence[LevelMaps], words: Sequence[Word], x: float, y: float, view_size: int
) -> list[tuple[tuple[int, int], np.ndarray]]:
    """Per level: the region under (x, y) and its row of α summed over each word's pieces."""
    out = []
    for level in levels:
        cell = region_cell(x, y, view_size, level.word_maps.shape[1:])
        out.append((cell, word_weights(level.region_words(*cell), list(words))))
    return out


def mark_region(view: Image.Image, cell: tuple[int, int], grid: tuple[int, int]) -> Image.Image:
    """``view`` with the region ``cell`` of a ``grid`` over it outlined."""
    marked = view.convert("RGB")
    (row, col), (h, w) = cell, grid
    box = (col * marked.width / w, row * marked.height / h)
    box += ((col + 1) * marked.width / w - 1, (row + 1) * marked.height / h - 1)
    draw = ImageDraw.Draw(marked)
    draw.rectangle(box, outline=MARK_EDGE, width=4)
    draw.rectangle(box, outline=MARK, width=2)
    return marked


def render_region_words(
    weights: Sequence[tuple[tuple[int, int], np.ndarray]],
    words: Sequence[Word],
    titles: Sequence[str],
) -> Image.Image:
    """Per level, a bar per word of the region's α row; one bar scale for all levels."""
    column = 105 + BAR_WIDTH + 55
    height = TITLE + len(words) * ROW + PAD
    canvas = Image.new("RGB", (PAD + len(weights) * column, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = label_font()
    largest = max(float(values.max()) for _, values in weights) or 1.0
    for n, ((cell, values), title) in enumerate(zip(weights, titles, strict=True)):
        x = PAD + n * column
        draw.text((x, 6), fit_text(draw, title, column - 10, font), fill=INK, font=font)
        draw.text((x, 24), f"region row {cell[0] + 1}, col {cell[1] + 1}", fill=INK, font=font)
        for i, (word, value) in enumerate(zip(words, values, strict=True)):
            y = TITLE + i * ROW
            ink = MINOR_INK if word.minor else INK
            draw.text((x, y + 4), fit_text(draw, word.text, 95, font), fill=ink, font=font)
            length = round(BAR_WIDTH * float(value) / largest)
            colour = tuple(int(c) for c in colormap(np.float32(value / largest)))
            draw.rectangle((x + 100, y + 4, x + 100 + max(1, length), y + 16), fill=colour)
            draw.text((x + 105 + BAR_WIDTH, y + 4), f"{value:.3f}", fill=ink, font=font)
    return canvas
