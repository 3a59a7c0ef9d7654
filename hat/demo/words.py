"""The caption's words as the maps page shows them: word pieces merged into whole words.

The tokenizer splits a rare word into pieces ("bul", "##ldo", "##zer"), and each piece has its own
column of α. A person thinks in words, so a word's map is the sum of its pieces' columns: for an
image → text model, where each region's α is a softmax over the word pieces, that is the share of
the region's attention the whole word receives. [CLS], [SEP], punctuation and stop words stay
selectable (they take part in the score) but are marked as minor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPECIAL = frozenset(["[CLS]", "[SEP]", "[PAD]", "<s>", "</s>"])
STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "some",
        "any",
        "of",
        "and",
        "or",
        "but",
        "with",
        "without",
        "on",
        "in",
        "at",
        "to",
        "from",
        "by",
        "for",
        "into",
        "onto",
        "over",
        "under",
        "near",
        "next",
        "beside",
        "behind",
        "between",
        "above",
        "below",
        "its",
        "it",
        "this",
        "that",
        "these",
        "those",
        "is",
        "are",
        "was",
        "were",
        "be",
        "there",
        "here",
        "his",
        "her",
        "their",
        "our",
        "my",
        "your",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "several",
        "many",
        "few",
        "very",
    ]
)


@dataclass(frozen=True)
class Word:
    """One word of the caption: its text, the indices of its word pieces, whether it is minor."""

    text: str
    pieces: tuple[int, ...]
    minor: bool


def group_pieces(pieces: list[str]) -> list[Word]:
    """Whole words of a WordPiece sequence (``##`` continues the previous word)."""
    groups: list[tuple[str, list[int]]] = []
    for index, piece in enumerate(pieces):
        if piece.startswith("##") and groups and groups[-1][0] not in SPECIAL:
            text, members = groups[-1]
            groups[-1] = (text + piece[2:], [*members, index])
        else:
            groups.append((piece, [index]))
    return [Word(text, tuple(members), _is_minor(text)) for text, members in groups]


def _is_minor(text: str) -> bool:
    return text in SPECIAL or text.lower() in STOP_WORDS or not any(c.isalnum() for c in text)


def word_weights(piece_weights: np.ndarray, words: list[Word]) -> np.ndarray:
    """``piece_weights`` (first axis: one entry per word piece) summed over each word's pieces."""
    return np.stack([piece_weights[list(w.pieces)].sum(axis=0) for w in words])
