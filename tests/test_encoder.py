"""The Encoder: batched, single-query and direct model encodings agree, wherever they run."""

import copy
import dataclasses

import pytest
import torch
from PIL import Image
from timm.layers import LayerScale
from torch import nn

from hat import create_model
from hat.data.images import ImageLoadError
from hat.encoder import Encoder, PackedLinear, PackedPatches, low_precision_copy
from hat.runtime import ENCODE_PRECISION_ENV, cpu_has_amx, encode_dtype
from hat.tokenization import tokenize
from hat.train import load_config

CAPTIONS = ["a red circle", "two blue squares on the left of a green triangle", "a star"]


def write_images(folder, count=3):
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.new("RGB", (70 + 10 * i, 64), (40 * i, 100, 200 - 30 * i)).save(path)
        paths.append(path)
    return paths


@torch.no_grad()
def test_captions_in_batches_equal_the_model_on_one_batch(tiny_model):
    model, tokenizer = tiny_model
    encoder = Encoder(model, tokenizer)
    batched = encoder.encode_captions(CAPTIONS * 2, batch_size=4)
    direct = model.encode_text(**tokenize(tokenizer, CAPTIONS * 2, model.config.max_text_len))
    assert torch.equal(batched.mask, direct.mask) and batched.levels[0].device.type == "cpu"
    for a, b in zip(batched.levels, direct.levels, strict=True):
        torch.testing.assert_close(a, b)
    one = encoder.encode_caption(CAPTIONS[1])
    torch.testing.assert_close(one.levels[-1], direct[1:2].levels[-1])


@torch.no_grad()
def test_images_from_paths_and_pictures_agree(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    encoder = Encoder(model, tokenizer)
    paths = write_images(tmp_path)
    batched = encoder.encode_images(paths, batch_size=2)
    assert len(batched) == 3
    with Image.open(paths[2]) as picture:
        single = encoder.encode_image(picture.convert("RGB"))
    pixels = torch.stack([encoder.transform(Image.open(p).convert("RGB")) for p in paths])
    direct = model.encode_image(pixels)
    for a, b, c in zip(batched.levels, direct.levels, single.levels, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(c, b[2:])
    torch.testing.assert_close(encoder.encode_image(paths[2]).levels[0], single.levels[0])


def test_batches_evaluate_a_model_left_in_training_mode(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    encoder = Encoder(model, tokenizer)
    model.train()
    encoder.encode_captions(CAPTIONS)
    assert not model.training
    model.train()
    encoder.encode_images(write_images(tmp_path, 1))
    assert not model.training


def test_unreadable_and_missing_images(tiny_model, tmp_path):
    encoder = Encoder(*tiny_model)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError):
        encoder.encode_images([bad])
    with pytest.raises(ValueError, match="no images"):
        encoder.encode_images([])
    loader = encoder.image_loader([bad, *write_images(tmp_path, 1)], skip_bad=True)
    (batch,) = list(loader)
    assert batch.skipped == 1 and batch.image_index.tolist() == [1]


def test_from_pretrained_binds_the_checkpoints_tokenizer(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    folder = model.save_pretrained(tmp_path / "ckpt", tokenizer)
    encoder = Encoder.from_pretrained(folder)
    assert not encoder.model.training and encoder.device.type == "cpu"
    assert encoder.tokenize(["a star"])["input_ids"].tolist() == (
        tokenize(tokenizer, ["a star"], model.config.max_text_len)["input_ids"].tolist()
    )
    again = Encoder(model, tokenizer).encode_caption("a star")
    torch.testing.assert_close(encoder.encode_caption("a star").levels[0], again.levels[0])


def test_the_encode_precision_is_bf16_only_where_amx_runs_it(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert encode_dtype(cpu, "fp32") is None and encode_dtype(cpu, "bf16") is torch.bfloat16
    assert encode_dtype(cpu, "auto") is (torch.bfloat16 if cpu_has_amx() else None)
    assert encode_dtype(cuda, "auto") is None
    monkeypatch.setenv(ENCODE_PRECISION_ENV, "bf16")
    assert encode_dtype(cpu) is torch.bfloat16 and encode_dtype(cpu, "fp32") is None
    monkeypatch.setenv(ENCODE_PRECISION_ENV, "auto")
    assert encode_dtype(cpu) is encode_dtype(cpu, "auto")
    with pytest.raises(ValueError, match="precision"):
        encode_dtype(cpu, "int4")


@torch.no_grad()
def test_bf16_encodings_are_fp32_tensors_close_to_fp32s(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    exact, fast = Encoder(model, tokenizer, "fp32"), Encoder(model, tokenizer, "bf16")
    paths = write_images(tmp_path)
    for a, b in (
        (exact.encode_captions(CAPTIONS), fast.encode_captions(CAPTIONS)),
        (exact.encode_images(paths), fast.encode_images(paths)),
    ):
        for x, y in zip(a.levels, b.levels, strict=True):
            assert y.dtype == torch.float32 and not torch.equal(x, y)  # bf16 products did run
            assert torch.nn.functional.cosine_similarity(x, y, dim=-1).min() > 0.99


@torch.no_grad()
def test_bf16_encoding_holds_a_bf16_copy_that_follows_the_models_weights(tiny_model):
    model, tokenizer = tiny_model
    encoder = Encoder(model, tokenizer, "bf16")
    before = encoder.encode_captions(CAPTIONS).levels[-1]
    copy, _ = encoder.encoding_model()
    assert copy is encoder.encoding_model()[0]  # made once
    layer = copy.text_proj[-1]
    assert isinstance(layer, PackedLinear) or layer.weight.dtype == torch.bfloat16
    assert model.text_proj[-1].weight.dtype == torch.float32  # the model itself is untouched
    model.text_proj[-1].weight.mul_(-1)  # as an optimiser step would: in place
    after = encoder.encode_captions(CAPTIONS).levels[-1]
    assert encoder.encoding_model()[0] is not copy
    torch.testing.assert_close(after, -before, rtol=0.05, atol=0.05)
    model.text_proj[-1].weight.mul_(-1)


@pytest.mark.skipif(not PackedLinear.supported(torch.device("cpu")), reason="no oneDNN bf16")
def test_a_packed_linear_layer_multiplies_as_a_bf16_linear_layer_under_autocast():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40)
    x = torch.randn(2, 7, 48)
    plain = copy.deepcopy(linear).to(torch.bfloat16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(x)
        got = PackedLinear(linear)(x)
    assert got.dtype == expected.dtype == torch.bfloat16 and got.shape == (2, 7, 40)
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
    assert (got == expected).float().mean() > 0.99  # the same products: bit for bit, nearly all


@pytest.mark.skipif(not PackedLinear.supported(torch.device("cpu")), reason="no oneDNN bf16")
@torch.no_grad()
def test_the_bf16_copy_takes_a_vits_gelus_and_layer_scales_into_its_linear_layers():
    """A DINOv2-style ViT (LayerScale after attention and MLP): the packed layers apply the
    GELU and the scales themselves, and the levels stay those of the fp32 model."""
    config = dataclasses.replace(
        load_config("hat-tiny"),
        image_backbone="vit_small_patch14_dinov2",
        image_levels=[0, 1, 2],
        image_size=28,
        image_backbone_kwargs={"embed_dim": 32, "depth": 3, "num_heads": 2},
    )
    torch.manual_seed(0)
    model = create_model(config)[0].eval()
    for block in model.image_tower.backbone.blocks:  # scales far from 1: dropping one would show
        block.ls1.gamma.uniform_(0.3, 3)
        block.ls2.gamma.uniform_(0.3, 3)
    low = low_precision_copy(model, torch.bfloat16)
    backbone = low.image_tower.backbone
    assert not any(isinstance(m, (LayerScale, nn.GELU)) for m in backbone.modules())
    assert all(block.mlp.fc1.activation[0] == "gelu" for block in backbone.blocks)
    assert isinstance(backbone.patch_embed.proj, PackedPatches)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        levels = low.image_tower(pixels)
    for got, want in zip(levels, model.image_tower(pixels), strict=True):
        assert torch.nn.functional.cosine_similarity(got.float(), want, dim=-1).min() > 0.999


@pytest.mark.skipif(not PackedLinear.supported(torch.device("cpu")), reason="no oneDNN bf16")
@torch.no_grad()
def test_a_patch_embedding_as_a_linear_layer_is_the_convolution():
    """Patches flattened in the weight's order, the bottom and right edges that make no whole
    patch left out, as the strided convolution does; its NCHW output shape."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 24, kernel_size=(5, 4), stride=(5, 4))
    assert PackedPatches.fits(conv) and not PackedPatches.fits(nn.Conv2d(3, 24, 5, 4))
    x = torch.randn(2, 3, 23, 18)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = PackedPatches(conv)(x)
    want = conv(x)
    assert got.shape == want.shape == (2, 24, 4, 4)
    torch.testing.assert_close(got.float(), want, rtol=0.02, atol=0.03)
