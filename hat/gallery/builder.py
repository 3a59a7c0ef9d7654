"""Building a gallery: reuse what earlier galleries encoded, encode the rest, write atomically."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from hat.config import HATConfig
from hat.data.images import ImageLoadError, load_image
from hat.distributed import DistInfo
from hat.encoder import Encoder
from hat.fileio import atomic_directory, atomic_write_text, cache_home
from hat.gallery.collection import (
    FORMAT_VERSION,
    BuildSettings,
    Collection,
    ImageEntry,
    checkpoint_fingerprint,
    gallery_key,
)
from hat.gallery.errors import CacheError, CorruptionError
from hat.gallery.first_stage import build_index
from hat.gallery.manifest import MANIFEST, FileEntry, GalleryHeader, Manifest
from hat.gallery.reader import (
    ITEMS,
    BuildReport,
    Gallery,
    check_files,
    load_array,
    load_gallery,
    load_json,
    open_gallery,
    read_manifest,
)
from hat.gallery.shards import Team
from hat.gallery.staging import (
    Encode,
    ImageLocation,
    Staged,
    file_table,
    link_segment,
    segment_name,
    stage_segment,
)
from hat.gallery.storage import SegmentWriter
from hat.model import CONFIG_NAME, ImageFeatures
from hat.owners import sweep
from hat.runtime import default_device, run_in_pieces

TEXT_BATCH = 128


def default_cache_dir() -> Path:
    return cache_home() / "galleries"


def _failure_reason(path: Path) -> str:
    try:
        load_image(path)
    except ImageLoadError as exc:
        return exc.reason
    return "could not be read"


def _as_key(fingerprint: list) -> tuple:
    path, size, mtime, captions = fingerprint
    return (path, size, mtime, tuple(captions))


def _donors(
    cache_dir: Path, model_key: str, settings: BuildSettings
) -> tuple[dict[tuple, ImageLocation], dict[str, FileEntry], list[Manifest]]:
    """Images already encoded by valid galleries of this checkpoint and settings.

    Returns their locations by fingerprint, the manifest entries of their files (so linked files
    are not hashed again) and the donors' manifests.
    """
    found: dict[tuple, ImageLocation] = {}
    files: dict[str, FileEntry] = {}
    manifests = []
    for directory in sorted(cache_dir.iterdir()) if cache_dir.is_dir() else []:
        if directory.name.startswith("."):
            continue  # a build's staging folder or a swap's backup: going away
        try:
            manifest = read_manifest(directory)
            if manifest.model_key != model_key or manifest.settings != settings:
                continue
            check_files(directory, manifest, verify=False)
            items = load_json(directory, manifest, ITEMS)
            image_rows = load_array(directory, manifest, "image_rows.npy")
            caption_rows = load_array(directory, manifest, "caption_rows.npy")
            owners = load_array(directory, manifest, "caption_image.npy")
        except (CacheError, OSError, ValueError, KeyError):
            continue
        manifests.append(manifest)
        files.update({k: v for k, v in manifest.files.items() if k.startswith("segments/")})
        by_image: dict[int, list[int]] = {}
        for row, owner in zip(caption_rows[:, 1].tolist(), owners.tolist(), strict=True):
            by_image.setdefault(owner, []).append(row)
        for i, fingerprint in enumerate(items["fingerprints"]):
            seg, row = image_rows[i].tolist()
            segment = manifest.segments[seg]
            found[_as_key(fingerprint)] = ImageLocation(
                directory, segment, row, by_image.get(i, [])
            )
    return found, files, manifests


def _superseded(cache_dir: Path, header: GalleryHeader) -> list[Path]:
    """Other galleries of ``header``'s source, checkpoint and settings, of any storage format
    (staging folders, hidden, are left to their builds)."""
    found = []
    for directory in cache_dir.iterdir():
        if directory.name == header.key or directory.name.startswith("."):
            continue
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if header.same_build(manifest):
            found.append(directory)
    return found


def discard(error: CorruptionError) -> list[Path]:
    """Remove the damaged gallery and, when the damage is in a segment, every gallery beside it
    that holds the segment (hard links share the damage), so that no build reuses it."""
    doomed = {error.gallery}
    if error.segment and error.gallery.parent.is_dir():
        cache = error.gallery.parent
        doomed.update(d for d in cache.iterdir() if (d / "segments" / error.segment).is_dir())
    for directory in doomed:
        shutil.rmtree(directory, ignore_errors=True)
    return sorted(doomed)


@torch.inference_mode()
def encode_segment(
    encoder: Encoder,
    paths: Sequence[Path],
    captions: Sequence[Sequence[str]],
    directory: Path,
    precision: str,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = False,
) -> list[int]:
    """Encode images, then the captions of every image, into a new segment at ``directory``.

    Unreadable images are skipped (their rows stay zero); returns the rows that were encoded.
    """
    model = encoder.model.eval()
    size = model.config.image_size
    probe = encoder.encode_pixels(torch.zeros(1, 3, size, size))
    flat = [c for caps in captions for c in caps]
    tokens = encoder.tokenize(flat or ["-"])
    lengths = tokens["attention_mask"].sum(dim=1).numpy()[: len(flat)]
    shapes = [tuple(x.shape[1:]) for x in probe.levels]
    writer = SegmentWriter(
        directory,
        precision,
        len(paths),
        shapes,
        lengths,
        model.first_stage_dim,
        gate=model.stored_gate,
    )
    loader = encoder.image_loader(paths, batch_size, num_workers, skip_bad=True)

    def encode_images(pixels: torch.Tensor) -> tuple[ImageFeatures, torch.Tensor]:
        features = encoder.encode_pixels(pixels)
        return features.to("cpu"), model.image_embedding(features).cpu()

    kept: list[int] = []
    for batch in tqdm(loader, desc="images", disable=not progress):
        rows = batch.image_index.numpy()
        for piece, (features, embedding) in run_in_pieces(
            encode_images, batch.pixel_values, batch_size
        ):
            writer.put_images(rows[piece], features, embedding)
        kept.extend(rows.tolist())
    for start in tqdm(
        range(0, len(flat), TEXT_BATCH), desc="captions", disable=not (progress and flat)
    ):
        mask = tokens["attention_mask"][start : start + TEXT_BATCH]
        width = int(mask.sum(dim=1).max())
        ids = tokens["input_ids"][start : start + TEXT_BATCH, :width]
        features = encoder.encode_tokens({"input_ids": ids, "attention_mask": mask[:, :width]})
        writer.put_texts(start, features.to("cpu"), model.text_embedding(features).cpu())
    writer.close()
    return kept


def link_reused(
    staging: Path, collection: Collection, located: dict[tuple, ImageLocation]
) -> dict[tuple, ImageLocation]:
    """Link every earlier segment that ``collection`` reuses into ``staging`` before anything
    is encoded: another build may remove an earlier gallery (superseded by its own) meanwhile,
    and the links keep its rows. Returns the images found in the linked segments; those of a
    segment already gone are left out, to be encoded again."""
    linked: dict[str, bool] = {}
    reused = {}
    for entry in collection.entries:
        found = located.get(entry.fingerprint)
        if found is None:
            continue
        if found.segment not in linked:
            target = staging / "segments" / found.segment
            try:
                link_segment(found.directory / "segments" / found.segment, target)
                linked[found.segment] = True
            except OSError:
                shutil.rmtree(target, ignore_errors=True)
                linked[found.segment] = False
        if linked[found.segment]:
            reused[entry.fingerprint] = found
    return reused


def write_gallery(
    staging: Path,
    collection: Collection,
    located: dict[tuple, ImageLocation],
    encode: Encode,
    header: GalleryHeader,
    known_files: dict[str, FileEntry],
    staged: Staged | None = None,
    encode_captions: Callable[[list[str], Path], object] | None = None,
) -> int:
    """Fill ``staging`` with a gallery of ``collection``: ``located`` images are in segments
    linked there already (:func:`link_reused`); ``encode(entries, segment_dir) -> rows read`` the
    others into a new segment,
    ``encode_captions(captions, segment_dir)`` its captions without images into one of their own
    (their image is -1), then write metadata, indexes and, last, the manifest (``header`` +
    counts + file table).
    ``staged`` images were already encoded into segments of ``staging`` (:func:`stage_segment`,
    by other processes too); they are not encoded again, not even the unreadable ones.

    Returns the number of images encoded, here or into ``staged`` (unreadable ones are retried
    by the next build, and not counted).
    """
    located = {**located, **(staged or {})}
    new = [e for e in collection.entries if e.fingerprint not in located]
    fresh = stage_segment(staging, new, encode)
    located.update(fresh)
    encoded = [found for found in located.values() if found and found.directory == staging]
    segments: dict[str, int] = {}
    image_rows, caption_rows, owners, skipped = [], [], [], []
    items: dict[str, list] = {"paths": [], "fingerprints": [], "captions": []}
    for entry in collection.entries:
        found = located.get(entry.fingerprint)
        if found is None:
            reason = _failure_reason(collection.root / entry.path)
            skipped.append({"path": entry.path, "reason": reason})
            continue
        if found.segment not in segments:
            segments[found.segment] = len(segments)
        seg = segments[found.segment]
        image_rows.append((seg, found.image_row))
        caption_rows.extend((seg, row) for row in found.caption_rows)
        owners.extend([len(items["paths"])] * len(entry.captions))
        items["paths"].append(entry.path)
        items["fingerprints"].append(list(entry.fingerprint))
        items["captions"].extend(entry.captions)
    if unpaired := list(collection.captions_without_images):
        if encode_captions is None:
            raise ValueError("the collection has captions without images: give encode_captions")
        name = segment_name()
        encode_captions(unpaired, staging / "segments" / name)
        segments[name] = seg = len(segments)
        caption_rows.extend((seg, row) for row in range(len(unpaired)))
        owners.extend([-1] * len(unpaired))
        items["captions"].extend(unpaired)
    for unused in set((staging / "segments").glob("*")) - {
        staging / "segments" / s for s in segments
    }:
        shutil.rmtree(unused)  # a new segment none of whose images could be read
    items["skipped"] = skipped
    (staging / ITEMS).write_text(json.dumps(items))
    np.save(staging / "image_rows.npy", np.asarray(image_rows, dtype=np.int64).reshape(-1, 2))
    np.save(staging / "caption_rows.npy", np.asarray(caption_rows, dtype=np.int64).reshape(-1, 2))
    np.save(staging / "caption_image.npy", np.asarray(owners, dtype=np.int64))
    files = file_table(staging, known_files)
    manifest = Manifest.complete(header, list(segments), len(image_rows), len(caption_rows), files)
    gallery = load_gallery(staging, manifest)  # checked: a damaged donor segment stops here
    flat_max = header.settings.flat_index_max
    for kind in ("image", "text"):
        index = build_index(gallery.embeddings(kind), flat_max)
        faiss.write_index(index, str(staging / f"{kind}.faiss"))
    manifest = manifest.with_files(file_table(staging, manifest.files))
    atomic_write_text(staging / MANIFEST, manifest.to_json())
    return len(encoded)


def gallery_header(
    key: str,
    checkpoint: str | Path,
    model_key: str,
    settings: BuildSettings,
    collection: Collection,
    config: HATConfig,
) -> GalleryHeader:
    """What a gallery is (its counts and files come later)."""
    return GalleryHeader(
        format=FORMAT_VERSION,
        key=key,
        checkpoint=str(Path(checkpoint).resolve()),
        model_key=model_key,
        settings=settings,
        source=collection.source,
        root=str(collection.root),
        num_levels=config.num_levels,
        dim=config.embed_dim,
        embedding_dim=config.first_stage_dim,
        gated=config.gated,
    )


def build_gallery(
    checkpoint: str | Path,
    collection: Collection,
    cache_dir: str | Path | None = None,
    settings: BuildSettings | None = None,
    *,
    encoder: Encoder | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | None = None,
    progress: bool = False,
    verify: bool = False,
    team: Team | None = None,
) -> Gallery:
    """The gallery of ``collection`` under ``checkpoint``: opened from the cache when it is valid,
    else built, encoding only images that no earlier gallery of this checkpoint holds.

    ``encoder`` (already loaded from ``checkpoint``) saves loading the model again. A
    successful build removes the galleries it supersedes (same source, checkpoint and settings,
    any storage format); one that finds an earlier gallery's segment damaged discards it
    (:func:`discard`) and encodes those images again.

    ``team``: this process's part in a torchrun build (:mod:`hat.gallery.shards`; use
    :func:`build_gallery_distributed`).
    """
    team = team or Team()
    start = time.perf_counter()
    settings = settings or BuildSettings()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    sweep(cache_dir, ".")  # staging folders of builds that were killed
    model_key = checkpoint_fingerprint(checkpoint)
    key = gallery_key(model_key, collection, settings)
    team.agree(key)
    directory = cache_dir / key
    reason = ""
    if team.leads and directory.exists():
        try:
            gallery = open_gallery(directory, verify)
            if gallery.manifest.key != key:
                raise CacheError(f"{directory} holds gallery {gallery.manifest.key}")
            seconds = time.perf_counter() - start
            gallery.report = BuildReport(True, reused_images=gallery.num_images, seconds=seconds)
            return gallery
        except CacheError as exc:
            reason = str(exc)
            shutil.rmtree(directory, ignore_errors=True)
    located, known_files, donors = (
        _donors(cache_dir, model_key, settings) if team.leads else ({}, {}, [])
    )

    def loaded() -> Encoder:
        nonlocal encoder
        if encoder is None:
            encoder = Encoder.from_pretrained(checkpoint, device or default_device())
        return encoder

    def encode(entries: list[ImageEntry], target: Path) -> list[int]:
        paths = [collection.root / e.path for e in entries]
        captions = [e.captions for e in entries]
        return encode_segment(
            loaded(), paths, captions, target, settings.precision, batch_size, num_workers, progress
        )

    def encode_captions(captions: list[str], target: Path) -> None:
        encode_segment(loaded(), [], [captions], target, settings.precision, progress=progress)

    if not team.leads:
        return team.follow(collection, encode)
    config = HATConfig.load(Path(checkpoint) / CONFIG_NAME)
    header = gallery_header(key, checkpoint, model_key, settings, collection, config)
    while True:
        try:
            with atomic_directory(directory) as staging:
                reused = link_reused(staging, collection, located)
                staged, files = team.encode(staging, collection, reused, encode)
                encoded = write_gallery(
                    staging,
                    collection,
                    reused,
                    encode,
                    header,
                    known_files | files,
                    staged,
                    encode_captions,
                )
            break
        except CorruptionError as exc:
            removed = {d.name for d in discard(exc)}
            if not removed & {m.key for m in donors}:
                raise  # not damage that an earlier gallery brought in
            reason = f"{reason}; {exc}" if reason else str(exc)
            located, known_files, donors = _donors(cache_dir, model_key, settings)
    for superseded in _superseded(cache_dir, header):
        shutil.rmtree(superseded, ignore_errors=True)
    gallery = open_gallery(directory)
    gallery.report = BuildReport(
        cache_hit=False,
        encoded_images=encoded,
        reused_images=gallery.num_images - encoded,
        rebuilt_because=reason,
        seconds=time.perf_counter() - start,
    )
    return gallery


def build_gallery_distributed(
    info: DistInfo, checkpoint: str | Path, collection: Collection, *args: Any, **kwargs: Any
) -> Gallery:
    """:func:`build_gallery` in every process of a torchrun group; every rank returns the same
    gallery. Call it on every rank, after ``init_process_group``."""
    return Team(info).run(lambda t: build_gallery(checkpoint, collection, *args, team=t, **kwargs))
