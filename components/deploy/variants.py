"""Deployment variants of the exported fp32 model, each judged on the validation set.

- `optimized`: onnxruntime's offline graph optimisation (constant folding, Conv+activation
  fusions) saved as a file, so a consumer skips that work at load; numerically the fp32 model.
- `fp16`: weights and activations in half precision for GPUs; inputs (uint8) and
  outputs (fp32 probabilities) keep their types, so consumers call it the same way.
- `int8`: onnxruntime static quantisation (QDQ, per-channel weights) calibrated on
  training images, for CPUs. Weights use 7 of their 8 bits (`reduce_range`): with all 8,
  x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake) run the fused QLinearConv
  through VPMADDUBSW, whose 16-bit sums saturate; on this project's models that alone cost
  about 14 accuracy points that the quantised maths itself does not lose (see `to_int8`).
  The first convolutions and the head stay fp32.

Every variant is scored on the validation images against the fp32 model; one that
loses more than `deploy.max_variant_drop` accuracy is not published (its file moves
to `rejected/` in the run folder, so it can be inspected, and it is neither
registered nor bundled). Imports onnx and onnxruntime only, no torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from components.core.errors import VariantError
from components.core.files import sha256
from components.runtime.model import OnnxClassifier
from components.runtime.variant_files import VARIANTS_TAG, variant_path

log = logging.getLogger(__name__)


INT8_OP_TYPES = ("Conv", "Gemm", "MatMul", "Add", "Clip", "Relu")
"""Operators quantised to INT8; preprocessing (Cast, Div, Sub) and the softmax stay fp32,
so the uint8 input is read exactly and the output stays a probability vector."""


INT8_FLOAT_LEADING_CONVS = 6
"""Convolutions kept fp32 from the input on: the stem and the first two blocks of EfficientNet-Lite.
Their quantisation noise is amplified by everything after them: quantising only the first three
convolutions of efficientnet_lite1 cost 12.3 accuracy points (logit SQNR 5 dB), quantising all of
the other 61 about 1 point. Keeping 6 rather than 3 in fp32 took lite0 from -0.6 to -0.3 points and
lite1 from -1.1 to 0.0; they are roughly a tenth of the multiply-adds."""


INT8_HEAD_OP_TYPES = ("Gemm", "MatMul")
"""The last of these is the head; it stays fp32 (10 x 1280 weights: no speed to win, and the logits
keep their resolution instead of 256 levels)."""


OPTIMIZATION_PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class VariantResult:
    """One variant, its accuracy change against fp32 on the validation set, and whether it is published."""

    name: str
    path: Path
    published: bool
    accuracy: float
    accuracy_change: float
    """accuracy(variant) - accuracy(fp32) on the same validation images; negative is a loss."""
    top1_agreement: float
    """Share of validation images where the variant's top-1 label equals fp32's."""
    max_abs_diff: float
    size_bytes: int
    seconds: float
    reason: str

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


@dataclass(frozen=True)
class VariantsReport:
    """The fp32 baseline accuracy and every variant built beside it."""

    fp32_accuracy: float
    variants: tuple[VariantResult, ...]

    @property
    def published(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variants if v.published)

    def get(self, name: str) -> VariantResult | None:
        return next((v for v in self.variants if v.name == name), None)

    def listing(self) -> dict[str, dict[str, object]]:
        """Published variants -> file, sha256 and accuracy evidence (the `onnx.variants` tag and bundle metadata)."""
        return {
            v.name: {
                "file": v.path.name,
                "sha256": sha256(v.path),
                "accuracy": round(v.accuracy, 6),
                "accuracy_change": round(v.accuracy_change, 6),
                "top1_agreement": round(v.top1_agreement, 6),
                "size_bytes": v.size_bytes,
            }
            for v in self.variants
            if v.published
        }

    def tags(self) -> dict[str, str]:
        """Model-version tags: the published listing, and each variant's accuracy change and verdict."""
        tags = {VARIANTS_TAG: json.dumps(self.listing(), sort_keys=True)}
        for v in self.variants:
            tags[f"variant.{v.name}.accuracy_change"] = f"{v.accuracy_change:+.4f}"
            tags[f"variant.{v.name}.published"] = "yes" if v.published else "no: " + v.reason
        return tags

    def to_dict(self) -> dict[str, object]:
        return {"fp32_accuracy": self.fp32_accuracy, "variants": [v.to_dict() for v in self.variants]}


def optimize_offline(source: Path, target: Path) -> Path:
    """Apply onnxruntime's extended graph optimisations for the CPU provider and save the result."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # EXTENDED (not ALL): ALL adds layout transforms tied to this CPU's instruction set
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=[OPTIMIZATION_PROVIDER])
    _stamp(onnx.load(str(target)), target, {"graft.variant": "optimized", "graft.optimized_for": OPTIMIZATION_PROVIDER})
    return target


def to_fp16(source: Path, target: Path) -> Path:
    """Convert weights and activations to fp16, keeping the uint8 input and fp32 output types."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True, disable_shape_infer=False)
    _stamp(model, target, {"graft.variant": "fp16"})
    return target


class _Calibration:
    """Feeds calibration images to onnxruntime's quantiser in batches of equal size."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int) -> None:
        usable = len(images) - len(images) % batch_size if len(images) >= batch_size else len(images)
        self._batches = iter(images[start : start + batch_size] for start in range(0, usable, batch_size))
        self._input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input_name: batch}

    def rewind(self) -> None:  # part of onnxruntime's CalibrationDataReader protocol; read once here
        return None


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(previous, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(previous)


def float_nodes(model) -> list[str]:  # noqa: ANN001 - onnx.ModelProto
    """Nodes `to_int8` leaves in fp32: the first `INT8_FLOAT_LEADING_CONVS` convolutions and the head."""
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"][:INT8_FLOAT_LEADING_CONVS]
    head = [node.name for node in model.graph.node if node.op_type in INT8_HEAD_OP_TYPES][-1:]
    return convs + head


def to_int8(source: Path, target: Path, calibration_images: np.ndarray, batch_size: int = 8) -> Path:
    """Static INT8 quantisation: QDQ, uint8 activations, per-channel 7-bit int8 weights, MinMax ranges.

    Why 7-bit weights (`reduce_range`): onnxruntime fuses DequantizeLinear -> Conv ->
    QuantizeLinear into QLinearConv, whose x86 kernel multiplies with VPMADDUBSW unless the CPU
    has VNNI: it adds pairs of uint8 x int8 products into int16 with saturation, and
    2 x 255 x 127 does not fit. Measured on the digits (112 px, 359 validation images, AVX2 CPU
    without VNNI), the same full 8-bit model loses 2.8 (efficientnet_lite0) and 8.4 points
    (lite1) with graph optimisation off (Q/DQ run in float, no fused kernels) but 17.3 and 22.6
    with it on, as served. With 7-bit weights (2 x 255 x 63 fits) both settings agree. Also
    measured: uint8 weights (U8U8) do not saturate either but ran 2-17x slower than fp32 here;
    int8 activations (S8S8) saturate the same way. The serving CPU is not known when the
    model is built, so it must not depend on VNNI.

    The preprocessing (Cast, Div, Sub) stays fp32 and its output is quantised exactly (scale 1/128,
    zero point 127 for Lite's mean and std); `float_nodes` names what else stays fp32.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as _quantize
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration_images) == 0:
        raise VariantError("no calibration images for INT8; set deploy.calibration_images >= 1 or drop int8 from deploy.variants")
    input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="graft-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # the documented prerequisite: ORT's basic optimisations (constant folding, fusions) first
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        kept_float = float_nodes(onnx.load(str(prepared)))
        with _quiet_root_logger():  # the quantiser logs a line per rescaled weight on the root logger
            _quantize(
                str(prepared),
                str(target),
                _Calibration(input_name, calibration_images, batch_size),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                reduce_range=True,
                calibrate_method=CalibrationMethod.MinMax,
                op_types_to_quantize=list(INT8_OP_TYPES),
                nodes_to_exclude=kept_float,
            )
    _stamp(
        onnx.load(str(target)),
        target,
        {
            "graft.variant": "int8",
            "graft.calibration_images": str(len(calibration_images)),
            "graft.int8_scheme": "QDQ, uint8 activations, per-channel 7-bit int8 weights (no VPMADDUBSW saturation)",
            "graft.int8_float_nodes": ",".join(kept_float),
        },
    )
    return target


def _stamp(model, target: Path, extra: dict[str, str]) -> None:  # noqa: ANN001 - onnx.ModelProto
    """Save `model` with its Graft metadata plus `extra` (replacing keys already there)."""
    import onnx

    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in extra]
    del model.metadata_props[:]
    for key, value in [*kept, *extra.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(model, str(target))


def judge_variant(
    name: str,
    path: Path,
    reference: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    max_drop: float,
    seconds: float,
) -> VariantResult:
    """Score `path` on the validation images against the fp32 probabilities `reference`."""
    probs = OnnxClassifier(path, ["CPUExecutionProvider"]).predict_proba(images)
    accuracy = float((probs.argmax(1) == labels).mean())
    change = accuracy - float((reference.argmax(1) == labels).mean())
    published = -change <= max_drop + 1e-9
    verdict = "published" if published else "NOT published"
    reason = (
        f"{name}: validation accuracy {accuracy:.4f} ({change * 100:+.1f} points vs fp32), "
        f"{verdict} (limit deploy.max_variant_drop={max_drop * 100:.1f} points)"
    )
    return VariantResult(
        name=name,
        path=path,
        published=published,
        accuracy=accuracy,
        accuracy_change=change,
        top1_agreement=float((probs.argmax(1) == reference.argmax(1)).mean()),
        max_abs_diff=float(np.abs(probs - reference).max()) if len(probs) else 0.0,
        size_bytes=path.stat().st_size,
        seconds=seconds,
        reason=reason,
    )


def build_variants(
    fp32_path: Path,
    names: Sequence[str],
    val_images: np.ndarray,
    val_labels: np.ndarray,
    calibration_images: np.ndarray,
    max_drop: float,
) -> VariantsReport:
    """Build the optimised model and each variant in `names` beside `fp32_path`, and judge each.

    Args:
        fp32_path: The exported, parity-checked model (`.../model.onnx`).
        names: Variants to build besides `optimized`: any of `fp16`, `int8`.
        val_images: uint8 validation batch at the model's input size.
        val_labels: Their class indices.
        calibration_images: uint8 training images for INT8 calibration.
        max_drop: Largest accuracy loss (fraction, 0.01 = 1 point) a published variant may have.

    Returns:
        The fp32 accuracy and one `VariantResult` per variant; rejected files are moved to `rejected/`.
    """
    reference = OnnxClassifier(fp32_path, ["CPUExecutionProvider"]).predict_proba(val_images)
    builders = {
        "optimized": lambda target: optimize_offline(fp32_path, target),
        "fp16": lambda target: to_fp16(fp32_path, target),
        "int8": lambda target: to_int8(fp32_path, target, calibration_images),
    }
    results = []
    for name in ("optimized", *[n for n in names if n != "optimized"]):
        if name not in builders:
            raise VariantError(f"unknown variant '{name}' in deploy.variants; choose from fp16, int8")
        target = variant_path(fp32_path, name)
        started = time.perf_counter()
        log.info("building the %s variant", name)
        try:
            builders[name](target)
        except VariantError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnx/onnxruntime tools raise many types
            raise VariantError(f"building the {name} variant of {fp32_path} failed ({exc}); drop it from deploy.variants") from exc
        result = judge_variant(name, target, reference, val_images, val_labels, max_drop, time.perf_counter() - started)
        log.info("%s", result.reason)
        if not result.published:
            rejected = target.parent / "rejected" / target.name
            rejected.parent.mkdir(exist_ok=True)
            shutil.move(target, rejected)
            result = VariantResult(**{**asdict(result), "path": rejected})
        results.append(result)
    return VariantsReport(float((reference.argmax(1) == val_labels).mean()), tuple(results))
