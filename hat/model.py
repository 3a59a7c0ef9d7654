"""The HAT model: two towers, per-level projections and hierarchical alignment scoring."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from hat.alignment import Basis, RaggedWords, hierarchical_scores
from hat.coded_regions import CodedRegions
from hat.concepts import ConceptPath
from hat.config import HATConfig
from hat.fileio import atomic_directory
from hat.filekind import describe
from hat.global_head import GlobalHead, pooled_image_embedding, pooled_text_embedding
from hat.image_tower import ImageTower
from hat.mapped_rows import MappedRows
from hat.pooling import pooled_level_scores
from hat.runtime import in_grad_mode
from hat.text_tower import TextTower

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointFormatError(ValueError):
    """A checkpoint folder's weights file is not a safetensors file."""

    def __init__(self, path: Path, reason: str):
        super().__init__(
            f"{path} is not a safetensors file: it is {describe(path)} (safetensors: {reason}). "
            f"A checkpoint folder holds {CONFIG_NAME}, {WEIGHTS_NAME} (the weights in safetensors "
            "format) and the tokenizer files, as save_pretrained and `hat train` write them; an "
            "official .ckpt becomes one with `hat convert` or `hat fetch`."
        )


@dataclass
class ImageFeatures:
    """Projected region features, one ``(N, K_i, D)`` tensor per level.

    A gallery hands out levels as stored, which scoring decodes a block at a time (see
    :func:`hat.alignment.level_scores`): fp16 or int8 values, times per-region ``scales[i]``
    ``(N, K_i)`` where given, or coordinates ``(N, K_i, d + e)`` in an orthonormal basis
    ``bases[i]`` (:class:`hat.alignment.Basis`), which a ``pq`` gallery hands out as their
    codes (:class:`~hat.coded_regions.CodedRegions`), with the regions' norms ``norms[i]``
    ``(N, K_i)`` where the gallery stores them (int8), and each image's concept gate ``gates``
    ``(N,)`` where it stores them (:meth:`HATModel.concept_gate`: it depends on the image alone,
    so a gallery takes it once, not on every query). :meth:`expanded` gives the fp32 features.
    A re-rank's int8 levels may be :class:`~hat.mapped_rows.MappedRows`, read where they lie.
    """

    levels: list[torch.Tensor | MappedRows | CodedRegions]
    bases: list[Basis | None] | None = None
    scales: list[torch.Tensor | None] | None = None
    norms: list[torch.Tensor | None] | None = None
    gates: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.levels[0].shape[0]

    @staticmethod
    def _each(per_level: list | None, method: Callable) -> list | None:
        return None if per_level is None else [x if x is None else method(x) for x in per_level]

    def _map(self, tensors: Callable, bases: Callable) -> ImageFeatures:
        return ImageFeatures(
            [tensors(x) for x in self.levels],
            self._each(self.bases, bases),
            self._each(self.scales, tensors),
            self._each(self.norms, tensors),
            None if self.gates is None else tensors(self.gates),
        )

    def __getitem__(self, index) -> ImageFeatures:
        return self._map(lambda x: x[index], lambda b: b[index])

    def to(self, device: torch.device | str) -> ImageFeatures:
        return self._map(*[lambda x: x.to(device)] * 2)

    def expanded(self) -> ImageFeatures:
        """The same features as fp32 tensors in the model's feature space."""
        if self.bases is None and self.scales is None:
            return ImageFeatures([x.float() for x in self.levels], gates=self.gates)
        count = len(self.levels)
        levels = []
        for x, b, s in zip(
            self.levels, self.bases or [None] * count, self.scales or [None] * count, strict=True
        ):
            x = x.float() if s is None else x.float().mul_(s.float()[..., None])
            levels.append(x if b is None else b.expand(x))
        return ImageFeatures(levels, gates=self.gates)

    def mean_region(self, level: int) -> torch.Tensor:
        """``(N, D)`` fp32: each image's mean region at ``level`` (0-based), from the stored
        values (the mean is taken before scaling and expanding, which are linear; pq codes are
        decoded to coordinates first)."""
        x = self.levels[level]
        if isinstance(x, CodedRegions):
            x = x.float()
        scales = self.scales[level] if self.scales else None
        if scales is None:
            mean = x.mean(1, dtype=torch.float32)
        else:  # a batched (1, K) @ (K, D) product: a third of einsum's time on int8 here
            weights = scales.float()[:, None, :] / x.shape[1]
            mean = torch.bmm(weights, x.float())[:, 0]
        basis = self.bases[level] if self.bases else None
        return mean if basis is None else basis.expand(mean[:, None])[:, 0]


@dataclass
class TextFeatures:
    """Projected word features, one ``(N, L, D)`` tensor per level, and the real-token mask
    (a gallery's caption bank may hand out :class:`~hat.alignment.RaggedWords` instead)."""

    levels: list[torch.Tensor]
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.mask.shape[0]

    def __getitem__(self, index) -> TextFeatures:
        return TextFeatures([x[index] for x in self.levels], self.mask[index])

    def to(self, device: torch.device | str) -> TextFeatures:
        return TextFeatures([x.to(device) for x in self.levels], self.mask.to(device))

    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    def padded(self) -> TextFeatures:
        """The same with every level a ``(N, L, D)`` tensor (a gallery may hand out
        :class:`~hat.alignment.RaggedWords`)."""
        levels = [x.padded() if isinstance(x, RaggedWords) else x for x in self.levels]
        return TextFeatures(levels, self.mask)


@dataclass
class BatchScores:
    """What a training batch needs from ``forward``: HAT scores and the global head's logits."""

    hat: torch.Tensor
    """``(I, T)`` HAT scores, image i paired with caption i."""
    first_stage: torch.Tensor | None
    """``(I, T)`` scaled inner products of the global vectors; None for a model without head."""


def _projection(in_features: int, out_features: int) -> nn.Linear:
    """A level projection as in the paper: linear, N(0, 0.02) weights, zero bias, no activation."""
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer


class HATModel(nn.Module):
    """Hierarchical Alignment Transformer for image–text retrieval.

    ``encode_image`` and ``encode_text`` are independent, so a gallery is encoded once and stored;
    ``score`` aligns any block of images with any block of captions.
    """

    def __init__(
        self,
        config: HATConfig,
        pretrained_image: bool | str = False,
        pretrained_text: str = "",
    ):
        super().__init__()
        image_file = pretrained_image if isinstance(pretrained_image, str) else ""
        self.image_tower = ImageTower(config, bool(pretrained_image), image_file)
        self.text_tower = TextTower(config, pretrained_text)
        self.image_proj = nn.ModuleList(
            _projection(c, config.embed_dim) for c in self.image_tower.channels
        )
        self.text_proj = nn.ModuleList(
            _projection(c, config.embed_dim) for c in self.text_tower.channels
        )
        self.concepts = None
        if (concepts := config.concept_config) is not None:
            hidden = self.text_tower.backbone.config.hidden_size
            mean, std = config.image_mean, config.image_std
            self.concepts = ConceptPath(concepts, hidden, config.embed_dim, mean, std)
        self.image_global = self.text_global = self.global_logit_scale = None
        if config.global_dim:
            pairs = len(config.image_levels)  # the head pools the backbone levels
            self.image_global = GlobalHead(pairs, config.embed_dim, config.global_dim)
            self.text_global = GlobalHead(pairs, config.embed_dim, config.global_dim)
            self.global_logit_scale = nn.Parameter(torch.tensor(math.log(20.0)))
        # Checkpoints must rebuild the text tower offline: record its architecture, in the
        # model's own copy of the config (the caller's may build other models).
        text_config = self.text_tower.backbone.config
        architecture = {**text_config.to_diff_dict(), "model_type": text_config.model_type}
        architecture.pop("transformers_version", None)
        self.config = replace(copy.deepcopy(config), text_backbone_config=architecture)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def level_directions(self) -> list[str]:
        """Each level's attention direction: the model's, and the concept level's own."""
        directions = [self.config.direction] * len(self.config.image_levels)
        if self.concepts is not None:
            directions.append(self.concepts.config.direction)
        return directions

    @property
    def level_weights(self) -> list[float]:
        """Each level's weight in the pair score: 1, and the concept level's own (times each
        image's gate where the concept level has one: :meth:`image_level_weights`)."""
        weights = [1.0] * len(self.config.image_levels)
        if self.concepts is not None:
            weights.append(self.concepts.config.weight)
        return weights

    def concept_gate(self, images: ImageFeatures) -> torch.Tensor | None:
        """``(N,)`` each image's gate of the concept level (:class:`hat.concepts.NoveltyGate`),
        None without one: as ``images`` carry it (a gallery's, taken when it was built), else
        from their regions."""
        if self.concepts is None or self.concepts.gate is None:
            return None
        if images.gates is not None:
            return images.gates
        level = self.concepts.config.gate_level - 1
        return self.concepts.gate(images.mean_region(level).to(self.device))

    @property
    def stored_gate(self) -> Callable[[ImageFeatures], torch.Tensor] | None:
        """What a gallery stores of each image as it writes it (``SegmentWriter``'s ``gate``):
        :meth:`concept_gate`, or None for a model without a gate."""
        return self.concept_gate if self.config.gated else None

    def image_level_weights(self, images: ImageFeatures) -> torch.Tensor:
        """``(num_levels, N)``: each level's weight in the pair score of each image."""
        device = images.levels[0].device
        weights = torch.tensor(self.level_weights, device=device)[:, None].repeat(1, len(images))
        if (gate := self.concept_gate(images)) is not None:
            weights[:-1] *= 1 - self.concepts.config.gate_damping * gate
            weights[-1] *= gate
        return weights

    def grid_sizes(self, image_size: int) -> list[tuple[int, int]]:
        """Each level's region grid (H, W) for a square input, to draw heatmaps."""
        grids = self.image_tower.grid_sizes(image_size)
        if self.concepts is not None:
            grids.append(self.concepts.grid_size())
        return grids

    def encode_image(
        self, pixel_values: torch.Tensor, side: Executor | None = None
    ) -> ImageFeatures:
        """Every level's regions; the concept level's teacher runs on ``side`` where given, side by
        side with the backbone (the two share nothing), in the caller's grad mode."""
        if self.concepts is None:
            return self.image_head(self.image_tower.backbone_levels(pixel_values))
        concepts = self.concepts.image_level
        running = None if side is None else side.submit(in_grad_mode(concepts), pixel_values)
        features = self.image_head(self.image_tower.backbone_levels(pixel_values))
        features.levels.append(concepts(pixel_values) if running is None else running.result())
        return features

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        return self.text_head(self.text_tower(input_ids, attention_mask), attention_mask)

    def image_head(self, backbone_levels: list[torch.Tensor]) -> ImageFeatures:
        """Level norms and projections on raw backbone outputs (cacheable while frozen)."""
        levels = self.image_tower.normalize(backbone_levels)
        return ImageFeatures([proj(x) for proj, x in zip(self.image_proj, levels, strict=True)])

    def text_head(self, backbone_levels: list[torch.Tensor], mask: torch.Tensor) -> TextFeatures:
        """Projections on the text backbone's hidden states (cacheable while frozen)."""
        projected = [proj(x) for proj, x in zip(self.text_proj, backbone_levels, strict=True)]
        if self.concepts is not None:
            words = backbone_levels[self.config.text_levels.index(self.concepts.config.text_level)]
            projected.append(self.concepts.text_level(words))
        return TextFeatures(projected, mask.bool())

    def level_scores(self, images: ImageFeatures, texts: TextFeatures, **kwargs) -> torch.Tensor:
        """Per-level alignment scores ``(num_levels, num_images, num_texts)``, each as it counts
        in the pair score (the concept level times its weight)."""
        cfg = self.config
        with torch.autocast(device_type=images.levels[0].device.type, enabled=False):
            if cfg.scoring == "pooled":
                images, texts = images.expanded(), texts.padded()
                scores = pooled_level_scores(images.levels, texts.levels, texts.mask)
            else:
                count = len(images.levels)
                bases, scales, norms = (
                    x or [None] * count for x in (images.bases, images.scales, images.norms)
                )
                pairs = len(cfg.image_levels)
                groups = [(slice(0, pairs), cfg.direction)]  # the concept level has its own
                if self.concepts is not None:
                    groups.append((slice(pairs, None), self.concepts.config.direction))
                scores = torch.cat(
                    [
                        hierarchical_scores(
                            images.levels[part],
                            texts.levels[part],
                            texts.mask,
                            lambda_softmax=cfg.lambda_softmax,
                            direction=direction,
                            slope=cfg.leaky_relu_slope,
                            bases=bases[part],
                            scales=scales[part],
                            norms=norms[part],
                            **kwargs,
                        )
                        for part, direction in groups
                    ]
                )
            if self.concepts is None:
                return scores
            return scores * self.image_level_weights(images)[:, :, None]

    def score(self, images: ImageFeatures, texts: TextFeatures, **kwargs) -> torch.Tensor:
        """HAT pair scores ``(num_images, num_texts)``: the sum of the level scores."""
        return self.level_scores(images, texts, **kwargs).sum(dim=0)

    @property
    def first_stage_dim(self) -> int:
        """Width of :meth:`image_embedding` / :meth:`text_embedding` vectors."""
        return self.config.first_stage_dim

    def image_embedding(self, images: ImageFeatures) -> torch.Tensor:
        """First-stage vectors ``(N, dim)`` of images, for a faiss index: unit length, unless
        the concept level's gate scales its parts by the image's level weights."""
        pairs = images.levels[: len(self.config.image_levels)]
        if self.image_global is None:
            vector = pooled_image_embedding(pairs)
        else:
            vector = self.image_global(pairs)
        if self.concepts is None:
            return vector
        vectors = self._with_concepts(vector, pooled_image_embedding(images.levels[-1:]))
        if (gate := self.concept_gate(images)) is not None:  # the image's own level weights
            backbone = vector.shape[1]
            vectors[:, :backbone] *= (1 - self.concepts.config.gate_damping * gate)[:, None]
            vectors[:, backbone:] *= gate[:, None]
        return vectors

    def text_embedding(self, texts: TextFeatures) -> torch.Tensor:
        """First-stage unit vectors ``(N, dim)`` of captions, for a faiss index."""
        pairs, mask = texts.levels[: len(self.config.image_levels)], texts.mask
        if self.text_global is None:
            vector = pooled_text_embedding(pairs, mask)
        else:
            vector = self.text_global(pairs, mask)
        if self.concepts is None:
            return vector
        return self._with_concepts(vector, pooled_text_embedding(texts.levels[-1:], mask))

    def _with_concepts(self, vector: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
        """The backbone levels' unit vector and the concept level's side by side, still unit
        length; the concept part holds ``first_stage_weight`` of the inner product."""
        share = self.concepts.config.first_stage_weight
        return torch.cat([vector * math.sqrt(1 - share), concept * math.sqrt(share)], dim=1)

    def first_stage_logits(self, images: ImageFeatures, texts: TextFeatures) -> torch.Tensor:
        """Scaled inner products of the global head's vectors, for training it.

        The head sees detached features: it learns to rank like HAT without changing what HAT
        learns (with Adam, adding its loss leaves every other parameter's update as it was).
        """
        if self.global_logit_scale is None:
            raise ValueError(f"{self.config.name} has no global head (global_dim is 0)")
        image = self.image_embedding(ImageFeatures([x.detach() for x in images.levels]))
        text = self.text_embedding(TextFeatures([x.detach() for x in texts.levels], texts.mask))
        return self.global_logit_scale.exp() * image @ text.T

    def batch_scores(self, images: ImageFeatures, texts: TextFeatures) -> BatchScores:
        """HAT scores and, with a global head, its logits for the same pairs."""
        first_stage = None
        if self.global_logit_scale is not None:
            first_stage = self.first_stage_logits(images, texts)
        return BatchScores(self.score(images, texts), first_stage)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> BatchScores:
        """Scores of a training batch (image i is paired with caption i).

        Everything that trains runs here, so DistributedDataParallel synchronises all of it.
        """
        return self.batch_scores(
            self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)
        )

    # ---------------------------------------------------------------- what trains
    def lock_backbones(self, locked: bool = True) -> None:
        """Freeze (or, ``locked=False``, unfreeze) both backbones, final norms included, as in the
        reference recipe's first phase; level norms, projections and the global head always
        train. The text pooler never trains: HAT does not use it."""
        self.image_tower.backbone.requires_grad_(not locked)
        self.text_tower.backbone.requires_grad_(not locked)
        if (pooler := self._text_pooler()) is not None:
            pooler.requires_grad_(False)

    def trainable_parameters(self, part: str = "all") -> list[nn.Parameter]:
        """The parameters an optimizer gets, in a stable order.

        ``"all"``: everything that trains in some phase (all but the text pooler and the concept
        path, which stay frozen).
        ``"heads"``: what :meth:`image_head` and :meth:`text_head` apply to cached backbone
        outputs: new level norms, the image backbone's final norm where a level uses it, the
        projections, and the global head.
        ``"global_head"``: the first-stage global head alone (empty without one).
        """
        if part == "all":
            frozen = [m for m in (self._text_pooler(), self.concepts) if m is not None]
            skip = {id(p) for m in frozen for p in m.parameters()}
            return [p for p in self.parameters() if id(p) not in skip]
        head = []
        if self.global_logit_scale is not None:
            head = [
                *self.image_global.parameters(),
                *self.text_global.parameters(),
                self.global_logit_scale,
            ]
        if part == "global_head":
            return head
        if part != "heads":
            raise ValueError(f"part must be 'all', 'heads' or 'global_head', got {part!r}")
        tower = self.image_tower
        modules = [tower.level_norms, self.image_proj, self.text_proj]
        params = [p for m in modules for p in m.parameters()]
        if tower.final_index in tower.levels:
            params += list(tower.backbone.norm.parameters())
        return params + head

    def _text_pooler(self) -> nn.Module | None:
        return getattr(self.text_tower.backbone, "pooler", None)

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path, tokenizer=None, half: bool = False) -> Path:
        """Write config, safetensors weights and tokenizer files; replaces ``directory`` atomically.

        ``half`` stores floating-point tensors in fp16 (the shipped demo checkpoint).
        """
        with atomic_directory(directory) as staging:
            self.config.save(staging / CONFIG_NAME)
            state = {
                k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
                for k, v in self.state_dict().items()
            }
            save_file(state, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
            if tokenizer is not None:
                tokenizer.save_pretrained(str(staging))
        return Path(directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> HATModel:
        """Rebuild a model from a folder written by :meth:`save_pretrained`; needs no network."""
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        weights_path = directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: is {directory} a HAT checkpoint?")
        config = HATConfig.from_dict(json.loads(config_path.read_text()))
        model = cls(config)
        try:
            state = load_file(str(weights_path), device=str(map_location))
        except SafetensorError as exc:
            raise CheckpointFormatError(weights_path, str(exc)) from None
        reference = model.state_dict()
        state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
        model.load_state_dict(state, strict=True)
        return model.to(map_location)
