"""A backbone cut in two where its frozen blocks end: the trunk (fixed) and the tail (trained).

Fine-tuning the last `train.unfreeze` blocks leaves the stem and the blocks before them frozen and
in eval mode: without augmentation they compute the same output for an image in every epoch. Cut
there, the trunk can run once per image (`components.train.trunk` caches its output) and each epoch
runs only the tail: the unfrozen blocks and whatever follows them (head convolution, pooling).

`split_backbone` knows the forward pass of the architectures whose blocks `unfreeze.trunk_blocks`
tells apart and whose forward is a plain chain of them: EfficientNet-Lite, ResNet, RegNet, and
torchvision's MobileNet, EfficientNet and ConvNeXt. It checks every cut it makes: the tail of the
trunk must compute what the whole backbone computes, on a probe batch, or it refuses. Other
architectures (timm's, ViT, custom) are refused with the reason, and training runs through the
whole backbone as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from components.backbones.unfreeze import trunk_blocks
from components.core.errors import ModelError

Step = Callable[[torch.Tensor], torch.Tensor]


class Chain(nn.Module):
    """Steps applied in order; `owners` registers the modules they use, so `parameters()` and modes follow them."""

    def __init__(self, steps: Sequence[Step], owners: Sequence[nn.Module]) -> None:
        super().__init__()
        self.steps = list(steps)
        self.owners = nn.ModuleList(owners)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step(x)
        return x


@dataclass(frozen=True)
class TrunkSplit:
    """The backbone as trunk then tail; `tail(trunk(x)) == backbone(x)` (checked when split)."""

    trunk: Chain
    """The stem and the frozen blocks: normalised images -> the tensor the first unfrozen block reads."""
    tail: Chain
    """The unfrozen blocks and what follows them -> pooled features."""
    frozen_blocks: int
    """Blocks in the trunk, the stem counted as one (as `train.unfreeze` counts them)."""


@dataclass(frozen=True)
class _Layout:
    """A backbone's forward pass as a stem, its blocks (as `trunk_blocks` lists them) and a finish."""

    stem: list[Step]
    stem_owners: list[nn.Module]
    blocks: list[Step]
    block_owners: list[nn.Module]
    finish: list[Step]
    finish_owners: list[nn.Module]


def _lite(net: nn.Module) -> _Layout:
    """EfficientNet-Lite (`efficientnet_lite_pytorch`, wrapped by the zoo): its `extract_features`, then the mean."""
    rate = net._global_params.drop_connect_rate
    count = len(net._blocks)

    def mbconv(block: nn.Module, index: int) -> Step:
        # the library scales drop connect by the block's index, as extract_features does
        return lambda x: block(x, drop_connect_rate=rate * index / count if rate else rate)

    return _Layout(
        stem=[lambda x: net._swish(net._bn0(net._conv_stem(x)))],
        stem_owners=[net._conv_stem, net._bn0],
        blocks=[*(mbconv(block, i) for i, block in enumerate(net._blocks)), lambda x: net._swish(net._bn1(net._conv_head(x)))],
        block_owners=[*net._blocks, nn.ModuleList([net._conv_head, net._bn1])],
        finish=[lambda x: x.mean(dim=(2, 3))],
        finish_owners=[],
    )


def _resnet(net: nn.Module) -> _Layout:
    layers = [net.layer1, net.layer2, net.layer3, net.layer4]
    return _Layout(
        stem=[net.conv1, net.bn1, net.relu, net.maxpool], stem_owners=[net.conv1, net.bn1],
        blocks=list(layers), block_owners=list(layers),
        finish=[net.avgpool, lambda x: torch.flatten(x, 1), net.fc], finish_owners=[net.fc],
    )


def _regnet(net: nn.Module) -> _Layout:
    stages = list(net.trunk_output.children())
    return _Layout(
        stem=[net.stem], stem_owners=[net.stem], blocks=list(stages), block_owners=list(stages),
        finish=[net.avgpool, lambda x: x.flatten(start_dim=1), net.fc], finish_owners=[net.fc],
    )


def _features_net(net: nn.Module) -> _Layout:
    """torchvision's MobileNet v2/v3, EfficientNet and ConvNeXt: `features`, pooling, `classifier`."""
    from torchvision.models import ConvNeXt, MobileNetV2

    stages = list(net.features.children())
    if isinstance(net, ConvNeXt):
        finish: list[Step] = [net.avgpool, net.classifier]
    elif isinstance(net, MobileNetV2):
        finish = [lambda x: nn.functional.adaptive_avg_pool2d(x, (1, 1)), lambda x: torch.flatten(x, 1), net.classifier]
    else:
        finish = [net.avgpool, lambda x: torch.flatten(x, 1), net.classifier]
    return _Layout(
        stem=[stages[0]], stem_owners=[stages[0]], blocks=stages[1:], block_owners=stages[1:],
        finish=finish, finish_owners=[net.classifier],
    )


def _layout(backbone: nn.Module) -> _Layout:
    """Raises ModelError: no known chain of blocks (the message names the architecture)."""
    name = type(backbone).__name__
    if hasattr(backbone, "group_matcher") and hasattr(backbone, "pretrained_cfg"):
        raise ModelError(f"{name} is a timm model, whose forward Graft does not cut between blocks")
    net = getattr(backbone, "net", None)
    if net is not None and hasattr(net, "_blocks"):
        return _lite(net)
    if hasattr(backbone, "layer4"):
        return _resnet(backbone)
    if hasattr(backbone, "trunk_output"):
        return _regnet(backbone)
    if isinstance(getattr(backbone, "features", None), nn.Sequential) and hasattr(backbone, "classifier"):
        return _features_net(backbone)
    raise ModelError(f"{name} has no forward Graft knows how to cut between blocks")


def split_backbone(backbone: nn.Module, frozen: int, image_size: int) -> TrunkSplit:
    """Cut `backbone` after its first `frozen` blocks (the stem counted as one, as `select_trainable` counts).

    Raises:
        ModelError: nothing is frozen, the architecture cannot be cut, or the cut does not reproduce the
            backbone on a probe batch; the message says which.
    """
    if frozen < 1:
        raise ModelError("train.unfreeze leaves no block frozen, so there is no fixed part to compute once")
    layout = _layout(backbone)
    if [_identity(m) for m in layout.block_owners] != [_identity(m) for m in trunk_blocks(backbone)]:
        raise ModelError(f"{type(backbone).__name__}'s blocks are not the chain its forward runs")
    if frozen > len(layout.block_owners):
        raise ModelError(f"{type(backbone).__name__} has {len(layout.block_owners) + 1} blocks: freezing {frozen} leaves nothing to train")
    cut = frozen - 1  # the stem is the first frozen block
    split = TrunkSplit(
        trunk=Chain(layout.stem + layout.blocks[:cut], layout.stem_owners + layout.block_owners[:cut]),
        tail=Chain(layout.blocks[cut:] + layout.finish, layout.block_owners[cut:] + layout.finish_owners),
        frozen_blocks=frozen,
    )
    _check(backbone, split, image_size)
    return split


def _identity(module: nn.Module) -> tuple[int, ...]:
    """A block by the modules it is (a ModuleList groups several, and is built anew on each call)."""
    return tuple(id(m) for m in module) if isinstance(module, nn.ModuleList) else (id(module),)


@torch.no_grad()
def _check(backbone: nn.Module, split: TrunkSplit, image_size: int) -> None:
    """The tail of the trunk must compute the backbone (in eval mode, on two seeded probe images)."""
    modes = {module: module.training for module in backbone.modules()}
    backbone.eval()
    try:
        probe = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        whole, cut = backbone(probe), split.tail(split.trunk(probe))
    finally:
        for module, training in modes.items():
            module.train(training)
    if whole.shape != cut.shape or not torch.allclose(whole, cut, rtol=1e-4, atol=1e-4 * float(whole.abs().max())):
        raise ModelError(f"{type(backbone).__name__} cut after {split.frozen_blocks} blocks does not reproduce its own forward")
