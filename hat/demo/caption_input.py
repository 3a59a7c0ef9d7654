"""Caption clean-up for queries and uploaded caption files: plain text, bounded, never markup.

Captions are only ever shown as plain text (text boxes, tables, pixels of a picture), so HTML in a
caption stays literal; here they lose control and format characters and are cut to a bounded
length, and one far longer than any description is refused before anything reads it, so that no
caption can make tokenizing (or anything after it) slow.
"""

from __future__ import annotations

import re
import unicodedata

from hat.demo import InputError

# The models read at most a few dozen word pieces; 1000 characters hold far more than that.
MAX_CAPTION_CHARS = 1000
# Longer than this is no description of an image but a pasted document (or an attack): refused.
REFUSED_CAPTION_CHARS = 10_000
# Control (Cc), format (Cf: zero-width, bidi overrides), surrogate, private-use and unassigned.
_DROPPED_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn"}
_SPACES = re.compile(r"\s+")


def clean_caption(text: object) -> str:
    """``text`` as one line of printable characters, at most :data:`MAX_CAPTION_CHARS` long.

    Raises :class:`InputError` when nothing printable is left or ``text`` is longer than
    :data:`REFUSED_CAPTION_CHARS`.
    """
    if not isinstance(text, str):
        raise InputError("The caption must be text.")
    if len(text) > REFUSED_CAPTION_CHARS:
        raise InputError(
            f"The caption is {len(text):,} characters long; at most {REFUSED_CAPTION_CHARS:,} are "
            "accepted (the model reads only its first few dozen word pieces)."
        )
    text = "".join(
        " " if c.isspace() else c
        for c in unicodedata.normalize("NFC", text)
        if c.isspace() or unicodedata.category(c) not in _DROPPED_CATEGORIES
    )
    text = _SPACES.sub(" ", text).strip()
    if not text:
        raise InputError("The caption is empty: type a few words that describe an image.")
    if len(text) > MAX_CAPTION_CHARS:
        text = text[:MAX_CAPTION_CHARS].rsplit(" ", 1)[0] or text[:MAX_CAPTION_CHARS]
    return text
