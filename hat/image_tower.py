"""Image tower: a timm backbone that yields region features at several levels."""

from __future__ import annotations

import timm
import torch
from torch import nn

from hat.config import HATConfig


class ImageTower(nn.Module):
    """Wraps any timm model with ``forward_intermediates`` and returns one token map per level.

    Following HAT, every level except the backbone's final one gets a new LayerNorm (the
    intermediate stage outputs of a pretrained backbone are not normalised); a level taken from
    the final stage or block reuses the backbone's own final norm and its pretrained statistics.
    """

    def __init__(self, config: HATConfig, pretrained: bool = False, checkpoint_path: str = ""):
        super().__init__()
        overlay = {"file": checkpoint_path} if checkpoint_path else None
        self.backbone = timm.create_model(
            config.image_backbone,
            pretrained=pretrained,
            pretrained_cfg_overlay=overlay,
            img_size=config.image_size,
            num_classes=0,
            **config.image_backbone_kwargs,
        )
        if not hasattr(self.backbone, "forward_intermediates"):
            raise ValueError(f"timm model {config.image_backbone!r} has no forward_intermediates")
        self.levels = list(config.image_levels)
        num_stages = len(self.backbone.feature_info)
        if any(not 0 <= i < num_stages for i in self.levels):
            raise ValueError(f"image levels {self.levels} out of range for {num_stages} stages")
        self.final_index = num_stages - 1
        # The classifier head, any stage after the deepest level and, when no level is taken from
        # the final stage, the final norm never influence a score: drop them.
        self.backbone.prune_intermediate_layers(
            self.levels, prune_norm=self.final_index not in self.levels, prune_head=True
        )
        channels = [self.backbone.feature_info[i]["num_chs"] for i in self.levels]
        self.level_norms = nn.ModuleList(
            nn.Identity() if i == self.final_index else nn.LayerNorm(c)
            for i, c in zip(self.levels, channels, strict=True)
        )
        self.channels = channels

    def backbone_levels(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Raw backbone outputs of the levels, ``(B, H_i * W_i, C_i)``, before any level norm.

        Separate from :meth:`normalize` so that frozen-backbone training can cache them.
        """
        maps = self.backbone.forward_intermediates(
            pixel_values, indices=self.levels, stop_early=True, intermediates_only=True
        )
        return [fmap.flatten(2).transpose(1, 2) for fmap in maps]

    def normalize(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each level's norm: the backbone's final norm for the final stage, else a new one."""
        return [
            self.backbone.norm(x) if index == self.final_index else norm(x)
            for index, x, norm in zip(self.levels, levels, self.level_norms, strict=True)
        ]

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Per-level region features, each ``(B, H_i * W_i, C_i)`` in row-major order."""
        return self.normalize(self.backbone_levels(pixel_values))

    def grid_sizes(self, image_size: int) -> list[tuple[int, int]]:
        """Spatial grid (H, W) of every level for a square input, used to draw heatmaps."""
        sizes = []
        for index in self.levels:
            side = image_size // self.backbone.feature_info[index]["reduction"]
            sizes.append((side, side))
        return sizes
