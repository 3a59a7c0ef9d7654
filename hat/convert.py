"""``hat convert``: an official LuminosityX/HAT checkpoint → one of our ``hat-b`` folders.

The official model (``meter/modules/meter_module.py``) is Swin-B 224 in22k + bert-base-uncased +
six ``nn.Linear`` projections, saved by PyTorch Lightning. Every official tensor lands in exactly
one place of our model with its values unchanged (only cast to our dtype), or is dropped for a
stated reason; every tensor of ours must be covered. Key rules, first match wins (:data:`RULES`):

- ``vit_model.*.relative_position_index`` / ``attn_mask``: buffers that timm recomputes and does
  not store; they are compared with ours, so a Swin of another window or resolution is refused.
- ``vit_model.norm_0``: dropped. The official forward normalises stage 0 (56×56×128) with it but
  never uses the result (``image_embeds_all[0]`` feeds no projection); HAT-B has no level there.
- ``vit_model.layers.i.downsample`` → ``image_tower.backbone.layers.{i+1}.downsample``: the
  official Swin merges patches at the end of stage i, timm at the start of stage i+1; both
  concatenate the 2×2 neighbours in the same order, so the weights are used as they are.
- ``vit_model.norm_1`` / ``norm_2`` / ``norm`` → ``image_tower.level_norms.0`` / ``.1`` /
  ``image_tower.backbone.norm``: the norms of stages 1, 2, 3 (28×28×256, 14×14×512, 7×7×1024).
- ``cross_modal_{image,text}_transform_1`` / ``_2`` / (no suffix) → ``{image,text}_proj.0`` /
  ``.1`` / ``.2``: levels Swin stage 1/2/3 ↔ BERT layer 4/10/12, shallow to deep.
- other ``vit_model.*`` → ``image_tower.backbone.*``; ``text_transformer.*`` (HF ``BertModel``
  names) → ``text_tower.backbone.*``.

Reading never runs code from the file (:mod:`hat.safe_load`: tensors, plain containers and the
Lightning callback classes that key a Lightning 1.3 checkpoint's callback states); a file that
needs more is refused unless ``--trust-checkpoint`` is given.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from hat.config import HATConfig, get_preset
from hat.model import HATModel
from hat.safe_load import read_checkpoint
from hat.tokenization import load_tokenizer

PRESET = "hat-b"
# The level order the projection rules below assume (Swin stages 1/2/3 ↔ BERT layers 4/10/12).
OFFICIAL_LEVELS = ([1, 2, 3], [4, 10, 12])
LOAD, CHECK, DROP = "load", "check", "drop"
MAX_LISTED = 25


class ConversionError(ValueError):
    """The state_dict is not the official HAT-B one: lists missing, unexpected, mismatched keys."""


class Rule(NamedTuple):
    """Where official keys matching ``pattern`` go; ``note`` is the documented reason."""

    pattern: re.Pattern[str]
    target: str | Callable[[re.Match[str]], str] | None
    kind: str
    note: str

    def place(self, match: re.Match[str]) -> str | None:
        """Our key for a matched official key; ``None`` when it is dropped."""
        if callable(self.target):
            return self.target(match)
        return None if self.target is None else match.expand(self.target)


def _next_stage_downsample(match: re.Match[str]) -> str:
    return f"image_tower.backbone.layers.{int(match[1]) + 1}.downsample.{match[2]}"


def _projection_rules() -> list[Rule]:
    """``_1`` / ``_2`` / no suffix project the shallow / middle / deep level (``infer``)."""
    rules = []
    for modality in ("image", "text"):
        for level, suffix in enumerate(("_1", "_2", "")):
            official = f"cross_modal_{modality}_transform{suffix}"
            stage, layer = OFFICIAL_LEVELS[0][level], OFFICIAL_LEVELS[1][level]
            rules.append(
                Rule(
                    re.compile(rf"{official}\.(weight|bias)"),
                    rf"{modality}_proj.{level}.\1",
                    LOAD,
                    f"{official} → {modality}_proj.{level} "
                    f"(level {level + 1}: Swin stage {stage} ↔ BERT layer {layer})",
                )
            )
    return rules


RULES: tuple[Rule, ...] = (
    Rule(
        re.compile(r"vit_model\.(.+\.(?:relative_position_index|attn_mask))"),
        r"image_tower.backbone.\1",
        CHECK,
        "Swin buffer timm recomputes: checked equal to ours, not stored",
    ),
    Rule(
        re.compile(r"vit_model\.norm_0\.(weight|bias)"),
        None,
        DROP,
        "norm_0 normalises Swin stage 0, which the official forward never uses: no HAT-B level",
    ),
    Rule(
        re.compile(r"vit_model\.layers\.(\d+)\.downsample\.(.+)"),
        _next_stage_downsample,
        LOAD,
        "patch merging: end of official stage i = start of timm stage i+1",
    ),
    Rule(
        re.compile(r"vit_model\.norm_1\.(weight|bias)"),
        r"image_tower.level_norms.0.\1",
        LOAD,
        "norm_1 (Swin stage 1, 28×28×256) → level norm 0",
    ),
    Rule(
        re.compile(r"vit_model\.norm_2\.(weight|bias)"),
        r"image_tower.level_norms.1.\1",
        LOAD,
        "norm_2 (Swin stage 2, 14×14×512) → level norm 1",
    ),
    Rule(
        re.compile(r"vit_model\.norm\.(weight|bias)"),
        r"image_tower.backbone.norm.\1",
        LOAD,
        "norm (Swin stage 3, 7×7×1024) → the backbone's final norm (level 2)",
    ),
    Rule(
        re.compile(r"vit_model\.(.+)"),
        r"image_tower.backbone.\1",
        LOAD,
        "Swin-B weights, same names in timm",
    ),
    Rule(
        re.compile(r"text_transformer\.(.+)"),
        r"text_tower.backbone.\1",
        LOAD,
        "bert-base-uncased weights, same names in HF BertModel",
    ),
    *_projection_rules(),
)


@dataclass
class ConversionReport:
    """What happened to every official tensor (keys are official names)."""

    mapped: dict[str, str] = field(default_factory=dict)  # → our key
    dropped: dict[str, str] = field(default_factory=dict)  # → reason
    cast: dict[str, str] = field(default_factory=dict)  # → "float16 → float32"
    notes: dict[str, str] = field(default_factory=dict)  # → the rule applied

    def summary(self) -> str:
        lines = [
            f"{len(self.mapped)} official tensors fill every tensor of our model, values "
            f"unchanged ({len(self.cast)} cast to our dtype); {len(self.dropped)} dropped:"
        ]
        lines += [f"  {n:4d} × {note}" for note, n in Counter(self.notes.values()).most_common()]
        return "\n".join(lines)


def _match(key: str) -> tuple[Rule, str | None] | None:
    """The first rule for ``key`` and the key it gives in our model."""
    for rule in RULES:
        match = rule.pattern.fullmatch(key)
        if match:
            return rule, rule.place(match)
    return None


def _listing(title: str, items: list[str]) -> str:
    shown = "\n".join(f"    {item}" for item in items[:MAX_LISTED])
    more = f"\n    … and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def _shape(t: torch.Tensor) -> str:
    return "×".join(map(str, t.shape)) or "scalar"


def convert_state_dict(
    official: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map an official HAT-B ``state_dict`` onto ``model``'s (a ``hat-b`` :class:`HATModel`).

    Pure: neither argument is modified. Returns our state_dict (cast to our dtypes) and a report;
    raises :class:`ConversionError` listing every missing, unexpected and mismatched key.
    """
    ours = model.state_dict()
    buffers = dict(model.named_buffers())
    report = ConversionReport()
    unexpected: list[str] = []
    mismatched: list[str] = []
    claimed: set[str] = set()  # our keys some official key points at, mapped or mismatched
    for key, value in official.items():
        found = _match(key)
        if found is None:
            unexpected.append(key)
            continue
        rule, target = found
        if target is None:
            report.dropped[key] = report.notes[key] = rule.note
            continue
        if target in claimed:
            mismatched.append(f"{key}: {target} already holds another official tensor")
            continue
        claimed.add(target)
        reference = (buffers if rule.kind == CHECK else ours).get(target)
        if reference is None:
            unexpected.append(f"{key} (no {target} in our model)")
        elif value.shape != reference.shape:
            mismatched.append(f"{key} {_shape(value)} ≠ {target} {_shape(reference)}")
        elif rule.kind == CHECK:
            if torch.equal(value.to(reference.dtype), reference):
                report.dropped[key] = report.notes[key] = rule.note
            else:
                mismatched.append(f"{key}: values differ from timm's {target}")
        else:
            report.mapped[key] = target
            report.notes[key] = rule.note
    missing = [k for k in ours if k not in claimed]
    if missing or unexpected or mismatched:
        problems = [
            _listing(title, items)
            for title, items in (
                ("missing (ours, not in the checkpoint)", missing),
                ("unexpected (in the checkpoint, no place in ours)", unexpected),
                ("mismatched", mismatched),
            )
            if items
        ]
        raise ConversionError(
            "not an official HAT-B (LuminosityX/HAT, Swin-B 224 + bert-base-uncased) "
            "state_dict:\n" + "\n".join(problems)
        )
    converted = {}  # cast only now: a refused input costs no copies
    for key, target in report.mapped.items():
        value, dtype = official[key], ours[target].dtype
        converted[target] = value.to(dtype)
        if value.dtype != dtype:
            report.cast[key] = f"{value.dtype} → {dtype}"
    return converted, report


def extract_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint, or the checkpoint itself when it is one."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise ConversionError("no state_dict in the checkpoint (expected a Lightning .ckpt)")
    odd = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if odd:
        raise ConversionError(_listing("state_dict entries that are not named tensors", odd))
    return dict(state)


def converted_config(checkpoint: Path) -> HATConfig:
    """The ``hat-b`` preset, checked against the level order the rules assume.

    Official checkpoints have no first-stage global head: search pools their features instead.
    """
    config = replace(get_preset(PRESET), global_dim=0)
    if (config.image_levels, config.text_levels) != OFFICIAL_LEVELS:
        raise ValueError(f"preset {PRESET} no longer has the official levels {OFFICIAL_LEVELS}")
    config.notes += (
        f" Converted by `hat convert` from the official LuminosityX/HAT {checkpoint.name}."
    )
    return config


def resolve_tokenizer(config: HATConfig, source: str | None) -> PreTrainedTokenizerBase:
    """The bundled bert-base-uncased vocabulary by default (no hub needed); else a local tokenizer
    folder, or a hub name (which fails at once when the hub is unreachable)."""
    if source is not None and Path(source).is_dir():
        return load_tokenizer(config, source)
    return load_tokenizer(replace(config, tokenizer=source) if source else config)


def convert_checkpoint(
    checkpoint: str | Path, out: str | Path, tokenizer: str | None = None, trust: bool = False
) -> ConversionReport:
    """Read, map and write ``out`` (config, safetensors weights, tokenizer files)."""
    checkpoint = Path(checkpoint)
    config = converted_config(checkpoint)
    tok = resolve_tokenizer(config, tokenizer)  # before the slow part: fail fast offline
    official = extract_state_dict(read_checkpoint(checkpoint, trust))
    model = HATModel(config)
    state, report = convert_state_dict(official, model)
    model.load_state_dict(state, strict=True, assign=True)
    model.save_pretrained(out, tokenizer=tok)
    return report
