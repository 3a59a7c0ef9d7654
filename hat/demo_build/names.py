"""How the demo data names things: a caption's article, and the comparable form of a name
(which decides whether two names are the same concept)."""

from __future__ import annotations

import re


def article(phrase: str) -> str:
    """``a hammer``, ``an owl``; phrases that start with an article or are plural stay."""
    first = phrase.split()[0]
    if first in ("a", "an", "the", "some") or (phrase.endswith("s") and not phrase.endswith("ss")):
        return phrase
    return f"{'an' if first[0] in 'aeiou' else 'a'} {phrase}"


def concept(name: str) -> str:
    """The comparable form of a name: lower case, letters only, no article, singular."""
    words = re.sub(r"[\W\d_]+", " ", name.lower()).split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    if words and len(words[-1]) > 3 and words[-1].endswith("s") and not words[-1].endswith("ss"):
        words[-1] = words[-1][:-1]
    return " ".join(words)
