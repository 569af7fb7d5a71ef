"""timm's pre-trained backbones as Graft candidates, named as timm names them.

`timm/convnext_tiny.fb_in22k` is timm's `convnext_tiny` with its `fb_in22k`
weights; `timm/convnext_tiny` takes timm's default weights for that
architecture, and `timm/<name>@<revision>` pins a Hub revision (a commit, tag or
branch). The pretrained config timm publishes for those weights gives the spec
its input size, mean/std, interpolation and licence. The network is built with
`num_classes=0`, so its output is the model's own pooled (pre-logits) features,
and its weights are loaded through timm's own pretrained-file mechanism
(`pretrained_cfg_overlay=dict(file=...)`) from the file the Hub cache, or
`choose.weights`, holds. `random_timm/<name>` is the same architecture randomly
initialised: the baseline.

timm is imported on first use of a `timm/` name only (importing it takes seconds).
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
from pathlib import Path

import torch
from torch import nn

from components.backbones.spec import BackboneSpec
from components.backbones.weights import HubFile, TorchHubFile, Weights
from components.core.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


TIMM_PREFIX = "timm/"


_RANDOM = "random_"


_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$")


HUB_FILES = ("model.safetensors", "pytorch_model.bin")
"""The files a timm repository on the Hub holds its weights in, preferred first."""


def is_timm_name(name: str) -> bool:
    """True for `timm/<name>` and its random twin `random_timm/<name>`."""
    return name.removeprefix(_RANDOM).startswith(TIMM_PREFIX)


def timm_names_hint() -> str:
    """How to name a timm backbone, for error messages."""
    return (
        "timm/<name> for any of timm's pre-trained weights, e.g. timm/convnext_tiny.fb_in22k "
        "(list them with: python -c \"import timm; print(timm.list_pretrained('convnext*'))\")"
    )


def _split(name: str) -> tuple[str, str | None]:
    """'random_timm/convnext_tiny.fb_in22k@abc' -> ('convnext_tiny.fb_in22k', 'abc')."""
    model, _, revision = name.removeprefix(_RANDOM).removeprefix(TIMM_PREFIX).partition("@")
    if revision and not _REVISION.match(revision):
        raise ConfigError(f"'{name}': '{revision}' is not a Hub revision; give a commit hash, tag or branch after '@'")
    return model, revision or None


def _pretrained_cfg(name: str, model: str):  # noqa: ANN202 - timm's PretrainedCfg
    """timm's pretrained config for `model` (its default weights when no tag is given).

    Raises:
        ConfigError: timm knows no such weights; the message gives the closest names.
    """
    import timm
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model)
    except RuntimeError:  # a known architecture with an unknown tag
        cfg = None
    if cfg is None or not cfg.has_weights:
        arch = model.split(".", 1)[0]
        tagged = timm.list_pretrained(f"{arch}.*")
        close = tagged or difflib.get_close_matches(model, timm.list_pretrained(), n=3, cutoff=0.7)
        hint = f" Did you mean {', '.join(TIMM_PREFIX + n for n in close[:6])}?" if close else ""
        raise ConfigError(f"timm has no pre-trained weights named '{model}' (from '{name}').{hint} Use {timm_names_hint()}")
    return cfg


def _weights(cfg, full: str, revision: str | None, name: str) -> Weights:  # noqa: ANN001 - timm's PretrainedCfg
    if cfg.hf_hub_id:
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILES
        return HubFile(repo_id=cfg.hf_hub_id.split("@", 1)[0], file_names=files, pinned=revision, candidate=name)
    if revision:
        raise ConfigError(f"timm/{full} is not on the Hugging Face Hub, so it has no revision to pin; drop '@{revision}'")
    return TorchHubFile(label=f"timm {full}", address=cfg.url)


def _params_m(full: str) -> float | None:
    """Parameters of the feature extractor in millions, counted on the meta device (no memory, no weights)."""
    import timm

    try:
        with torch.device("meta"):
            net = timm.create_model(full, pretrained=False, num_classes=0)
    except Exception:  # noqa: BLE001 - some constructors need real tensors; the count then waits for the build
        return None
    return round(sum(p.numel() for p in net.parameters()) / 1e6, 3)


@functools.cache
def timm_spec(name: str) -> BackboneSpec:
    """The spec of `timm/<name>` (or its random twin) from timm's own pretrained config.

    Raises:
        ConfigError: timm has no such pre-trained weights, or the revision is malformed.
    """
    pretrained = not name.startswith(_RANDOM)
    model, revision = _split(name)
    cfg = _pretrained_cfg(name, model)
    full = f"{cfg.architecture}.{cfg.tag}"
    if full != model:
        log.info("%s: timm's default weights for %s are %s", name, model, full)
    return BackboneSpec(
        name=name,
        family="timm",
        input_size=int(cfg.input_size[-1]),
        mean=tuple(float(m) for m in cfg.mean),
        std=tuple(float(s) for s in cfg.std),
        params_m=_params_m(full),
        gflops=None,
        imagenet_top1=None,
        licence=cfg.license or "not stated by timm (see the model's page on the Hub)",
        pretrained=pretrained,
        fixed_size=bool(cfg.fixed_input_size),
        interpolation=cfg.interpolation,
        architecture=full,
        weights=_weights(cfg, full, revision, name) if pretrained else None,
        _builder=_build_timm,
    )


def _file_keys(path: Path) -> set[str]:
    """Tensor names in a weights file, as timm reads it (safetensors: the header only)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as stored:
            return set(stored.keys())
    from timm.models import load_state_dict

    return set(load_state_dict(str(path)))


def _build_timm(spec: BackboneSpec, image_size: int) -> nn.Module:
    """timm's network without its classifier; pre-trained weights through timm's pretrained-file loader."""
    import timm

    path = spec.weights_path()
    if path is None:
        return timm.create_model(spec.architecture, pretrained=False, num_classes=0)
    try:
        net = timm.create_model(
            spec.architecture, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)}
        )
        stored = _file_keys(path)
    except Exception as exc:  # noqa: BLE001 - torch, safetensors and timm raise many types for an unfit file
        raise ModelError(
            f"{spec.name}: cannot load weights file {path} into timm's {spec.architecture} "
            f"({exc.__class__.__name__}: {str(exc)[:300]}); is it the file for this backbone?"
        ) from exc
    # timm loads non-strictly once the classifier is dropped, so a file for another network
    # would leave layers at their random start without a word: check the names here.
    missing = sorted(set(net.state_dict()) - stored)
    if missing:
        raise ModelError(
            f"{spec.name}: weights file {path} does not fit timm's {spec.architecture} (missing {missing[:5]}, "
            f"{len(missing)} in all); is it the file for this backbone?"
        )
    return net
