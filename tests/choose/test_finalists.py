"""The choose stage's second round on real backbones and real digits: the finalists' heads are trained
as the fine-tune stage trains them, and the best validation accuracy wins where LogME picks wrong."""

import logging
from dataclasses import replace
from functools import partial

import pytest

from components.choose.candidates import CandidateScore
from components.choose.ranking import BASELINE_STATUS, ChooseResult, rank, settle
from components.choose.report import log_choice, prediction_metrics
from components.choose.stage import choose_model
from components.core.config import load_params
from components.core.errors import ModelError, TrainingError
from components.data.folders import scan
from components.data.split import SplitSettings
from components.train.stage import fine_tune, forget_checkpoints
from components.train.strategies import fit_finalist_head, forget_trained_heads
from tests.conftest import REPO, tiny_overrides

LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


@pytest.fixture(scope="module")
def misordered(tmp_path_factory, feature_cache_dir):
    """All ten digits, 24 a class, split with data.seed=5, at the demo's 112 px: LogME ranks Lite2 first,
    while a trained head does best on Lite0 (0.950 against 0.875 on the 40 validation images)."""
    from components.data.demo import write_digits

    work = tmp_path_factory.mktemp("misordered")
    data = write_digits(work / "images", per_class=24)
    params = load_params(
        REPO / "params.yaml",
        tiny_overrides(data, work, feature_cache_dir)
        + ["data.image_size=112", "data.seed=5", "choose.sample_size=200", f"choose.candidates=[{', '.join(LITES)}]",
           "choose.baseline=false"],
    )
    return params, scan(params.data.dir, SplitSettings.from_config(params.data))


def _with_choose(params, **changes):
    return params.model_copy(update={"choose": params.choose.model_copy(update=changes)})


def trained_accuracy(params, split, name: str, run_dir) -> float:
    """The ground truth: the fine-tune stage's validation accuracy for `name` (train.strategy=feature_extraction)."""
    trained = fine_tune(params, split, ChooseResult(name, params.data.image_size, "logme", "truth", (), 0.0), run_dir / name)
    return trained.history[trained.best_epoch - 1]["val/accuracy"]


def test_default_selection_picks_the_best_trained_backbone_where_logme_misorders(misordered, tmp_path):
    params, split = misordered
    assert params.train.strategy == "feature_extraction" and params.choose.finalists >= len(LITES)
    result = choose_model(params, split, fit_head=partial(fit_finalist_head, params))
    forget_trained_heads()  # the fine-tune stage would reuse the finalists' heads: the truth is trained anew
    truth = {name: trained_accuracy(params, split, name, tmp_path) for name in LITES}
    best = max(truth.values())
    assert truth[result.score_pick] < best - 0.01, f"LogME's pick trains as well as the best here: {truth}"
    assert truth[result.chosen] == best
    rows = {row.name: row for row in result.candidates}
    assert {name: rows[name].val_accuracy for name in LITES} == pytest.approx(truth, abs=1e-6)
    assert [row.trained_rank for row in result.candidates] == [1, 2, 3]
    assert result.score_regret == pytest.approx(best - truth[result.score_pick], abs=1e-6)
    place = {1: "1st", 2: "2nd", 3: "3rd"}[rows[result.chosen].score_rank]
    assert result.reason.startswith(f"validation accuracy {best:.3f} after training the 3 finalists' heads")
    assert result.reason.endswith(f"LogME ranked it {place}")


def test_the_feature_extraction_stage_takes_the_winning_finalists_head_which_is_the_head_it_would_train(
    misordered, tmp_path, monkeypatch
):
    """Right after the choose stage in the same process (as `graft run` runs them), the feature_extraction stage
    does not train the winner's head again: it takes the finalist's, replays its epochs to the run's metrics and
    leaves the global random generators as training would. Trained again from nothing, it is the same head."""
    import torch

    import components.train.strategies as strategies
    from components.train.stage import load_head

    params, split = misordered
    forget_trained_heads()
    choice = choose_model(params, split, fit_head=partial(fit_finalist_head, params))
    monkeypatch.setattr(strategies, "fit", lambda *a, **k: pytest.fail("the winning finalist's head was trained again"))
    logged = []
    torch.manual_seed(123)  # whatever the generators hold before, the stage seeds them
    reused = fine_tune(params, split, choice, tmp_path / "reused", on_epoch=lambda row, step: logged.append((step, row)))
    generators_after_reuse = torch.get_rng_state()
    # its finished checkpoint is written as training writes it: a stop in a later stage does not train it again
    kept = list((params.data.cache_dir / "resume").glob(f"{reused.resume_key}-*"))
    assert kept and all(torch.load(path, weights_only=True)["finished"] for path in kept)
    forget_checkpoints(params, reused)
    monkeypatch.undo()
    forget_trained_heads()
    fresh = fine_tune(params, split, choice, tmp_path / "fresh")
    forget_checkpoints(params, fresh)
    assert fresh.resumed_from_epoch == 0
    assert torch.equal(generators_after_reuse, torch.get_rng_state())
    for name, tensor in load_head(fresh.checkpoint_path).state_dict().items():
        assert torch.equal(load_head(reused.checkpoint_path).state_dict()[name], tensor), name
    timings = ("train/images_per_second", "time/epoch_seconds")
    assert [{k: v for k, v in row.items() if k not in timings} for row in reused.history] == [
        {k: v for k, v in row.items() if k not in timings} for row in fresh.history]
    assert (reused.best_epoch, reused.best_val_loss) == (fresh.best_epoch, fresh.best_val_loss)
    assert logged == list(enumerate(reused.history, 1))


def test_one_finalist_keeps_choosing_by_the_score_alone(misordered):
    params, split = misordered
    result = choose_model(_with_choose(params, finalists=1), split)
    assert result.chosen == result.score_pick == result.candidates[0].name
    assert all(row.val_accuracy is None and row.trained_rank is None for row in result.candidates)
    assert result.reason.startswith("highest LogME") and result.score_regret is None


def test_finalists_are_the_best_by_score_within_the_limits(misordered):
    params, split = misordered
    limited = _with_choose(params, finalists=2, max_params_m=4.5)  # Lite2 (4.8M) is over the limit
    result = choose_model(limited, split, fit_head=partial(fit_finalist_head, limited))
    rows = {row.name: row for row in result.candidates}
    assert rows["efficientnet_lite2"].status.startswith("over limit") and rows["efficientnet_lite2"].val_accuracy is None
    assert {row.name for row in result.trained} == {"efficientnet_lite0", "efficientnet_lite1"}


def test_training_finalists_needs_the_fine_tune_stages_head_trainer(misordered):
    params, split = misordered
    with pytest.raises(ValueError, match=r"choose.finalists=3 .*fit_head=functools.partial\(.*fit_finalist_head"):
        choose_model(params, split)


def test_a_finalist_whose_head_fails_is_marked_and_the_others_still_compete(misordered):
    params, split = misordered
    fit = partial(fit_finalist_head, params)
    calls = []

    def first_diverges(*arrays):
        calls.append(1)
        if len(calls) == 1:
            raise TrainingError("loss became NaN at epoch 3; lower train.lr")
        return fit(*arrays)

    result = choose_model(params, split, fit_head=first_diverges)
    failed = [row for row in result.candidates if row.status.startswith("skipped: its head did not train")]
    assert len(failed) == 1 and failed[0].score_rank == 1 and failed[0].name != result.chosen
    assert len(result.trained) == 2 and "after training the 2 finalists' heads" in result.reason


def _row(name: str, score: float, pretrained: bool = True) -> CandidateScore:
    return CandidateScore(name, pretrained, "ok", score=score, logme=score, image_size=64)


def replace_trained(row: CandidateScore, accuracy: float, loss: float) -> CandidateScore:
    return replace(row, val_accuracy=accuracy, val_loss=loss)


def test_ties_in_validation_accuracy_go_to_the_lower_validation_loss(tiny_params):
    ranking = rank(tiny_params, [_row("a", 0.9), _row("b", 0.5), _row("c", 0.1)])
    by_name = {row.name: row for row in ranking.candidates}
    finalists = [
        replace_trained(by_name["a"], 0.90, 0.40),
        replace_trained(by_name["b"], 0.95, 0.30),
        replace_trained(by_name["c"], 0.95, 0.20),
    ]
    result = settle(tiny_params, ranking, finalists, 1.0)
    assert [row.name for row in result.candidates] == ["c", "b", "a"]
    assert result.chosen == "c" and result.score_pick == "a" and result.score_regret == pytest.approx(0.05)
    assert result.reason == (
        "validation accuracy 0.950 after training the 3 finalists' heads on the whole training split "
        "(b 0.950, a 0.900); LogME ranked it 3rd"
    )
    assert prediction_metrics(result) == pytest.approx(
        {"choose/finalists_trained": 3.0, "choose/score_kendall_tau": -1.0, "choose/score_regret": 0.05}
    )


def test_a_random_baseline_is_reference_only_unless_allowed_and_outscoring_every_pretrained_one_is_a_warning(tiny_params, caplog):
    rows = [_row("a", 0.5), _row("b", 0.3), _row("random_a", 0.9, pretrained=False)]
    with caplog.at_level(logging.WARNING, logger="components"):
        ranking = rank(tiny_params, rows)
    by_name = {row.name: row for row in ranking.candidates}
    assert ranking.chosen == "a" and by_name["random_a"].status == BASELINE_STATUS and by_name["random_a"].score_rank is None
    assert [r.name for r in ranking.candidates if r.score_rank] == ["a", "b"]  # the finalists come from these
    assert "the random baseline random_a outscores every pre-trained candidate (0.9000 > 0.5000)" in caplog.text

    caplog.clear()
    allowed = tiny_params.model_copy(update={"choose": tiny_params.choose.model_copy(update={"allow_baseline": True})})
    with caplog.at_level(logging.WARNING, logger="components"):
        ranking = rank(allowed, rows)
    assert ranking.chosen == "random_a" and {r.name: r.score_rank for r in ranking.candidates} == {"random_a": 1, "a": 2, "b": 3}
    assert "outscores" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="components"):
        assert rank(tiny_params, [_row("a", 0.95), *rows[1:]]).chosen == "a"  # a baseline below the best: no warning
    assert "outscores" not in caplog.text


def test_no_trained_finalist_is_a_model_error_naming_each(tiny_params):
    ranking = rank(tiny_params, [_row("a", 0.9), _row("b", 0.5)])
    failed = [
        CandidateScore(row.name, True, "skipped: its head did not train (loss NaN)", score=row.score, score_rank=row.score_rank)
        for row in ranking.candidates
    ]
    with pytest.raises(ModelError, match=r"no finalist could be trained \(a: skipped: its head did not train.*b: skipped"):
        settle(tiny_params, ranking, failed, 1.0)


def test_mlflow_holds_the_predicted_and_the_realised_ranking(tiny_params, tmp_path):
    from components.registry.tracking import parent_run
    from mlflow import MlflowClient

    ranking = rank(tiny_params, [_row("a", 0.9), _row("b", 0.5), _row("c", 0.1, pretrained=False)])
    by_name = {row.name: row for row in ranking.candidates}
    choice = settle(tiny_params, ranking, [replace_trained(by_name["a"], 0.80, 0.5), replace_trained(by_name["b"], 0.90, 0.4)], 2.0)
    with parent_run(tiny_params) as run:
        log_choice(run, choice, tmp_path)
    client = MlflowClient(run.uri, run.uri)
    parent = client.get_run(run.run_id).data
    assert parent.metrics["choose/score_kendall_tau"] == -1.0 and parent.metrics["choose/score_regret"] == pytest.approx(0.1)
    assert parent.tags["chosen_backbone"] == "b" and parent.tags["choose.score_pick"] == "a"
    children = client.search_runs(
        [client.get_run(run.run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run.run_id}'"
    )
    ranks = {c.data.params["backbone"]: (c.data.metrics.get("choose/score_rank"), c.data.metrics.get("choose/trained_rank")) for c in children}
    assert ranks == {"a": (1.0, 2.0), "b": (2.0, 1.0), "c": (None, None)}


@pytest.mark.slow
def test_the_flows_choose_stage_trains_the_finalists(prefect_harness, misordered):
    """`graft run`'s wiring: the candidates scored as mapped Prefect tasks, the finalists trained with the
    fine-tune stage's head trainer, the same choice as `choose_model` in-process."""
    from prefect import flow

    from flows.training import choose_stage

    params, split = misordered

    @flow
    def choose_in_a_flow(params, split):
        return choose_stage(params, split)

    in_flow = choose_in_a_flow(params, split)
    here = choose_model(params, split, fit_head=partial(fit_finalist_head, params))
    assert in_flow.chosen == here.chosen and in_flow.reason == here.reason
    assert [(r.name, r.val_accuracy, r.trained_rank) for r in in_flow.trained] == [(r.name, r.val_accuracy, r.trained_rank) for r in here.trained]
