"""A person's own gallery: uploaded images or zips copied into a private folder, within limits.

Nothing an upload names can leave the folder: a zip member's path is checked before anything is
written (absolute paths, ``..``, drive letters and NUL are refused) and the resolved target must
lie inside the folder. Sizes in zip headers can lie, so every copy counts the bytes it writes and
stops at the limit; a zip with too many members, or whose images would unpack past the limit, is
left out before one member is read. Every file left out is listed with why; the rest is kept.
"""

from __future__ import annotations

import csv
import json
import zipfile
import zlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from hat.data.captions import DatasetFormatError, read_captions_file
from hat.data.images import IMAGE_EXTENSIONS
from hat.demo import InputError
from hat.demo.caption_input import clean_caption

MB = 1 << 20
MAX_IMAGES = 500  # an upload is encoded while its visitor waits, on CPUs every visitor shares
MAX_ZIP_MEMBERS = 2000
MAX_IMAGE_BYTES = 32 * MB
MAX_TOTAL_BYTES = 256 * MB
MAX_CAPTIONS_BYTES = 4 * MB
MAX_CAPTIONS_PER_IMAGE = 20
MAX_PATH_DEPTH = 8
CHUNK = MB
CAPTION_SUFFIXES = (".json", ".csv")
TOO_MUCH = f"it would take the upload past {MAX_TOTAL_BYTES // MB} MB unpacked"
GONE = "is no longer on the server (old uploads are cleared): upload it again"


@dataclass
class UploadReport:
    """Images written (paths relative to the folder) and the files left out, with why."""

    images: list[str] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    bytes: int = 0


class _TooLarge(Exception):
    pass


def safe_member_path(name: str) -> PurePosixPath | None:
    """``name`` (a zip member or file name) as a path inside the upload folder, or ``None`` when
    it is absolute, climbs with ``..``, names a drive, holds NUL or nests deeper than allowed."""
    name = name.replace("\\", "/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if (
        not parts
        or name.startswith("/")
        or ".." in parts
        or "\0" in name
        or ":" in parts[0]
        or len(parts) > MAX_PATH_DEPTH
    ):
        return None
    return PurePosixPath(*parts)


def _copy_limited(source: BinaryIO, target: Path, limit: int) -> int:
    """Copy ``source`` to a new file ``target``; raises :class:`_TooLarge` past ``limit`` bytes."""
    written = 0
    with target.open("xb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > limit:
                raise _TooLarge
            out.write(chunk)
    return written


def _free_name(path: Path) -> Path:
    """``path``, or ``stem-1.ext``, ``stem-2.ext`` … when it is taken (two uploads, one name)."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


class _Collector:
    """Writes accepted images below ``folder`` and keeps the running totals and the report."""

    def __init__(self, folder: Path):
        self.folder = folder.resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.report = UploadReport()

    def ignore(self, name: str, why: str) -> None:
        self.report.ignored.append((name, why))

    def add(
        self, name: str, open_source: Callable[[], AbstractContextManager[BinaryIO]], size: int
    ) -> None:
        """Store the file ``name`` (read through ``open_source``) if it is an acceptable image."""
        relative = safe_member_path(name)
        if relative is None:
            self.ignore(name, "unsafe path: it would be written outside the upload folder")
            return
        if any(p.startswith(".") or p == "__MACOSX" for p in relative.parts):
            self.ignore(name, "hidden or system file")
            return
        if relative.suffix.lower() not in IMAGE_EXTENSIONS:
            self.ignore(name, "not an image file type")
            return
        if size > MAX_IMAGE_BYTES:
            self.ignore(name, f"over the limit of {MAX_IMAGE_BYTES // MB} MB per image")
            return
        if len(self.report.images) >= MAX_IMAGES:
            self.ignore(name, f"over the limit of {MAX_IMAGES} images per gallery")
            return
        if self.report.bytes + size > MAX_TOTAL_BYTES:
            self.ignore(name, TOO_MUCH)
            return
        target = _free_name(self.folder / relative)
        if not target.resolve().is_relative_to(self.folder):
            self.ignore(name, "unsafe path: it would be written outside the upload folder")
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        limit = min(MAX_IMAGE_BYTES, MAX_TOTAL_BYTES - self.report.bytes)
        try:
            with open_source() as source:
                written = _copy_limited(source, target, limit)
        except _TooLarge:
            target.unlink()
            too_large = f"over the limit of {MAX_IMAGE_BYTES // MB} MB per image"
            self.ignore(name, TOO_MUCH if limit < MAX_IMAGE_BYTES else too_large)
            return
        except (OSError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError) as exc:
            target.unlink(missing_ok=True)
            self.ignore(name, f"could not be extracted ({exc})")
            return
        if written == 0:
            target.unlink()
            self.ignore(name, "empty (0 bytes)")
            return
        self.report.bytes += written
        self.report.images.append(target.relative_to(self.folder).as_posix())

    def add_zip(self, path: Path, name: str) -> None:
        """Every image of the zip at ``path``; the whole zip is left out, unread, when it has too
        many members or its images would take the upload past :data:`MAX_TOTAL_BYTES`."""
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError):
            self.ignore(name, "not a readable zip file")
            return
        with archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if len(members) > MAX_ZIP_MEMBERS:
                limit = f"a zip may hold at most {MAX_ZIP_MEMBERS:,}"
                self.ignore(name, f"holds {len(members):,} files; {limit}")
                return
            declared = sum(
                m.file_size for m in members if Path(m.filename).suffix.lower() in IMAGE_EXTENSIONS
            )
            if self.report.bytes + declared > MAX_TOTAL_BYTES:
                self.ignore(
                    name,
                    f"unpacks to {declared / MB:,.0f} MB of images; at most "
                    f"{MAX_TOTAL_BYTES // MB} MB are accepted",
                )
                return
            for member in members:
                self.add(member.filename, lambda m=member: archive.open(m), member.file_size)


def collect_uploads(files: Sequence[str | Path], folder: Path) -> UploadReport:
    """Copy the images among ``files`` (image files and zips of images) below ``folder``.

    A file or zip that breaks a limit is left out and listed; raises :class:`InputError` only
    when no image is left.
    """
    if not files:
        raise InputError("Upload some images (several files or one zip) first.")
    collector = _Collector(folder)
    for file in files:
        path = Path(file)
        if path.suffix.lower() == ".zip":
            collector.add_zip(path, path.name)
            continue
        try:
            size = path.stat().st_size
        except OSError:  # removed by Gradio's clean-up of old uploads, say
            collector.ignore(path.name, GONE)
            continue
        collector.add(path.name, lambda p=path: p.open("rb"), size)
    report = collector.report
    if not report.images:
        reasons = "; ".join(f"{name}: {why}" for name, why in report.ignored[:3])
        raise InputError(
            "None of the uploaded files is an image (jpg, png, gif, webp, bmp, tif) that could be "
            f"used{f' ({reasons})' if reasons else ''}."
        )
    return report


def _read_table(path: Path) -> dict[str, list[str]]:
    if path.suffix.lower() not in CAPTION_SUFFIXES:
        raise InputError("The captions file must be .json or .csv.")
    try:
        if path.stat().st_size > MAX_CAPTIONS_BYTES:
            raise InputError(f"The captions file is larger than {MAX_CAPTIONS_BYTES // MB} MB.")
        return read_captions_file(path)
    except (DatasetFormatError, UnicodeDecodeError, csv.Error) as exc:
        reason = str(exc).replace(str(path), path.name)
        raise InputError(f"The captions file could not be read: {reason}") from None
    except OSError:
        raise InputError(f"The captions file {GONE}.") from None


def write_captions(captions_file: str | Path, images: Sequence[str], target: Path) -> int:
    """Captions of the uploaded ``images`` as JSON at ``target``; returns how many have some.

    Keys of the captions file match an image by its path in the upload or by its file name;
    captions are cleaned like queries and at most :data:`MAX_CAPTIONS_PER_IMAGE` are kept.
    """
    table = _read_table(Path(captions_file))
    out = {}
    for image in images:
        raw = table.get(image) or table.get(PurePosixPath(image).name) or []
        kept = []
        for caption in raw[:MAX_CAPTIONS_PER_IMAGE]:
            try:
                kept.append(clean_caption(caption))
            except InputError:
                continue  # a caption with nothing printable in it
        if kept:
            out[image] = kept
    target.write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")
    return len(out)
