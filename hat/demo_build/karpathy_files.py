"""Writing a dataset in Karpathy layout: image entries, JPEG files and the dataset JSON.

Shared by the Tux Paint Scenes and the object datasets, so both read the same in ``hat train``,
``hat eval`` and any Karpathy reader.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from hat.fileio import atomic_write_text

JPEG_QUALITY = 90


def tokenize(raw: str) -> list[str]:
    """Karpathy-style tokens: lower-case words without punctuation."""
    return re.findall(r"[^\W_]+", raw.lower())


def karpathy_image(record: dict, filename: str, split: str, imgid: int, first_sentid: int) -> dict:
    """The Karpathy entry of one image: ``record``'s captions (raw text, groundings) become
    ``sentences``; its other keys are kept as they are."""
    captions = record["captions"]
    sentids = list(range(first_sentid, first_sentid + len(captions)))
    entry = {
        "filename": filename,
        "filepath": "",
        "imgid": imgid,
        "split": split,
        "sentids": sentids,
        "sentences": [
            {"raw": raw, "tokens": tokenize(raw), "imgid": imgid, "sentid": sid, "groundings": g}
            for sid, (raw, g) in zip(sentids, captions, strict=True)
        ],
    }
    entry.update({k: v for k, v in record.items() if k != "captions"})
    return entry


def save_jpeg(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=JPEG_QUALITY)


def write_json(obj: dict, path: Path) -> None:
    """Atomic write, so a reader never sees a half-written dataset file."""
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
