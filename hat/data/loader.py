"""Torch datasets and batching for training (caption–image pairs) and encoding (images)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from hat.data.captions import CaptionedImages
from hat.data.images import ImageLoadError, load_image
from hat.tokenization import tokenize


class ImageDataset(Dataset):
    """Preprocessed images; with ``skip_bad`` an unreadable image yields ``None`` and is counted."""

    def __init__(self, paths: list, transform: Callable, skip_bad: bool = False):
        self.paths = list(paths)
        self.transform = transform
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor | None:
        try:
            return self.transform(load_image(self.paths[index]))
        except ImageLoadError:
            if self.skip_bad:
                return None
            raise

    def __getitem__(self, index: int):
        return index, self.load(index)


class PairDataset(Dataset):
    """One item per caption, paired with its image, as in the reference training loop."""

    def __init__(self, data: CaptionedImages, transform: Callable, skip_bad: bool = False):
        self.data = data
        self.images = ImageDataset(data.image_paths, transform, skip_bad)

    def __len__(self) -> int:
        return len(self.data.captions)

    def __getitem__(self, index: int):
        image_index = int(self.data.caption_to_image[index])
        return image_index, self.images.load(image_index), self.data.captions[index]


@dataclass
class Batch:
    pixel_values: torch.Tensor
    image_index: torch.Tensor
    skipped: int = 0
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    captions: list[str] = field(default_factory=list)


def collate_images(items) -> Batch:
    good = [(i, x) for i, x in items if x is not None]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped=len(items))
    return Batch(
        pixel_values=torch.stack([x for _, x in good]),
        image_index=torch.tensor([i for i, _ in good]),
        skipped=len(items) - len(good),
    )


class PairCollator:
    """Stacks images and tokenizes captions; pairs whose image failed to load are dropped."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer = tokenizer
        self.max_len = max_len

    def __call__(self, items) -> Batch:
        good = [(i, x, c) for i, x, c in items if x is not None]
        batch = collate_images([(i, x) for i, x, _ in good])
        batch.skipped = len(items) - len(good)
        if good:
            captions = [c for _, _, c in good]
            tokens = tokenize(self.tokenizer, captions, self.max_len)
            batch.input_ids, batch.attention_mask = tokens["input_ids"], tokens["attention_mask"]
            batch.captions = captions
        return batch
