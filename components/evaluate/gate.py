"""The promotion gate: should the challenger replace the champion?

Both models' probabilities on the same test images come in, with which of those
images neither model trained or early-stopped on; a verdict with one plain-words
line per check goes out. Every check runs, so a refusal lists all its reasons at once:

- floors (`evaluate.min_accuracy`, `evaluate.min_macro_f1`) on every test image,
  so a poor first model is registered but not made champion;
- enough test images that neither model saw (`evaluate.min_comparison_images`);
  the checks below compare the two on those images only;
- the gain on `evaluate.metric`, at least `deploy.min_improvement` and above 0;
- a paired test that the gain is not noise (`evaluate.gate_test`);
- optionally, no class's recall may drop by more than `evaluate.max_class_drop`.

The floors and the minimum gain are judged by MLflow's model-validation API
(`mlflow.validate_evaluation_results` with `MetricThreshold`s). It compares
aggregate numbers only, so the paired test and the per-class check, which
need both models' predictions image by image, are computed here.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction

import numpy as np

from components.core.config import Params
from components.core.lineage import GATE_CHAMPION_TAG
from components.evaluate.metrics import class_recall, score

# Metric values are ratios of image counts; this absorbs float rounding in `>=` without
# letting a tie (gain exactly 0) count as an improvement.
EPSILON = 1e-9


@dataclass(frozen=True)
class GateRules:
    """What the challenger must show to become champion (from `evaluate` and `deploy.min_improvement`)."""

    metric: str = "accuracy"
    min_improvement: float = 0.0
    test: str = "mcnemar"
    alpha: float = 0.05
    bootstrap_samples: int = 2000
    min_accuracy: float | None = None
    min_macro_f1: float | None = None
    max_class_drop: float | None = None
    min_comparison_images: int = 1
    seed: int = 0

    @classmethod
    def from_params(cls, params: Params) -> GateRules:
        cfg = params.evaluate
        return cls(
            metric=cfg.metric,
            min_improvement=params.deploy.min_improvement,
            test=cfg.gate_test,
            alpha=cfg.alpha,
            bootstrap_samples=cfg.bootstrap_samples,
            min_accuracy=cfg.min_accuracy,
            min_macro_f1=cfg.min_macro_f1,
            max_class_drop=cfg.max_class_drop,
            min_comparison_images=cfg.min_comparison_images,
            seed=params.data.seed,
        )


@dataclass(frozen=True)
class Comparison:
    """Which test images the challenger and the champion are compared on: those neither trained or early-stopped on."""

    fair: np.ndarray
    """Boolean mask over the test images."""
    notes: tuple[str, ...] = ()
    """What the reader must know about the set (the split settings changed, there is no test split, ...)."""

    @classmethod
    def every(cls, count: int) -> Comparison:
        return cls(np.ones(count, dtype=bool))

    @property
    def size(self) -> int:
        return int(self.fair.sum())


@dataclass(frozen=True)
class Check:
    """One rule of the gate and how the challenger fared, in plain words."""

    name: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class Verdict:
    """Whether to move `champion` to the challenger, with every reason in plain words."""

    promote: bool
    reasons: tuple[str, ...]
    """Failed checks first, then passed ones."""
    metric: str
    challenger_score: float
    """On the compared images when there is a champion to compare with, else on every test image."""
    champion_score: float | None = None
    champion_version: str | None = None
    mcnemar_p: float | None = None
    test: str = "none"
    bootstrap_interval: tuple[float, float] | None = None
    """Interval of challenger - champion on `metric` when `test` is bootstrap."""
    checks: tuple[Check, ...] = field(default=())
    compared_images: int | None = None
    """Test images the two models were compared on (neither trained or early-stopped on them); None without a champion."""

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def text(self) -> str:
        return ("PROMOTE: " if self.promote else "KEEP CHAMPION: ") + "; ".join(self.reasons)

    def with_note(self, name: str, note: str) -> Verdict:
        """The same verdict with `note` (a passed check, so the verdict is unchanged) before the passed checks."""
        failed, passed = self.failures, tuple(c for c in self.checks if c.passed)
        checks = (*failed, Check(name, True, note), *passed)
        return replace(self, checks=checks, reasons=tuple(c.reason for c in checks))

    def tags(self) -> dict[str, str]:
        """Tags for the model version and the run, so the MLflow UI shows why."""
        tags = {
            "gate.verdict": "promote" if self.promote else "keep champion",
            "gate.reasons": self.text(),
            "gate.failed": ", ".join(c.name for c in self.failures) or "none",
            "gate.metric": self.metric,
            "gate.test": self.test,
        }
        if self.champion_version is not None:
            tags[GATE_CHAMPION_TAG] = self.champion_version
        if self.compared_images is not None:
            tags["gate.compared_images"] = str(self.compared_images)
        if self.mcnemar_p is not None:
            tags["gate.mcnemar_p"] = f"{self.mcnemar_p:.4g}"
        if self.bootstrap_interval is not None:
            tags["gate.bootstrap_interval"] = f"[{self.bootstrap_interval[0]:+.4f}, {self.bootstrap_interval[1]:+.4f}]"
        return tags

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def mcnemar_p(challenger_correct: np.ndarray, champion_correct: np.ndarray) -> float:
    """Exact two-sided McNemar test on the images where exactly one model is right: the binomial test of
    `only_challenger` of `n` discordant images at p = 1/2, which is symmetric, so its two-sided p-value is twice
    the smaller tail (at most 1). In exact integers: the same p-value as `scipy.stats.binomtest`, without
    importing scipy.stats into every run (tests/evaluate/test_gate_statistics.py compares the two)."""
    only_challenger = int((challenger_correct & ~champion_correct).sum())
    only_champion = int((~challenger_correct & champion_correct).sum())
    n = only_challenger + only_champion
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_challenger, only_champion) + 1))
    return min(1.0, float(Fraction(2 * tail, 2**n)))


def bootstrap_interval(
    challenger: np.ndarray, champion: np.ndarray, labels: np.ndarray, metric: str, num_classes: int,
    samples: int, alpha: float, seed: int,
) -> tuple[float, float]:
    """Percentile interval (1 - alpha) of metric(challenger) - metric(champion) over paired resamples of the images."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    deltas = np.empty(samples)
    for i in range(samples):
        pick = rng.integers(0, n, n)
        deltas[i] = score(challenger[pick], labels[pick], metric, num_classes) - score(champion[pick], labels[pick], metric, num_classes)
    low, high = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _mlflow_passes(name: str, candidate: float, baseline: float | None = None, **threshold: object) -> bool:
    """Ask MLflow's model-validation API whether `candidate` meets the `MetricThreshold(**threshold)`."""
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    import mlflow

    def result(value: float) -> EvaluationResult:
        return EvaluationResult(metrics={name: value}, artifacts={}, run_id="graft-gate")

    chatter = logging.getLogger("mlflow.models.evaluation.validation")
    level = chatter.level
    chatter.setLevel(logging.WARNING)  # it logs two INFO lines per call; the verdict says it better
    try:
        mlflow.validate_evaluation_results(
            {name: MetricThreshold(greater_is_better=True, **threshold)},
            result(candidate),
            result(baseline) if baseline is not None else None,
        )
    except ModelValidationFailedException:
        return False
    finally:
        chatter.setLevel(level)
    return True


def _points(value: float) -> str:
    return signed_points(value).lstrip("+")


def _images(count: int) -> str:
    return f"{count} image" if count == 1 else f"{count} images"


def signed_points(value: float) -> str:
    """A change (a fraction: -0.0101) in points with its sign: one decimal, two where the second is not 0, so a
    figure just past a limit never reads as the limit itself (-1.01 against a 1.0-point limit, not -1.0)."""
    hundredths = round(value * 100, 2) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{hundredths:+.1f}" if hundredths == round(hundredths, 1) else f"{hundredths:+.2f}"


def _floor_checks(predicted: np.ndarray, labels: np.ndarray, num_classes: int, rules: GateRules) -> list[Check]:
    checks = []
    for metric, floor in (("accuracy", rules.min_accuracy), ("macro_f1", rules.min_macro_f1)):
        if floor is None:
            continue
        value = score(predicted, labels, metric, num_classes)
        passed = _mlflow_passes(metric, value, threshold=float(floor))
        relation = "meets" if passed else "is below"
        tail = "" if passed else "; registered, but not made champion"
        checks.append(Check(f"floor.{metric}", passed, f"{metric} {value:.3f} {relation} the floor {floor:.3f} (evaluate.min_{metric}){tail}"))
    return checks


def _improvement_check(score_: float, best: float, version: str, rules: GateRules) -> Check:
    gain = score_ - best
    minimum = rules.min_improvement
    passed = _mlflow_passes(rules.metric, score_, best, min_absolute_change=max(minimum - EPSILON, EPSILON))
    line = f"{rules.metric} {score_:.3f} vs {best:.3f} (champion v{version}): {signed_points(gain)} points"
    if passed:
        tail = f"at least the {_points(minimum)}-point minimum" if minimum > 0 else "better than the champion"
    elif gain <= EPSILON:
        tail = "not above the champion" + (f" nor the {_points(minimum)}-point minimum (deploy.min_improvement)" if minimum > 0 else "")
    else:
        tail = f"below the {_points(minimum)}-point minimum (deploy.min_improvement)"
    return Check("improvement", passed, f"{line}, {tail}")


def _mcnemar_check(challenger: np.ndarray, champion: np.ndarray, labels: np.ndarray, alpha: float) -> tuple[Check, float]:
    mine, theirs = challenger == labels, champion == labels
    only_challenger, only_champion = int((mine & ~theirs).sum()), int((~mine & theirs).sum())
    p = mcnemar_p(mine, theirs)
    head = (
        f"McNemar's test: only the challenger is right on {_images(only_challenger)}, "
        f"only the champion on {_images(only_champion)}"
    )
    if only_challenger + only_champion == 0:
        return Check("significance", False, f"{head}: the two models err on exactly the same images, nothing tells them apart"), p
    if p >= alpha:
        return Check("significance", False, f"{head}; p={p:.3g} is not below alpha {alpha:g} (evaluate.alpha): the difference may be noise"), p
    if only_challenger <= only_champion:
        return Check("significance", False, f"{head}; p={p:.3g}: the champion is significantly better"), p
    return Check("significance", True, f"{head}; p={p:.3g} < alpha {alpha:g}: unlikely to be noise"), p


def _bootstrap_check(challenger: np.ndarray, champion: np.ndarray, labels: np.ndarray, num_classes: int, rules: GateRules) -> tuple[Check, tuple[float, float]]:
    low, high = bootstrap_interval(challenger, champion, labels, rules.metric, num_classes, rules.bootstrap_samples, rules.alpha, rules.seed)
    head = (
        f"paired bootstrap ({rules.bootstrap_samples} resamples): {1 - rules.alpha:.0%} interval of the {rules.metric} "
        f"gain [{signed_points(low)}, {signed_points(high)}] points"
    )
    if low > 0:
        return Check("significance", True, f"{head} lies above 0: unlikely to be noise"), (low, high)
    return Check("significance", False, f"{head} reaches 0 or below (evaluate.alpha={rules.alpha:g}): the gain may be noise"), (low, high)


def _class_drop_check(challenger: np.ndarray, champion: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], version: str, limit: float) -> Check:
    mine = class_recall(challenger, labels, len(classes))
    theirs = class_recall(champion, labels, len(classes))
    drops = theirs - mine
    worse = [i for i in range(len(classes)) if np.isfinite(drops[i]) and drops[i] > limit + EPSILON]
    if worse:
        parts = [f"'{classes[i]}' {mine[i]:.3f} vs {theirs[i]:.3f} ({signed_points(-drops[i])} points)" for i in worse]
        return Check(
            "class_drop", False,
            f"recall fell by more than the {_points(limit)}-point limit (evaluate.max_class_drop) against champion v{version} "
            f"for class{'es' if len(worse) > 1 else ''} {', '.join(parts)}",
        )
    largest = int(np.nanargmax(drops)) if np.isfinite(drops).any() else 0
    return Check(
        "class_drop", True,
        f"no class's recall fell by more than {_points(limit)} points (largest change: '{classes[largest]}' "
        f"{signed_points(-drops[largest])} points)",
    )


def _comparison_check(comparison: Comparison, total: int, version: str, rules: GateRules) -> Check:
    notes = "".join(f"; {note}" for note in comparison.notes)
    if comparison.size < rules.min_comparison_images:
        needed = f"at least {rules.min_comparison_images} are needed to tell the two apart (evaluate.min_comparison_images)"
        if total < rules.min_comparison_images:  # the test split itself is too small, whatever the champion saw
            return Check(
                "comparison", False,
                f"the test split holds only {_images(total)}{notes}; {needed}: registered as challenger, promote by hand if "
                "intended. For runs that can promote, add images, raise data.test_fraction, or lower evaluate.min_comparison_images",
            )
        return Check(
            "comparison", False,
            f"only {_images(comparison.size)} of the {total} test images were seen by neither model (champion v{version} "
            f"trained or early-stopped on the others){notes}; {needed}: registered as challenger, promote by hand if intended",
        )
    return Check("comparison", True, f"compared on {_images(comparison.size)} of the {total} test images that neither model "
                                     f"trained or early-stopped on{notes}")


def judge(
    challenger_probs: np.ndarray,
    labels: np.ndarray,
    rules: GateRules,
    champion_probs: np.ndarray | None = None,
    champion_version: str | None = None,
    comparable: str | None = None,
    classes: tuple[str, ...] | None = None,
    comparison: Comparison | None = None,
) -> Verdict:
    """Run every check of the gate: the floors on every test image, the comparison with the champion on
    the test images neither model trained or early-stopped on.

    Args:
        challenger_probs: Test probabilities of the challenger, N x classes.
        labels: True class indices of those N images.
        rules: The gate's settings.
        champion_probs: The champion's probabilities on the same N images, in the same class order.
        champion_version: The champion's registry version; None when there is no champion.
        comparable: None when the champion can be compared, else why it cannot (classes differ, unreadable,
            no record of what it trained on).
        classes: Class names, for the per-class check's wording.
        comparison: Which of the N images both models may be compared on; default all of them.
    """
    num_classes = challenger_probs.shape[1]
    names = classes or tuple(str(i) for i in range(num_classes))
    predicted = challenger_probs.argmax(1)
    own_score = score(predicted, labels, rules.metric, num_classes)
    checks = _floor_checks(predicted, labels, num_classes, rules)
    best = p = interval = compared = None
    challenger_score = own_score
    if champion_version is None:
        checks.insert(0, Check("champion", True, f"no champion yet; challenger test {rules.metric} {own_score:.3f}"))
    elif comparable is not None or champion_probs is None:
        why = comparable or "its test predictions are unavailable"
        checks.insert(0, Check("comparable", False, f"cannot compare with champion v{champion_version}: {why}; it stays champion, promote by hand if intended"))
    else:
        comparison = comparison or Comparison.every(len(labels))
        compared = comparison.size
        checks.insert(0, _comparison_check(comparison, len(labels), champion_version, rules))
        if compared >= rules.min_comparison_images:
            fair = comparison.fair
            mine, theirs, truth = predicted[fair], champion_probs.argmax(1)[fair], labels[fair]
            challenger_score, best = score(mine, truth, rules.metric, num_classes), score(theirs, truth, rules.metric, num_classes)
            checks.insert(0, _improvement_check(challenger_score, best, champion_version, rules))
            if rules.test == "mcnemar":
                check, p = _mcnemar_check(mine, theirs, truth, rules.alpha)
            elif rules.test == "bootstrap":
                check, interval = _bootstrap_check(mine, theirs, truth, num_classes, rules)
                p = mcnemar_p(mine == truth, theirs == truth)  # reported beside it
            else:
                check = Check("significance", True, "no significance test (evaluate.gate_test: none)")
                p = mcnemar_p(mine == truth, theirs == truth)
            checks.insert(1, check)
            if rules.max_class_drop is not None:
                checks.append(_class_drop_check(mine, theirs, truth, names, champion_version, rules.max_class_drop))
    ordered = [c for c in checks if not c.passed] + [c for c in checks if c.passed]
    return Verdict(
        promote=all(c.passed for c in checks),
        reasons=tuple(c.reason for c in ordered),
        metric=rules.metric,
        challenger_score=challenger_score,
        champion_score=best,
        champion_version=champion_version,
        mcnemar_p=p,
        test=rules.test,
        bootstrap_interval=interval,
        checks=tuple(ordered),
        compared_images=compared,
    )
