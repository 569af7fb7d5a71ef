"""What each stage leaves in MLflow and on disk for people to look at."""

from __future__ import annotations

import shutil
from pathlib import Path

from components.choose import ChooseResult, ranking_table
from components.config import Params, flatten
from components.data import Split
from components.evaluate import EvalResult, write_json
from components.tracking import Run


def log_run_start(run: Run, params: Params, split: Split, data_md5: str, commit: str) -> None:
    """Parameters, data version and class counts on the parent run."""
    run.log_params(flatten(params.model_dump(mode="json")))
    run.set_tags({"data_md5": data_md5, "git_commit": commit, "data_dir": str(split.root), "classes": ",".join(split.classes)})
    run.log_dict(split.counts(), "data/class_counts.json")


def plot_ranking(choice: ChooseResult, path: Path) -> Path:
    """Bars of each candidate's score and its onnxruntime latency side by side; the chosen one is dark,
    other eligible ones light, baselines and candidates over a limit or skipped grey with the reason."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(reversed(choice.candidates))
    fig, (ax, ax_ms) = plt.subplots(
        1, 2, figsize=(10, 0.5 * len(rows) + 1.8), sharey=True, gridspec_kw={"width_ratios": [3, 2]}
    )
    names = [row.name for row in rows]
    colours = [
        "#2a7ab9" if row.name == choice.chosen else ("#9ecae1" if row.status == "ok" else "#cccccc") for row in rows
    ]
    values = [row.score if row.score is not None else 0.0 for row in rows]
    ax.barh(names, values, color=colours)
    for index, row in enumerate(rows):
        note = f"{row.score:.3f}" if row.score is not None else ""
        if row.status != "ok":
            note += f"  ({row.status.split(':')[0]})"
        ax.text(values[index], index, f" {note}", va="center", fontsize=8)
    ax.axvline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel("LogME (higher is better)" if choice.score_name == "logme" else "linear-probe accuracy")
    latency = [row.latency_ms if row.latency_ms is not None else 0.0 for row in rows]
    ax_ms.barh(names, latency, color=colours)
    for index, row in enumerate(rows):
        if row.latency_ms is not None:
            ax_ms.text(latency[index], index, f" {row.latency_ms:.1f} ms, {row.size_mb or 0:.0f} MB", va="center", fontsize=8)
    ax_ms.set_xlabel("onnxruntime ms/image at batch 1 (lower is better)")
    ax_ms.margins(x=0.35)
    fig.suptitle(f"chose {choice.chosen}: {choice.reason}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_choice(run: Run, choice: ChooseResult, run_dir: Path) -> None:
    """A child run per candidate, the ranking as JSON and text, and its bar chart."""
    for row in choice.candidates:
        child = run.child(f"candidate: {row.name}")
        child.log_params({"backbone": row.name, "pretrained": row.pretrained, "image_size": row.image_size, "status": row.status[:500]})
        metrics = {
            "choose/logme": row.logme,
            "choose/probe_accuracy": row.probe_accuracy,
            "choose/params_m": row.params_m,
            "choose/size_mb": row.size_mb,
            "choose/latency_ms": row.latency_ms,
            "choose/latency_batch_ms": row.latency_batch_ms,
            "choose/seconds": row.seconds,
        }
        metrics = {k: v for k, v in metrics.items() if v is not None}
        if metrics:
            child.log_metrics(metrics)
        child.set_tags({"chosen": str(row.name == choice.chosen).lower()})
        child.finish()
    run.set_tags({"chosen_backbone": choice.chosen, "choose.reason": choice.reason})
    run.log_metrics({"choose/seconds": choice.seconds})
    run.log_dict({"chosen": choice.chosen, "reason": choice.reason, "score": choice.score_name, "candidates": [r.to_dict() for r in choice.candidates]}, "choose/ranking.json")
    run.client.log_text(run.run_id, ranking_table([r.to_dict() for r in choice.candidates]), "choose/ranking.txt")
    run.log_artifact(plot_ranking(choice, run_dir / "ranking.png"), "choose")


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


def log_summary(run: Run, summary: dict, run_dir: Path) -> None:
    """The summary as a run artifact and a file in the run folder."""
    write_json(run_dir / "summary.json", summary)
    run.log_dict(summary, "summary.json")
    run.set_tags({"registered": f"{summary['registered']['name']} v{summary['registered']['version']}"})
