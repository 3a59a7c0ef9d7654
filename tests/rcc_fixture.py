"""Build Qt ``.rcc`` resource archives in memory, for tests of the rcc reader and its users.

Written from Qt's rcc format, independently of ``hat.demo_build.qt_resources``: a ``qres`` header,
a tree of fixed-size nodes (directories' children on consecutive indices), a names region
(u16 length, u32 hash, UTF-16-BE) and a data region (u32 length + bytes; zlib-compressed
files carry Qt's 4-byte big-endian uncompressed size in front of the zlib stream).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Collection, Mapping, Sequence

REGIONS = ("tree", "names", "data")


def build_rcc(
    files: Mapping[str, bytes],
    version: int = 2,
    compressed: Collection[str] = (),
    zstd: Collection[str] = (),
    layout: Sequence[str] = ("data", "names", "tree"),
) -> bytes:
    """An rcc archive holding ``files`` (``{"dir/sub/name": bytes}``).

    ``compressed``: paths stored zlib-compressed (flag 1); ``zstd``: paths flagged as
    zstd-compressed (flag 4, bytes stored as given). ``layout``: the order of the three
    regions after the header (rcc itself writes data, names, tree).
    """
    assert sorted(layout) == sorted(REGIONS)
    root: dict = {}
    for path, content in files.items():
        *dirs, leaf = path.split("/")
        folder = root
        for part in dirs:
            folder = folder.setdefault(part, {})
        folder[leaf] = (path, content)

    names, name_at = bytearray(), {}

    def name_offset(name: str) -> int:
        if name not in name_at:
            name_at[name] = len(names)
            encoded = name.encode("utf-16-be")
            names.extend(struct.pack(">HI", len(name), zlib.crc32(encoded)) + encoded)
        return name_at[name]

    data = bytearray()
    nodes: list[bytes | None] = [None]  # node 0 is the root directory
    queue = [(0, "", root)]  # breadth first: each directory's children get consecutive indices
    while queue:
        index, name, folder = queue.pop(0)
        first = len(nodes)
        nodes.extend([None] * len(folder))
        name_ref = name_offset(name) if index else 0  # the root's name is never read
        nodes[index] = struct.pack(">IHII", name_ref, 0x02, len(folder), first)
        for child_index, (child, value) in enumerate(sorted(folder.items()), start=first):
            if isinstance(value, dict):
                queue.append((child_index, child, value))
                continue
            path, content = value
            flags = 0
            if path in compressed:
                flags = 0x01
                content = struct.pack(">I", len(content)) + zlib.compress(content)
            elif path in zstd:
                flags = 0x04
            nodes[child_index] = struct.pack(">IHHHI", name_offset(child), flags, 0, 1, len(data))
            data.extend(struct.pack(">I", len(content)) + content)

    mtime = struct.pack(">Q", 1_700_000_000_000) if version >= 2 else b""
    blobs = {"tree": b"".join(node + mtime for node in nodes), "names": names, "data": data}
    header_size = 24 if version >= 3 else 20
    offsets, at = {}, header_size
    for region in layout:
        offsets[region] = at
        at += len(blobs[region])
    header = b"qres" + struct.pack(
        ">4I", version, offsets["tree"], offsets["data"], offsets["names"]
    )
    if version >= 3:
        header += struct.pack(">I", 0)  # flags: no zstd
    return header + b"".join(bytes(blobs[region]) for region in layout)
