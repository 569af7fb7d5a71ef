"""A model's files: the fp32 `model.onnx` and its variants beside it, and which one to load.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from components.core.errors import GraftError
from components.core.lineage import sha256_tag
from components.runtime.providers import GPU_PROVIDERS

VARIANT_SUFFIXES: dict[str, str] = {"fp32": "", "optimized": ".optimized", "fp16": ".fp16", "int8": ".int8"}
"""Variant name -> what its file adds to the fp32 file's stem (`model.onnx` -> `model.int8.onnx`)."""


VARIANT_CHOICES = ("auto", *VARIANT_SUFFIXES)


FP32_FILE = "model.onnx"
"""The fp32 model's file name in a registered version's folder and in a bundle."""


VARIANTS_TAG = "onnx.variants"
"""Model-version tag older versions carry: JSON {variant: {file, sha256, accuracy_change, ...}} of the published
variants. Newer versions list them by their `sha256.<file>` tags (and in `registration.json`)."""


def variant_path(fp32_path: Path, variant: str) -> Path:
    """The file of `variant` beside the fp32 model file."""
    if variant not in VARIANT_SUFFIXES:
        raise GraftError(f"unknown model variant '{variant}'; choose one of {', '.join(VARIANT_CHOICES)}")
    return fp32_path.with_name(f"{fp32_path.stem}{VARIANT_SUFFIXES[variant]}{fp32_path.suffix}")


def named_variant(path: Path) -> tuple[Path, str]:
    """The fp32 file a file belongs beside, and the variant its name says it is (`model.int8.onnx`: `model.onnx`, int8)."""
    for name, suffix in VARIANT_SUFFIXES.items():
        ending = f"{suffix}{path.suffix}"
        if suffix and path.name.endswith(ending) and len(path.name) > len(ending):
            return path.with_name(path.name[: -len(ending)] + path.suffix), name
    return path, "fp32"


def variant_filename(variant: str) -> str:
    """The file name of `variant` in a registered version's folder or a bundle (`model.int8.onnx`)."""
    return variant_path(Path(FP32_FILE), variant).name


def pick_variant(requested: str, available: Sequence[str], providers: Sequence[str], skip: Sequence[str] = ()) -> str:
    """Resolve `auto` (fp16 on a GPU provider, else int8, else the optimised fp32; none of `skip`) and check availability."""
    if requested == "auto":
        preference = ("fp16", "fp32") if providers and providers[0] in GPU_PROVIDERS else ("int8", "optimized", "fp32")
        return next(name for name in preference if (name in available and name not in skip) or name == "fp32")
    if requested not in VARIANT_SUFFIXES:
        raise GraftError(f"unknown model variant '{requested}'; choose one of {', '.join(VARIANT_CHOICES)}")
    if requested not in available:
        raise GraftError(
            f"variant '{requested}' was not published for this model (available: {', '.join(available)}); "
            "a variant that lost more accuracy than deploy.max_variant_drop, or a CPU variant no faster than fp32 "
            "where it was built, is not published"
        )
    return requested


def published_variants(tags: Mapping[str, str]) -> list[str]:
    """Variant names a model version was registered with (always includes fp32): each file registration uploaded has
    its `sha256.<file>` tag; versions registered before those tags list them in `onnx.variants`."""
    recorded = [name for name in VARIANT_SUFFIXES if name != "fp32" and sha256_tag(variant_filename(name)) in tags]
    if recorded:
        return ["fp32", *recorded]
    try:
        listed = json.loads(tags.get(VARIANTS_TAG, "{}"))
    except ValueError:
        listed = {}
    return ["fp32", *[name for name in listed if name != "fp32" and name in VARIANT_SUFFIXES]]


def copy_variant_files(fp32_path: Path, names: Sequence[str], target_dir: Path) -> list[Path]:
    """Copy the fp32 file and the named variants beside it into `target_dir`, keeping their names."""
    target_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ("fp32", *[n for n in names if n != "fp32"]):
        source = variant_path(fp32_path, name)
        copied.append(Path(shutil.copyfile(source, target_dir / source.name)))
    return copied
