"""Search galleries: a collection's features, encoded once, stored compactly, reopened at once.

A gallery directory ``<cache>/<key>`` belongs to one checkpoint, one collection and one set of
build settings (:func:`gallery_key` hashes all three)::

    manifest.json              written last: key, settings, counts, size + xxh3 of every file
    items.json                 image paths and fingerprints, captions, skipped images and why
    image_rows.npy             image i -> (segment, row); caption_rows.npy likewise
    caption_image.npy          caption j -> image i
    image.faiss, text.faiss    first-stage indexes over the global vectors
    segments/<name>/           immutable .npy arrays of one encoding run (memory-mapped):
        image.<level>.npy      (rows, regions, D) int8 / fp16 / fp32, + .scale.npy and
                               .norm.npy (rows, regions; the norms as scored, fp32) for int8;
                               (rows, regions, 32) codes for pq, + .mean.npy (rows, D) and
                               .codec.npy (PCA + codebooks)
        text.<level>.npy       (tokens, D) real tokens of all captions back to back, likewise
        text.offsets.npy       caption r owns tokens offsets[r]:offsets[r + 1]
        image.embedding.npy, text.embedding.npy   first-stage vectors (fp16)
        image.gate.npy         (rows,) each image's concept gate, fp32 (models with a gate only)
        image.xxh3.npy, text.xxh3.npy   per image / caption: digest of its features, of its vector

The whole directory is staged and renamed into place, so a reader never sees half of it; opening
checks every file's size against the manifest and the digest of every file it reads whole, a
query the digests of exactly the rows it gathers (``verify=True`` checks every byte up front);
a bad cache is rebuilt, never used. A build killed half-way leaves a staging folder that the next
build removes once its process is gone (:mod:`hat.owners`). A rebuild reuses the segments of
earlier galleries of the same checkpoint and settings (hard links): images whose path, size,
mtime and captions are unchanged are never encoded again.

Modules: ``collection`` (inputs, cache keys), ``first_stage`` (faiss indexes of the global
vectors), ``codecs`` (how vectors are stored), ``storage`` (memory-mapped segments), ``reader``
(open, check, gather), ``staging`` (segments linked or encoded into a build's staging folder),
``shards`` (the part of each process of a torchrun group in a build, one segment per rank),
``builder`` (the build, alone or on every rank: ``build_gallery_distributed``); no module of the
package imports one that imports it back (``tests/test_imports.py``).
"""

from hat.gallery.builder import (
    build_gallery,
    build_gallery_distributed,
    default_cache_dir,
    discard,
    encode_segment,
    gallery_header,
    write_gallery,
)
from hat.gallery.codecs import PRECISIONS, dequantize, quantize
from hat.gallery.collection import (
    BuildSettings,
    Collection,
    ImageEntry,
    checkpoint_fingerprint,
    collection_from_spec,
    folder_collection,
    gallery_key,
    karpathy_collection,
)
from hat.gallery.errors import CacheError, CorruptionError
from hat.gallery.first_stage import (
    EMBEDDING,
    FLAT_INDEX_MAX,
    build_index,
    search_index,
)
from hat.gallery.manifest import FileEntry, GalleryHeader, Manifest
from hat.gallery.reader import BuildReport, Gallery, open_gallery
from hat.gallery.shards import Team, TeamError
from hat.gallery.staging import stage_segment
from hat.gallery.storage import Segment, SegmentWriter

__all__ = [
    "EMBEDDING",
    "FLAT_INDEX_MAX",
    "PRECISIONS",
    "BuildReport",
    "BuildSettings",
    "CacheError",
    "Collection",
    "CorruptionError",
    "FileEntry",
    "Gallery",
    "GalleryHeader",
    "ImageEntry",
    "Manifest",
    "Segment",
    "SegmentWriter",
    "Team",
    "TeamError",
    "build_gallery",
    "build_gallery_distributed",
    "build_index",
    "checkpoint_fingerprint",
    "collection_from_spec",
    "default_cache_dir",
    "dequantize",
    "discard",
    "encode_segment",
    "folder_collection",
    "gallery_header",
    "gallery_key",
    "karpathy_collection",
    "open_gallery",
    "quantize",
    "search_index",
    "stage_segment",
    "write_gallery",
]
