"""Fine-tune and evaluate on tiny real data: beats chance, early stopping, folded head, metrics."""

import numpy as np
import pytest
import torch

from components.choose import choose_model
from components.data import scan
from components.errors import TrainingError
from components.evaluate import classification_metrics, evaluate, expected_calibration_error
from components.zoo import get_spec
from components.train import fine_tune, fold_standardisation, load_classifier, train_head


@pytest.fixture
def trained(tiny_params, tmp_path):
    split = scan(tiny_params.data.dir)
    choice = choose_model(tiny_params, split)
    return tiny_params, split, fine_tune(tiny_params, split, choice, tmp_path / "run")


def test_feature_extraction_beats_chance_and_keeps_backbone_frozen(trained, tmp_path):
    params, split, result = trained
    assert result.epochs_run >= result.best_epoch
    evaluation = evaluate(params, split, result, tmp_path / "run")
    assert evaluation.metrics["accuracy"] > 0.6  # chance is 1/3
    assert evaluation.confusion_path.stat().st_size > 1000
    model, ckpt = load_classifier(result.checkpoint_path)
    assert set(ckpt) >= {"backbone", "image_size", "classes", "head", "config"}
    # frozen: the trained model's backbone is exactly the pretrained one
    pretrained = get_spec(result.backbone).build(result.image_size).state_dict()
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, pretrained[name]), name


def test_model_probabilities_match_the_cached_feature_path(trained):
    params, split, result = trained
    from components.evaluate import predict_val
    from components.images import load_batch

    model, _ = load_classifier(result.checkpoint_path)
    with torch.no_grad():
        direct = model(torch.from_numpy(load_batch([s.path for s in split.val], result.image_size))).numpy()
    np.testing.assert_allclose(predict_val(params, split, result), direct, atol=1e-5)


def test_early_stopping_stops_before_the_epoch_budget(tiny_params):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    y = rng.integers(0, 2, size=60)  # pure noise: validation loss stops improving quickly
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"epochs": 500, "patience": 3})})
    _, history = train_head(params, x[:40], y[:40], x[40:], y[40:])
    assert len(history) < 500
    best = int(np.argmin([h["val/loss"] for h in history]))
    assert len(history) - 1 - best == 3


def test_divergence_names_the_epoch_and_suggests_a_lower_lr(tiny_params):
    x = np.full((20, 4), 1e30, dtype=np.float32)
    x[::2] *= -1
    y = np.arange(20) % 2
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"lr": 1e30})})
    with pytest.raises(TrainingError, match=r"diverged at epoch \d+.*lower train.lr"):
        train_head(params, np.vstack([x, x * np.inf]), np.concatenate([y, y]), x, y)


def test_folding_standardisation_is_exact():
    head = {"weight": torch.randn(3, 5), "bias": torch.randn(3)}
    mean, scale = torch.randn(5), torch.rand(5) + 0.5
    features = torch.randn(7, 5)
    folded = fold_standardisation(head, mean, scale)
    expected = ((features - mean) / scale) @ head["weight"].T + head["bias"]
    torch.testing.assert_close(features @ folded["weight"].T + folded["bias"], expected)


def test_metrics_match_hand_computed_values():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    labels = np.array([0, 1, 1, 1])
    metrics, per_class = classification_metrics(probs, labels, ("a", "b"), top_k=1)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["balanced_accuracy"] == pytest.approx((1.0 + 1 / 3) / 2)
    # class a: P=1/3, R=1 -> F1=0.5; class b: P=1, R=1/3 -> F1=0.5
    assert metrics["macro_f1"] == pytest.approx(0.5)
    assert per_class["b"]["support"] == 3
    assert metrics["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.7, 0.2])))


def test_ece_of_a_perfectly_calibrated_toy_is_zero_and_of_overconfidence_is_not():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.0)
    assert expected_calibration_error(probs, np.array([1, 0])) == pytest.approx(1.0)
