"""The run summary: a typed record of one pipeline run, serialised in one place (`RunSummary.to_dict`),
and the terminal text and Markdown made from it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from components.choose.ranking import ChooseResult, ranking_table
from components.core import progress
from components.core.config import REPO_ROOT
from components.core.files import write_json
from components.core.lineage import CHALLENGER, CHAMPION
from components.data.split import PARTS, RUN_SPLIT, Split
from components.deploy.model_card import CARD_NAME
from components.deploy.stage import DeployResult
from components.deploy.variants import VariantsReport
from components.evaluate.gate import signed_points
from components.evaluate.stage import EvalResult
from components.report.log_file import RUN_LOG
from components.train.stage import TrainResult


class Stopwatch:
    """Seconds spent per named stage: `with clock("choose"): ...`; it also marks where the run is
    (`components.core.progress`), for the line an interrupted run prints."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        name = stage.replace("_", "-")
        progress.enter_stage(name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started
        progress.leave_stage(name)


@dataclass(frozen=True)
class RunSummary:
    """One pipeline run, from the stages' own results; `to_dict` is the `--summary` JSON document."""

    run_id: str
    data_dir: Path
    data_md5: str
    commit: str
    choice: ChooseResult
    trained: TrainResult
    evaluation: EvalResult
    deployed: DeployResult
    run_dir: Path
    timings: dict[str, float]
    split: Split

    @property
    def split_counts(self) -> dict[str, int]:
        """Images in train, val and test."""
        return {part: len(getattr(self.split, part)) for part in PARTS}

    @property
    def model_label(self) -> str:
        """`NAME vN`, how the registered version is named in logs and the UIs."""
        return f"{self.deployed.model_name} v{self.deployed.version}"

    def to_dict(self) -> dict:
        """Everything a person or a script needs to know about the run, as plain JSON values; files inside the
        project are named relative to it, so a committed summary holds no machine's folders."""
        return _relative(self._content())

    def _content(self) -> dict:
        choice, trained, evaluation, deployed = self.choice, self.trained, self.evaluation, self.deployed
        return {
            "run_id": self.run_id,
            "data_dir": _project_path(self.data_dir),
            "data_md5": self.data_md5,
            "git_commit": self.commit,
            "chosen": choice.chosen,
            "choose": {"score": choice.score_name, "reason": choice.reason, "score_pick": choice.score_pick,
                       "score_regret": choice.score_regret},
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
            "val": evaluation.val,
            "test": evaluation.test,
            "test_is_val": evaluation.test_is_val,
            "split": {"settings": self.split.settings.to_dict(), "source": self.split.source, "counts": self.split_counts},
            "onnx": {
                "path": _project_path(deployed.export.onnx_path),
                "sha256": deployed.export.sha256,
                "opset": deployed.export.opset,
                "graph": deployed.export.made,
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
            "bundle": _project_path(deployed.bundle_dir) if deployed.bundle_dir else None,
            "gate": {
                "promote": deployed.verdict.promote,
                "reasons": list(deployed.verdict.reasons),
                "failed": [check.name for check in deployed.verdict.failures],
                "test": deployed.verdict.test,
                "mcnemar_p": deployed.verdict.mcnemar_p,
                "compared_images": deployed.verdict.compared_images,
                "held": deployed.held,
            },
            "files": {
                "run_dir": _project_path(self.run_dir),
                "split": _project_path(self.run_dir / RUN_SPLIT),
                "checkpoint": _project_path(trained.checkpoint_path),
                "metrics": _project_path(evaluation.metrics_path),
                **{picture.stem: _project_path(picture) for picture in evaluation.pictures},
                "model_card": _project_path(self.run_dir / CARD_NAME),
            },
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
        }

    def write(self, path: Path) -> Path:
        """Write `to_dict()` as JSON, atomically."""
        return write_json(path, self.to_dict())

    def text(self, graft: str = ".venv/bin/graft", mlflow_ui: str = "make mlflow-ui") -> str:
        """The human-readable end of `graft run`: what was chosen, how good, where it went, what next (`graft` and
        `mlflow_ui`: the commands that work from the folder the run started in)."""
        deployed, val, test = self.deployed, self.evaluation.val, self.evaluation.test
        champion = CHAMPION in deployed.aliases
        timings = ", ".join(f"{k} {round(v, 2)}" for k, v in self.timings.items())
        lines = ["backbone ranking:", ranking_table([row.to_dict() for row in self.choice.candidates]), ""]
        lines += [
            f"chosen backbone   {self.choice.chosen}  ({self.choice.reason})",
            f"trained           {self.trained.backbone}, {self.trained.strategy}",
            f"data split        {', '.join(f'{n} {part}' for part, n in self.split_counts.items() if not (part == 'test' and self.split.test_is_val))} "
            f"images ({self.split.describe()})",
            f"validation        accuracy {val['accuracy']:.4f}, macro-F1 {val['macro_f1']:.4f}  (chose the epoch: optimistic)",
            f"{'test (= val)' if self.evaluation.test_is_val else 'test':<17} accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f}"
            f"{'  (no test split: data.test_fraction=0)' if self.evaluation.test_is_val else '  (unseen until now: what the gate judges)'}",
            f"ONNX parity       max |diff| {deployed.export.max_abs_diff:.1e}, top-1 agreement {deployed.export.top1_agreement:.0%}",
            *_variant_lines(deployed.variants),
            f"registered        {self.model_label}  aliases: {', '.join(deployed.aliases)}",
            f"gate              {'; '.join(deployed.verdict.reasons)}",
            *([f"held back         {deployed.held}"] if deployed.held else []),
            f"files             {self.run_dir}",
            *([f"log               {self.run_dir / RUN_LOG}"] if (self.run_dir / RUN_LOG).is_file() else []),
            f"MLflow run        {self.run_id}",
            f"timings (s)       {timings}",
            "",
            "next:",
            f"  {graft} predict --model models:/{deployed.model_name}@{CHAMPION if champion else CHALLENGER} IMAGE...",
            f"  {mlflow_ui}     # compare runs, move the champion alias",
        ]
        return "\n".join(lines)

    def markdown(self) -> str:
        """The run as Markdown (the flow run's Prefect artifact): ranking, metrics, gate, registered version."""
        deployed = self.deployed
        lines = [
            f"# Graft run: {self.model_label} ({', '.join(deployed.aliases)})",
            "",
            f"Chosen backbone **{self.choice.chosen}**: {self.choice.reason}. Data md5 `{self.data_md5}`, "
            f"commit `{self.commit}`, MLflow run `{self.run_id}`.",
            "",
            "## Backbone ranking",
            "",
            "| # | backbone | pretrained | val acc (trained) | score | score # | probe | params | latency | status |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for index, row in enumerate(self.choice.candidates, 1):
            trained = f"{row.val_accuracy:.3f}" if row.val_accuracy is not None else "-"
            score = f"{row.score:.4f}" if row.score is not None else "-"
            score_rank = str(row.score_rank) if row.score_rank is not None else "-"
            probe = f"{row.probe_accuracy:.3f}" if row.probe_accuracy is not None else "-"
            size = f"{row.params_m:.1f}M" if row.params_m is not None else "-"
            latency = f"{row.latency_ms:.1f} ms" if row.latency_ms is not None else "-"
            status = row.status.replace("|", "/")
            lines.append(
                f"| {index} | {row.name} | {row.pretrained} | {trained} | {score} | {score_rank} | {probe} | {size} | {latency} | {status} |"
            )
        evaluation = self.evaluation
        lines += ["", "## Metrics", "", f"| metric | validation | {evaluation.test_label} |", "|---|---|---|"]
        lines += [f"| {key} | {value:.4f} | {evaluation.test.get(key, float('nan')):.4f} |"
                  for key, value in evaluation.val.items() if isinstance(value, (int, float))]
        verdict = "promoted to champion" if deployed.verdict.promote else "champion kept"
        lines += ["", f"## Gate: {verdict}", ""]
        lines += [f"- {reason}" for reason in deployed.verdict.reasons]
        lines += [
            "",
            "## Registered",
            "",
            f"`{deployed.model_uri}` with aliases {', '.join(deployed.aliases)}; ONNX parity max |diff| "
            f"{deployed.export.max_abs_diff:.1e}, top-1 agreement {deployed.export.top1_agreement:.0%}.",
            "",
            "Timings (s): " + ", ".join(f"{k} {round(v, 2)}" for k, v in self.timings.items()),
        ]
        return "\n".join(lines) + "\n"


def _relative(value: object) -> object:
    """`value` with every string naming a path inside the project rewritten relative to it."""
    if isinstance(value, dict):
        return {key: _relative(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_relative(item) for item in value]
    if isinstance(value, str) and value.startswith(f"{REPO_ROOT}/"):
        return _project_path(Path(value))
    return value


def _project_path(path: Path) -> str:
    """A path inside the project as written relative to it (committed summaries hold no machine's folders), else whole."""
    resolved = Path(path).resolve()
    return resolved.relative_to(REPO_ROOT).as_posix() if resolved.is_relative_to(REPO_ROOT) else str(resolved)


def _variant_lines(variants: VariantsReport | None) -> list[str]:
    """One line per variant: its accuracy change against fp32 and whether it was published."""
    if not variants:
        return []
    parts = [f"{v.name} {signed_points(v.accuracy_change)} pts{'' if v.published else ' (NOT published)'}" for v in variants.variants]
    return [f"variants          {', '.join(parts)} (accuracy vs fp32)"]
