"""The depthwise convolutions that train on the CPU (`components.train.depthwise`): the same gradients as
PyTorch's own, for the shapes the tiles cover and through a real backbone's modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components.backbones.unfreeze import select_trainable
from components.backbones.zoo import get_spec
from components.train.depthwise import DepthwiseConv, for_training, is_trained_depthwise, tile_offsets
from components.train.network import build_model


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "size"),
    [(5, 1, 0, 8), (5, 2, 0, 9), (5, 1, 2, 7), (7, 1, 3, 12), (4, 2, 1, 11), (3, 1, 1, 10)],
    ids=["5x5", "5x5-stride-2", "5x5-padded", "7x7", "4x4-stride-2", "3x3"],
)
def test_the_tiled_weight_gradient_equals_pytorchs(kernel, stride, padding, size):
    torch.manual_seed(0)
    channels = 6
    x = torch.randn(3, channels, size, size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(channels, 1, kernel, kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(channels, dtype=torch.float64, requires_grad=True)
    expected_out = F.conv2d(x, weight, bias, stride, padding, 1, channels)
    upstream = torch.randn_like(expected_out)
    expected = torch.autograd.grad(expected_out, (x, weight, bias), upstream)
    out = DepthwiseConv.apply(x, weight, bias, (stride, stride), (padding, padding))
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("input", "weight", "bias"), torch.autograd.grad(out, (x, weight, bias), upstream), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"{name} gradient")


def test_the_tiles_cover_every_tap_once_or_more():
    for kernel in range(3, 12):
        covered = {tap for start in tile_offsets(kernel) for tap in range(start, start + 3)}
        assert covered == set(range(kernel)), kernel


def test_a_lite_backbone_trains_with_the_same_gradients_and_is_given_back_unchanged(monkeypatch):
    """Lite's depthwise modules pad first (`Conv2dStaticSamePadding`), then call `F.conv2d`: the 5x5 ones' call is
    routed through `DepthwiseConv` while `for_training` holds, and PyTorch's gradients are matched in float32."""
    model = build_model(get_spec("efficientnet_lite0"), 112, 10, seed=0)
    select_trainable(model.backbone, 3)
    model.eval()  # no stochastic depth: two passes must see the same network
    images = torch.randint(0, 256, (4, 112, 112, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    depthwise = [m for m in model.modules() if is_trained_depthwise(m)]
    assert {m.kernel_size for m in depthwise} == {(5, 5), (3, 3)}

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(images).log().sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected = gradients()
    routed = []
    original = DepthwiseConv.apply
    monkeypatch.setattr(DepthwiseConv, "apply", lambda *args: routed.append(args[1].shape) or original(*args))
    with for_training(model, "cpu"):
        got = gradients()
    assert sorted(routed) == sorted(m.weight.shape for m in depthwise if m.kernel_size == (5, 5))  # 3x3 ones: PyTorch's own
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-6 * float(want.abs().max()), msg=name)
    # given back: the modules' own forward and layout
    assert all("forward" not in vars(m) and m.weight.is_contiguous() for m in depthwise)
    assert not any(isinstance(m, nn.Conv2d) and "forward" in vars(m) for m in model.modules())
