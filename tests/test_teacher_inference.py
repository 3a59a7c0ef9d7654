"""The teacher rewritten for inference gives the teacher's own outputs."""

import copy

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d, Conv2dSame

from hat.teacher_inference import PackedConvolution, inference_copy


def with_trained_norms(net: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """A copy of ``net`` whose batch norms hold statistics and affine weights far from a fresh
    network's (where folding would be nearly the identity and prove nothing)."""
    torch.manual_seed(seed)
    trained = copy.deepcopy(net)
    with torch.no_grad():
        for norm in (m for m in trained.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            norm.running_mean.normal_(0, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.2)
    return trained


@pytest.mark.parametrize("side", [64, 67])  # even sides pad "same" asymmetrically, odd ones not
def test_the_rewritten_teacher_gives_the_teachers_features(side):
    torch.manual_seed(0)
    teacher = with_trained_norms(timm.create_model("tf_efficientnet_lite0").eval())
    rewritten = inference_copy(teacher, (side, side))
    kinds = {type(m) for m in rewritten.modules()}
    assert not kinds & {BatchNormAct2d, torch.nn.BatchNorm2d, Conv2dSame, torch.nn.ReLU6}
    assert not any(p.requires_grad for p in rewritten.parameters())
    if PackedConvolution.supported(teacher.conv_stem.weight):  # every convolution prepacked
        packed = [m for m in rewritten.modules() if isinstance(m, PackedConvolution)]
        assert torch.nn.Conv2d not in kinds and len(packed) == 49
        assert sum(m.activation[0] == "hardtanh" for m in packed) == 33  # their ReLU6 taken in
    pixels = torch.randn(3, 3, side, side)
    with torch.no_grad():
        expected = teacher.forward_features(pixels)
        got = rewritten.forward_features(pixels.contiguous(memory_format=torch.channels_last))
        alone = rewritten.forward_features(
            pixels[1:2].contiguous(memory_format=torch.channels_last)
        )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(alone, expected[1:2], rtol=1e-4, atol=1e-4)  # any batch size
    assert expected.abs().mean() > 0.1  # a real signal, not all zeros
    assert teacher.conv_stem.__class__ is Conv2dSame  # the teacher itself is left as it was
