"""Depthwise convolutions that train on the CPU: float32, channels-last, and a faster weight gradient.

PyTorch's CPU kernels for a depthwise convolution's backward pass are slow in the cases EfficientNet-Lite's
tail trains, and `for_training` works around both while `fit` runs:

- **Layout and precision.** The weight gradient of the 5x5 depthwise convolution of 1,152 channels on 4x4
  outputs, 64 images, took 51 ms in bfloat16 and 36 ms in float32 in the default layout, against 14 ms in
  float32 channels-last (AMD EPYC, 2026-11-29 01:30 UTC). The modules run in float32 and channels-last, with
  autocast off: exact where bfloat16 rounded.
- **Kernels larger than 3x3.** oneDNN's weight gradient for that 5x5 convolution still took 18-19 ms in float32
  channels-last, against 0.7 ms for the 3x3 depthwise convolution of the same 1,152 channels on the same 4x4
  outputs (Intel Xeon with AMX, 02:58 UTC). A KxK kernel's gradient is made of 3x3 tiles instead: each tile
  is the gradient of a 3x3 depthwise convolution over the input shifted to the tile's corner (four tiles
  cover 5x5), and each goes through the fast kernel: 10.7 ms against 21.2 ms in the same run, and a training
  step of the tail 0.90x of PyTorch's own path (steps alternating in one process, 03:14 UTC). The input
  gradient and the forward pass are PyTorch's own. `DepthwiseConv` is that autograd function; the call to
  `torch.conv2d` with its own weight of a module whose kernel is larger than 3x3 is routed to it while the
  module runs (`_RouteToDepthwise`), so any `nn.Conv2d` subclass works, whatever padding it applies first.

Both are undone when `for_training` exits, before the model is saved or exported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

TILE = 3
"""Side of the kernels whose weight gradient oneDNN computes fast; larger kernels are tiled by these."""


def tile_offsets(kernel: int) -> list[int]:
    """Where the 3x3 tiles that cover one side of a `kernel`-wide kernel start (overlapping where they must)."""
    return sorted(set(range(0, kernel - TILE + 1, 2)) | {kernel - TILE})


def _weight_grad(grad: torch.Tensor, x: torch.Tensor, shape: Sequence[int], stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """The weight gradient of a depthwise convolution (dilation 1) of `x` whose output gradient is `grad`."""
    channels, _, kh, kw = shape

    def via_onednn(inputs: torch.Tensor, like: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
        return torch.ops.aten.convolution_backward(
            grad, inputs, like, None, list(stride), list(pad), [1, 1], False, [0, 0], channels, [False, True, False],
        )[1]

    if kh <= TILE and kw <= TILE:
        return via_onednn(x, x.new_empty(shape), padding)
    if padding != (0, 0):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    out_h, out_w = grad.shape[-2:]
    tile = x.new_empty((channels, 1, TILE, TILE)).contiguous(memory_format=torch.channels_last)
    weight_grad = x.new_empty(tuple(shape))
    for row in tile_offsets(kh):
        for col in tile_offsets(kw):
            # the input that tap (row + i, col + j) of every output sees, for i, j < 3
            window = x[:, :, row : row + stride[0] * (out_h - 1) + TILE, col : col + stride[1] * (out_w - 1) + TILE]
            weight_grad[:, :, row : row + TILE, col : col + TILE] = via_onednn(window.contiguous(memory_format=torch.channels_last), tile, (0, 0))
    return weight_grad


class DepthwiseConv(torch.autograd.Function):
    """`F.conv2d(x, weight, bias, stride, padding, groups=channels)` whose weight gradient is computed in 3x3 tiles."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:  # noqa: ANN001, D102
        x = x.contiguous(memory_format=torch.channels_last)  # the tiles' windows are then copied without a transpose
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001, D102
        x, weight = ctx.saved_tensors
        stride, padding, has_bias = ctx.geometry
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], weight.shape[0], [True, False, False],
            )[0]
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(grad, x, weight.shape, stride, padding)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


class _RouteToDepthwise(TorchFunctionMode):
    """While a depthwise module with a kernel larger than 3x3 runs (`_float32_channels_last` enters it only for
    those): its `torch.conv2d` call goes to `DepthwiseConv` (other calls are untouched, and so is a call this
    function does not cover: string padding, dilation)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is torch.conv2d:
            call = {**dict(zip(_CONV2D_ARGS, args, strict=False)), **kwargs}
            padding = call.get("padding", 0)
            if call.get("weight") is self.weight and not isinstance(padding, str) and _pair(call.get("dilation", 1)) == (1, 1):
                return DepthwiseConv.apply(call["input"], self.weight, call.get("bias"), _pair(call.get("stride", 1)), _pair(padding))
        return func(*args, **kwargs)


def is_trained_depthwise(module: nn.Module) -> bool:
    """A depthwise `nn.Conv2d` (one group per channel) whose weight trains."""
    return (isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels == module.out_channels
            and module.weight.requires_grad)


def _float32_channels_last(module: nn.Conv2d, forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    tiled = max(module.kernel_size) > TILE  # a 3x3 kernel's gradient is fast already: its calls are not intercepted

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False), _RouteToDepthwise(module.weight) if tiled else nullcontext():
            return forward(x.float().contiguous(memory_format=torch.channels_last))

    return run


@contextmanager
def for_training(model: nn.Module, device: str) -> Iterator[None]:
    """On the CPU, the depthwise convolutions of `model` that train run as the module docstring says, until exit."""
    if device != "cpu":
        yield
        return
    patched = [module for module in model.modules() if is_trained_depthwise(module)]
    with torch.no_grad():
        for module in patched:
            module.forward = _float32_channels_last(module, module.forward)
            module.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        with torch.no_grad():
            for module in patched:
                del module.forward
                module.to(memory_format=torch.contiguous_format)
