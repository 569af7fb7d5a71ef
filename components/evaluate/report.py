"""What the evaluate stage leaves in MLflow: `val/...` and `test/...` metrics, per-class figures, pictures, plot data."""

from __future__ import annotations

from components.evaluate.stage import EvalResult
from components.registry.tracking import Run


def log_evaluation(run: Run, evaluation: EvalResult) -> None:
    """Metrics by where they come from (`val/...` chose the epoch, `test/...` did not), and the test report's files."""
    run.log_metrics({**{f"val/{k}": v for k, v in evaluation.val.items()}, **{f"test/{k}": v for k, v in evaluation.test.items()}})
    run.set_tags({"test_split": evaluation.test_label})
    run.log_dict(evaluation.per_class, "evaluate/per_class.json")
    for picture in evaluation.pictures:
        run.log_artifact(picture, "evaluate")
    for data in evaluation.plot_data:
        run.log_artifact(data, "evaluate/plots")
    run.log_artifact(evaluation.metrics_path, "evaluate")
