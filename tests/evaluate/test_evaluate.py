"""Evaluate: metrics against hand-computed values, calibration, pictures and DVC files, bad validation data."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from components.choose.ranking import ChooseResult
from components.core.errors import CalibrationError, DataError
from components.data.folders import scan
from components.data.split import Sample, Split
from components.evaluate.calibration import (
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    softmax,
)
from components.evaluate.metrics import check_classes, classification_metrics, most_confident_mistakes
from components.evaluate.stage import evaluate, logits_of
from components.train.stage import fine_tune

# Four images, two classes: predictions [a, a, b, a] for truths [a, b, b, b].
PROBS = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
LABELS = np.array([0, 1, 1, 1])


def test_metrics_match_hand_computed_values():
    metrics, per_class = classification_metrics(PROBS, LABELS, ("a", "b"), top_k=1)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["balanced_accuracy"] == pytest.approx((1.0 + 1 / 3) / 2)
    # class a: P=1/3, R=1 -> F1=0.5; class b: P=1, R=1/3 -> F1=0.5
    assert metrics["macro_f1"] == pytest.approx(0.5)
    assert per_class["a"] == pytest.approx({"precision": 1 / 3, "recall": 1.0, "f1": 0.5, "support": 1})
    assert per_class["b"] == pytest.approx({"precision": 1.0, "recall": 1 / 3, "f1": 0.5, "support": 3})
    assert metrics["top1_accuracy"] == metrics["accuracy"]
    assert metrics["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.7, 0.2])))


def test_log_loss_is_the_same_for_the_float32_model_and_the_float64_softmax_of_a_confident_mistake():
    """`graft evaluate` scores the ONNX model's float32 output; the run scored a float64 softmax of the same logits."""
    from components.evaluate.metrics import log_loss

    probs = np.array([[1 - 1e-20, 1e-20], [0.2, 0.8]])  # the first image: sure of the wrong class
    labels = np.array([1, 1])
    assert log_loss(probs.astype(np.float32), labels) == pytest.approx(log_loss(probs, labels), rel=1e-6)
    assert log_loss(probs, labels) == pytest.approx((-np.log(np.finfo(np.float32).eps) - np.log(0.8)) / 2, rel=1e-6)


def test_top_k_counts_the_true_class_among_the_k_most_probable():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    labels = np.array([2, 0, 1, 1])  # top-2 sets: {0,1} miss, {2,1} miss, {1,2} hit, {0,1} hit
    metrics, _ = classification_metrics(probs, labels, ("x", "y", "z"), top_k=2)
    assert metrics["accuracy"] == pytest.approx(0.25)
    assert metrics["top2_accuracy"] == pytest.approx(0.5)
    metrics, _ = classification_metrics(probs, labels, ("x", "y", "z"), top_k=10)  # k is capped at the class count
    assert metrics["top3_accuracy"] == pytest.approx(1.0)


def test_ece_and_reliability_bins_match_hand_computed_values():
    # 2 bins: all four in (0.5, 1], mean confidence 0.75, accuracy 0.5 -> ECE 0.25
    assert expected_calibration_error(PROBS, LABELS, bins=2) == pytest.approx(0.25)
    # 5 bins: (0.4,0.6] {0.6 wrong}: 0.25*0.6; (0.6,0.8] {0.7 right, 0.8 wrong}: 0.5*0.25; (0.8,1] {0.9 right}: 0.25*0.1
    assert expected_calibration_error(PROBS, LABELS, bins=5) == pytest.approx(0.15 + 0.125 + 0.025)
    rows = reliability_bins(PROBS, LABELS, bins=5)
    assert [(r.count, r.accuracy) for r in rows] == [(1, 0.0), (2, 0.5), (1, 1.0)]
    assert rows[1].confidence == pytest.approx(0.75)


def test_ece_of_a_perfectly_calibrated_toy_is_zero_and_of_overconfidence_is_not():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.0)
    assert expected_calibration_error(probs, np.array([1, 0])) == pytest.approx(1.0)


def test_temperature_scaling_recovers_a_known_overconfidence_and_keeps_predictions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 4)) * 3
    truth = softmax(logits, 2.5)  # the model's logits are 2.5x too sharp
    labels = np.array([rng.choice(4, p=row) for row in truth])
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(2.5, rel=0.08)
    assert negative_log_likelihood(logits, labels, temperature) < negative_log_likelihood(logits, labels)
    assert (softmax(logits, temperature).argmax(1) == logits.argmax(1)).all()
    before = expected_calibration_error(softmax(logits), labels)
    assert expected_calibration_error(softmax(logits, temperature), labels) < before / 2


def test_temperature_scaling_refuses_broken_logits_naming_the_setting():
    with pytest.raises(CalibrationError, match="evaluate.temperature_scaling=false"):
        fit_temperature(np.array([[np.nan, 1.0]]), np.array([0]))


def test_most_confident_mistakes_come_first():
    probs = np.array([[0.4, 0.6], [0.95, 0.05], [0.1, 0.9], [0.3, 0.7]])
    labels = np.array([0, 0, 0, 1])  # wrong: 0 (0.6), 2 (0.9); right: 1, 3
    assert most_confident_mistakes(probs, labels, limit=5) == [2, 0]
    assert most_confident_mistakes(probs, labels, limit=1) == [2]
    assert most_confident_mistakes(probs, np.array([1, 0, 1, 1]), limit=5) == []


def _split(classes, labels, test_labels=None):
    val = tuple(Sample(Path(f"/data/val/{i}.png"), label) for i, label in enumerate(labels))
    test = tuple(Sample(Path(f"/data/test/{i}.png"), label) for i, label in enumerate(labels if test_labels is None else test_labels))
    return Split(root=Path("/data"), classes=classes, train=(), val=val, test=test, presplit=True)


def test_held_out_classes_that_differ_from_the_model_are_named():
    with pytest.raises(DataError, match=r"lacks classes the model knows: 2; it has classes the model does not know: 7"):
        check_classes(_split(("0", "1", "7"), [0, 1, 2]), ("0", "1", "2"))
    with pytest.raises(DataError, match="its val split has no images of: 1"):
        check_classes(_split(("0", "1"), [0, 0], [0, 1]), ("0", "1"))
    with pytest.raises(DataError, match="its test split has no images of: 0"):
        check_classes(_split(("0", "1"), [0, 1], [1, 1]), ("0", "1"))
    check_classes(_split(("0", "1"), [0, 1]), ("0", "1"))


def test_presplit_validation_lacking_a_class_is_refused_by_name(digits_dir, tmp_path):
    for part, classes in (("train", ("0", "1", "7")), ("val", ("0", "1"))):
        for name in classes:
            shutil.copytree(digits_dir / name, tmp_path / part / name)
    with pytest.raises(DataError, match="lacks classes the model will learn: 7"):
        scan(tmp_path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, digits_dir, feature_cache_dir):
    """A head trained on efficientnet_lite0 features of the tiny digits (choose skipped: it is tested elsewhere)."""
    from components.core.config import load_params
    from tests.conftest import REPO, tiny_overrides

    work = tmp_path_factory.mktemp("evaluate")
    params = load_params(REPO / "params.yaml", [*tiny_overrides(digits_dir, work, feature_cache_dir), "evaluate.temperature_scaling=true"])
    split = scan(params.data.dir)
    choice = ChooseResult("efficientnet_lite0", 64, "logme", "test", (), 0.0)
    return params, split, fine_tune(params, split, choice, work / "run"), work


def test_evaluate_reports_val_and_test_and_draws_the_test_split(tiny_model, monkeypatch):
    """Temperature fitted on val; metrics for both splits; pictures, plot data and per-class figures from test."""
    params, split, trained, work = tiny_model
    result = evaluate(params, split, trained, work / "run")
    assert result.test["accuracy"] > 0.6 and result.val["accuracy"] > 0.6  # chance is 1/3
    assert not result.test_is_val and len(split.test) and not {s.path for s in split.test} & {s.path for s in split.val}
    assert result.temperature > 0 and result.val["temperature"] == result.test["temperature"] == result.temperature
    assert {"ece_uncalibrated", "log_loss_uncalibrated"} <= set(result.val)
    assert result.val["log_loss"] <= result.val["log_loss_uncalibrated"] + 1e-9  # the fit minimises NLL on val
    for picture in result.pictures:
        assert picture.stat().st_size > 1000, picture
    assert [p.name for p in result.pictures] == ["confusion_matrix.png", "reliability_diagram.png", "misclassified.png"]
    confusion, reliability = (json.loads(p.read_text()) for p in result.plot_data)
    assert len(confusion) == len(split.test) and set(confusion[0]) == {"actual", "predicted"}
    right = sum(row["actual"] == row["predicted"] for row in confusion)
    assert right / len(confusion) == pytest.approx(result.test["accuracy"])
    assert sum(row["count"] for row in reliability) == len(split.test)
    written = json.loads(result.metrics_path.read_text())
    assert written["val"]["accuracy"] == result.val["accuracy"] and written["test"]["accuracy"] == result.test["accuracy"]
    assert sum(c["support"] for c in written["per_class"].values()) == len(split.test)

    # evaluate.calibration_bins and evaluate.misclassified_images shape the plots
    import components.evaluate.stage as stage

    shown, draw = [], stage.plot_mistakes
    monkeypatch.setattr(stage, "plot_mistakes", lambda *args, **kwargs: (shown.append(args[4]), draw(*args, **kwargs))[1])
    few = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"calibration_bins": 2, "misclassified_images": 1})})
    again = evaluate(few, split, trained, work / "few")
    mistakes = len(confusion) - right
    assert len(shown) == 1 and len(shown[0]) == min(1, mistakes)
    bins = json.loads(again.plot_data[1].read_text())
    assert 1 <= len(bins) <= 2 and sum(row["count"] for row in bins) == len(split.test)
    assert len(bins) == 2 or all(row["confidence"] >= 0.5 for row in bins)  # two bins: [0, 0.5) and [0.5, 1]


@pytest.mark.slow
def test_the_exported_model_carries_the_fitted_temperature(tiny_model):
    from components.data.images import load_batch
    from components.deploy.export import export_and_verify
    from components.runtime.model import OnnxClassifier
    from components.train.stage import load_classifier

    params, split, trained, work = tiny_model
    result = evaluate(params, split, trained, work / "run")
    model, _ = load_classifier(trained.checkpoint_path)
    model.temperature.fill_(result.temperature)  # what deploy does
    paths = [s.path for s in split.val]
    exported = export_and_verify(model, work / "t.onnx", trained.image_size, 18, {"classes": list(split.classes), "image_size": 64}, paths, 1e-4)
    onnx_probs = OnnxClassifier(exported.onnx_path, ["CPUExecutionProvider"]).predict_proba(load_batch(paths, 64))
    expected = softmax(logits_of(params, trained, split.val), result.temperature)
    np.testing.assert_allclose(onnx_probs, expected, atol=1e-4)
    if abs(result.temperature - 1.0) > 0.05:  # the temperature really changed the probabilities
        assert np.abs(onnx_probs - softmax(logits_of(params, trained, split.val))).max() > 1e-3
    with torch.no_grad():
        assert float(model.temperature) == pytest.approx(result.temperature)


def test_the_misclassified_picture_shows_each_image_whole_at_any_size(tmp_path):
    """Images of any size and mode are each scaled into their cell of the grid, whole: a tiny grey scan, a wide
    photo and a tall one, each a solid colour, all appear."""
    from PIL import Image

    from components.evaluate.plots import MISTAKE_CELL_PX, plot_mistakes

    colours = {"grey.png": ((8, 8), "L", 128), "wide.png": ((300, 60), "RGB", (255, 0, 0)), "tall.png": ((40, 400), "RGBA", (0, 0, 255, 255))}
    paths = []
    for name, (size, mode, colour) in colours.items():
        Image.new(mode, size, colour).save(tmp_path / name)
        paths.append(tmp_path / name)
    probs = np.array([[0.2, 0.8], [0.9, 0.1], [0.3, 0.7]])
    picture = np.asarray(Image.open(plot_mistakes(paths, np.array([0, 1, 0]), probs, ("a", "b"), [0, 1, 2], tmp_path / "m.png")).convert("RGB"))

    def pixels(rgb: tuple[int, int, int]) -> int:
        return int((picture == rgb).all(axis=2).sum())

    assert pixels((128, 128, 128)) >= MISTAKE_CELL_PX**2 * 0.9  # the 8x8 scan, scaled up to its cell
    assert pixels((255, 0, 0)) >= MISTAKE_CELL_PX * (MISTAKE_CELL_PX * 60 // 300) * 0.9  # 5:1, its width fills the cell
    assert pixels((0, 0, 255)) >= MISTAKE_CELL_PX * (MISTAKE_CELL_PX * 40 // 400) * 0.9  # 1:10, its height fills the cell


def test_evaluate_scores_the_model_beside_the_summary_when_the_run_folder_is_not_on_this_machine(tmp_path, tiny_params):
    """A fresh clone has the DVC train stage's `outputs/summary.json` and, after `dvc pull`, its `outputs/model/model.onnx`,
    but not the run folder the summary names: the same file (by sha256) beside the summary is scored instead."""
    from components.core.files import sha256
    from components.evaluate.holdout import REPORTED_MODEL, evaluate_holdout, run_metrics
    from tests.models import tiny_onnx

    model = tiny_onnx(tmp_path / "outputs" / REPORTED_MODEL)
    summary = tmp_path / "outputs" / "summary.json"
    gone = tmp_path / "outputs" / "runs" / "elsewhere" / "model.onnx"
    summary.write_text(json.dumps({"test": {"accuracy": 0.5}, "onnx": {"path": str(gone), "sha256": sha256(model)}}))
    assert run_metrics(summary) == ({"accuracy": 0.5}, model)

    summary.write_text(json.dumps({"test": {"accuracy": 0.5}, "onnx": {"path": str(gone), "sha256": "0" * 64}}))
    assert run_metrics(summary) == ({"accuracy": 0.5}, gone)  # another model: not a stand-in
    with pytest.raises(DataError, match=rf"ONNX model {gone} does not exist; pass --model FILE, or run `dvc pull`.*its model is {model}"):
        evaluate_holdout(tiny_params, None, summary, tmp_path / "holdout")
    assert not (tmp_path / "holdout").exists()
