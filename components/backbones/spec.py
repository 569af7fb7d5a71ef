"""What Graft knows about one backbone (`BackboneSpec`), and the loading rules every builder shares.

A backbone here is a module that maps a normalised N x 3 x S x S batch to
pooled features N x D. Its weights file comes from a `Weights` source
(`components.backbones.weights`): the torch hub cache, the Hugging Face Hub
cache, a pip package or a local file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from components.backbones.weights import Download, LocalFile, Weights
from components.core.errors import ModelError

# Building seeds torch's global RNG; candidates scored in parallel threads must not interleave there.
BUILD_LOCK = threading.Lock()


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


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
    """Multiply-adds at `input_size`, in billions, as published; None when unknown (custom, timm)."""
    imagenet_top1: float | None
    licence: str
    pretrained: bool = True
    fixed_size: bool = False
    """True when the architecture only accepts `input_size` (ViT's position embeddings)."""
    interpolation: str = "bilinear"
    """The resize its authors evaluated with (timm's `interpolation`); Graft resizes every backbone's
    input bilinearly (`components.data.images`), and the model card says both."""
    architecture: str = ""
    """The library's own name for it, e.g. timm's 'convnext_tiny.fb_in22k'."""
    weights: Weights | None = field(default=None, compare=False)
    """Where the pre-trained weights come from; None for a random initialisation or a factory's own."""
    _builder: Callable[[BackboneSpec, int], nn.Module] = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    @property
    def slug(self) -> str:
        """The name as a file name: 'timm/convnext_tiny.fb_in22k' -> 'timm--convnext_tiny.fb_in22k'."""
        return self.name.replace("/", "--").replace("@", "-at-")

    @property
    def weights_source(self) -> str:
        """Where the weights come from, in words."""
        if self.weights is not None:
            return self.weights.description
        return "the factory's own" if self.pretrained else "random initialisation (seeded)"

    def code_file(self) -> Path | None:
        """The file holding a user backbone's factory (`choose.custom`): its content is part of every cache key, so
        a factory changed or fixed between two runs is built again. None for a built-in backbone (its code is the
        library's, whose version the keys name) or a factory that cannot be found (building it says why)."""
        if not self.family.startswith("custom:"):
            return None
        target = self.family.removeprefix("custom:").rpartition(":")[0]
        if target.endswith(".py"):
            path: Path | None = Path(target).expanduser().resolve()
        else:
            try:
                found = importlib.util.find_spec(target)
            except (ImportError, ValueError):
                return None
            path = Path(found.origin) if found is not None and found.origin else None
        return path if path is not None and path.is_file() else None

    def weights_path(self) -> Path | None:
        """Where this backbone's weights file is (or is expected), or None for a random initialisation."""
        return self.weights.path() if self.weights is not None else None

    def missing_weights(self) -> str | None:
        """A 'put FILE in DIR' hint when the weights file is absent, else None."""
        if self.weights is None or self.weights.path().is_file():
            return None
        if self.weights.path().is_dir():
            return f"weights not found: {self.weights.path()} is a folder; name the weights file in it"
        return f"weights not found: {self.weights.instruction()}"

    def ensure_weights(self, download: Download) -> str | None:
        """Fetch a missing weights file into its cache when `download` allows; None once it is there, else why not."""
        return self.weights.ensure(self.name, download) if self.weights is not None else None

    def provenance(self) -> dict[str, str]:
        """Source, revision, URL and sha256 of the weights used, for the model card and the version's tags."""
        if self.weights is None:
            return {"weights.source": self.weights_source}
        return self.weights.provenance()

    def resolve_size(self, requested: int | None) -> int:
        """The image side this backbone runs at, given the user's `data.image_size` (None: its own)."""
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
        with BUILD_LOCK:
            torch.manual_seed(seed)
            net = self._builder(self, image_size)
            if not self.pretrained:  # a random baseline (or a custom net declared untrained)
                settle_batchnorm(net, image_size, self.mean, self.std, seed)
            return net.eval()

    def skeleton(self, image_size: int) -> nn.Module:
        """The architecture alone, on the meta device: no weights read, no memory, milliseconds (to count its blocks).

        Raises:
            Whatever its constructor raises there (some need real tensors).
        """
        bare = dataclasses.replace(self, weights=None)
        with torch.device("meta"):
            return bare._builder(bare, image_size)

    def with_weights(self, path: Path) -> BackboneSpec:
        """This backbone, loading its weights from `path` instead of the default location."""
        return dataclasses.replace(self, pretrained=True, weights=LocalFile(Path(path), "choose.weights"))


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


def check_state_keys(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """Refuse a state dict whose keys or shapes differ from the module's, saying which.

    Raises:
        ModelError: a key is missing, unexpected, or of the wrong shape.
    """
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ModelError(
            f"{name}: weights file {path} does not fit the architecture "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}); "
            "is it the file for this backbone?"
        )


def load_state_dict_checked(module: nn.Module, path: Path, name: str, ignore: tuple[str, ...] = ()) -> None:
    """Load a weights file into `module`, explaining any key or shape mismatch."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        if isinstance(exc, IsADirectoryError):
            raise ModelError(f"{name}: {path} is a folder, not a weights file; name the .pth or .safetensors file in it") from exc
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        # a whole pickled module (`torch.save(model)`) needs code to run to be read, which Graft never does
        pickled = "WeightsUnpickler" in str(exc) or "weights_only" in str(exc)
        hint = ("it holds pickled objects, e.g. a whole model saved with torch.save(model), which Graft does not run: "
                "save model.state_dict() instead" if pickled
                else f"{first[:200]}; replace the file (a zoo backbone's: reinstall its package or download it again)")
        raise ModelError(f"{name}: cannot read weights file {path} ({hint})") from exc
    for wrapper in ("state_dict", "model_state_dict", "model"):  # a training checkpoint around the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    check_state_keys(module.state_dict(), state, path, name)
    module.load_state_dict(state)
