"""The `evaluate` stage of `dvc repro`: the exported ONNX model, through onnxruntime, on the test split.

`graft run` evaluates the PyTorch model it trained; this checks the artifact
production loads, on the test images `prepare` set aside (which nothing looked
at during training), with the same metric functions
(`components.evaluate.metrics.classification_metrics`), and writes what
`dvc metrics diff` and `dvc plots diff` compare between commits.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.core.config import REPO_ROOT, Params
from components.core.errors import DataError
from components.core.files import sha256, write_json
from components.data.images import load_batch
from components.data.split import Split
from components.evaluate.metrics import check_classes, classification_metrics
from components.runtime.model import OnnxClassifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HoldoutResult:
    """The ONNX model's test metrics, and how far they are from what training reported."""

    onnx_path: Path
    metrics: dict[str, float]
    metrics_path: Path
    confusion_path: Path
    max_gap_to_training: float
    """Largest |ONNX metric - the run's PyTorch metric| on the test split, over the metrics both report."""


REPORTED_MODEL = Path("model") / "model.onnx"
"""Where `graft run --report DIR` keeps the run's fp32 model, beside the summary in DIR: the DVC train stage's output
(`outputs/model/model.onnx`), which `dvc pull` brings to a fresh clone, where the run folder the summary names is not."""


def run_metrics(summary_path: Path) -> tuple[dict[str, float], Path]:
    """The test metrics a `graft run --summary` file records, and the ONNX file it names: the run folder's, or where
    that is not on this machine, the same model (by sha256) kept beside the summary (`REPORTED_MODEL`).

    Raises:
        DataError: the summary is missing or unreadable.
    """
    try:
        summary = json.loads(summary_path.read_text())
        metrics, named, digest = dict(summary["test"]), Path(summary["onnx"]["path"]), summary["onnx"].get("sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"run summary {summary_path} is missing or unreadable ({exc}); run `graft run --summary {summary_path}` first") from exc
    named = named if named.is_absolute() else REPO_ROOT / named  # summaries name files relative to the project
    reported = summary_path.parent / REPORTED_MODEL
    if not named.is_file() and digest and reported.is_file() and sha256(reported) == digest:
        log.info("the run folder's model %s is not here; scoring the same file (sha256 %s...) beside the summary: %s",
                 named, digest[:12], reported)
        return metrics, reported
    return metrics, named


def evaluate_holdout(params: Params, split: Split, summary_path: Path, out_dir: Path, model_path: Path | None = None) -> HoldoutResult:
    """Score the run's ONNX model (`model_path`, else the file the summary names) on the test split;
    write `metrics.json`, `per_class.json` and `confusion.json` under `out_dir`.

    Raises:
        DataError: the summary or the model file is missing, or the test split does not match the model.
    """
    trained_metrics, named = run_metrics(summary_path)
    onnx_path = model_path or named
    if not onnx_path.is_file():
        reported = summary_path.parent / REPORTED_MODEL
        raise DataError(
            f"ONNX model {onnx_path} does not exist; pass --model FILE, or run `dvc pull` if the DVC train stage made "
            f"{summary_path} (its model is {reported}), or run `graft run --summary FILE` and evaluate that"
        )
    model = OnnxClassifier.load(onnx_path)  # checked against its sidecar (and signature) first
    check_classes(split, model.classes, parts=("test",))
    tested = split.evaluation
    labels = np.array([s.label for s in tested])
    probs = model.predict_proba(load_batch([s.path for s in tested], model.image_size))
    metrics, per_class = classification_metrics(probs, labels, split.classes, params.evaluate.top_k, params.evaluate.calibration_bins)
    shared = [k for k in metrics if isinstance(trained_metrics.get(k), (int, float))]
    gap = max((abs(metrics[k] - trained_metrics[k]) for k in shared), default=0.0)
    part = "validation (no test split)" if split.test_is_val else "test"
    log.info("ONNX on %d %s images: accuracy %.4f (largest gap to the run's own metrics %.2e)", len(labels), part, metrics["accuracy"], gap)
    metrics_path = write_json(out_dir / "metrics.json", {"test": metrics})
    write_json(out_dir / "per_class.json", per_class)
    predicted = probs.argmax(axis=1)
    confusion = [{"actual": split.classes[t], "predicted": split.classes[p]} for t, p in zip(labels, predicted, strict=True)]
    confusion_path = write_json(out_dir / "confusion.json", confusion)
    return HoldoutResult(onnx_path, metrics, metrics_path, confusion_path, gap)
