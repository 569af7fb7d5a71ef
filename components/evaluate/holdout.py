"""The `evaluate` stage of `dvc repro`: the exported ONNX model, through onnxruntime, on the held-out split.

`graft run` evaluates the PyTorch model it trained; this checks the artifact
production loads, on the images `prepare` set aside, with the same metric
functions (`components.evaluate.classification_metrics`), and writes what
`dvc metrics diff` and `dvc plots diff` compare between commits.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.core.config import Params
from components.core.errors import DataError
from components.core.files import write_json
from components.data.images import load_batch
from components.data.split import Split
from components.evaluate.metrics import check_classes, classification_metrics
from components.runtime.model import OnnxClassifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HoldoutResult:
    """The ONNX model's held-out metrics, and how far they are from what training reported."""

    onnx_path: Path
    metrics: dict[str, float]
    metrics_path: Path
    confusion_path: Path
    max_gap_to_training: float
    """Largest |ONNX metric - the run's PyTorch metric| over the metrics both report."""


def onnx_of_run(summary_path: Path) -> tuple[Path, dict[str, float]]:
    """The ONNX file and the validation metrics a `graft run --summary` file records.

    Raises:
        DataError: the summary is missing or names no existing ONNX file.
    """
    try:
        summary = json.loads(summary_path.read_text())
        onnx_path, val = Path(summary["onnx"]["path"]), dict(summary["val"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"run summary {summary_path} is missing or unreadable ({exc}); run `graft run --summary {summary_path}` first") from exc
    if not onnx_path.is_file():
        raise DataError(f"{summary_path} names {onnx_path}, which does not exist; run `graft run --summary {summary_path}` again")
    return onnx_path, val


def evaluate_holdout(params: Params, split: Split, summary_path: Path, out_dir: Path) -> HoldoutResult:
    """Score the run's ONNX model on `split.val`; write `metrics.json` and `confusion.json` under `out_dir`."""
    onnx_path, trained_metrics = onnx_of_run(summary_path)
    model = OnnxClassifier(onnx_path)
    check_classes(split, model.classes)
    labels = np.array([s.label for s in split.val])
    probs = model.predict_proba(load_batch([s.path for s in split.val], model.image_size))
    metrics, per_class = classification_metrics(probs, labels, split.classes, params.evaluate.top_k, params.evaluate.calibration_bins)
    shared = [k for k in metrics if isinstance(trained_metrics.get(k), (int, float))]
    gap = max((abs(metrics[k] - trained_metrics[k]) for k in shared), default=0.0)
    log.info("ONNX on %d held-out images: accuracy %.4f (largest gap to the run's own metrics %.2e)", len(labels), metrics["accuracy"], gap)
    metrics_path = write_json(out_dir / "metrics.json", {"holdout": metrics})
    write_json(out_dir / "per_class.json", per_class)
    predicted = probs.argmax(axis=1)
    confusion = [{"actual": split.classes[t], "predicted": split.classes[p]} for t, p in zip(labels, predicted, strict=True)]
    confusion_path = write_json(out_dir / "confusion.json", confusion)
    return HoldoutResult(onnx_path, metrics, metrics_path, confusion_path, gap)
