"""Tests for the Qt ``.rcc`` reader on archives built in memory by ``tests/rcc_fixture``."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from hat.demo_build.qt_resources import QtResourceArchive, ResourceFormatError
from tests.rcc_fixture import build_rcc

FILES = {
    "gcompris/src/activities/a/resource/README": b"License: CC0\nFiles:\nowl.webp\n",
    "gcompris/src/activities/a/resource/images/owl.webp": bytes(range(256)) * 3,
    "gcompris/src/activities/a/resource/images/caf\u00e9.txt": "caf\u00e9".encode(),
    "gcompris/src/activities/b/board/board1.qml": b'{"image": "qrc:/x/owl.webp"}' * 20,
    "gcompris/empty.bin": b"",
    "top.txt": b"at the root",
}
COMPRESSED = {
    "gcompris/src/activities/a/resource/images/owl.webp",
    "gcompris/src/activities/b/board/board1.qml",
    "top.txt",
}
LAYOUTS = [("data", "names", "tree"), ("tree", "data", "names"), ("tree", "names", "data")]


@pytest.mark.parametrize("version", [1, 2, 3])
def test_lists_and_reads_every_file(version: int) -> None:
    """Full paths through nested directories, zlib and stored files, UTF-16 names, rcc v1-v3."""
    archive = QtResourceArchive(build_rcc(FILES, version=version, compressed=COMPRESSED))
    assert archive.names() == sorted(FILES)
    for path, content in FILES.items():
        assert archive.read(path) == content
    assert dict(archive.items()) == FILES


@pytest.mark.parametrize("layout", LAYOUTS)
def test_region_order_does_not_matter(layout: tuple[str, ...]) -> None:
    """The reader follows the header's offsets, whatever order the regions are in."""
    archive = QtResourceArchive(build_rcc(FILES, compressed=COMPRESSED, layout=layout))
    assert dict(archive.items()) == FILES


def test_open_reads_a_file_on_disk(tmp_path: Path) -> None:
    """``open`` reads the archive from disk and names the file in its errors."""
    path = tmp_path / "a.rcc"
    path.write_bytes(build_rcc(FILES, compressed=COMPRESSED))
    archive = QtResourceArchive.open(path)
    assert archive.read("top.txt") == b"at the root"
    with pytest.raises(KeyError, match=r"a\.rcc.*no file 'missing\.txt'"):
        archive.read("missing.txt")


def test_directories_are_not_files() -> None:
    """Only files are listed; asking for a directory is an unknown path."""
    archive = QtResourceArchive(build_rcc(FILES))
    assert "gcompris" not in archive.names()
    with pytest.raises(KeyError):
        archive.read("gcompris/src")


@pytest.mark.parametrize(
    "data",
    [b"", b"qres", b"PK\x03\x04" + bytes(40), b"QRES" + build_rcc(FILES)[4:]],
    ids=["empty", "header-only", "zip", "wrong-case-magic"],
)
def test_not_an_archive(data: bytes) -> None:
    """Anything without the ``qres`` magic and a full header is refused with a format error."""
    with pytest.raises(ResourceFormatError, match="not a Qt resource archive"):
        QtResourceArchive(data)


@pytest.mark.parametrize("version", [0, 4, 0x01000000])
def test_unsupported_version(version: int) -> None:
    data = bytearray(build_rcc(FILES))
    data[4:8] = struct.pack(">I", version)
    with pytest.raises(ResourceFormatError, match=f"unsupported rcc version {version}"):
        QtResourceArchive(bytes(data))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_truncation_is_a_format_error(layout: tuple[str, ...]) -> None:
    """Cut anywhere, the archive fails with ResourceFormatError on opening or on reading,
    never with an IndexError, struct.error or zlib.error. (Version 1, so that every byte of the
    fixture is read: the reader rightly ignores the last node's modification time.)"""
    data = build_rcc(FILES, version=1, compressed=COMPRESSED, layout=layout)
    for cut in range(len(data)):
        with pytest.raises(ResourceFormatError):
            archive = QtResourceArchive(data[:cut], source="cut.rcc")
            for name in archive.names():
                archive.read(name)


def test_zstd_files_are_refused_by_name() -> None:
    """Qt 6 may store files zstd-compressed (flag 4): reading one says so; others still read."""
    archive = QtResourceArchive(build_rcc(FILES, version=3, zstd={"top.txt"}))
    with pytest.raises(ResourceFormatError, match=r"top\.txt is zstd-compressed"):
        archive.read("top.txt")
    assert archive.read("gcompris/empty.bin") == b""


def test_a_directory_that_contains_itself_is_refused() -> None:
    """A cyclic tree (node 1 lists itself as its child) stops with a format error, not a
    RecursionError."""
    name = struct.pack(">HI", 1, 0) + "d".encode("utf-16-be")
    tree = struct.pack(">IHII", 0, 2, 1, 1) + struct.pack(">IHII", 0, 2, 1, 1)
    header = b"qres" + struct.pack(">4I", 1, 20, 20 + len(tree) + len(name), 20 + len(tree))
    with pytest.raises(ResourceFormatError, match="deeper than 64"):
        QtResourceArchive(header + tree + name)


def test_root_must_be_a_directory() -> None:
    data = bytearray(build_rcc({"a.txt": b"x"}, version=1, layout=("tree", "names", "data")))
    data[20 + 4 : 20 + 6] = struct.pack(">H", 0)  # clear the root's directory flag
    with pytest.raises(ResourceFormatError, match="root node is not a directory"):
        QtResourceArchive(bytes(data))
