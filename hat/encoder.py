"""A model bound to its tokenizer and evaluation transform: captions and images in, features out.

Like a processor bound to its model: whoever encodes holds one :class:`Encoder`, so tokenizing
(length, padding), preprocessing (resize, crop, normalise) and moving to the model's device are
written once, and the tokenizer does not travel loose next to the model.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from timm.layers import LayerScale, Mlp
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.activations import GELUActivation
from transformers.models.bert.modeling_bert import BertIntermediate

from hat.data.images import load_image
from hat.data.loader import ImageDataset, collate_images
from hat.encode import concat_text_features
from hat.factory import load_model
from hat.model import HATModel, ImageFeatures, TextFeatures
from hat.runtime import encode_dtype, usable_cores
from hat.tokenization import tokenize
from hat.transforms import eval_transform

CAPTION_BATCH = 128
IMAGE_BATCH = 32
PACKED_ROWS = 256  # oneDNN's hint of the rows a packed weight multiplies: a query image's tokens


class PackedLinear(nn.Module):
    """A bf16 linear layer whose weight oneDNN has laid out for this CPU's matrix units once,
    instead of on every call (``nn.Linear`` hands oneDNN a plain weight, which it reorders each
    time: a quarter of a query image's backbone time here). Same products, same output.

    ``gelu``: the exact GELU that follows the layer applied as oneDNN writes the output, to the
    fp32 sums before they are rounded to bf16 (one pass less, and closer to fp32). ``scale``:
    a per-output factor (a LayerScale's) folded into the weight and bias in fp32.
    """

    def __init__(
        self,
        linear: nn.Linear,
        rows: int = PACKED_ROWS,
        gelu: bool = False,
        scale: torch.Tensor | None = None,
    ):
        super().__init__()
        weight, bias = linear.weight.detach().float(), linear.bias
        bias = None if bias is None else bias.detach().float()
        if scale is not None:
            scale = scale.detach().float()
            weight = weight * scale[:, None]
            bias = None if bias is None else bias * scale
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16), rows)
        self.bias = None if bias is None else bias.to(torch.bfloat16)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.activation = ("gelu", [], "none") if gelu else ("none", [], "")

    @staticmethod
    def supported(device: torch.device) -> bool:
        if device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return False
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, *self.activation)

    def extra_repr(self) -> str:
        gelu = ", GELU" if self.activation[0] == "gelu" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16{gelu}"


class PackedPatches(nn.Module):
    """A convolution whose kernel is its stride, without padding, groups or dilation (a ViT's or
    Swin's patch embedding), as a :class:`PackedLinear` over the flattened patches: oneDNN's bf16
    convolution over three input channels leaves the CPU's matrix units idle (1.9 ms of a query
    image here). Returns the convolution's NCHW output, as a view of the linear layer's."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.patch = conv.kernel_size
        linear = nn.Linear(conv.weight[0].numel(), conv.out_channels, bias=conv.bias is not None)
        linear.weight.data = conv.weight.detach().flatten(1)  # (out, C · ph · pw): patch order
        if conv.bias is not None:
            linear.bias.data = conv.bias.detach()
        self.linear = PackedLinear(linear)

    @staticmethod
    def fits(conv: nn.Module) -> bool:
        return (
            isinstance(conv, nn.Conv2d)
            and conv.kernel_size == conv.stride
            and conv.padding in ((0, 0), "valid")
            and conv.dilation == (1, 1)
            and conv.groups == 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        (ph, pw), rows, cols = self.patch, height // self.patch[0], width // self.patch[1]
        x = x[:, :, : rows * ph, : cols * pw].reshape(batch, channels, rows, ph, cols, pw)
        patches = x.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, -1)
        return self.linear(patches).transpose(1, 2).unflatten(2, (rows, cols))


def _exact_gelu(module: nn.Module) -> bool:
    if isinstance(module, nn.GELU):
        return module.approximate == "none"
    return isinstance(module, GELUActivation) and module.act is F.gelu


Follower = tuple[nn.Module, str]  # the module holding a follower, and the follower's attribute


def _followers(model: nn.Module) -> tuple[dict[nn.Linear, Follower], dict[nn.Linear, Follower]]:
    """The linear layers an exact GELU follows (timm's ``Mlp``: fc1 then act; BERT's
    intermediate: dense then its activation), and those a LayerScale multiplies (a timm ViT
    block's attention projection and second MLP layer), each with where that follower is."""
    gelus, scales = {}, {}
    for module in model.modules():
        if isinstance(module, Mlp) and isinstance(module.fc1, nn.Linear):
            if _exact_gelu(module.act):
                gelus[module.fc1] = (module, "act")
        elif isinstance(module, BertIntermediate) and isinstance(module.dense, nn.Linear):
            if _exact_gelu(module.intermediate_act_fn):
                gelus[module.dense] = (module, "intermediate_act_fn")
        elif isinstance(module, Block):
            for attribute, last in (("ls1", module.attn.proj), ("ls2", module.mlp.fc2)):
                if isinstance(getattr(module, attribute), LayerScale):
                    scales[last] = (module, attribute)
    return gelus, scales


def _take(followers: dict[nn.Linear, Follower], linear: nn.Linear) -> nn.Module | None:
    """The module that follows ``linear`` (None if none), replaced where it is by an identity."""
    if linear not in followers:
        return None
    owner, attribute = followers[linear]
    follower = getattr(owner, attribute)
    setattr(owner, attribute, nn.Identity())
    return follower


@torch.no_grad()
def low_precision_copy(model: HATModel, dtype: torch.dtype) -> HATModel:
    """A copy of ``model`` whose matrix weights (linear layers, convolutions) are ``dtype``, for
    encoding under autocast: autocast would cast them again on every call, which costs a single
    caption more than its products. bf16 linear layers on a CPU are :class:`PackedLinear`, with
    the GELU after them and the LayerScale that multiplies them taken in (:func:`_followers`),
    and patch embeddings :class:`PackedPatches`.
    Norms stay fp32, and so does the concept level (see
    :meth:`hat.concepts.ConceptPath.image_level`)."""
    low = copy.deepcopy(model).eval()
    pack = dtype == torch.bfloat16 and PackedLinear.supported(model.device)
    gelus, scales = _followers(low) if pack else ({}, {})
    for name, module in list(low.named_modules()):
        if name.startswith("concepts") or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if pack and PackedPatches.fits(module):
            parent, _, child = name.rpartition(".")
            setattr(low.get_submodule(parent), child, PackedPatches(module))
        elif pack and isinstance(module, nn.Linear):
            gelu, scale = _take(gelus, module) is not None, _take(scales, module)
            gamma = None if scale is None else scale.gamma
            parent, _, child = name.rpartition(".")
            setattr(low.get_submodule(parent), child, PackedLinear(module, gelu=gelu, scale=gamma))
        else:
            module.to(dtype)
    return low.requires_grad_(False)


class Encoder:
    """Encodes captions and images with ``model``; every method runs in inference mode on the
    model's device. Batch methods return CPU features (a split or gallery may not fit on the
    device); single-query methods leave them on the device, where scoring happens."""

    def __init__(
        self,
        model: HATModel,
        tokenizer: PreTrainedTokenizerBase,
        precision: str | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.transform = eval_transform(model.config)
        self.precision = precision  # see hat.runtime.encode_dtype; the features are fp32 anyway
        self._low_precision = None  # (key, low_precision_copy of the model)
        # Walking the module tree for them costs 0.7 ms a query here; a list, 0.06.
        self._weights = list(model.parameters())
        self._side: ThreadPoolExecutor | None = None  # side_thread()
        self._side_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str = "cpu") -> Encoder:
        """The encoder of a checkpoint folder (:func:`hat.factory.load_model`)."""
        return cls(*load_model(source, device))

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def encode_dtype(self) -> torch.dtype | None:
        """What the towers encode in here (:func:`hat.runtime.encode_dtype`; None: fp32)."""
        return encode_dtype(self.device, self.precision)

    def encoding_model(self) -> tuple[HATModel, contextlib.AbstractContextManager]:
        """The model that encodes and the context it runs in: the model itself in fp32, or
        under :func:`hat.runtime.encode_dtype`'s autocast a :func:`low_precision_copy`, made
        again whenever the model's weights change (their versions) or move (parameters the
        model held when this encoder was made: a training step, a load, ``.to``)."""
        dtype = self.encode_dtype
        if dtype is None:
            return self.model, contextlib.nullcontext()
        weights = tuple((p.data_ptr(), p._version) for p in self._weights)
        key = (dtype, self.device, weights)
        if self._low_precision is None or self._low_precision[0] != key:
            self._low_precision = (key, low_precision_copy(self.model, dtype))
        return self._low_precision[1], torch.autocast(self.device.type, dtype=dtype)

    # ---------------------------------------------------------------- captions
    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (CPU), padded to the longest caption."""
        return tokenize(self.tokenizer, list(captions), self.model.config.max_text_len)

    @torch.inference_mode()
    def encode_tokens(self, tokens: dict[str, torch.Tensor]) -> TextFeatures:
        """Features of a :meth:`tokenize` batch, on the model's device."""
        model, context = self.encoding_model()
        with context:
            features = model.encode_text(
                tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            )
        return TextFeatures([x.float() for x in features.levels], features.mask)

    def encode_caption(self, caption: str) -> TextFeatures:
        """One query caption's features, on the model's device."""
        return self.encode_tokens(self.tokenize([caption]))

    def encode_captions(
        self, captions: Sequence[str], batch_size: int = CAPTION_BATCH, progress: bool = False
    ) -> TextFeatures:
        """Features of every caption (CPU), right-padded to the longest."""
        self.model.eval()
        parts = [
            self.encode_tokens(self.tokenize(captions[start : start + batch_size])).to("cpu")
            for start in tqdm(
                range(0, len(captions), batch_size), desc="captions", disable=not progress
            )
        ]
        return concat_text_features(parts)

    # ---------------------------------------------------------------- images
    def image_loader(
        self,
        paths: Sequence,
        batch_size: int = IMAGE_BATCH,
        num_workers: int = 0,
        skip_bad: bool = False,
    ) -> DataLoader:
        """Batches of preprocessed images of ``paths`` (:class:`~hat.data.loader.Batch`); with
        ``skip_bad`` unreadable ones are left out of their batch instead of raising."""
        return DataLoader(
            ImageDataset(paths, self.transform, skip_bad=skip_bad),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate_images,
        )

    def side_thread(self) -> Executor | None:
        """Where the concept level's teacher runs beside the backbone: a thread of this encoder's
        own where the model has one and PyTorch gets fewer threads than this process has cores
        (the app's model calls: one each on two), else None (all of them busy already)."""
        if self.model.concepts is None or self.device.type != "cpu":
            return None
        if torch.get_num_threads() >= usable_cores():
            return None
        with self._side_lock:
            if self._side is None:
                self._side = ThreadPoolExecutor(1, thread_name_prefix="hat-concepts")
        return self._side

    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """Features of preprocessed images, on the model's device."""
        model, context = self.encoding_model()
        with context:
            features = model.encode_image(pixel_values.to(self.device), self.side_thread())
        return ImageFeatures([x.float() for x in features.levels])

    def encode_image(self, image: str | Path | Image.Image) -> ImageFeatures:
        """One query image's features (a path or a PIL image), on the model's device."""
        image = image if isinstance(image, Image.Image) else load_image(image)
        return self.encode_pixels(self.transform(image)[None])

    def encode_images(
        self,
        paths: Sequence,
        batch_size: int = IMAGE_BATCH,
        num_workers: int = 0,
        progress: bool = False,
    ) -> ImageFeatures:
        """Features of every image (CPU); an unreadable image raises
        :class:`~hat.data.images.ImageLoadError`."""
        self.model.eval()
        loader = self.image_loader(paths, batch_size, num_workers)
        parts = [
            self.encode_pixels(batch.pixel_values).to("cpu")
            for batch in tqdm(loader, desc="images", disable=not progress)
        ]
        if not parts:
            raise ValueError("no images to encode")
        levels = [torch.cat([p.levels[i] for p in parts]) for i in range(len(parts[0].levels))]
        return ImageFeatures(levels)
