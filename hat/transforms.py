"""Image preprocessing of the reference code.

Training: random resized crop + horizontal flip; evaluation: resize + centre crop.
"""

from __future__ import annotations

from torchvision import transforms as T

from hat.config import HATConfig


def _normalise(config: HATConfig) -> list:
    return [T.ToTensor(), T.Normalize(mean=config.image_mean, std=config.image_std)]


def train_transform(config: HATConfig) -> T.Compose:
    return T.Compose(
        [T.RandomResizedCrop(config.image_size), T.RandomHorizontalFlip(), *_normalise(config)]
    )


def eval_resize(crop: int) -> int:
    """Short side before the evaluation centre crop: 8/7 of the crop (256 for 224)."""
    return round(crop * 256 / 224)


def eval_transform(config: HATConfig) -> T.Compose:
    """Resize the short side to :func:`eval_resize`, then centre crop."""
    resize = eval_resize(config.image_size)
    return T.Compose([T.Resize(resize), T.CenterCrop(config.image_size), *_normalise(config)])
