"""One image–caption pair's alignment, kept for the maps page: its views on request.

Computed once per pair (the same attention α that produced the score) and kept in the page's
session, so picking another word or region only redraws. Which weights each view shows, per the
model's direction, is spelled out by :func:`word_view_note` and :func:`region_view_note`.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from hat.alignment_maps import LevelMaps
from hat.demo import InputError
from hat.demo.wordmaps import mark_region, region_weights, render_region_words, render_word_levels
from hat.demo.words import Word

VIEW = 448  # pixels of the model's crop shown for picking a region
MINOR_MARK = "\u2009"  # a thin space ends a minor word's chip label; the page's CSS greys it


@dataclass
class PairMaps:
    """The maps of one pair: the model's crop, the levels' α, the caption's words and titles."""

    view: Image.Image
    levels: list[LevelMaps]
    words: list[Word]
    titles: list[tuple[str, str]]
    score: float

    @property
    def direction(self) -> str:
        return self.levels[0].direction

    def chips(self) -> list[tuple[str, int]]:
        """(label, index) of every word, minor words' labels marked with :data:`MINOR_MARK`."""
        return [(w.text + (MINOR_MARK if w.minor else ""), i) for i, w in enumerate(self.words)]

    def first_content_word(self) -> int:
        return next((i for i, w in enumerate(self.words) if not w.minor), 0)

    def word(self, index: object) -> Word:
        try:
            return self.words[int(index)]
        except (TypeError, ValueError, IndexError):
            raise InputError("Pick one of the caption's words.") from None

    def find(self, text: object) -> int:
        """Index of the first word spelt ``text`` (any case), or a refusal listing the words."""
        wanted = str(text).strip().lower()
        for index, word in enumerate(self.words):
            if word.text.lower() == wanted:
                return index
        listed = ", ".join(w.text for w in self.words)
        raise InputError(f"'{str(text)[:40]}' is not a word of the caption; its words: {listed}.")


def word_view(
    pair: PairMaps | None, index: object, per_level: bool = False, skip_outliers: bool = False
) -> tuple[Image.Image, str]:
    """The chosen word's map at every level, and a line saying what it shows."""
    if pair is None:
        raise InputError("Show the alignment maps of an image and a caption first.")
    word = pair.word(index)
    titles = [
        (f"{title}   score {level.score:.3f}", layers)
        for (title, layers), level in zip(pair.titles, pair.levels, strict=True)
    ]
    picture = render_word_levels(pair.view, pair.levels, word, titles, not per_level, skip_outliers)
    return picture, word_view_note(pair, word, per_level, skip_outliers)


def word_view_note(pair: PairMaps, word: Word, per_level: bool, skip_outliers: bool) -> str:
    pieces = f" (the sum of its {len(word.pieces)} word pieces)" if len(word.pieces) > 1 else ""
    if pair.direction == "i2t":
        what = (
            f"the share of each region's attention that goes to **{word.text}**{pieces}: α of "
            "the image → text alignment, a softmax over the words for every region"
        )
    else:
        what = (
            f"where **{word.text}**{pieces} looks: α of the text → image alignment, a softmax "
            "over the regions for every word"
        )
    scale = "each level on its own colour range" if per_level else "one colour range for all levels"
    outliers = (
        "left out of the colour range" if skip_outliers else "inside the colour range like any"
    )
    return (
        f"Each map shows {what}; the very weights behind the level score. {scale.capitalize()}; "
        f"outlined regions have an outlier feature norm ({outliers})."
    )


def region_view(
    pair: PairMaps | None, x: object, y: object
) -> tuple[Image.Image, Image.Image, str, dict]:
    """The words that the region under pixel (x, y) of the crop view attends to, per level: the
    view with the region outlined, the bars, a line saying what they show, and the numbers."""
    if pair is None:
        raise InputError("Show the alignment maps of an image and a caption first.")
    try:
        x, y = float(x), float(y)
    except (TypeError, ValueError):
        raise InputError("Click a point of the image.") from None
    titles = [title for title, _ in pair.titles]
    if not (0 <= x < pair.view.width and 0 <= y < pair.view.height):  # NaN too
        raise InputError(f"The point must lie in the {pair.view.width}-pixel view of the image.")
    weights = region_weights(pair.levels, pair.words, x, y, pair.view.width)
    picture = render_region_words(weights, pair.words, titles)
    finest = max(range(len(weights)), key=lambda n: pair.levels[n].word_maps[0].size)
    marked = mark_region(pair.view, weights[finest][0], pair.levels[finest].word_maps.shape[1:])
    numbers = {
        level.name: {
            "region": list(cell),
            "words": [[w.text, float(v)] for w, v in zip(pair.words, values, strict=True)],
        }
        for level, (cell, values) in zip(pair.levels, weights, strict=True)
    }
    return marked, picture, region_view_note(pair), numbers


def region_view_note(pair: PairMaps) -> str:
    if pair.direction == "i2t":
        return (
            "Bars: the clicked region's attention over the caption's words (its row of α, a "
            "softmax over the word pieces; a word's bar sums its pieces). Each level's bars sum "
            "to 1."
        )
    return (
        "Bars: how much of each word's attention (a softmax over the regions) lands on the "
        "clicked region; a word's bar sums its pieces."
    )
