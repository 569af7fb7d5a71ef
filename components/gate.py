"""The promotion gate: is the challenger better than the champion on the same data?"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Verdict:
    """Whether to move `champion` to the challenger, with every reason in plain words."""

    promote: bool
    reasons: tuple[str, ...]
    metric: str
    challenger_score: float
    champion_score: float | None = None
    champion_version: str | None = None
    mcnemar_p: float | None = None

    def text(self) -> str:
        return ("PROMOTE: " if self.promote else "KEEP CHAMPION: ") + "; ".join(self.reasons)


def metric_value(probs: np.ndarray, labels: np.ndarray, metric: str) -> float:
    """The gate's metric for one model's validation probabilities."""
    predicted = probs.argmax(1)
    if metric == "accuracy":
        return float((predicted == labels).mean())
    from sklearn.metrics import f1_score

    return float(f1_score(labels, predicted, average="macro", labels=list(range(probs.shape[1])), zero_division=0))


def mcnemar_p(challenger_correct: np.ndarray, champion_correct: np.ndarray) -> float:
    """Exact two-sided McNemar test on the images where exactly one model is right."""
    from scipy.stats import binomtest

    only_challenger = int((challenger_correct & ~champion_correct).sum())
    only_champion = int((~challenger_correct & champion_correct).sum())
    if only_challenger + only_champion == 0:
        return 1.0
    return float(binomtest(only_challenger, only_challenger + only_champion, 0.5).pvalue)


def judge(
    challenger_probs: np.ndarray,
    labels: np.ndarray,
    metric: str,
    min_improvement: float,
    champion_probs: np.ndarray | None = None,
    champion_version: str | None = None,
    comparable: str | None = None,
) -> Verdict:
    """Compare challenger and champion predictions on the same validation images.

    Args:
        comparable: None when the champion can be compared, else why it cannot.
    """
    score = metric_value(challenger_probs, labels, metric)
    if champion_version is None:
        return Verdict(True, (f"no champion yet; challenger {metric} {score:.4f}",), metric, score)
    if comparable is not None:
        return Verdict(
            False,
            (f"cannot compare with champion v{champion_version}: {comparable}; promote by hand if intended",),
            metric, score, None, champion_version,
        )
    assert champion_probs is not None
    best = metric_value(champion_probs, labels, metric)
    gain = score - best
    p = mcnemar_p(challenger_probs.argmax(1) == labels, champion_probs.argmax(1) == labels)
    line = (
        f"{metric} {score:.4f} vs champion v{champion_version} {best:.4f}: {gain * 100:+.1f} points "
        f"(McNemar p={p:.3g})"
    )
    if gain > min_improvement:
        return Verdict(True, (f"{line}, above the {min_improvement * 100:.1f}-point minimum",), metric, score, best, champion_version, p)
    return Verdict(
        False,
        (f"{line}, not above the {min_improvement * 100:.1f}-point minimum (deploy.min_improvement)",),
        metric, score, best, champion_version, p,
    )
