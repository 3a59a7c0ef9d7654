"""A model bound to its tokenizer and evaluation transform: captions and images in, features out.

Like a processor bound to its model: whoever encodes holds one :class:`Encoder`, so tokenizing
(length, padding), preprocessing (resize, crop, normalise) and moving to the model's device are
written once, and the tokenizer does not travel loose next to the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from hat.data.images import load_image
from hat.data.loader import ImageDataset, collate_images
from hat.encode import concat_text_features
from hat.factory import load_model
from hat.model import HATModel, ImageFeatures, TextFeatures
from hat.runtime import encode_dtype
from hat.tokenization import tokenize
from hat.transforms import eval_transform

CAPTION_BATCH = 128
IMAGE_BATCH = 32


class Encoder:
    """Encodes captions and images with ``model``; every method runs in inference mode on the
    model's device. Batch methods return CPU features (a split or gallery may not fit on the
    device); single-query methods leave them on the device, where scoring happens."""

    def __init__(
        self,
        model: HATModel,
        tokenizer: PreTrainedTokenizerBase,
        precision: str | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.transform = eval_transform(model.config)
        self.precision = precision  # see hat.runtime.encode_dtype; the features are fp32 anyway

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str = "cpu") -> Encoder:
        """The encoder of a checkpoint folder (:func:`hat.factory.load_model`)."""
        return cls(*load_model(source, device))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def autocast(self) -> contextlib.AbstractContextManager:
        """The towers' matrix products in :func:`hat.runtime.encode_dtype`'s dtype, if any."""
        dtype = encode_dtype(self.device, self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    # ---------------------------------------------------------------- captions
    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (CPU), padded to the longest caption."""
        return tokenize(self.tokenizer, list(captions), self.model.config.max_text_len)

    @torch.inference_mode()
    def encode_tokens(self, tokens: dict[str, torch.Tensor]) -> TextFeatures:
        """Features of a :meth:`tokenize` batch, on the model's device."""
        with self.autocast():
            features = self.model.encode_text(
                tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            )
        return TextFeatures([x.float() for x in features.levels], features.mask)

    def encode_caption(self, caption: str) -> TextFeatures:
        """One query caption's features, on the model's device."""
        return self.encode_tokens(self.tokenize([caption]))

    def encode_captions(
        self, captions: Sequence[str], batch_size: int = CAPTION_BATCH, progress: bool = False
    ) -> TextFeatures:
        """Features of every caption (CPU), right-padded to the longest."""
        self.model.eval()
        parts = [
            self.encode_tokens(self.tokenize(captions[start : start + batch_size])).to("cpu")
            for start in tqdm(
                range(0, len(captions), batch_size), desc="captions", disable=not progress
            )
        ]
        return concat_text_features(parts)

    # ---------------------------------------------------------------- images
    def image_loader(
        self,
        paths: Sequence,
        batch_size: int = IMAGE_BATCH,
        num_workers: int = 0,
        skip_bad: bool = False,
    ) -> DataLoader:
        """Batches of preprocessed images of ``paths`` (:class:`~hat.data.loader.Batch`); with
        ``skip_bad`` unreadable ones are left out of their batch instead of raising."""
        return DataLoader(
            ImageDataset(paths, self.transform, skip_bad=skip_bad),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate_images,
        )

    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """Features of preprocessed images, on the model's device."""
        with self.autocast():
            features = self.model.encode_image(pixel_values.to(self.device))
        return ImageFeatures([x.float() for x in features.levels])

    def encode_image(self, image: str | Path | Image.Image) -> ImageFeatures:
        """One query image's features (a path or a PIL image), on the model's device."""
        image = image if isinstance(image, Image.Image) else load_image(image)
        return self.encode_pixels(self.transform(image)[None])

    def encode_images(
        self,
        paths: Sequence,
        batch_size: int = IMAGE_BATCH,
        num_workers: int = 0,
        progress: bool = False,
    ) -> ImageFeatures:
        """Features of every image (CPU); an unreadable image raises
        :class:`~hat.data.images.ImageLoadError`."""
        self.model.eval()
        loader = self.image_loader(paths, batch_size, num_workers)
        parts = [
            self.encode_pixels(batch.pixel_values).to("cpu")
            for batch in tqdm(loader, desc="images", disable=not progress)
        ]
        if not parts:
            raise ValueError("no images to encode")
        levels = [torch.cat([p.levels[i] for p in parts]) for i in range(len(parts[0].levels))]
        return ImageFeatures(levels)
