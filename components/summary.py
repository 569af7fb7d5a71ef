"""The run summary: one JSON document (`--summary`) and the lines the CLI prints."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from components.choose import ChooseResult, ranking_table
from components.deploy import DeployResult
from components.evaluate import EvalResult
from components.model_card import CARD_NAME
from components.train import TrainResult


class Stopwatch:
    """Seconds spent per named stage: `with clock("choose"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started


def build_summary(
    run_id: str,
    data_dir: Path,
    data_md5: str,
    commit: str,
    choice: ChooseResult,
    trained: TrainResult,
    evaluation: EvalResult,
    deployed: DeployResult,
    run_dir: Path,
    timings: dict[str, float],
) -> dict:
    """Everything a person or a script needs to know about one pipeline run."""
    return {
        "run_id": run_id,
        "data_dir": str(data_dir),
        "data_md5": data_md5,
        "git_commit": commit,
        "chosen": choice.chosen,
        "choose": {"score": choice.score_name, "reason": choice.reason},
        "candidates": [row.to_dict() for row in choice.candidates],
        "strategy": trained.strategy,
        "image_size": trained.image_size,
        "classes": list(trained.classes),
        "train": {
            "epochs_run": trained.epochs_run,
            "best_epoch": trained.best_epoch,
            "best_val_loss": trained.best_val_loss,
            "resumed_from_epoch": trained.resumed_from_epoch,
            "features_from_cache": trained.features_cached,
            "seconds": round(trained.seconds, 2),
        },
        "val": evaluation.metrics,
        "onnx": {
            "path": str(deployed.export.onnx_path),
            "sha256": deployed.export.sha256,
            "opset": deployed.export.opset,
            "max_abs_diff": deployed.export.max_abs_diff,
            "top1_agreement": deployed.export.top1_agreement,
            "parity_images": deployed.export.parity_images,
        },
        "registered": {
            "name": deployed.model_name,
            "version": deployed.version,
            "aliases": list(deployed.aliases),
            "uri": deployed.model_uri,
        },
        "variants": deployed.variants.to_dict() if deployed.variants else None,
        "bundle": str(deployed.bundle_dir) if deployed.bundle_dir else None,
        "gate": {
            "promote": deployed.verdict.promote,
            "reasons": list(deployed.verdict.reasons),
            "failed": [check.name for check in deployed.verdict.failures],
            "test": deployed.verdict.test,
            "mcnemar_p": deployed.verdict.mcnemar_p,
        },
        "files": {
            "run_dir": str(run_dir),
            "checkpoint": str(trained.checkpoint_path),
            "metrics": str(evaluation.metrics_path),
            **{picture.stem: str(picture) for picture in evaluation.pictures},
            "model_card": str(run_dir / CARD_NAME),
        },
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }


def format_summary(summary: dict) -> str:
    """The human-readable end of `graft run`: what was chosen, how good, where it went, what next."""
    reg = summary["registered"]
    champion = "champion" in reg["aliases"]
    lines = ["backbone ranking:", ranking_table(summary["candidates"]), ""]
    lines += [
        f"chosen backbone   {summary['chosen']}  ({summary['choose']['reason']})",
        f"validation        accuracy {summary['val']['accuracy']:.4f}, macro-F1 {summary['val']['macro_f1']:.4f}",
        f"ONNX parity       max |diff| {summary['onnx']['max_abs_diff']:.1e}, top-1 agreement {summary['onnx']['top1_agreement']:.0%}",
        *_variant_lines(summary.get("variants")),
        f"registered        {reg['name']} v{reg['version']}  aliases: {', '.join(reg['aliases'])}",
        f"gate              {'; '.join(summary['gate']['reasons'])}",
        f"files             {summary['files']['run_dir']}",
        f"MLflow run        {summary['run_id']}",
        f"timings (s)       " + ", ".join(f"{k} {v}" for k, v in summary["timings"].items()),
        "",
        "next:",
        f"  .venv/bin/graft predict --model models:/{reg['name']}@{'champion' if champion else 'challenger'} IMAGE...",
        "  make mlflow-ui     # compare runs, move the champion alias",
    ]
    return "\n".join(lines)


def summary_markdown(summary: dict) -> str:
    """The run summary as Markdown (the flow run's Prefect artifact): ranking, metrics, gate, registered version."""
    reg = summary["registered"]
    lines = [
        f"# Graft run: {reg['name']} v{reg['version']} ({', '.join(reg['aliases'])})",
        "",
        f"Chosen backbone **{summary['chosen']}**: {summary['choose']['reason']}. Data md5 `{summary['data_md5']}`, "
        f"commit `{summary['git_commit']}`, MLflow run `{summary['run_id']}`.",
        "",
        "## Backbone ranking",
        "",
        "| # | backbone | pretrained | score | probe | params | latency | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for index, row in enumerate(summary["candidates"], 1):
        score = f"{row['score']:.4f}" if row.get("score") is not None else "-"
        probe = f"{row['probe_accuracy']:.3f}" if row.get("probe_accuracy") is not None else "-"
        size = f"{row['params_m']:.1f}M" if row.get("params_m") is not None else "-"
        latency = f"{row['latency_ms']:.1f} ms" if row.get("latency_ms") is not None else "-"
        status = str(row["status"]).replace("|", "/")
        lines.append(f"| {index} | {row['name']} | {row['pretrained']} | {score} | {probe} | {size} | {latency} | {status} |")
    lines += ["", "## Validation metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4f} |" for key, value in summary["val"].items() if isinstance(value, (int, float))]
    verdict = "promoted to champion" if summary["gate"]["promote"] else "champion kept"
    lines += ["", f"## Gate: {verdict}", ""]
    lines += [f"- {reason}" for reason in summary["gate"]["reasons"]]
    lines += [
        "",
        "## Registered",
        "",
        f"`{reg['uri']}` with aliases {', '.join(reg['aliases'])}; ONNX parity max |diff| "
        f"{summary['onnx']['max_abs_diff']:.1e}, top-1 agreement {summary['onnx']['top1_agreement']:.0%}.",
        "",
        "Timings (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings"].items()),
    ]
    return "\n".join(lines) + "\n"


def _variant_lines(variants: dict | None) -> list[str]:
    """One line per variant: its accuracy change against fp32 and whether it was published."""
    if not variants:
        return []
    parts = [
        f"{v['name']} {v['accuracy_change'] * 100:+.1f} pts{'' if v['published'] else ' (NOT published)'}"
        for v in variants["variants"]
    ]
    return [f"variants          {', '.join(parts)} (accuracy vs fp32)"]
