"""Readers for captioned image collections: Karpathy-split JSON and plain folders."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hat.data.images import list_images


class DatasetFormatError(ValueError):
    """A dataset file is malformed; the message names the file and the entry."""


@dataclass
class CaptionedImages:
    """Images and their captions; ``caption_to_image[j]`` is the image index of caption j."""

    image_paths: list[Path]
    captions: list[str]
    caption_to_image: np.ndarray

    def __post_init__(self) -> None:
        self.caption_to_image = np.asarray(self.caption_to_image, dtype=np.int64)
        if len(self.captions) != len(self.caption_to_image):
            raise ValueError("captions and caption_to_image differ in length")

    @property
    def num_images(self) -> int:
        return len(self.image_paths)

    def first(self, num_images: int) -> CaptionedImages:
        """The first ``num_images`` images with their captions (an evaluation subset)."""
        keep = self.caption_to_image < num_images
        return CaptionedImages(
            self.image_paths[:num_images],
            [c for c, k in zip(self.captions, keep, strict=True) if k],
            self.caption_to_image[keep],
        )

    def captions_of(self, image_index: int) -> list[str]:
        return [self.captions[j] for j in np.flatnonzero(self.caption_to_image == image_index)]


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetFormatError(f"dataset file {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{path} is not valid JSON: {exc}") from None


def read_karpathy(
    json_path: str | Path,
    image_root: str | Path,
    splits: str | list[str],
    include_restval: bool = False,
) -> CaptionedImages:
    """Read ``dataset_flickr30k.json`` / ``dataset_coco.json`` style files (Karpathy splits).

    Image path = ``image_root / filepath / filename`` (``filepath`` is absent for Flickr30K).
    ``include_restval`` adds COCO's ``restval`` images to ``train``, as most papers do.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    wanted = {splits} if isinstance(splits, str) else set(splits)
    if include_restval and "train" in wanted:
        wanted.add("restval")
    data = _load_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetFormatError(f"{json_path}: expected an object with an 'images' list")
    paths: list[Path] = []
    captions: list[str] = []
    owners: list[int] = []
    for n, entry in enumerate(data["images"]):
        try:
            if entry["split"] not in wanted:
                continue
            path = image_root / entry.get("filepath", "") / entry["filename"]
            sentences = [s["raw"].strip() for s in entry["sentences"]]
        except (KeyError, TypeError, AttributeError) as exc:
            raise DatasetFormatError(
                f"{json_path}: image entry {n} is malformed (missing or bad field {exc})"
            ) from None
        if not sentences or not all(sentences):
            raise DatasetFormatError(f"{json_path}: image entry {n} ({path}) has an empty caption")
        owners.extend([len(paths)] * len(sentences))
        captions.extend(sentences)
        paths.append(path)
    if not paths:
        raise DatasetFormatError(f"{json_path}: no images in split(s) {sorted(wanted)}")
    return CaptionedImages(paths, captions, np.asarray(owners))


def karpathy_groups(
    json_path: str | Path, splits: str | list[str], key: str
) -> dict[str, np.ndarray]:
    """Image masks by the value of an extra field of a Karpathy file's entries, in the order
    :func:`read_karpathy` reads them: ``{"seen_concept=True": mask, "seen_concept=False": mask}``.
    Entries without the field are in no group."""
    wanted = {splits} if isinstance(splits, str) else set(splits)
    entries = [e for e in _load_json(Path(json_path))["images"] if e.get("split") in wanted]
    values = [e.get(key) for e in entries]
    if all(v is None for v in values):
        raise DatasetFormatError(f"{json_path}: no image of split(s) {sorted(wanted)} has {key!r}")
    return {
        f"{key}={value}": np.array([v == value for v in values])
        for value in sorted({v for v in values if v is not None}, key=str)
    }


def read_captions_file(path: str | Path) -> dict[str, list[str]]:
    """Captions keyed by image path relative to the image folder, from JSON or CSV.

    JSON: ``{"a.jpg": ["caption", ...]}`` (a single string is allowed too).
    CSV: rows ``image,caption`` (a header row naming ``image`` is skipped; repeat rows for more).
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        data = _load_json(path)
        if not isinstance(data, dict):
            raise DatasetFormatError(f"{path}: expected an object mapping image -> captions")
        out: dict[str, list[str]] = {}
        for key, value in data.items():
            caps = [value] if isinstance(value, str) else value
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise DatasetFormatError(f"{path}: captions of {key!r} must be strings")
            out[key] = [c.strip() for c in caps if c.strip()]
        return out
    if path.suffix.lower() == ".csv":
        out = {}
        with path.open(newline="", encoding="utf-8") as fh:
            for n, row in enumerate(csv.reader(fh), start=1):
                if n == 1 and row and row[0].strip().lower() in ("image", "filename", "file"):
                    continue
                if len(row) < 2:
                    raise DatasetFormatError(f"{path}: line {n} needs 'image,caption'")
                if row[1].strip():
                    out.setdefault(row[0].strip(), []).append(row[1].strip())
        return out
    raise DatasetFormatError(f"{path}: captions file must be .json or .csv")


def read_folder(
    image_dir: str | Path, captions_file: str | Path | None = None, require_captions: bool = True
) -> CaptionedImages:
    """Images below ``image_dir`` with captions from ``captions_file``.

    With ``require_captions`` images without a caption are left out (training, evaluation);
    without it they are kept (a search gallery).
    """
    image_dir = Path(image_dir)
    table = read_captions_file(captions_file) if captions_file else {}
    paths: list[Path] = []
    captions: list[str] = []
    owners: list[int] = []
    for image in list_images(image_dir):
        caps = table.get(image.relative_to(image_dir).as_posix(), [])
        if require_captions and not caps:
            continue
        owners.extend([len(paths)] * len(caps))
        captions.extend(caps)
        paths.append(image)
    if not paths:
        raise DatasetFormatError(f"no captioned images found in {image_dir}")
    return CaptionedImages(paths, captions, np.asarray(owners, dtype=np.int64))
