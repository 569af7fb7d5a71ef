"""Typed view of `params.yaml`: one section per stage, unknown keys rejected.

Every path Graft reads or writes is declared once here; other modules take it
from the parsed `Params`, never from a literal of their own.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from components.errors import ConfigError

SECTIONS = ("data", "choose", "train", "evaluate", "deploy", "tracking")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Where the images are and how they are split."""

    dir: Path = Path("data")
    """Image folder: `<class>/*`, or `train/<class>/*` and `val/<class>/*`."""
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of each class held out for validation when the folder is not pre-split."""
    seed: int = 42
    """Seed of the stratified split."""
    image_size: int | None = Field(112, ge=32, le=1024)
    """Side in pixels every image is resized to; null uses each backbone's own input size."""
    cache_dir: Path = Path(".cache/graft")
    """Feature cache and other derived data that can be rebuilt at any time."""


class ChooseConfig(_Section):
    """Which backbones compete and how they are scored."""

    candidates: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1", "random_efficientnet_lite0")
    sample_size: int = Field(400, ge=4)
    """Images drawn (stratified) from the training split to score candidates on."""
    score: Literal["logme", "probe"] = "logme"
    """Ranking score: LogME evidence, or held-out linear-probe accuracy."""
    allow_baseline: bool = False
    """Let a randomly initialised baseline be chosen; by default it is ranked as a reference only."""
    max_params_m: float | None = Field(None, gt=0)
    """Largest backbone allowed, in millions of parameters; null for no limit."""
    batch_size: int = Field(64, ge=1)

    @field_validator("candidates")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("list at least one backbone, e.g. [efficientnet_lite0]")
        return value


class TrainConfig(_Section):
    """How the chosen backbone is adapted."""

    strategy: Literal["feature_extraction"] = "feature_extraction"
    epochs: int = Field(200, ge=1)
    patience: int = Field(5, ge=1)
    """Epochs without a better validation loss before training stops."""
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(64, ge=1)
    seed: int = 42


class EvaluateConfig(_Section):
    """What the validation report contains."""

    top_k: int = Field(3, ge=1)
    metric: Literal["accuracy", "macro_f1"] = "accuracy"
    """Metric the champion gate compares."""


class DeployConfig(_Section):
    """Export, parity gate and registration."""

    model_name: str = Field("graft-classifier", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    opset: int = Field(18, ge=17, le=23)
    parity_atol: float = Field(1e-4, gt=0)
    """Largest allowed |p_onnx - p_torch| on the validation images."""
    parity_images: int = Field(64, ge=1)
    min_improvement: float = Field(0.0, ge=0.0, le=1.0)
    """The challenger must beat the champion by more than this on `evaluate.metric`."""
    output_dir: Path = Path("outputs")
    """Run folders, the latest `metrics.json` and plots for DVC."""


class TrackingConfig(_Section):
    """Where MLflow keeps runs and models when MLFLOW_TRACKING_URI is not set."""

    store_dir: Path = Path("mlflow")
    experiment: str = Field("graft", min_length=1)


class Params(_Section):
    """All of `params.yaml`."""

    data: DataConfig = DataConfig()
    choose: ChooseConfig = ChooseConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    deploy: DeployConfig = DeployConfig()
    tracking: TrackingConfig = TrackingConfig()

    def resolve_paths(self, root: Path) -> Params:
        """Return a copy whose relative paths are anchored at `root` (the params file's folder)."""

        def anchor(path: Path) -> Path:
            return path if path.is_absolute() else (root / path).resolve()

        return self.model_copy(
            update={
                "data": self.data.model_copy(
                    update={"dir": anchor(self.data.dir), "cache_dir": anchor(self.data.cache_dir)}
                ),
                "deploy": self.deploy.model_copy(update={"output_dir": anchor(self.deploy.output_dir)}),
                "tracking": self.tracking.model_copy(update={"store_dir": anchor(self.tracking.store_dir)}),
            }
        )


def valid_keys(model: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    """Every dotted key `--set` accepts, e.g. `train.lr`."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(valid_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key_error(key: str, where: str) -> ConfigError:
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown key '{key}' in {where}.{hint} Valid keys: {', '.join(keys)}")


def _check_known(raw: dict[str, Any], where: str, model: type[BaseModel] = Params, prefix: str = "") -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'params'}' in {where} must be a mapping, got {raw!r}")
    for key, value in raw.items():
        field = model.model_fields.get(key)
        if field is None:
            raise _unknown_key_error(f"{prefix}{key}", where)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and value is not None:
            _check_known(value, where, annotation, f"{prefix}{key}.")


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.key=value`; the value is read as YAML (`0.1`, `null`, `[a, b]`)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set '{text}' is not of the form section.key=value, e.g. --set train.lr=0.01")
    key = key.strip()
    if key not in valid_keys():
        raise _unknown_key_error(key, "--set")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot read '{value}' as a value ({exc.__class__.__name__})") from exc


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def load_params(path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read `params.yaml` (or defaults), apply `--set` overrides, validate, anchor paths.

    Args:
        path: The params file; None uses built-in defaults anchored at the working directory.
        overrides: `section.key=value` strings, applied in order.

    Raises:
        ConfigError: naming every bad key and what it accepts.
    """
    raw: dict[str, Any] = {}
    root = Path.cwd()
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"params file '{path}' not found: pass --params PATH to an existing params.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        _check_known(raw, str(path))
        root = path.resolve().parent
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        target = raw.setdefault(section, {})
        if target is None:
            target = raw[section] = {}
        target[name] = value
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise ConfigError(f"invalid parameters: {problems}") from exc
    return params.resolve_paths(root)
