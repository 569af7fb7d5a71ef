"""The champion gate: promotes a clearly better model, refuses same-quality and worse ones, and says why."""

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score

from components.evaluate.gate import GateRules, bootstrap_interval, judge
from components.evaluate.metrics import score
from tests.models import tiny_onnx

CLASSES = ("cat", "dog", "fox", "owl")
LABELS = np.repeat(np.arange(4), 25)  # 100 validation images, 25 per class


def probs_of(wrong: list[int] | range) -> np.ndarray:
    """Probabilities of a model that errs exactly on the images `wrong` (predicting the next class)."""
    predicted = LABELS.copy()
    predicted[list(wrong)] = (LABELS[list(wrong)] + 1) % 4
    probs = np.full((len(LABELS), 4), 0.05)
    probs[np.arange(len(LABELS)), predicted] = 0.85
    return probs


# the champion is wrong on 20 images spread over all classes: accuracy 0.80
CHAMPION_WRONG = list(range(0, 100, 5))
CHAMPION = probs_of(CHAMPION_WRONG)


def verdict_of(challenger, rules=GateRules(), champion=CHAMPION):
    return judge(challenger, LABELS, rules, champion, "1", None, CLASSES)


def test_a_clearly_better_challenger_is_promoted_with_its_reasons():
    verdict = verdict_of(probs_of(CHAMPION_WRONG[:3]))  # fixes 17 of the champion's 20 mistakes
    assert verdict.promote
    assert verdict.reasons[0] == "accuracy 0.970 vs 0.800 (champion v1): +17.0 points, better than the champion"
    assert "only the challenger is right on 17 images, only the champion on 0" in verdict.reasons[1]
    assert verdict.mcnemar_p < 1e-4 and "unlikely to be noise" in verdict.reasons[1]
    assert verdict.text().startswith("PROMOTE: ")


def test_a_same_quality_challenger_is_refused_with_every_reason():
    verdict = verdict_of(CHAMPION.copy())
    assert not verdict.promote
    assert [c.name for c in verdict.failures] == ["improvement", "significance"]
    assert verdict.reasons[0] == "accuracy 0.800 vs 0.800 (champion v1): +0.0 points, not above the champion"
    assert "err on exactly the same images" in verdict.reasons[1]
    # same accuracy, different mistakes: still not better
    shifted = verdict_of(probs_of([i + 1 for i in CHAMPION_WRONG]))
    assert not shifted.promote and "+0.0 points, not above the champion" in shifted.reasons[0]
    assert "p=1 is not below alpha 0.05" in shifted.reasons[1]


def test_a_worse_challenger_is_refused_and_the_champion_called_better():
    verdict = verdict_of(probs_of(CHAMPION_WRONG + list(range(1, 100, 10))))  # 10 more mistakes
    assert not verdict.promote
    assert verdict.reasons[0] == "accuracy 0.700 vs 0.800 (champion v1): -10.0 points, not above the champion"
    assert "the champion is significantly better" in verdict.reasons[1]


def test_a_small_gain_that_may_be_noise_is_refused_by_either_paired_test():
    challenger = probs_of(CHAMPION_WRONG[2:])  # +2 points: 2 images of 100
    mcnemar = verdict_of(challenger)
    assert not mcnemar.promote and [c.name for c in mcnemar.failures] == ["significance"]
    assert "p=0.5 is not below alpha 0.05 (evaluate.alpha): the difference may be noise" in mcnemar.reasons[0]
    bootstrap = verdict_of(challenger, GateRules(test="bootstrap", bootstrap_samples=500))
    assert not bootstrap.promote and "reaches 0 or below" in bootstrap.reasons[0]
    low, high = bootstrap.bootstrap_interval
    assert low <= 0 < high
    assert verdict_of(challenger, GateRules(test="none")).promote  # with no test, +2 points is enough


def test_the_minimum_improvement_is_explained_in_points_and_met_at_exactly_the_minimum():
    challenger = probs_of(CHAMPION_WRONG[2:])  # 0.82 vs 0.80
    below = verdict_of(challenger, GateRules(test="none", min_improvement=0.05))
    assert not below.promote
    assert below.reasons[0] == (
        "accuracy 0.820 vs 0.800 (champion v1): +2.0 points, below the 5.0-point minimum (deploy.min_improvement)"
    )
    # 0.82 - 0.80 is 0.0199999... in floating point; "at least 2 points" must still hold
    exactly = verdict_of(challenger, GateRules(test="none", min_improvement=0.02))
    assert exactly.promote and "at least the 2.0-point minimum" in exactly.reasons[0]


def test_macro_f1_gate_compares_macro_f1():
    challenger = probs_of(CHAMPION_WRONG[:3])
    verdict = verdict_of(challenger, GateRules(metric="macro_f1"))
    expected = f1_score(LABELS, challenger.argmax(1), average="macro")
    assert verdict.challenger_score == pytest.approx(expected)
    assert verdict.reasons[0].startswith(f"macro_f1 {expected:.3f} vs ")


def test_a_gate_with_many_rules_reports_every_failure_at_once():
    # 10 more mistakes, all in class 'owl' (images 75..99): worse overall, one class much worse, below the floor
    worse = probs_of(CHAMPION_WRONG + [i for i in range(76, 100) if i not in CHAMPION_WRONG][:10])
    rules = GateRules(min_accuracy=0.75, min_macro_f1=0.5, max_class_drop=0.1, min_improvement=0.01)
    verdict = verdict_of(worse, rules)
    assert not verdict.promote
    assert {c.name for c in verdict.failures} == {"improvement", "significance", "floor.accuracy", "class_drop"}
    assert [c.passed for c in verdict.checks] == [False] * 4 + [True, True]  # failures first, then comparison, floor.macro_f1
    text = verdict.text()
    assert text.startswith("KEEP CHAMPION: ")
    assert "accuracy 0.700 is below the floor 0.750 (evaluate.min_accuracy); registered, but not made champion" in text
    assert "'owl' 0.400 vs 0.800 (-40.0 points)" in text and "evaluate.max_class_drop" in text
    tags = verdict.tags()
    assert tags["gate.verdict"] == "keep champion" and tags["gate.failed"] == "improvement, significance, floor.accuracy, class_drop"
    assert json.loads(json.dumps(verdict.to_dict()))["checks"][0]["name"] == "improvement"


def test_a_poor_first_model_is_not_made_champion_but_a_good_one_is():
    poor = judge(CHAMPION, LABELS, GateRules(min_accuracy=0.9), classes=CLASSES)
    assert not poor.promote
    assert poor.reasons[0] == "accuracy 0.800 is below the floor 0.900 (evaluate.min_accuracy); registered, but not made champion"
    first = judge(CHAMPION, LABELS, GateRules(min_accuracy=0.5), classes=CLASSES)
    assert first.promote and first.reasons[0] == "no champion yet; challenger test accuracy 0.800"


def test_a_champion_that_cannot_be_compared_is_never_replaced_silently():
    why = "its classes ['a', 'b'] differ from the challenger's ['cat', 'dog', 'fox', 'owl']"
    verdict = judge(probs_of([]), LABELS, GateRules(), None, "4", why, CLASSES)
    assert not verdict.promote
    assert verdict.reasons[0] == f"cannot compare with champion v4: {why}; it stays champion, promote by hand if intended"


def test_scores_agree_with_scikit_learn_even_for_a_class_never_predicted():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 300)
    predicted = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 4, 300))  # class 4 never predicted
    assert score(predicted, labels, "macro_f1", 5) == pytest.approx(
        f1_score(labels, predicted, average="macro", labels=range(5), zero_division=0)
    )
    assert score(predicted, labels, "accuracy", 5) == pytest.approx((predicted == labels).mean())


def test_bootstrap_interval_is_seeded_and_brackets_the_observed_gain():
    better, worse = probs_of(CHAMPION_WRONG[:3]).argmax(1), CHAMPION.argmax(1)
    interval = bootstrap_interval(better, worse, LABELS, "accuracy", 4, 1000, 0.05, seed=7)
    assert interval == bootstrap_interval(better, worse, LABELS, "accuracy", 4, 1000, 0.05, seed=7)
    assert 0 < interval[0] < 0.17 < interval[1]


# ---------------------------------------------------------------- the registry side (real MLflow on SQLite)


@pytest.fixture
def registry(tiny_params, tmp_path):
    """An empty registry (SQLite in tmp) and a helper that registers a version from a local folder."""
    from components.core.files import sha256
    from components.core.lineage import sha256_tag
    from components.registry.tracking import open_tracking_store

    uri = open_tracking_store(tiny_params)
    from mlflow import MlflowClient

    client = MlflowClient(uri, uri)
    experiment = client.get_experiment_by_name(tiny_params.tracking.experiment).experiment_id
    name = tiny_params.deploy.model_name

    def register(classes=("0", "1", "7")) -> str:
        run = client.create_run(experiment)
        folder = tmp_path / run.info.run_id / "model"
        tiny_onnx(folder / "model.onnx", classes)
        client.log_artifacts(run.info.run_id, str(folder), "model")
        try:
            client.get_registered_model(name)
        except Exception:  # noqa: BLE001 - not there yet
            client.create_registered_model(name)
        # what Graft's registration records beside the file: the digest that loading checks
        digest = {sha256_tag("model.onnx"): sha256(folder / "model.onnx")}
        return str(client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=digest).version)

    return client, name, register


def test_a_champion_with_other_classes_cannot_be_compared(registry):
    from components.core.lineage import CHAMPION
    from components.deploy.judge import champion_probabilities
    from components.registry.versions import version_by_alias

    client, name, register = registry
    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    version = register(classes=("cat", "dog", "fox"))
    client.set_registered_model_alias(name, CHAMPION, version)
    probs, problem = champion_probabilities(name, version_by_alias(client, name), ("0", "1", "7"), lambda size: images)
    assert probs is None
    assert problem == "its classes ['cat', 'dog', 'fox'] differ from the challenger's ['0', '1', '7']"
    verdict = judge(np.eye(3)[[0, 1, 2, 0, 1, 2]], np.array([0, 1, 2, 0, 1, 2]), GateRules(), probs, version, problem)
    assert not verdict.promote and "cannot compare with champion" in verdict.reasons[0]

    same = register(classes=("0", "1", "7"))
    client.set_registered_model_alias(name, CHAMPION, same)
    probs, problem = champion_probabilities(name, version_by_alias(client, name), ("0", "1", "7"), lambda size: images)
    assert problem is None and probs.shape == (6, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_the_comparison_uses_only_the_images_neither_model_saw_and_needs_enough_of_them():
    """Champion-seen images are left out of the comparison; too few left and the gate does not promote."""
    from components.evaluate.gate import Comparison

    better = probs_of(CHAMPION_WRONG[:3])  # its 3 mistakes are among the champion's 20
    fair = np.ones(len(LABELS), dtype=bool)
    fair[CHAMPION_WRONG] = False  # say the champion trained on exactly the images it gets wrong
    verdict = judge(better, LABELS, GateRules(min_comparison_images=50, test="none"), CHAMPION, "4", None, CLASSES, Comparison(fair))
    assert verdict.compared_images == len(LABELS) - len(CHAMPION_WRONG)
    assert verdict.champion_score == 1.0  # on the images it never saw, the champion is never wrong here
    assert any("compared on 80 images of the 100 test images that neither model trained or early-stopped on" in r
               for r in verdict.reasons)
    assert not verdict.promote and {c.name for c in verdict.failures} == {"improvement"}
    few = judge(better, LABELS, GateRules(min_comparison_images=85), CHAMPION, "4", None, CLASSES,
                Comparison(fair, ("the split settings changed since champion v4",)))
    assert not few.promote and [c.name for c in few.failures] == ["comparison"]
    assert "only 80 images of the 100 test images were seen by neither model" in few.reasons[0]
    assert "the split settings changed since champion v4" in few.reasons[0] and "evaluate.min_comparison_images" in few.reasons[0]
    assert few.tags()["gate.compared_images"] == "80"
    # a test split smaller than the rule can never promote: that is what the reason says, with the fixes
    small = judge(better, LABELS, GateRules(min_comparison_images=120), CHAMPION, "4", None, CLASSES, Comparison(fair))
    assert not small.promote and [c.name for c in small.failures] == ["comparison"]
    assert small.reasons[0].startswith("the test split holds only 100 images; at least 120 are needed"), small.reasons[0]
    assert "add images, raise data.test_fraction, or lower evaluate.min_comparison_images" in small.reasons[0]


def test_a_champion_moved_by_hand_is_recorded_on_the_next_run(registry):
    from components.core.lineage import CHAMPION
    from components.deploy.register import record_manual_promotion
    from components.registry.history import move_alias, read_history

    client, name, register = registry
    first, second = register(), register()
    move_alias(client, name, first, "gate", "test", "first model")
    record_manual_promotion(client, name)  # Graft's own choice: nothing to record
    assert [m.action for m in read_history(client, name)] == ["gate"]

    client.set_registered_model_alias(name, CHAMPION, second)  # a person moves it in the UI
    record_manual_promotion(client, name)
    manual = read_history(client, name)[-1]
    assert (manual.action, manual.previous, manual.version) == ("manual", first, second)
    record_manual_promotion(client, name)  # recorded once
    assert len(read_history(client, name)) == 2


def test_gate_rules_come_from_params_yaml(digits_dir, tmp_path, feature_cache_dir):
    from components.core.config import load_params
    from tests.conftest import REPO, tiny_overrides

    overrides = ["evaluate.gate_test=bootstrap", "evaluate.alpha=0.01", "evaluate.max_class_drop=0.1", "deploy.min_improvement=0.02"]
    params = load_params(REPO / "params.yaml", [*tiny_overrides(digits_dir, tmp_path, feature_cache_dir), *overrides])
    rules = GateRules.from_params(params)
    assert (rules.test, rules.alpha, rules.max_class_drop, rules.min_improvement) == ("bootstrap", 0.01, 0.1, 0.02)
    assert rules.min_accuracy == params.evaluate.min_accuracy and rules.metric == params.evaluate.metric


def test_a_gain_just_under_the_minimum_never_reads_as_the_minimum():
    """99 images: one more right is +1.01 points; against a 1.02-point minimum one decimal would say +1.0 below 1.0."""
    labels = np.repeat(np.arange(3), 33)

    def erring_on(wrong: list[int]) -> np.ndarray:
        predicted = labels.copy()
        predicted[wrong] = (labels[wrong] + 1) % 3
        return np.eye(3)[predicted] * 0.9 + 0.1 / 3

    champion, challenger = erring_on(list(range(0, 99, 10))), erring_on(list(range(10, 99, 10)))
    verdict = judge(challenger, labels, GateRules(min_improvement=0.0102), champion, "1", None, ("a", "b", "c"))
    assert not verdict.promote
    assert verdict.reasons[0].endswith("+1.01 points, below the 1.02-point minimum (deploy.min_improvement)")
