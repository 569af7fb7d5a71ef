"""The choose stage on real pip-packaged weights and real digit images."""

import pytest

from components.choose import choose_model, stratified_sample
from components.data import scan
from components.errors import ConfigError
from components.zoo import ZOO, get_spec


def test_unknown_candidate_lists_valid_names_and_closest(tiny_params):
    params = tiny_params.model_copy(update={"choose": tiny_params.choose.model_copy(update={"candidates": ("efficientnet_lite9",)})})
    with pytest.raises(ConfigError, match=r"Did you mean 'efficientnet_lite\d'.*Valid names: .*resnet18"):
        choose_model(params, scan(params.data.dir))


def test_stratified_sample_keeps_every_class(digits_dir):
    split = scan(digits_dir)
    sample = stratified_sample(split.train, 9, seed=0)
    assert sorted({s.label for s in sample}) == [0, 1, 2]


def test_ranking_scores_candidates_and_keeps_baseline_as_reference(tiny_params, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    params = tiny_params.model_copy(
        update={"choose": tiny_params.choose.model_copy(update={"candidates": ("efficientnet_lite0", "random_efficientnet_lite0", "resnet18")})}
    )
    result = choose_model(params, scan(params.data.dir))
    rows = {row.name: row for row in result.candidates}
    assert result.chosen == "efficientnet_lite0"
    assert rows["efficientnet_lite0"].status == "ok" and rows["efficientnet_lite0"].logme is not None
    assert rows["random_efficientnet_lite0"].status.startswith("baseline")
    assert rows["random_efficientnet_lite0"].score is not None
    hint = rows["resnet18"].status
    assert hint.startswith("skipped: weights not found: put resnet18-") and str(tmp_path / "empty-torch-home") in hint


def test_params_limit_marks_candidate_and_it_is_not_chosen(tiny_params):
    params = tiny_params.model_copy(
        update={"choose": tiny_params.choose.model_copy(update={"candidates": ("efficientnet_lite0", "efficientnet_lite2"), "max_params_m": 4.0})}
    )
    result = choose_model(params, scan(params.data.dir))
    rows = {row.name: row for row in result.candidates}
    assert rows["efficientnet_lite2"].status.startswith("over limit")
    assert result.chosen == "efficientnet_lite0"


def test_zoo_metadata_is_complete():
    for spec in ZOO.values():
        assert spec.input_size >= 224 and len(spec.mean) == 3 and spec.params_m > 0 and spec.licence
    assert get_spec("efficientnet_lite1").weights_path().is_file()
