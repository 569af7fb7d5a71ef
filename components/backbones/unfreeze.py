"""Which parts of a backbone train: its blocks, counted from the output end.

A backbone is seen as a stem (whatever comes before the first block: the
first convolution, ViT's patch embedding and position table) followed by its
blocks. `unfreeze: N` trains the last N of these (the stem counts as one), and
`all` trains everything. Frozen parts get `requires_grad=False` and stay in
eval mode, so neither their weights nor their BatchNorm statistics change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import nn

from components.core.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from components.backbones.spec import BackboneSpec


def trunk_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's blocks in input-to-output order, stem excluded.

    Raises:
        ModelError: the architecture has no known block structure.
    """
    if hasattr(backbone, "group_matcher") and hasattr(backbone, "pretrained_cfg"):  # timm (components.backbones.timm_models)
        return timm_blocks(backbone)
    net = getattr(backbone, "net", None)
    if net is not None and hasattr(net, "_blocks"):  # EfficientNet-Lite (components.backbones.zoo)
        return [*net._blocks, nn.ModuleList([net._conv_head, net._bn1])]
    if hasattr(backbone, "layer4"):  # ResNet
        return [backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
    if hasattr(backbone, "trunk_output"):  # RegNet
        return list(backbone.trunk_output.children())
    if hasattr(backbone, "encoder") and hasattr(backbone.encoder, "layers"):  # ViT
        return [*backbone.encoder.layers.children(), backbone.encoder.ln]
    features = getattr(backbone, "features", None)
    if isinstance(features, nn.Sequential):  # MobileNet, EfficientNet-B, ConvNeXt
        return list(features.children())[1:]
    raise ModelError(
        f"cannot tell the blocks of {type(backbone).__name__} apart, so train.unfreeze cannot pick some; "
        "use --set train.unfreeze=all or train.strategy=feature_extraction"
    )


def timm_blocks(backbone: nn.Module) -> list[nn.Module]:
    """A timm model's blocks as timm itself groups them (`group_matcher(coarse=True)`, the groups of its
    layer-wise learning-rate decay): the first group is the stem; a last group of normalisation layers only
    (ConvNeXt's `head.norm`, ViT's `fc_norm`) goes with the block before it."""
    from timm.models import group_modules

    groups = [names for _, names in sorted(group_modules(backbone, backbone.group_matcher(coarse=True)).items())]
    blocks = [_group_module(backbone, names) for names in groups[1:]]
    if len(blocks) > 1 and all(_is_norm(module) for module in blocks[-1].modules() if not list(module.children())):
        blocks[-2:] = [nn.ModuleList([blocks[-2], blocks[-1]])]
    return blocks


def _group_module(backbone: nn.Module, names: list[str]) -> nn.Module:
    """The one submodule holding exactly these layers (`stages.2`, so its dropout follows train mode too), else a list of them."""
    prefix = os.path.commonprefix([name.split(".") for name in names])
    if prefix:
        module = backbone.get_submodule(".".join(prefix))
        owners = {f"{'.'.join(prefix)}.{n}".rstrip(".") for n, m in module.named_modules() if list(m.parameters(recurse=False))}
        if owners == set(names):
            return module
    return nn.ModuleList(backbone.get_submodule(name) for name in names)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or "Norm" in type(module).__name__


def block_count(spec: BackboneSpec, image_size: int) -> int | None:
    """The blocks `train.unfreeze` counts in `spec` (the stem as one), from its architecture alone: built without
    weights on the meta device, so it costs no memory and milliseconds. None for a user's own factory (its code
    runs in the stages, not here) and for an architecture that cannot be built there or cut into blocks."""
    if spec.family.startswith("custom:"):
        return None
    try:
        return len(trunk_blocks(spec.skeleton(image_size))) + 1
    except Exception:  # noqa: BLE001 - some constructors need real tensors; the stage then checks the built network
        return None


@dataclass(frozen=True)
class Trainable:
    """What `unfreeze` selected: the modules that train and a count for the log."""

    modules: tuple[nn.Module, ...]
    blocks: int
    total_blocks: int
    parameters: int


def select_trainable(backbone: nn.Module, unfreeze: int | Literal["all"], name: str | None = None) -> Trainable:
    """Freeze the whole backbone (`name`, for the error), then unfreeze its last `unfreeze` blocks.

    Raises:
        ConfigError: `unfreeze` asks for more blocks than the backbone has.
    """
    if unfreeze == "all":  # needs no blocks: a user backbone whose blocks cannot be told apart trains whole too
        try:
            total = len(trunk_blocks(backbone)) + 1
        except ModelError:
            total = 1
        backbone.requires_grad_(True)
        return Trainable((backbone,), total, total, sum(p.numel() for p in backbone.parameters()))
    blocks = trunk_blocks(backbone)
    total = len(blocks) + 1  # + the stem
    count = unfreeze
    if count > total:
        raise ConfigError(
            f"train.unfreeze={unfreeze} but {name or 'the backbone'} has {total} blocks (stem included); "
            f"use a number up to {total} or --set train.unfreeze=all"
        )
    backbone.requires_grad_(False)
    modules = (backbone,) if count == total else tuple(blocks[len(blocks) - count :])
    for module in modules:
        module.requires_grad_(True)
    parameters = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    return Trainable(modules, count, total, parameters)


def set_train_mode(backbone: nn.Module, trainable: Trainable, freeze_bn: bool) -> None:
    """Train mode for the unfrozen blocks only; BatchNorm in eval mode everywhere when `freeze_bn`."""
    backbone.eval()
    for module in trainable.modules:
        module.train()
    if freeze_bn:
        for module in backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
