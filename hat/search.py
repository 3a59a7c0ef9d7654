"""Search a gallery: first-stage faiss candidates, then the exact hierarchical HAT score.

A dot-product index cannot hold HAT's cross-attention score, so search is two-stage: the query's
pooled embedding picks K candidates (default 100) from the faiss index, and only those K are
scored exactly, every level, by the model's own ``level_scores``. ``exact=True`` scores the whole
gallery instead (small galleries, evaluation). The final ranking is always the HAT score.

    hat search --gallery ~/.cache/hat/galleries/<key> --text "a red circle on the left" -k 5
    hat search --gallery ... --image query.jpg --json
    hat search --checkpoint official-f30k --text "two dogs run through the snow" \
               --gallery karpathy:dataset_flickr30k.json:flickr30k-images:test  # built first
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image

from hat import native
from hat.alignment import DEFAULT_BLOCK_ELEMENTS
from hat.encoder import Encoder
from hat.gallery import (
    CacheError,
    Gallery,
    build_gallery,
    checkpoint_fingerprint,
    collection_from_spec,
    open_gallery,
    search_index,
)
from hat.model import HATModel, ImageFeatures, TextFeatures
from hat.runtime import block_size, default_device, free_memory, run_in_pieces

DEFAULT_CANDIDATES = 100
TEXT_BLOCK = 4096  # captions gathered at once when scoring the whole caption bank


@dataclass
class Hit:
    """One result: image number (text → image) or caption number (image → text), and scores."""

    index: int
    score: float
    level_scores: list[float]
    image: str | None  # None: a caption without an image
    caption: str | None = None


@dataclass
class SearchResult:
    hits: list[Hit]
    scored: int  # how many gallery items were scored exactly
    seconds: dict[str, float] = field(default_factory=dict)


def top_hits(scores: torch.Tensor, ids: np.ndarray, k: int) -> list[tuple[int, float, list[float]]]:
    """Best ``k`` of ``(levels, n)`` scores as (id, total, per-level), highest total first.

    Ties keep the order of ``ids``.
    """
    totals = scores.sum(dim=0)
    best = torch.sort(totals, descending=True, stable=True).indices[:k].tolist()
    return [(int(ids[i]), float(totals[i]), scores[:, i].tolist()) for i in best]


class Searcher:
    """Text → image and image → text search over a built gallery with its model."""

    def __init__(self, gallery: Gallery, encoder: Encoder):
        self.gallery = gallery
        self.encoder = encoder
        native.kernels()  # built or loaded now, not on the first query

    @classmethod
    def open(cls, directory: str | Path, device: str | None = None) -> Searcher:
        """Open a gallery and load the checkpoint it was built with (which must be unchanged)."""
        gallery = open_gallery(directory)
        checkpoint = gallery.manifest.checkpoint
        if checkpoint_fingerprint(checkpoint) != gallery.manifest.model_key:
            raise CacheError(
                f"{checkpoint} changed since {directory} was built: run `hat index build` again"
            )
        return cls(gallery, Encoder.from_pretrained(checkpoint, device or default_device()))

    @classmethod
    def build(
        cls, checkpoint: str | Path, spec: str, cache_dir: str | Path, device: str | None = None
    ) -> Searcher:
        """Load ``checkpoint`` and open the gallery of ``spec`` (:func:`collection_from_spec`),
        building it in ``cache_dir`` first unless the cache already holds it."""
        encoder = Encoder.from_pretrained(checkpoint, device or default_device())
        collection = collection_from_spec(spec)
        gallery = build_gallery(checkpoint, collection, cache_dir, encoder=encoder, progress=True)
        return cls(gallery, encoder)

    @property
    def model(self) -> HATModel:
        return self.encoder.model

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---------------------------------------------------------------- scoring
    def _in_blocks(
        self, score: Callable[[np.ndarray], torch.Tensor], ids: Sequence[int], size: int
    ) -> torch.Tensor:
        """``score(ids block) -> (levels, block)`` over blocks of ``size`` (halved on GPU OOM)."""
        ids = np.asarray(ids, dtype=np.int64)
        parts = [part for _, part in run_in_pieces(score, ids, size)]
        return torch.cat(parts, dim=1) if parts else torch.empty(self.gallery.num_levels, 0)

    def _level_scores(self, images: ImageFeatures, texts: TextFeatures) -> torch.Tensor:
        elements = DEFAULT_BLOCK_ELEMENTS
        if self.device.type == "cuda":  # a GPU wants large blocks: ~8 fp32 temporaries of this
            elements = max(elements, free_memory(self.device) // 64)
        return self.model.level_scores(images, texts, block_elements=elements).float().cpu()

    @torch.inference_mode()
    def score_images(self, ids: Sequence[int], text: TextFeatures) -> torch.Tensor:
        """Exact per-level scores ``(levels, len(ids))`` of gallery images against one caption."""
        text = text.to(self.device)
        image_bytes = 4 * self.gallery.manifest.dim * sum(self.gallery.regions())

        def score(block: np.ndarray) -> torch.Tensor:
            out = torch.empty(self.gallery.num_levels, len(block))
            for positions, images in self.gallery.image_parts(block, in_place=True):
                scores = self._level_scores(images.to(self.device), text)[:, :, 0]
                out[:, torch.from_numpy(positions)] = scores
            return out

        return self._in_blocks(score, ids, block_size(image_bytes, self.device))

    @torch.inference_mode()
    def score_captions(self, ids: Sequence[int], image: ImageFeatures) -> torch.Tensor:
        """Exact per-level scores ``(levels, len(ids))`` of one image against bank captions."""
        image = image.to(self.device)
        text_bytes = 4 * self.gallery.manifest.dim * self.model.config.max_text_len
        size = min(TEXT_BLOCK, block_size(text_bytes * self.gallery.num_levels, self.device))

        def score(block: np.ndarray) -> torch.Tensor:
            texts = self.gallery.text_features(block, ragged=True).to(self.device)
            return self._level_scores(image, texts)[:, 0, :]

        return self._in_blocks(score, ids, size)

    # ---------------------------------------------------------------- search
    def _search(
        self,
        embedding: torch.Tensor,
        index: faiss.Index,
        size: int,
        score: Callable[[np.ndarray], torch.Tensor],
        k: int,
        candidates: int,
        exact: bool,
        timings: dict[str, float],
    ) -> tuple[list[tuple[int, float, list[float]]], int]:
        start = time.perf_counter()
        if exact:
            ids = np.arange(size)
        else:
            ids = search_index(index, embedding.float().cpu().numpy(), candidates)[0]
            ids = np.sort(ids[ids >= 0])  # file order reads faster; ties rank by id
        timings["candidates"] = time.perf_counter() - start
        start = time.perf_counter()
        hits = top_hits(score(ids), ids, k)
        timings["rerank"] = time.perf_counter() - start
        return hits, len(ids)

    @torch.inference_mode()
    def text_to_image(
        self, caption: str, k: int = 10, candidates: int = DEFAULT_CANDIDATES, exact: bool = False
    ) -> SearchResult:
        """The ``k`` gallery images with the highest HAT score for ``caption``."""
        start = time.perf_counter()
        text = self.encoder.encode_caption(caption)
        timings = {"encode": time.perf_counter() - start}
        embedding = self.model.text_embedding(text)
        hits, scored = self._search(
            embedding,
            self.gallery.image_index,
            self.gallery.num_images,
            lambda ids: self.score_images(ids, text),
            k,
            candidates,
            exact,
            timings,
        )
        paths = self.gallery.paths
        return SearchResult([Hit(i, s, lv, paths[i]) for i, s, lv in hits], scored, timings)

    @torch.inference_mode()
    def image_to_text(
        self,
        image: str | Path | Image.Image,
        k: int = 10,
        candidates: int = DEFAULT_CANDIDATES,
        exact: bool = False,
    ) -> SearchResult:
        """The ``k`` captions of the caption bank with the highest HAT score for ``image``."""
        start = time.perf_counter()
        features = self.encoder.encode_image(image)
        timings = {"encode": time.perf_counter() - start}
        hits, scored = self._search(
            self.model.image_embedding(features),
            self.gallery.text_index,
            self.gallery.num_captions,
            lambda ids: self.score_captions(ids, features),
            k,
            candidates,
            exact,
            timings,
        )
        g = self.gallery
        results = [Hit(i, s, lv, g.caption_path(i), g.captions[i]) for i, s, lv in hits]
        return SearchResult(results, scored, timings)
