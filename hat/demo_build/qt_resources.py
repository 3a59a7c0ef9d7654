"""Read files out of Qt binary resource archives (``.rcc``), as shipped by GCompris.

Format (Qt's ``rcc``, versions 1-3): a ``qres`` magic, then big-endian uint32 version, tree,
data and names offsets (version 3 adds a flags word). The tree is an array of fixed-size nodes
(14 bytes, 22 from version 2 on with a modification time): name offset (u32), flags (u16), then
either child count and first child index (directories, flag 2) or country, language and data
offset (files). A name is a u16 length, a u32 hash and UTF-16-BE characters; a file's data is a
u32 length and the bytes, zlib-compressed with Qt's 4-byte size prefix when flag 1 is set.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

MAGIC = b"qres"
COMPRESSED = 0x01
DIRECTORY = 0x02
COMPRESSED_ZSTD = 0x04


class ResourceFormatError(ValueError):
    """The file is not a Qt resource archive this reader understands; the message says why."""


class QtResourceArchive:
    """The files of one ``.rcc`` archive: ``names()`` lists their paths, ``read(path)`` gives
    the bytes."""

    def __init__(self, data: bytes, source: str = "<bytes>"):
        if len(data) < 20 or data[:4] != MAGIC:
            raise ResourceFormatError(f"{source}: not a Qt resource archive (no 'qres' magic)")
        self._data = data
        self._source = source
        version, self._tree, self._payload, self._names = struct.unpack(">4I", data[4:20])
        if version not in (1, 2, 3):
            raise ResourceFormatError(f"{source}: unsupported rcc version {version}")
        self._node_size = 14 if version == 1 else 22
        self._files: dict[str, tuple[int, int]] = {}
        self._walk(0, "", depth=0)

    @classmethod
    def open(cls, path: str | Path) -> QtResourceArchive:
        return cls(Path(path).read_bytes(), str(path))

    def _node(self, index: int) -> tuple[int, int, int, int]:
        offset = self._tree + index * self._node_size
        if offset + 14 > len(self._data):
            raise ResourceFormatError(f"{self._source}: tree node {index} lies outside the file")
        name, flags, a, b = struct.unpack(">IHII", self._data[offset : offset + 14])
        return name, flags, a, b

    def _size_at(self, fmt: str, at: int, what: str) -> int:
        """The length field ``fmt`` at ``at``, or a format error if it lies past the end."""
        end = at + struct.calcsize(fmt)
        if end > len(self._data):
            raise ResourceFormatError(f"{self._source}: {what} runs past the end of the file")
        return struct.unpack(fmt, self._data[at:end])[0]

    def _name(self, offset: int) -> str:
        at = self._names + offset
        length = self._size_at(">H", at, "a name")
        raw = self._data[at + 6 : at + 6 + 2 * length]
        if len(raw) != 2 * length:
            raise ResourceFormatError(f"{self._source}: a name runs past the end of the file")
        return raw.decode("utf-16-be")

    def _walk(self, index: int, prefix: str, depth: int) -> None:
        if depth > 64:
            raise ResourceFormatError(f"{self._source}: directory tree deeper than 64 levels")
        _, flags, count, first = self._node(index)
        if not flags & DIRECTORY:
            raise ResourceFormatError(f"{self._source}: the root node is not a directory")
        for child in range(first, first + count):
            child_name, child_flags, _, data_offset = self._node(child)
            path = prefix + self._name(child_name)
            if child_flags & DIRECTORY:
                self._walk(child, path + "/", depth + 1)
            else:
                self._files[path] = (data_offset, child_flags)

    def names(self) -> list[str]:
        return sorted(self._files)

    def read(self, path: str) -> bytes:
        try:
            offset, flags = self._files[path]
        except KeyError:
            raise KeyError(f"{self._source}: no file {path!r}") from None
        at = self._payload + offset
        length = self._size_at(">I", at, path)
        blob = self._data[at + 4 : at + 4 + length]
        if len(blob) != length:
            raise ResourceFormatError(f"{self._source}: {path} runs past the end of the file")
        if flags & COMPRESSED_ZSTD:
            raise ResourceFormatError(f"{self._source}: {path} is zstd-compressed (unsupported)")
        if flags & COMPRESSED:
            return zlib.decompress(blob[4:])  # Qt prefixes the uncompressed size (u32)
        return blob

    def items(self) -> Iterator[tuple[str, bytes]]:
        for name in self.names():
            yield name, self.read(name)
