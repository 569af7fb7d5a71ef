"""The DVC `train` stage's outputs: what `graft run --report DIR` writes for `dvc metrics` and `dvc plots`.

Only the DVC pipeline asks for them (dvc.yaml), so `make run` and scheduled runs leave every
file git or DVC tracks untouched. The fp32 ONNX model is one of them, so the `evaluate`
stage can rerun on its own from a fresh clone after `dvc pull`.
"""

from __future__ import annotations

from pathlib import Path

from components.core.files import copy_file
from components.evaluate.holdout import REPORTED_MODEL
from components.report.summary import RunSummary
from components.runtime.trust import write_sidecar


def write_dvc_outputs(summary: RunSummary, report_dir: Path) -> list[Path]:
    """Copy the run's metrics, pictures, plot data and fp32 ONNX model into `report_dir`; returns what was written."""
    evaluation = summary.evaluation
    written = [copy_file(evaluation.metrics_path, report_dir / "metrics.json")]
    written += [copy_file(picture, report_dir / picture.name) for picture in evaluation.pictures]
    written += [copy_file(data, report_dir / "plots" / data.name) for data in evaluation.plot_data]
    model = copy_file(summary.deployed.export.onnx_path, report_dir / REPORTED_MODEL)  # where `graft evaluate` looks for it
    written += [model, write_sidecar(model, summary.deployed.export.sha256)]  # the evaluate stage checks the file against it
    return written
