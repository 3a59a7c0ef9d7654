"""What a gallery is built from (a collection of images and captions) and its cache key.

The collection is fingerprinted by path, size and mtime, not by content: a stat is far cheaper
than reading and hashing every image, whose cost grows with file size and with disk reads when
the page cache is cold, on every start. Any edit through the file system changes the mtime.
Checkpoints are hashed by content (weights, config, tokenizer).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from hat.data.captions import CaptionedImages, DatasetFormatError, read_folder, read_karpathy
from hat.fileio import sha256_file
from hat.gallery.codecs import PRECISIONS
from hat.gallery.first_stage import EMBEDDING, FLAT_INDEX_MAX
from hat.training_state import STATE_NAME, TENSORS_NAME

# 2: per-row xxh3 digests of the features; xxh3 instead of sha256 per file.
# pq (format 2 too) adds codes and trained codebooks per level; other precisions are unchanged.
# 3: pq stores each image's mean region (image.<level>.mean.npy) and codes its regions'
# differences from it.
# 4: int8 image levels store their regions' norms (image.<level>.norm.npy, fp32, in the row
# digest); first-stage vectors are fp16, and an IVF index holds them as fp16 too.
# 5: a model with a concept gate gets each image's gate stored (image.gate.npy, fp32, read whole);
# the manifest says whether (``gated``).
FORMAT_VERSION = 5
KARPATHY_PREFIX = "karpathy:"
CAPTIONS_WITHOUT_IMAGES = "captions_without_images.txt"
TRAINING_ONLY_FILES = {STATE_NAME, TENSORS_NAME}


@dataclass(frozen=True)
class ImageEntry:
    """One image of a collection: path relative to the root, fingerprint, captions."""

    path: str
    size: int
    mtime_ns: int
    captions: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> tuple:
        return (self.path, self.size, self.mtime_ns, self.captions)


@dataclass
class Collection:
    """The images (and captions) a gallery is built from; ``source`` names where they came from.

    ``captions_without_images`` join the caption bank that image → text search ranks, with no
    gallery image of their own: captions that name what a visitor's photo may show.
    """

    root: Path
    entries: list[ImageEntry]
    source: dict[str, str]
    captions_without_images: tuple[str, ...] = ()


def _entries(data: CaptionedImages, root: Path) -> list[ImageEntry]:
    captions: list[list[str]] = [[] for _ in data.image_paths]
    for caption, owner in zip(data.captions, data.caption_to_image, strict=True):
        captions[owner].append(caption)
    entries = []
    for path, caps in zip(data.image_paths, captions, strict=True):
        try:
            stat = path.stat()
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size, mtime = -1, 0  # missing: the build reports it as skipped
        entries.append(ImageEntry(path.relative_to(root).as_posix(), size, mtime, tuple(caps)))
    return entries


def read_caption_lines(path: str | Path) -> tuple[str, ...]:
    """Captions one per line (blank lines skipped; a repeated caption is kept once)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"{path} is not UTF-8 text: {exc}") from None
    return tuple(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))


def folder_collection(
    image_dir: str | Path,
    captions_file: str | Path | None = None,
    captions_without_images: str | Path | None = None,
) -> Collection:
    """Every image below ``image_dir``; captions (optional) from a JSON or CSV file, and captions
    with no image (optional) from a text file, one per line."""
    root = Path(image_dir).resolve()
    data = read_folder(root, captions_file, require_captions=False)
    source = {"kind": "folder", "images": str(root)}
    if captions_file:
        source["captions"] = str(Path(captions_file).resolve())
    unpaired = ()
    if captions_without_images:
        source["captions_without_images"] = str(Path(captions_without_images).resolve())
        unpaired = read_caption_lines(captions_without_images)
    return Collection(root, _entries(data, root), source, unpaired)


def karpathy_collection(json_path: str | Path, image_root: str | Path, split: str) -> Collection:
    """One split of a Karpathy-style JSON (images and their captions)."""
    root = Path(image_root).resolve()
    data = read_karpathy(json_path, root, split)
    source = {"kind": "karpathy", "json": str(Path(json_path).resolve()), "images": str(root)}
    source["split"] = split
    return Collection(root, _entries(data, root), source)


def collection_from_spec(spec: str | Path) -> Collection:
    """A gallery given on a command line: ``karpathy:JSON:IMAGE_ROOT:SPLIT`` (one split of a
    Karpathy file, with its captions), else a folder holding ``images/`` (or the images
    themselves) and, optionally, ``captions.json`` or ``captions.csv`` keyed by image path and
    ``captions_without_images.txt`` (captions the caption bank holds with no image)."""
    spec = str(spec)
    if spec.startswith(KARPATHY_PREFIX):
        fields = spec[len(KARPATHY_PREFIX) :].split(":")
        if len(fields) != 3 or not all(fields):
            raise ValueError(
                f"gallery {spec!r}: write karpathy:JSON:IMAGE_ROOT:SPLIT, e.g. "
                "karpathy:dataset_flickr30k.json:flickr30k-images:test"
            )
        return karpathy_collection(*fields)
    directory = Path(spec)
    images = directory / "images" if (directory / "images").is_dir() else directory
    captions = next(
        (p for p in (directory / "captions.json", directory / "captions.csv") if p.is_file()), None
    )
    unpaired = directory / CAPTIONS_WITHOUT_IMAGES
    return folder_collection(images, captions, unpaired if unpaired.is_file() else None)


def checkpoint_fingerprint(checkpoint: str | Path) -> str:
    """sha256 over the names and contents of a checkpoint's files (weights, config, tokenizer)."""
    digest = hashlib.sha256()
    for path in sorted(Path(checkpoint).iterdir()):
        if path.is_file() and path.name not in TRAINING_ONLY_FILES:
            digest.update(f"{path.name}\0{sha256_file(path)}\0".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class BuildSettings:
    """Everything besides checkpoint and collection that changes what a gallery stores."""

    precision: str = "int8"
    embedding: str = EMBEDDING
    flat_index_max: int = FLAT_INDEX_MAX

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, not {self.precision!r}")


def gallery_key(model_key: str, collection: Collection, settings: BuildSettings) -> str:
    """Cache key: checkpoint hash + collection fingerprints + settings + storage format."""
    payload = {
        "format": FORMAT_VERSION,
        "model": model_key,
        "settings": asdict(settings),
        "root": str(collection.root),
        "images": [e.fingerprint for e in collection.entries],
    }
    if collection.captions_without_images:  # (galleries without them keep their keys)
        payload["captions_without_images"] = list(collection.captions_without_images)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]
