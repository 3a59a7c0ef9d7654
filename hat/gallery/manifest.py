"""A gallery's ``manifest.json`` as typed records: what the gallery is (its header), what it holds
(segments, counts) and every file's size and digest. Written last, so a gallery without one was
never finished."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from hat.gallery.collection import FORMAT_VERSION, BuildSettings
from hat.gallery.errors import CacheError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class FileEntry:
    """Size and xxh3 digest of one file of a gallery."""

    size: int
    xxh3: str


@dataclass(frozen=True)
class GalleryHeader:
    """What a gallery is: known before any image is encoded."""

    format: int
    key: str
    checkpoint: str
    model_key: str
    settings: BuildSettings
    source: dict[str, str]
    root: str
    num_levels: int
    dim: int
    embedding_dim: int
    gated: bool  # each image's concept gate is stored (HATConfig.gated)

    def same_build(self, raw: dict[str, Any]) -> bool:
        """Whether a manifest read as plain JSON (of any format) has this source, checkpoint and
        settings: a gallery this one replaces."""
        mine = self.to_dict()
        return all(raw.get(name) == mine[name] for name in ("source", "model_key", "settings"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Manifest(GalleryHeader):
    """A finished gallery: its header, its segments in row order, counts and file table."""

    segments: list[str]
    num_images: int
    num_captions: int
    files: dict[str, FileEntry]

    @classmethod
    def complete(
        cls,
        header: GalleryHeader,
        segments: list[str],
        num_images: int,
        num_captions: int,
        files: dict[str, FileEntry],
    ) -> Manifest:
        base = {f.name: getattr(header, f.name) for f in fields(GalleryHeader)}
        return cls(
            **base,
            segments=segments,
            num_images=num_images,
            num_captions=num_captions,
            files=files,
        )

    def with_files(self, files: dict[str, FileEntry]) -> Manifest:
        return Manifest.complete(self, self.segments, self.num_images, self.num_captions, files)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Refuses another storage format before reading any other field."""
        if data.get("format") != FORMAT_VERSION:
            raise CacheError(f"storage format {data.get('format')} is not supported")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["settings"] = BuildSettings(**values["settings"])
        values["files"] = {name: FileEntry(**entry) for name, entry in values["files"].items()}
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)
