"""What the deploy stage knows once the model is exported, judged and its variants built: the one record the
registration's tags and the model card are both written from."""

from __future__ import annotations

from dataclasses import dataclass

from components.core.config import Params
from components.data.split import Split
from components.deploy.export import ExportResult
from components.deploy.variants import VariantsReport
from components.evaluate.gate import Verdict
from components.evaluate.stage import EvalResult
from components.train.stage import TrainResult


@dataclass(frozen=True)
class DeployFacts:
    """The trained, evaluated, exported and judged model, with its data version and code commit."""

    params: Params
    split: Split
    trained: TrainResult
    evaluation: EvalResult
    exported: ExportResult
    verdict: Verdict
    variants: VariantsReport | None
    data_md5: str
    commit: str
    hold: str | None = None
    """Why this run must not move `champion` (a DVC experiment, `--no-promote`); None: the gate decides."""
