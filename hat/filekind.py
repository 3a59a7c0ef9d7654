"""What a file is, from its first bytes: errors name what was found where something else was
expected (a renamed ``torch.save`` file, a Git LFS pointer, a download's HTML error page)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

HEAD = 64


def _safetensors_header(head: bytes) -> bool:
    """The first 8 bytes are a header length and the header is a JSON object."""
    return len(head) > 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] > 1


def describe(path: str | Path) -> str:
    """A few words saying what ``path`` holds, e.g. ``"a zip archive (what torch.save
    writes)"``; ``"a damaged or truncated safetensors file"`` when it starts like one."""
    with Path(path).open("rb") as fh:
        head = fh.read(HEAD)
    text = head.lstrip().lower()
    if not head:
        return "empty (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (what torch.save writes: convert such weights, do not rename them)"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "a pickle (an old-style torch.save file?)"
    if text.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights: run `git lfs pull`"
    if text.startswith((b"<!doctype html", b"<html", b"<?xml")):
        return "an HTML page (a failed download?)"
    if _safetensors_header(head):
        return "a damaged or truncated safetensors file"
    return f"something else: it starts with {json.dumps(head[:16].decode('latin-1'))}"
