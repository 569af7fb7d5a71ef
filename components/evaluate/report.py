"""What the evaluate stage leaves in MLflow and where DVC reads it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from components.evaluate.stage import EvalResult
from components.registry.tracking import Run


def log_evaluation(run: Run, evaluation: EvalResult, output_dir: Path) -> None:
    """`val/...` metrics and pictures on the run; `metrics.json`, pictures and plot data where DVC expects them."""
    run.log_metrics({f"val/{k}": v for k, v in evaluation.metrics.items()})
    run.log_dict(evaluation.per_class, "evaluate/per_class.json")
    for picture in evaluation.pictures:
        run.log_artifact(picture, "evaluate")
    for data in evaluation.plot_data:
        run.log_artifact(data, "evaluate/plots")
    run.log_artifact(evaluation.metrics_path, "evaluate")
    output_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(evaluation.metrics_path, output_dir / "metrics.json.tmp")
    (output_dir / "metrics.json.tmp").replace(output_dir / "metrics.json")
    for picture in evaluation.pictures:
        shutil.copyfile(picture, output_dir / picture.name)
    (output_dir / "plots").mkdir(exist_ok=True)
    for data in evaluation.plot_data:
        shutil.copyfile(data, output_dir / "plots" / data.name)
