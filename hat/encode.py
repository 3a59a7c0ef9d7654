"""Batch encoding of images and captions into stored per-level features, and full-matrix scoring."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hat.data.loader import ImageDataset, collate_images
from hat.model import HATModel, ImageFeatures, TextFeatures
from hat.tokenization import tokenize
from hat.transforms import eval_transform


def concat_text_features(parts: Sequence[TextFeatures]) -> TextFeatures:
    """Concatenate caption batches, right-padding to the longest (padding never affects scores)."""
    width = max(p.mask.shape[1] for p in parts)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return (
            F.pad(x, (0, 0, 0, width - x.shape[1]))
            if x.ndim == 3
            else F.pad(x, (0, width - x.shape[1]))
        )

    levels = [torch.cat([pad(p.levels[i]) for p in parts]) for i in range(len(parts[0].levels))]
    return TextFeatures(levels, torch.cat([pad(p.mask) for p in parts]))


@torch.inference_mode()
def encode_captions(
    model: HATModel,
    tokenizer,
    captions: Sequence[str],
    batch_size: int = 128,
    progress: bool = False,
) -> TextFeatures:
    """Per-level word features of every caption, on the CPU."""
    model.eval()
    parts = []
    for start in tqdm(range(0, len(captions), batch_size), desc="captions", disable=not progress):
        batch = tokenize(
            tokenizer, list(captions[start : start + batch_size]), model.config.max_text_len
        )
        feats = model.encode_text(
            batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        )
        parts.append(feats.to("cpu"))
    return concat_text_features(parts)


@torch.inference_mode()
def encode_images(
    model: HATModel,
    paths: Sequence,
    batch_size: int = 32,
    num_workers: int = 0,
    skip_bad: bool = False,
    progress: bool = False,
) -> tuple[ImageFeatures, list[int]]:
    """Per-level region features of every readable image (CPU) and the indices that were kept."""
    model.eval()
    dataset = ImageDataset(paths, eval_transform(model.config), skip_bad=skip_bad)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images
    )
    parts, kept = [], []
    for batch in tqdm(loader, desc="images", disable=not progress):
        if batch.pixel_values.numel():
            parts.append(model.encode_image(batch.pixel_values.to(model.device)).to("cpu"))
            kept.extend(batch.image_index.tolist())
    if not parts:
        raise ValueError("no image could be read")
    levels = [torch.cat([p.levels[i] for p in parts]) for i in range(len(parts[0].levels))]
    return ImageFeatures(levels), kept


@torch.inference_mode()
def score_matrix(
    model: HATModel,
    images: ImageFeatures,
    texts: TextFeatures,
    image_block: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Exact per-level scores ``(num_levels, num_images, num_texts)`` for stored features.

    Features stay on the CPU and move to the model's device one block of images at a time.
    """
    device = model.device
    texts_on_device = texts.to(device)
    rows = []
    for start in tqdm(range(0, len(images), image_block), desc="scoring", disable=not progress):
        block = images[start : start + image_block].to(device)
        rows.append(model.level_scores(block, texts_on_device).float().cpu())
    return torch.cat(rows, dim=1)


@torch.inference_mode()
def first_stage_matrix(
    model: HATModel, images: ImageFeatures, texts: TextFeatures, block: int = 256
) -> torch.Tensor:
    """Inner products ``(num_images, num_texts)`` of the first-stage vectors of stored features."""
    device = model.device

    def vectors(embed, features) -> torch.Tensor:
        parts = [
            embed(features[s : s + block].to(device)).float().cpu()
            for s in range(0, len(features), block)
        ]
        return torch.cat(parts)

    return vectors(model.image_embedding, images) @ vectors(model.text_embedding, texts).T
