"""What the choose stage leaves in MLflow: a child run per candidate, the ranking and its chart.

When finalists were trained, each child run holds both rankings (`choose/score_rank`, predicted
by the first-round score, and `choose/trained_rank`, realised by the trained heads) and the parent
run says how well the score predicted on this data (`choose/score_kendall_tau`, `choose/score_regret`):
compare them across runs to see whether the first round can be trusted on your images.
"""

from __future__ import annotations

import math
from pathlib import Path

from components.choose.ranking import ChooseResult, ranking_table
from components.core.files import save_figure
from components.registry.tracking import Run


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
        if row.val_accuracy is not None:
            note += f"  val acc {row.val_accuracy:.3f} (#{row.trained_rank} trained)"
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
    return save_figure(fig, path)


def kendall_tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b of two rankings, ties counted as `scipy.stats.kendalltau` counts them (nan when either
    ranking is constant): a few finalists' pairs, counted directly instead of importing scipy.stats into every run."""
    concordant = discordant = tied_x = tied_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tied_x += 1
            elif dy == 0:
                tied_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + tied_x) * (concordant + discordant + tied_y))
    return (concordant - discordant) / denominator if denominator else math.nan


def prediction_metrics(choice: ChooseResult) -> dict[str, float]:
    """How well the first-round score predicted the trained finalists (empty when none were trained):
    Kendall's tau between the two rankings, and the validation accuracy the score's own pick loses."""
    trained = choice.trained
    if len(trained) < 2:
        return {}
    tau = kendall_tau_b([r.score_rank for r in trained], [r.trained_rank for r in trained])
    metrics = {"choose/finalists_trained": float(len(trained)), "choose/score_kendall_tau": float(tau)}
    if choice.score_regret is not None:
        metrics["choose/score_regret"] = choice.score_regret
    return metrics


def log_choice(run: Run, choice: ChooseResult, run_dir: Path) -> None:
    """A child run per candidate, the predicted and realised rankings, the ranking as JSON and text, and its bar chart."""
    for row in choice.candidates:
        # the backbone's own name first: the MLflow UI cuts run names short
        child = run.child(f"{row.name} (chosen)" if row.name == choice.chosen else row.name, f"Candidate backbone: {row.status}")
        child.log_params({"backbone": row.name, "pretrained": row.pretrained, "image_size": row.image_size, "status": row.status[:500]})
        metrics = {
            "choose/logme": row.logme,
            "choose/probe_accuracy": row.probe_accuracy,
            "choose/params_m": row.params_m,
            "choose/size_mb": row.size_mb,
            "choose/latency_ms": row.latency_ms,
            "choose/latency_batch_ms": row.latency_batch_ms,
            "choose/seconds": row.seconds,
            "choose/score_rank": row.score_rank,
            "choose/val_accuracy": row.val_accuracy,
            "choose/val_loss": row.val_loss,
            "choose/trained_rank": row.trained_rank,
            "choose/train_seconds": row.train_seconds,
        }
        metrics = {k: v for k, v in metrics.items() if v is not None}
        if metrics:
            child.log_metrics(metrics)
        child.set_tags({"chosen": str(row.name == choice.chosen).lower()})
        child.finish()
    run.set_tags({"chosen_backbone": choice.chosen, "choose.reason": choice.reason, "choose.score_pick": choice.score_pick})
    run.log_metrics({"choose/seconds": choice.seconds, **prediction_metrics(choice)})
    run.log_dict(
        {"chosen": choice.chosen, "reason": choice.reason, "score": choice.score_name, "score_pick": choice.score_pick,
         "candidates": [r.to_dict() for r in choice.candidates]},
        "choose/ranking.json",
    )
    run.client.log_text(run.run_id, ranking_table([r.to_dict() for r in choice.candidates]), "choose/ranking.txt")
    run.log_artifact(plot_ranking(choice, run_dir / "ranking.png"), "choose")
