"""Typed view of `params.yaml`: one section per stage, unknown keys rejected.

The folders a run reads and writes are set here (`data.dir`, `data.cache_dir`,
`deploy.output_dir`, `tracking.store_dir`); the stages name what they keep inside
them. The DVC pipeline's own files (`outputs/split.json`, `outputs/summary.json`,
`outputs/holdout/`) are named by `dvc.yaml` and the command line's defaults.
"""

from __future__ import annotations

import difflib
import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.core.errors import ConfigError
from components.core.files import user_cache_dir

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The project folder: `params.yaml`, `data.dvc`, `components/`, `flows/`."""
PARAMS_FILE = "params.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Where the images are and how they are split."""

    dir: Path = Path("data")
    """Image folder: `<class>/*`, or `train/<class>/*` and `val/<class>/*`."""
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    """Share of the images held out for validation (early stopping, temperature) when the folder is not pre-split."""
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    """Share held out for the test split (the gate, the reported metrics); 0 runs with two splits, and every
    report then says the test metrics are validation metrics."""
    seed: int = 42
    """Salt of the content-hash split: each image's part depends only on its bytes and this seed."""
    image_size: int | None = Field(112, ge=32, le=1024)
    """Side in pixels every image is resized to; null uses each backbone's own input size."""
    cache_dir: Path = Path(".cache/graft")
    """Feature cache and other derived data that can be rebuilt at any time."""

    @property
    def resume_dir(self) -> Path:
        """Training's epoch checkpoints (`train.resume`), kept until the run that wrote them registers its model."""
        return self.cache_dir / "resume"

    @model_validator(mode="after")
    def _room_for_training(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction {self.val_fraction:g} + test_fraction {self.test_fraction:g} leave no training images; "
                "keep their sum below 1, e.g. 0.15 + 0.15"
            )
        return self


class CustomBackbone(_Section):
    """A backbone of the user's own, declared in `choose.custom` without editing Graft."""

    factory: str = Field(pattern=r"^[^:]+:[A-Za-z_][A-Za-z0-9_]*$")
    """`package.module:function` or `path/to/file.py:function`; called with no arguments, it returns a
    torch module mapping a normalised N x 3 x S x S batch to pooled features N x D."""
    weights: Path | None = None
    """State-dict file loaded into the factory's module (keys and shapes checked); null keeps its own weights."""
    input_size: int = Field(224, ge=32, le=1024)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    pretrained: bool = True
    """False marks it as a baseline (ranked for reference, chosen only with allow_baseline)."""
    licence: str = "unknown"


class ChooseConfig(_Section):
    """Which backbones compete and how they are scored."""

    candidates: tuple[str, ...] = (
        "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "random_efficientnet_lite0",
    )
    sample_size: int = Field(400, ge=4)
    """Images drawn (stratified) from the training split to score candidates on."""
    score: Literal["logme", "probe"] = "logme"
    """First-round score on the sample: LogME evidence, or held-out linear-probe accuracy."""
    finalists: int = Field(3, ge=1)
    """The best eligible candidates by `score` that go on to a second round: each one's head is trained on
    the whole training split's cached features with the fine-tune stage's own feature_extraction recipe,
    and the best validation accuracy wins. 1 picks by `score` alone (no training: faster, but 1-2 points
    worse on two of the three sets of the choose benchmark, benchmarks/README.md)."""
    allow_baseline: bool = False
    """Let a randomly initialised baseline be chosen; by default it is ranked as a reference only."""
    max_params_m: float | None = Field(None, gt=0)
    """Largest backbone allowed, in millions of parameters; null for no limit."""
    max_size_mb: float | None = Field(None, gt=0)
    """Largest exported model allowed (the backbone's fp32 ONNX file), in MB; null for no limit."""
    max_latency_ms: float | None = Field(None, gt=0)
    """Slowest backbone allowed, in ms per image on onnxruntime at batch 1 and at `latency_batch_size`
    (the larger counts); null for no limit."""
    latency_batch_size: int = Field(16, ge=1)
    """The serving batch size at which latency per image is measured besides batch 1."""
    latency_runs: int = Field(20, ge=3)
    """Timed runs per batch size; the median is reported."""
    latency_cache: bool = True
    """Reuse a candidate's latency timed earlier on this machine, by any project, for the same exported graph
    (its sha256), settings and onnxruntime (kept in `~/.cache/graft/latency`: a retrain on new data or a new
    project does not time unchanged backbones again); false times every candidate on every run."""
    shared_exports: bool = True
    """Keep each zoo backbone's exported graph in `~/.cache/graft/backbones` for every project on this machine
    (checked against its sha256 when copied; keyed by the weights file, the size, the seed, the opset, torch and
    Graft's own code): a new project copies it instead of exporting it again (about a second per candidate, and
    the backbone need not be built); false exports in every project."""
    latency_quiet_cores: float | None = Field(0.5, ge=0)
    """A latency timed while other processes kept more than this many cores busy is used for that run but
    not kept for later ones (a busy moment would otherwise fix a figure many times off); null keeps every one."""
    onnx_features: bool = True
    """Compute a pre-trained backbone's features with its exported graph on onnxruntime (faster on CPU than eager
    PyTorch): the choose sample, the finalists' split, and a `feature_extraction` model's training and test images."""
    baseline: bool = True
    """Always rank a randomly initialised twin of the first pre-trained candidate when none is listed."""
    download: Literal["auto", "never"] = "auto"
    """A pre-trained backbone's missing weights file: fetch it into its library's cache ($TORCH_HOME for
    torchvision, $HF_HOME for timm; checksum verified), or never download and say where to put it.
    HF_HUB_OFFLINE=1 also keeps Hub files offline."""
    weights: dict[str, Path] = {}
    """Local weights files for zoo or timm backbones, used instead of the caches, e.g. {resnet18: /models/resnet18.pth}."""
    custom: dict[str, CustomBackbone] = {}
    """Backbones of your own by name, e.g. {mynet: {factory: mypkg.nets:mynet, weights: mynet.pth}}."""
    batch_size: int = Field(64, ge=1)

    @field_validator("candidates")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("list at least one backbone, e.g. [efficientnet_lite0]")
        return value

    @field_validator("weights", mode="before")
    @classmethod
    def _every_name_has_a_file(cls, value: object) -> object:
        if isinstance(value, dict):
            empty = [str(name) for name, path in value.items() if path is None or path == ""]
            if empty:
                raise ValueError(f"{', '.join(empty)} has no file: YAML reads 'name:/path' (no space after the colon) as a "
                                 "name alone; write {name: /path/to/file.pth}")
        return value


class TrainConfig(_Section):
    """How the chosen backbone is adapted."""

    strategy: Literal["feature_extraction", "fine_tune", "two_stage", "scratch"] = "feature_extraction"
    """feature_extraction: frozen backbone, new head on cached features; fine_tune: the last `unfreeze`
    blocks train with the head; two_stage: head first (frozen backbone), then `unfreeze` blocks at a low
    lr; scratch: the same architecture randomly initialised, everything trained (the baseline)."""
    epochs: int = Field(200, ge=1)
    """Most epochs (per stage for two_stage); early stopping usually ends sooner. The cosine decay of
    the strategies that train the backbone spans this many epochs."""
    patience: int = Field(5, ge=1)
    """Epochs without a better validation loss before training stops; the best weights are kept."""
    lr: float = Field(1e-3, gt=0)
    """Learning rate of the head (and of every layer for scratch)."""
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(64, ge=1)
    seed: int = 42
    """Seeds initialisation, shuffling and augmentation: the same seed and data give the same model on CPU."""
    unfreeze: Annotated[int, Field(ge=1)] | Literal["all"] = 3
    """fine_tune/two_stage: how many of the backbone's last blocks train (the stem counts as one), or all."""
    backbone_lr_ratio: float = Field(0.1, gt=0, le=1)
    """Discriminative learning rates: unfrozen backbone blocks learn at lr x this; two_stage's second
    stage runs every trainable layer at lr x this."""
    freeze_bn: bool = True
    """Keep pre-trained BatchNorm running statistics fixed while fine-tuning (small batches of new data
    would overwrite what the model learned); scratch always updates them."""
    warmup_epochs: int = Field(1, ge=0)
    """Linear warm-up before the cosine decay, for the strategies that train the backbone."""
    cache_trunk: bool = True
    """fine_tune/two_stage: run the frozen blocks once per image and cache their output (under data.cache_dir,
    keyed like the features), so each epoch runs only the unfrozen blocks and the head; the same model to float
    precision. Training runs through the whole backbone instead where the frozen part is not a fixed function
    (augmentation on, unfreeze: all) or the architecture cannot be cut (the log says which path ran)."""
    augment: bool = False
    """Random crops/rotations/colour jitter (torchvision.transforms.v2) on training images; this bypasses
    the feature cache, since every epoch then sees different pixels."""
    augment_crop_scale: float = Field(0.8, gt=0, le=1)
    """Smallest share of the image a random resized crop keeps; 1 = no cropping."""
    augment_rotate: float = Field(10.0, ge=0, le=180)
    """Largest random rotation in degrees; 0 = none."""
    augment_color: float = Field(0.2, ge=0, le=1)
    """Brightness/contrast/saturation jitter strength; 0 = none."""
    augment_flip: bool = False
    """Random horizontal flips; off by default because mirrored digits or text are different things."""
    balance: Literal["none", "class_weights", "sampler"] = "none"
    """Imbalanced classes: weight the loss by inverse class frequency, or draw batches class-balanced."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)
    """Clip the gradient norm to this; null for no clipping."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto uses CUDA when present."""
    mixed_precision: Literal["auto"] | bool = "auto"
    """Autocast. On CUDA (auto or true): bfloat16 where supported, else float16 with loss scaling. On the CPU,
    where it has native bfloat16 (AVX-512 BF16, AMX): auto uses bfloat16 on the cached trunk's tail only, where
    it was measured to change nothing but the speed; true uses it through the whole backbone too (faster, but
    the frozen blocks then compute in bfloat16, so results differ); false is float32 everywhere."""
    channels_last: bool = True
    """On CUDA: channels-last memory format for the backbone (faster convolutions); ignored on CPU (measured no faster)."""
    processes: int = Field(1, ge=1, le=64)
    """Training processes on this machine for the strategies that train through the backbone: above 1,
    the step starts them with torchrun and trains with DistributedDataParallel, one GPU each (gloo
    processes on the CPU where there is no CUDA); each takes its share of every `batch_size` batch."""
    resume: bool = True
    """Continue an interrupted run from its last epoch checkpoint (kept under data.cache_dir, keyed by
    data, backbone and these settings) when started again with the same inputs."""


class EvaluateConfig(_Section):
    """What the validation report contains, and the rules of the champion gate."""

    top_k: int = Field(3, ge=1)
    metric: Literal["accuracy", "macro_f1"] = "accuracy"
    """Metric the champion gate compares, on the test split."""
    calibration_bins: int = Field(15, ge=2, le=100)
    """Equal-width confidence bins of the expected calibration error and the reliability diagram."""
    temperature_scaling: bool = False
    """Fit a softmax temperature on the validation split and export the model with it (better calibrated
    probabilities, same predictions); calibration metrics on that split are then optimistic."""
    misclassified_images: int = Field(16, ge=1, le=100)
    """How many of the most confidently wrong test images (validation where there is no test split) the misclassification
    grid shows."""
    gate_test: Literal["mcnemar", "bootstrap", "none"] = "mcnemar"
    """Paired test that the challenger's gain is not noise: McNemar's exact test on the images where the
    two models disagree (tests accuracy), a paired bootstrap interval of the `metric` difference, or none."""
    alpha: float = Field(0.05, gt=0.0, lt=0.5)
    """Significance level of `gate_test` (McNemar p < alpha, or the 1 - alpha bootstrap interval above 0)."""
    bootstrap_samples: int = Field(2000, ge=100, le=100_000)
    """Resamples of the paired bootstrap."""
    min_accuracy: float | None = Field(None, ge=0.0, le=1.0)
    """Floor: a challenger below this test accuracy is registered but never made champion; null for none."""
    min_macro_f1: float | None = Field(None, ge=0.0, le=1.0)
    """Floor on test macro-F1, like `min_accuracy`; null for none."""
    min_comparison_images: int = Field(30, ge=1)
    """The gate compares challenger and champion only on test images neither trained or early-stopped on; with
    fewer than this many such images it does not promote (too few to tell the two apart)."""
    max_class_drop: float | None = Field(None, ge=0.0, le=1.0)
    """Largest drop in any one class's recall, challenger vs champion, that still allows promotion; null for no limit."""


Exporter = Literal["torchscript", "dynamo"]
"""`deploy.exporter`'s choices (`components.deploy.export.export_onnx`)."""


class DeployConfig(_Section):
    """Export, parity gate and registration."""

    model_name: str = Field("graft-classifier", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    """Registered model name. It names the params file's own data: `--data DIR` (or `--set data.dir=DIR`) without
    `--set deploy.model_name=...` registers as `model_name_for(DIR)` instead (`graft-<folder name>`)."""
    opset: int = Field(18, ge=17, le=23)
    parity_atol: float = Field(1e-4, gt=0)
    """Largest allowed |p_onnx - p_torch| on the validation images."""
    parity_images: int = Field(64, ge=1)
    min_improvement: float = Field(0.0, ge=0.0, le=1.0)
    """The challenger must beat the champion by at least this on `evaluate.metric` (and by more than 0:
    a tie never replaces the champion); see also the `evaluate` gate settings."""
    output_dir: Path = Path("outputs")
    """Run folders, the latest `metrics.json` and plots for DVC."""
    exporter: Exporter = "torchscript"
    """How a model whose backbone trained becomes ONNX (one whose backbone never trained is the choose stage's backbone
    graph and its head): `torchscript`, PyTorch's TorchScript tracer, its graph tidied by onnxruntime's basic optimiser
    (under a second; the torch.export-based exporter runs should the tracer fail); `dynamo`, the torch.export-based
    exporter (5-6 s the first time per architecture on this machine, then `graph_template_dir`). The parity gate
    checks either against PyTorch."""
    graph_template_dir: Path | None = None
    """Where the torch.export-based exporter's graph of each architecture is kept
    (`components.backbones.export.trace_with_template`); null: `$XDG_CACHE_HOME/graft/onnx-graphs`, shared by the
    projects on this machine (a template holds no trained weights that matter: every export puts its own in, and
    the parity gate checks the result)."""
    variants: tuple[Literal["optimized", "fp16", "int8"], ...] = ("fp16", "int8")
    """Variants built beside the fp32 model: `fp16` for GPUs, `int8` for CPUs, `optimized` (onnxruntime's offline-optimised
    fp32 copy, published only where it is faster than fp32)."""
    max_variant_drop: float = Field(0.01, ge=0.0, le=1.0)
    """Largest test-accuracy loss of a variant against fp32 (0.01 = 1 point); a variant that loses more is not published."""
    calibration_images: int = Field(64, ge=1)
    """Training images (stratified) that calibrate the INT8 variant's activation ranges."""
    int8_weight_bits: Literal["auto", 7, 8] = "auto"
    """The INT8 variant's weights: `auto` uses all 8 bits where the building CPU has VNNI (AVX-512 VNNI, AVX-VNNI, AMX)
    and 7 elsewhere; 7 keeps its accuracy on any x86 CPU (set it where the serving CPUs may lack VNNI: an 8-bit file
    loses accuracy there, and `variant="auto"` skips it); 8 needs a CPU with VNNI to build on
    (`components.deploy.int8`)."""
    serve_poll_seconds: float = Field(10.0, gt=0)
    """`graft serve`: how often to ask the registry whether the alias moved (then reload)."""
    serve_max_upload_mb: float = Field(10.0, gt=0)
    """`graft serve`: largest request body; bigger requests get 413."""
    serve_max_batch: int = Field(32, ge=1)
    """`graft serve`: most images in one JSON batch request."""
    serve_timeout_seconds: float = Field(10.0, gt=0)
    """`graft serve`: a request still running after this gets 504, and its work stops (decoding or onnxruntime's run)."""

    @property
    def template_dir(self) -> Path:
        """`graph_template_dir`, or the user's cache when it is null."""
        return self.graph_template_dir if self.graph_template_dir is not None else user_cache_dir() / "onnx-graphs"


class TrackingConfig(_Section):
    """Where MLflow keeps runs and models when MLFLOW_TRACKING_URI is not set."""

    store_dir: Path = Path("mlflow")
    experiment: str = Field("graft", min_length=1)
    log_pytorch_model: bool = True
    """Also log the trained classifier with MLflow's PyTorch flavour (`pytorch_model/`, the pt2 format: a torch.export
    graph, 2-4 s the first time per model structure on this machine, see `pt2_template_dir`, and the model's size
    again per run); false logs only the ONNX model Graft registers and serves."""
    pt2_template_dir: Path | None = None
    """Where the first `pt2` export of each model structure (zoo backbone, image size, classes) is kept, so that a
    model built like it is written into that archive with its own weights instead of being exported
    (`components.train.report.fill_template`: the same file byte for byte, a tenth of a second instead of 2-4 s);
    null: `$XDG_CACHE_HOME/graft/pt2-templates`, shared by the projects on this machine (the last three kept)."""

    @property
    def pt2_templates(self) -> Path:
        """`pt2_template_dir`, or the user's cache when it is null."""
        return self.pt2_template_dir if self.pt2_template_dir is not None else user_cache_dir() / "pt2-templates"


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
            path = path.expanduser()
            return path if path.is_absolute() else (root / path).resolve()

        def anchor_factory(reference: str) -> str:  # `file.py:function`: the file, as any other path
            target, _, function = reference.rpartition(":")
            return f"{anchor(Path(target))}:{function}" if target.endswith(".py") else reference

        return self.model_copy(
            update={
                "data": self.data.model_copy(
                    update={"dir": anchor(self.data.dir), "cache_dir": anchor(self.data.cache_dir)}
                ),
                "choose": self.choose.model_copy(
                    update={
                        "weights": {name: anchor(path) for name, path in self.choose.weights.items()},
                        "custom": {
                            name: spec.model_copy(update={"weights": anchor(spec.weights) if spec.weights else None,
                                                          "factory": anchor_factory(spec.factory)})
                            for name, spec in self.choose.custom.items()
                        },
                    }
                ),
                "deploy": self.deploy.model_copy(update={
                    "output_dir": anchor(self.deploy.output_dir),
                    "graph_template_dir": anchor(self.deploy.graph_template_dir.expanduser()) if self.deploy.graph_template_dir else None,
                }),
                "tracking": self.tracking.model_copy(update={
                    "store_dir": anchor(self.tracking.store_dir),
                    "pt2_template_dir": anchor(self.tracking.pt2_template_dir.expanduser()) if self.tracking.pt2_template_dir else None,
                }),
            }
        )


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


PLACES = ("data.dir", "data.cache_dir", "choose.weights", "deploy.output_dir", "deploy.graph_template_dir", "deploy.model_name", "tracking.")
"""Keys that say where things are, not how a model is made or judged: left out of `changed_settings`."""


def changed_settings(params: Params, reference: Path | None = None) -> dict[str, tuple[object, object]]:
    """How `params` differs from the project's own `params.yaml` (`reference`), `{key: (this value, params.yaml's)}`:
    what a run set on the command line or in another params file (`evaluate.gate_test=none` beside `mcnemar`), for
    the pages a promoter reads. Places (`PLACES`) are left out; empty when the reference does not load."""
    reference = reference or REPO_ROOT / "params.yaml"
    try:
        base = load_params(reference)
    except ConfigError:
        return {}
    mine, theirs = flatten(params.model_dump(mode="json")), flatten(base.model_dump(mode="json"))
    return {key: (value, theirs.get(key)) for key, value in mine.items()
            if value != theirs.get(key) and not key.startswith(PLACES) and not key.startswith("choose.custom")}


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


def model_name_for(data_dir: Path) -> str:
    """The registered model name for a data folder of the user's own: `graft-<folder name>`, lower-case, safe for MLflow."""
    slug = re.sub(r"[^a-z0-9_.-]+", "-", Path(data_dir).name.lower()).strip("-._")
    return f"graft-{slug}" if slug else "graft-classifier"


def _name_after_other_data(raw: dict[str, Any], root: Path, data_dir: object, keys: list[str]) -> None:
    """Name the model after the data folder when an override points `data.dir` at another folder than the params
    file's and does not name the model itself, so a user's own images never become a version of the demo's model."""
    if "data.dir" not in keys or "deploy.model_name" in keys:
        return
    new_dir = Path(str(raw["data"]["dir"]))
    anchored = new_dir if new_dir.is_absolute() else root / new_dir
    if data_dir is not None and anchored.resolve() == (root / Path(str(data_dir))).resolve():
        return
    deploy = raw.get("deploy") or {}
    raw["deploy"] = {**deploy, "model_name": model_name_for(anchored.resolve())}
    log.info("registering as '%s', named after the data folder (set deploy.model_name to choose another name)", raw["deploy"]["model_name"])


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    hint = ""
    if error.get("type") in ("tuple_type", "list_type") and isinstance(error.get("input"), str):
        hint = f"; a list is written in brackets: --set {key}=[{error['input']}]"  # --set's YAML: [a, b]
    return f"{key}: {error['msg']} (got {error.get('input')!r}){hint}"


def find_params_file(path: str | Path | None = None) -> Path | None:
    """The params file a command reads: `path` when given, else `./params.yaml`, else the project's own.

    Every command (`graft run`, `predict`, `serve`, ..., the scheduled retraining flow) finds it this way.
    None means neither exists: the built-in defaults apply, anchored at the working directory.
    """
    if path is not None:
        return Path(path)
    for candidate in (Path.cwd() / PARAMS_FILE, REPO_ROOT / PARAMS_FILE):
        if candidate.is_file():
            return candidate
    return None


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
    data_dir = (raw.get("data") or {}).get("dir")
    keys = []
    for text in overrides:
        key, value = parse_override(text)
        keys.append(key)
        section, _, name = key.partition(".")
        target = raw.setdefault(section, {})
        if target is None:
            target = raw[section] = {}
        target[name] = value
    _name_after_other_data(raw, root, data_dir, keys)
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise ConfigError(f"invalid parameters: {problems}") from exc
    return params.resolve_paths(root)
