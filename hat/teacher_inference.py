"""The frozen teacher rewritten for inference: the same outputs, about twice as fast on a CPU core.

Eager PyTorch runs timm's EfficientNet-Lite as written: a batch norm after every convolution,
TensorFlow "same" padding as a padded copy of the input before each strided convolution, and
activations that write new tensors. For a frozen network in eval mode each of these is one more
pass over a feature map, and the teacher's maps are large. The rewrites below change no output
beyond float rounding (a test compares them), and channels-last memory is what oneDNN's
convolutions run fastest on; on a CPU each convolution's weight is laid out for oneDNN once,
not on every call, and the ReLU6 after it is applied as it writes its output.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, Conv2dSame
from timm.layers.padding import get_same_padding
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """Every convolution followed by a batch norm merged into that convolution (in eval mode a
    norm is a per-channel affine map); the norm's activation stays. In place."""
    previous_name, previous = None, None
    for name, child in list(module.named_children()):
        if isinstance(child, BatchNormAct2d) and isinstance(previous, nn.Conv2d):
            setattr(module, previous_name, fuse_conv_bn_eval(previous, child))
            setattr(module, name, nn.Sequential(child.drop, child.act))
        else:
            fold_batch_norms(child)
        previous_name, previous = name, child
    return module


def static_convolution(conv: Conv2dSame, input_size: tuple[int, int]) -> nn.Conv2d:
    """A plain convolution equal to ``conv`` ("same" padding) on inputs of ``input_size``.

    Where "same" pads ``a`` before and ``a + 1`` after, a zero tap before the kernel and ``a + 1``
    on both sides give the same sums, so the convolution pads by itself, without a copy.
    """
    padding, taps = [], []
    for size, kernel, stride, dilation in zip(
        input_size, conv.kernel_size, conv.stride, conv.dilation, strict=True
    ):
        total = get_same_padding(size, kernel, stride, dilation)
        if total % 2 and dilation != 1:
            raise ValueError("an asymmetric padding of a dilated convolution cannot be made static")
        padding.append(total // 2 + total % 2)
        taps.append(total % 2)
    weight = F.pad(conv.weight, (taps[1], 0, taps[0], 0))
    static = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        tuple(weight.shape[-2:]),
        conv.stride,
        tuple(padding),
        conv.dilation,
        conv.groups,
        bias=conv.bias is not None,
    ).to(weight)
    with torch.no_grad():
        static.weight.copy_(weight)
        if conv.bias is not None:
            static.bias.copy_(conv.bias)
    return static


def static_same_padding(net: nn.Module, input_size: tuple[int, int]) -> nn.Module:
    """Every "same"-padded convolution of ``net`` made static for inputs of ``input_size`` (each
    one's own input size is read from one forward pass). In place."""
    sizes = {}
    hooks = [
        conv.register_forward_pre_hook(lambda conv, args: sizes.__setitem__(conv, args[0].shape))
        for conv in net.modules()
        if isinstance(conv, Conv2dSame)
    ]
    with torch.no_grad():
        net.forward_features(next(net.parameters()).new_zeros(1, 3, *input_size))
    for hook in hooks:
        hook.remove()
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if child in sizes:
                setattr(parent, name, static_convolution(child, tuple(sizes[child][-2:])))
    return net


class ReLU6InPlace(nn.Module):
    """ReLU6 that overwrites its input: a convolution's fresh output is read by nothing else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_(0.0, 6.0)


def activations_in_place(module: nn.Module) -> nn.Module:
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, ReLU6InPlace())
    return module


class PackedConvolution(nn.Module):
    """An fp32 convolution whose weight oneDNN has laid out once for this CPU (``nn.Conv2d``
    hands it a plain weight, which it reorders on every call), with the ReLU6 that follows it
    applied as it writes its output instead of in one more pass. Outputs within float rounding
    of the plain convolution's (another summation order)."""

    def __init__(self, conv: nn.Conv2d, input_shape: torch.Size, relu6: bool):
        super().__init__()
        self.shape = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        weight = conv.weight.detach()
        self.weight = torch.ops.mkldnn._reorder_convolution_weight(
            weight, *self.shape, list(input_shape)
        )
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.activation = ("hardtanh", [0.0, 6.0], "") if relu6 else ("none", [], "")

    @staticmethod
    def supported(weight: torch.Tensor) -> bool:
        return (
            weight.device.type == "cpu"
            and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, *self.shape, *self.activation
        )


def packed_convolutions(net: nn.Module, input_size: tuple[int, int]) -> nn.Module:
    """Every convolution of ``net`` a :class:`PackedConvolution` for inputs of ``input_size``
    (each one's own input shape read from one forward pass), taking in the ReLU6 that follows it
    (a sibling ``Sequential`` of a folded norm: its dropout and activation). In place."""
    shapes = {}
    hooks = [
        conv.register_forward_pre_hook(lambda conv, args: shapes.__setitem__(conv, args[0].shape))
        for conv in net.modules()
        if isinstance(conv, nn.Conv2d)
    ]
    with torch.no_grad():
        inputs = next(net.parameters()).new_zeros(1, 3, *input_size)
        net.forward_features(inputs.contiguous(memory_format=torch.channels_last))
    for hook in hooks:
        hook.remove()
    for parent in list(net.modules()):
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            if child not in shapes:
                continue
            after_name, after = children[i + 1] if i + 1 < len(children) else (None, None)
            relu6 = isinstance(after, nn.Sequential) and isinstance(after[-1], ReLU6InPlace)
            relu6 = relu6 and all(isinstance(m, nn.Identity) for m in after[:-1])
            setattr(parent, name, PackedConvolution(child, shapes[child], relu6))
            if relu6:
                setattr(parent, after_name, nn.Identity())
    return net


@torch.no_grad()
def inference_copy(teacher: nn.Module, input_size: tuple[int, int]) -> nn.Module:
    """A frozen copy of ``teacher`` for inputs of ``input_size``: norms folded, padding static,
    activations in place, channels-last, and on a CPU its convolutions prepacked for oneDNN with
    their ReLU6 taken in. For inference only (it overwrites activations)."""
    net = fold_batch_norms(copy.deepcopy(teacher).eval())
    net = activations_in_place(static_same_padding(net, input_size))
    net = net.requires_grad_(False).to(memory_format=torch.channels_last)
    if PackedConvolution.supported(next(net.parameters())):
        net = packed_convolutions(net, input_size)
    return net
