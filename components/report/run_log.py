"""What the parent MLflow run of a pipeline run holds besides each stage's own report: its parameters, the data
as an MLflow dataset input, and, at the end, a readable name and a description with the verdict.
"""

from __future__ import annotations

from components.core.config import REPO_ROOT, Params, flatten
from components.core.files import write_json
from components.core.lineage import CHAMPION
from components.data.split import RUN_SPLIT, Split, split_document
from components.data.versions import dvc_file_for
from components.registry import ui_links
from components.registry.tracking import Run, TrainingData
from components.report.summary import RunSummary


def training_data(split: Split, data_md5: str) -> TrainingData:
    """The data a run trains on, as MLflow records a dataset: the folder's name, its DVC md5, where it is, its counts."""
    dvc_file = dvc_file_for(split.root)
    root = split.root.resolve()
    where = root.relative_to(REPO_ROOT).as_posix() if root.is_relative_to(REPO_ROOT) else str(root)
    source = {"path": where, "dvc_md5": data_md5}
    if dvc_file.is_file():
        source["dvc_file"] = dvc_file.name
    counts = {part: len(getattr(split, part)) for part in ("train", "val", "test")}
    profile = {"images": sum(counts.values()), "classes": len(split.classes), **counts, "split": split.settings.describe()}
    return TrainingData(split.root.name, data_md5, source, "dvc" if dvc_file.is_file() else "local", profile)


def log_run_start(run: Run, params: Params, split: Split, data_md5: str, commit: str) -> None:
    """Parameters, the data as a dataset input, its version and class counts on the parent run."""
    run.log_params(flatten(params.model_dump(mode="json")))
    run.set_tags({"data_md5": data_md5, "git_commit": commit, "data_dir": str(split.root), "classes": ",".join(split.classes)})
    run.log_dataset(training_data(split, data_md5))
    run.log_dict(split.counts(), "data/class_counts.json")


def run_name(summary: RunSummary) -> str:
    """`outcome · model · backbone · strategy` (`promoted v3 · graft-digits · efficientnet_lite1 · feature_extraction`):
    the outcome first, since MLflow's runs table cuts names at about twenty characters, then the registered model,
    as every model's runs share the `tracking.experiment`. The outcome is what the run did (promoted, kept out,
    held), which stays true when `champion` moves later; where the alias is now, the model page says."""
    deployed = summary.deployed
    outcome = (f"promoted v{deployed.version}" if CHAMPION in deployed.aliases
               else f"held v{deployed.version}" if deployed.held else f"kept out v{deployed.version}")
    return f"{outcome} · {deployed.model_name} · {summary.trained.backbone} · {summary.trained.strategy}"


def run_description(summary: RunSummary) -> str:
    """The run's description (Markdown on its MLflow page): the verdict, the headline metrics, the registered version."""
    deployed, test, val = summary.deployed, summary.evaluation.test, summary.evaluation.val
    name, version = deployed.model_name, deployed.version
    verdict = "**Promoted to champion.**" if CHAMPION in deployed.aliases else "**Not promoted: the champion stays.**"
    lines = [
        f"{verdict} {'; '.join(deployed.verdict.reasons)}",
        "",
        f"- Registered [{name} v{version}]({ui_links.version_page(name, version)}) ({', '.join(deployed.aliases)} when "
        "registered; the model's Aliases column shows where they are now)",
        f"- Backbone {summary.choice.chosen} ({summary.choice.reason}), strategy {summary.trained.strategy}",
        f"- {summary.evaluation.test_label.capitalize()}: accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f}; "
        f"validation accuracy {val['accuracy']:.4f}",
        f"- Data `{summary.data_dir.name}` (DVC md5 `{summary.data_md5}`), commit `{summary.commit}`",
    ]
    if deployed.held:
        lines.append(f"- Held: {deployed.held}")
    return "\n".join(lines)


def log_summary(run: Run, summary: RunSummary) -> None:
    """The summary as a run artifact and a file in the run folder; the run's readable name and description."""
    content = summary.to_dict()
    write_json(summary.run_dir / "summary.json", content)
    # the split this run trained and tested on, so `graft evaluate --summary` scores the same test images later
    write_json(summary.run_dir / RUN_SPLIT, {"data_md5": summary.data_md5, **split_document(summary.split)})
    run.log_dict(content, "summary.json")
    run.set_tags({"registered": summary.model_label})
    run.describe(run_name(summary), run_description(summary))
