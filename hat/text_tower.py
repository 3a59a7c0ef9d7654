"""Text tower: an HF BERT-family encoder that yields word features at several layers."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from hat.config import HATConfig
from hat.hub import require_hub


def text_backbone_config(config: HATConfig) -> PretrainedConfig:
    """The text backbone's HF config: ``text_backbone_config`` when stored, else by name."""
    if config.text_backbone_config is not None:
        options = dict(config.text_backbone_config)
        return AutoConfig.for_model(options.pop("model_type"), **options)
    if not Path(config.text_backbone).is_dir():
        require_hub(f"the architecture of {config.text_backbone!r}", "--pretrained-text")
    return AutoConfig.from_pretrained(config.text_backbone)


class TextTower(nn.Module):
    """Returns the hidden states of the configured layers (HF ``hidden_states`` indexing).

    The pooler is kept (official checkpoints carry it) but never used nor trained.
    """

    def __init__(self, config: HATConfig, pretrained_path: str = ""):
        super().__init__()
        if pretrained_path:
            self.backbone = AutoModel.from_pretrained(pretrained_path)
        else:
            self.backbone = AutoModel.from_config(text_backbone_config(config))
        num_layers = self.backbone.config.num_hidden_layers
        self.levels = list(config.text_levels)
        if any(not 0 <= i <= num_layers for i in self.levels):
            raise ValueError(f"text levels {self.levels} out of range for {num_layers} layers")
        self.channels = [self.backbone.config.hidden_size] * len(self.levels)
        self._drop_unused_layers(max(self.levels))
        pooler = getattr(self.backbone, "pooler", None)
        if pooler is not None:
            pooler.requires_grad_(False)

    def _drop_unused_layers(self, keep: int) -> None:
        """Layers above the deepest level never influence a score: remove them (BERT family)."""
        encoder = getattr(self.backbone, "encoder", None)
        if encoder is not None and hasattr(encoder, "layer") and keep < len(encoder.layer):
            encoder.layer = encoder.layer[:keep]
            self.backbone.config.num_hidden_layers = keep

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Return per-level word features, each ``(B, L, C)``; padded positions are garbage."""
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
            output_hidden_states=True,
        )
        return [out.hidden_states[i] for i in self.levels]
