"""What the parent MLflow run of a pipeline run holds besides each stage's own report.
"""

from __future__ import annotations

from components.core.config import Params, flatten
from components.core.files import write_json
from components.data.split import Split
from components.registry.tracking import Run
from components.report.summary import RunSummary


def log_run_start(run: Run, params: Params, split: Split, data_md5: str, commit: str) -> None:
    """Parameters, data version and class counts on the parent run."""
    run.log_params(flatten(params.model_dump(mode="json")))
    run.set_tags({"data_md5": data_md5, "git_commit": commit, "data_dir": str(split.root), "classes": ",".join(split.classes)})
    run.log_dict(split.counts(), "data/class_counts.json")


def log_summary(run: Run, summary: RunSummary) -> None:
    """The summary as a run artifact and a file in the run folder."""
    content = summary.to_dict()
    write_json(summary.run_dir / "summary.json", content)
    run.log_dict(content, "summary.json")
    run.set_tags({"registered": summary.model_label})
