"""What the demo does, without the UI: search both ways, alignment maps, per-person galleries.

One :class:`DemoEngine` holds the model and the built-in gallery (built through the retrieval
engine's cache at start-up, so a warm restart only reopens it). Results come back as plain rows
and pictures that the page (:mod:`hat.demo.ui`) puts into components; every refusal is an
:class:`InputError` whose message says what to change.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hat.alignment_maps import LevelMaps, alignment_maps
from hat.data.images import ImageLoadError, load_image
from hat.demo import InputError
from hat.demo.builtin import REBUILDING, BuiltinGallery
from hat.demo.caption_input import clean_caption
from hat.demo.pairmaps import VIEW, PairMaps
from hat.demo.rendering import model_view, render_grid
from hat.demo.uploads import collect_uploads, write_captions
from hat.demo.words import group_pieces
from hat.encoder import Encoder
from hat.gallery import (
    CacheError,
    Gallery,
    build_gallery,
    collection_from_spec,
    folder_collection,
)
from hat.model import HATModel, ImageFeatures
from hat.owners import Owner, sweep
from hat.runtime import default_device
from hat.search import Hit, Searcher, SearchResult
from hat.transforms import eval_resize

BUILTIN = "built-in"
MINE = "mine"
MAX_K = 50
NO_IMAGE = "— (no gallery image)"  # a caption of the bank's captions without images
SHOW_SKIPPED = 20
# A query JPEG is decoded at no less than the short side the pair maps' view of it needs (the
# largest picture the demo draws of it; models crop at most 384): a phone photo 4x smaller.
QUERY_SIDE = eval_resize(VIEW)
TEMP_PREFIX = "hat-demo-"  # the app's own temp folder, with the session galleries inside


@dataclass
class SessionGallery:
    """A person's uploaded gallery: its private folder (images, captions, cache) and the gallery."""

    directory: Path
    gallery: Gallery

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class Results:
    """A search answer: table rows, the hits behind them and a one-line summary."""

    headers: list[str]
    rows: list[list[Any]]
    hits: list[Hit]
    status: str
    pictures: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class Maps:
    """Alignment maps of one pair: the grid picture, a markdown legend, the numbers, and the pair's
    attention kept for the word and region views."""

    picture: Image.Image
    legend: str
    details: dict[str, Any] = field(default_factory=dict)
    pair: PairMaps | None = None


def _clamp_k(k: object) -> int:
    try:
        return max(1, min(int(k), MAX_K))
    except (TypeError, ValueError):
        raise InputError(f"top-k must be a whole number from 1 to {MAX_K}.") from None


def _timings(result: SearchResult) -> str:
    parts = ", ".join(f"{name} {s * 1000:.0f}" for name, s in result.seconds.items())
    return f"{sum(result.seconds.values()) * 1000:.0f} ms ({parts})"


def query_image(path: str | None) -> Image.Image:
    """An uploaded query image as RGB, or a refusal that says why it cannot be used."""
    if path is None:
        raise InputError("Upload an image first (or pick one of the examples).")
    name = Path(path).name
    try:
        if Path(path).stat().st_size == 0:
            raise InputError(f"{name} is empty (0 bytes).")
        return load_image(path, min_side=QUERY_SIDE)
    except ImageLoadError as exc:
        reason = exc.reason.replace(path, name)  # no server paths in messages
        raise InputError(f"{name} cannot be used as an image: {reason}.") from None
    except OSError:
        raise InputError(f"{name} could not be read.") from None


class DemoEngine:
    """The model, the built-in gallery and the operations the demo offers."""

    def __init__(
        self,
        checkpoint: str | Path,
        gallery_dir: str | Path,
        cache_dir: str | Path | None = None,
        temp_dir: str | Path | None = None,
        device: str | None = None,
        progress: bool = True,
    ):
        start = time.perf_counter()
        self.checkpoint = Path(checkpoint)
        self.gallery_dir = Path(gallery_dir)
        self.device = device or default_device()
        self.encoder = Encoder.from_pretrained(self.checkpoint, self.device)
        self.encoder.encoding_model()  # a bf16 copy, if any, now: not in the first visitor's query
        loaded = time.perf_counter()

        def build() -> Gallery:
            gallery = build_gallery(
                self.checkpoint,
                collection_from_spec(gallery_dir),
                cache_dir,
                encoder=self.encoder,
                progress=progress,
            )
            # faiss indexes load lazily: load them now so that the first query is as fast as any.
            _ = gallery.image_index, gallery.text_index
            return gallery

        self.builtin = BuiltinGallery(build, lambda g: Searcher(g, self.encoder))
        temp_root = Path(temp_dir or tempfile.gettempdir())
        temp_root.mkdir(parents=True, exist_ok=True)
        sweep(temp_root, TEMP_PREFIX)  # uploads of demo processes that were killed
        # Spelt without symlinks (macOS's temp folder is one): files in it are named by their
        # real path (by Gradio, by the image reader's messages), and this is how they are known.
        self.temp_dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=temp_root)).resolve()
        # Gradio's upload folder (app.py points GRADIO_TEMP_DIR here): it goes with the app.
        self.upload_dir = self.temp_dir / "gradio"
        self._owner = Owner(self.temp_dir)
        self.startup = {
            "model_seconds": loaded - start,
            "gallery_seconds": time.perf_counter() - loaded,
            "cache_hit": self.gallery.report.cache_hit,
        }

    def examples(self, count: int) -> tuple[list[str], list[str]]:
        """Example captions and example image paths for the page: those the gallery's
        ``examples.json`` (``{"captions": [...], "images": [paths in the gallery]}``) names, else
        ``count`` of each spread evenly over the gallery."""
        listed = self.gallery_dir / "examples.json"
        if listed.is_file():
            chosen = json.loads(listed.read_text(encoding="utf-8"))
            images = [str(self.gallery_root / p) for p in chosen.get("images", [])]
            return list(chosen.get("captions", [])), images
        gallery = self.gallery
        captions = gallery.captions[:: max(1, gallery.num_captions // count)][:count]
        every = max(1, gallery.num_images // count)
        images = [str(gallery.image_path(i)) for i in range(0, gallery.num_images, every)]
        return captions, images[:count]

    # ---------------------------------------------------------------- descriptions
    def level_layers(self) -> list[tuple[str, str]]:
        """(image module, text layer) of every level, e.g. ``("blocks.4", "layer 2")``."""
        cfg = self.model.config
        info = self.model.image_tower.backbone.feature_info
        layers = [
            (info[i]["module"], f"layer {t}" if t else "embeddings")
            for i, t in zip(cfg.image_levels, cfg.text_levels, strict=True)
        ]
        if (concepts := cfg.concept_config) is not None:
            layers.append((f"{concepts.teacher_name} class maps", f"layer {concepts.text_level}"))
        return layers

    def image_headers(self) -> list[str]:
        """Columns of the text → image table."""
        return ["rank", "image", "score", *self._level_headers()]

    def caption_headers(self) -> list[str]:
        """Columns of the image → text table."""
        return ["rank", "caption", "image", "score", *self._level_headers()]

    def _level_headers(self) -> list[str]:
        return [f"level {n + 1}" for n in range(self.model.config.num_levels)]

    def legend(self) -> str:
        """Markdown naming the backbone layer of every level (the rows of the maps and scores)."""
        cfg = self.model.config
        lines = [
            f"- **level {n + 1}**: image `{cfg.image_backbone}` {image} ↔ "
            f"text `{cfg.text_backbone}` {text}"
            for n, (image, text) in enumerate(self.level_layers()[: len(cfg.image_levels)])
        ]
        if (concepts := cfg.concept_config) is not None:
            gate = ""
            if concepts.gate_level is not None:
                gate = (
                    " × the image's novelty gate: 0 for images like the training ones, 1 for "
                    f"images far from them; the other levels weigh 1 − {concepts.gate_damping:g} "
                    "× gate"
                )
            lines.append(
                f"- **level {cfg.num_levels}**: {concepts.label}: the ImageNet classifier's class "
                f"maps weighting its 1,000 class texts ↔ text `{cfg.text_backbone}` layer "
                f"{concepts.text_level} (weight {concepts.weight:g}{gate})"
            )
        return "\n".join(lines)

    @property
    def model(self) -> HATModel:
        return self.encoder.model

    @property
    def gallery(self) -> Gallery:
        """The built-in gallery (a rebuilt one, once a damaged one has been replaced)."""
        return self.builtin.gallery

    @property
    def searcher(self) -> Searcher:
        return self.builtin.searcher

    @property
    def gallery_root(self) -> Path:
        """The built-in gallery's image folder (the app may serve files from it)."""
        return Path(self.gallery.manifest.root)

    def describe(self) -> dict[str, Any]:
        """Model, device, levels, gallery size and start-up timings (the ``/info`` endpoint)."""
        cfg = self.model.config
        return {
            "model": cfg.name,
            "checkpoint": self.checkpoint.name,  # not the server's file system
            "device": str(self.device),
            "encode_precision": "fp32" if self.encoder.encode_dtype is None else "bf16",
            "image_backbone": cfg.image_backbone,
            "text_backbone": cfg.text_backbone,
            "levels": [
                {"name": name, "image_layer": image, "text_layer": text}
                for name, (image, text) in zip(cfg.level_names, self.level_layers(), strict=True)
            ],
            "gallery_images": self.gallery.num_images,
            "gallery_captions": self.gallery.num_captions,
            "gallery_status": self.builtin.status,
            "startup": self.startup,
        }

    def input_path(self, source: object) -> str | None:
        """The file a request names (Gradio's file payload or its path), which must lie in
        Gradio's upload folder (the caller's own uploads: see hat/demo/visitor_files.py) or the
        built-in gallery; or a :class:`Path` of the app's own. Anything else could name any file
        of the server: refused."""
        if isinstance(source, dict):
            source = source.get("path")
        if source is None or isinstance(source, Path):
            return str(source) if source else None
        if isinstance(source, str):
            real = Path(source).resolve()
            if real.is_relative_to(self.upload_dir) or real.is_relative_to(self.gallery_root):
                return source
        raise InputError("Upload the file (gradio_client: handle_file(path)), do not name a path.")

    # ---------------------------------------------------------------- galleries
    def _searcher(self, gallery: Gallery) -> Searcher:
        if gallery is self.gallery:
            return self.searcher
        return Searcher(gallery, self.encoder)

    @contextmanager
    def _reading(self, gallery: Gallery) -> Iterator[None]:
        """A damaged gallery, found while reading it, as a message (and, built-in, a rebuild)."""
        try:
            yield
        except CacheError as exc:
            if gallery.directory.is_relative_to(self.temp_dir):
                raise InputError(
                    "Your gallery's stored features were found damaged: build it again."
                ) from None
            self.builtin.damaged(gallery, exc)
            raise InputError(REBUILDING) from None

    def pick(self, choice: object, mine: SessionGallery | None) -> Gallery:
        """The gallery a request names: ``built-in`` or ``mine`` (the person's upload)."""
        if choice == BUILTIN:
            return self.builtin.current()
        if choice == MINE:
            if mine is None:
                raise InputError("You have no gallery yet: build one in the 'Your gallery' tab.")
            return mine.gallery
        raise InputError(f"Choose the gallery '{BUILTIN}' or '{MINE}'.")

    def build_session_gallery(
        self,
        files: Sequence[str | Path] | None,
        captions_file: str | Path | None,
        previous: SessionGallery | None = None,
    ) -> tuple[SessionGallery, str]:
        """A new gallery of uploaded images (and captions) replacing ``previous``; a summary."""
        files = [self.input_path(f) for f in files or []]
        captions_file = self.input_path(captions_file)
        directory = Path(tempfile.mkdtemp(prefix="session-", dir=self.temp_dir))
        try:
            report = collect_uploads(files, directory / "images")
            captions = None
            if captions_file:
                captions = directory / "captions.json"
                write_captions(captions_file, report.images, captions)
            gallery = build_gallery(
                self.checkpoint,
                folder_collection(directory / "images", captions),
                directory / "cache",
                encoder=self.encoder,
                progress=True,
            )
            folder = f"{directory / 'images'}/"  # reasons name files by their upload path
            skipped = [(s["path"], s["reason"].replace(folder, "")) for s in gallery.skipped]
            if gallery.num_images == 0:
                reasons = "; ".join(f"{name}: {why}" for name, why in skipped[:3])
                raise InputError(f"None of the uploaded images could be read ({reasons}).")
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        if previous is not None:
            previous.remove()
        skipped += report.ignored
        return SessionGallery(directory, gallery), self._build_summary(gallery, skipped)

    @staticmethod
    def _build_summary(gallery: Gallery, skipped: list[tuple[str, str]]) -> str:
        lines = [
            f"Your gallery: {gallery.num_images} images, {gallery.num_captions} captions, "
            f"built in {gallery.report.seconds:.1f} s. {len(skipped)} file(s) left out."
        ]
        lines += [f"  {name}: {why}" for name, why in skipped[:SHOW_SKIPPED]]
        if len(skipped) > SHOW_SKIPPED:
            lines.append(f"  … and {len(skipped) - SHOW_SKIPPED} more")
        return "\n".join(lines)

    # ---------------------------------------------------------------- captions
    def read_caption(self, caption: object) -> tuple[str, dict[str, torch.Tensor], list[str]]:
        """The cleaned caption, its token batch and its word pieces (what the model reads)."""
        caption = clean_caption(caption)
        batch = self.encoder.tokenize([caption])
        length = int(batch["attention_mask"][0].sum())
        words = self.encoder.tokenizer.convert_ids_to_tokens(
            batch["input_ids"][0, :length].tolist()
        )
        return caption, batch, words

    def _truncation_note(self, caption: str, words: list[str]) -> str:
        full = len(self.encoder.tokenizer(caption)["input_ids"])
        if full > len(words):
            return f" The model read the first {len(words) - 2} of {full - 2} word pieces."
        return ""

    # ---------------------------------------------------------------- search
    def search_text(
        self, caption: object, k: object, choice: object, mine: SessionGallery | None = None
    ) -> Results:
        """Images of the chosen gallery ranked by HAT score for ``caption``."""
        gallery = self.pick(choice, mine)
        caption, _, words = self.read_caption(caption)
        with self._reading(gallery):
            result = self._searcher(gallery).text_to_image(caption, _clamp_k(k))
        rows = [
            [rank, hit.image, round(hit.score, 4), *(round(s, 4) for s in hit.level_scores)]
            for rank, hit in enumerate(result.hits, start=1)
        ]
        status = (
            f"{gallery.num_images} images, {result.scored} re-ranked exactly on {self.device} in "
            f"{_timings(result)}.{self._truncation_note(caption, words)}"
        )
        pictures = [
            (gallery.image_path(hit.index), f"#{rank}  {hit.score:.3f}")
            for rank, hit in enumerate(result.hits, start=1)
        ]
        return Results(self.image_headers(), rows, result.hits, status, pictures)

    def search_image(
        self, image: object, k: object, choice: object, mine: SessionGallery | None = None
    ) -> Results:
        """Captions of the chosen gallery ranked by HAT score for an uploaded image."""
        gallery = self.pick(choice, mine)
        if gallery.num_captions == 0:
            raise InputError("This gallery has no captions: build it with a captions file.")
        picture = query_image(self.input_path(image))
        with self._reading(gallery):
            result = self._searcher(gallery).image_to_text(picture, _clamp_k(k))
        rows = [
            [rank, hit.caption, hit.image or NO_IMAGE, round(hit.score, 4)]
            + [round(s, 4) for s in hit.level_scores]
            for rank, hit in enumerate(result.hits, start=1)
        ]
        status = (
            f"{gallery.num_captions} captions, {result.scored} re-ranked exactly on {self.device} "
            f"in {_timings(result)}."
        )
        return Results(self.caption_headers(), rows, result.hits, status)

    # ---------------------------------------------------------------- alignment maps
    def maps_for_image(self, image: object, caption: object) -> Maps:
        """Maps of an uploaded image with a caption (the image is encoded as for a query)."""
        picture = query_image(self.input_path(image))
        features = self.encoder.encode_image(picture)
        return self._maps(picture, features, caption)

    def maps_for_gallery_image(self, gallery: Gallery, index: int, caption: object) -> Maps:
        """Maps of a gallery image from its stored features: the ones that scored it."""
        with self._reading(gallery):
            features = gallery.image_features([index]).to(self.device)
        try:
            picture = load_image(gallery.image_path(index))
        except ImageLoadError:  # a visitor's image, cleared with their upload
            message = "That gallery image can no longer be read: build the gallery again."
            raise InputError(message) from None
        return self._maps(picture, features, caption)

    def _maps(self, picture: Image.Image, features: ImageFeatures, caption: object) -> Maps:
        caption, batch, words = self.read_caption(caption)
        text = self.encoder.encode_tokens(batch)
        levels = alignment_maps(self.model, features, text)
        total = sum(level.score for level in levels)
        grid = render_grid(
            picture, levels, words, self._row_labels(levels), self.model.config.image_size
        )
        legend = (
            f"HAT score **{total:.4f}** = sum of the level scores. Overview: one row per level; "
            f"columns: the whole caption, then each word piece the model read, each cell on its "
            f"own colour range.\n\n{self.legend()}"
        )
        grouped = group_pieces(words)
        details = {
            "score": total,
            "words": words,
            "whole_words": [
                {"text": w.text, "pieces": list(w.pieces), "minor": w.minor} for w in grouped
            ],
            "levels": [
                {
                    "name": level.name,
                    "score": level.score,
                    "grid": list(level.caption_map.shape),
                    "norm_outliers": np.argwhere(level.outliers).tolist(),
                }
                for level in levels
            ],
        }
        titles = [
            (f"level {n + 1}", f"image {image}, text {text}")
            for n, (image, text) in enumerate(self.level_layers())
        ]
        view = model_view(picture, self.model.config.image_size, VIEW)
        pair = PairMaps(view, levels, grouped, titles, total)
        return Maps(grid, legend, details, pair)

    def _row_labels(self, levels: list[LevelMaps]) -> list[list[str]]:
        return [
            [f"level {n + 1}   score {level.score:.3f}", f"image {image}", f"text {text}"]
            for n, (level, (image, text)) in enumerate(
                zip(levels, self.level_layers(), strict=True)
            )
        ]

    def close(self) -> None:
        """Stop the built-in gallery's background repairs and remove the demo's temporary folder
        (all session galleries)."""
        self.builtin.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self._owner.release()
