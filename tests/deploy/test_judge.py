"""The gate on grown data: challenger and champion compared only on test images neither has seen.

A real image folder grows by 10% per class and some of its files are renamed; models are trained,
evaluated and deployed through `deploy()` against a real MLflow registry on SQLite.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from components.choose.ranking import ChooseResult
from components.core.config import load_params
from components.data.demo import write_digits
from components.data.folders import scan
from components.data.split import SplitSettings
from components.data.versions import dir_md5
from components.deploy.stage import DeployContext, deploy
from components.evaluate.stage import evaluate
from components.registry.tracking import parent_run
from components.train.stage import fine_tune
from tests.conftest import REPO, seeded_store, tiny_overrides

pytestmark = pytest.mark.slow

WEAK = ["train.epochs=1", "train.lr=0.00001"]
"""A head that has barely moved from its random start: near chance."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    everything = write_digits(root / "all", per_class=48, classes=(0, 1, 7))
    before, after = root / "before", root / "after"
    for folder in sorted(everything.iterdir()):
        files = sorted(folder.iterdir())
        (before / folder.name).mkdir(parents=True)
        (after / folder.name).mkdir(parents=True)
        for path in files[:44]:
            shutil.copy(path, before / folder.name / path.name)
            shutil.copy(path, after / folder.name / f"renamed-{path.name}")  # every old file renamed
        for path in files[44:]:  # 10% more per class
            shutil.copy(path, after / folder.name / path.name)
    return before, after


def _deployed(folder: Path, work: Path, cache: Path, *extra: str):
    """Train, evaluate and deploy on `folder`; returns (split, DeployResult)."""
    params = load_params(REPO / "params.yaml", [
        *tiny_overrides(folder, work, cache), "deploy.variants=[]", "evaluate.min_accuracy=null",
        f"tracking.store_dir={seeded_store(work.parent / 'mlflow')}", *extra,
    ])
    split = scan(folder, SplitSettings.from_config(params.data))
    run_dir = work / "run"
    trained = fine_tune(params, split, ChooseResult("efficientnet_lite0", 64, "logme", "test", (), 0.0), run_dir)
    evaluation = evaluate(params, split, trained, run_dir)
    with parent_run(params) as run:
        result = deploy(DeployContext(params, split, run, run_dir, dir_md5(folder), "test"), trained, evaluation)
    return split, result


@pytest.fixture(scope="module")
def champion(folders, tmp_path_factory, feature_cache_dir):
    """A weak first model on the smaller folder: registered and made champion (there is none yet)."""
    before, _ = folders
    work = tmp_path_factory.mktemp("registry") / "champion"
    split, result = _deployed(before, work, feature_cache_dir, *WEAK)
    assert result.aliases == ("champion",)
    return work.parent, split


def test_a_truly_better_challenger_on_grown_data_is_promoted_after_a_comparison_on_unseen_images(folders, champion, feature_cache_dir):
    _, after = folders
    registry, old = champion
    split, result = _deployed(after, registry / "better", feature_cache_dir)
    assert result.verdict.promote and result.aliases == ("champion",)
    # the grown folder keeps every old image in its old split, so no test image was seen by the champion
    assert {s.digest for s in split.test}.isdisjoint(s.digest for s in old.train + old.val)
    assert result.verdict.compared_images == len(split.test)
    assert f"compared on {len(split.test)} images of the {len(split.test)} test images that neither model" in result.verdict.text()


def test_a_challenger_that_is_not_better_is_refused_with_the_comparison_size(folders, champion, feature_cache_dir):
    _, after = folders
    registry, _ = champion
    split, result = _deployed(after, registry / "same", feature_cache_dir, *WEAK)
    assert not result.verdict.promote and result.aliases == ("challenger",)
    assert {c.name for c in result.verdict.failures} & {"improvement", "significance"}
    assert f"of the {len(split.test)} test images that neither model trained or early-stopped on" in result.verdict.text()


def test_after_a_change_of_split_settings_only_images_neither_model_saw_are_compared(folders, tmp_path, feature_cache_dir):
    """Against a champion trained with other split settings, the compared images are the challenger's test images
    minus every image in the champion's train and val parts (computed here from the folders themselves); the
    verdict says the settings changed, and with fewer such images than `evaluate.min_comparison_images` it does
    not promote."""
    before, after = folders
    registry = tmp_path / "registry"
    old, first = _deployed(before, registry / "first", feature_cache_dir, *WEAK, "data.seed=11")
    assert "champion" in first.aliases
    new = scan(after)
    seen_by_champion = {s.digest for s in old.train + old.val}
    expected = sum(s.digest not in seen_by_champion for s in new.test)
    assert 0 < expected < len(new.test)
    _, second = _deployed(after, registry / "second", feature_cache_dir, f"evaluate.min_comparison_images={expected + 1}")
    verdict = second.verdict
    assert verdict.compared_images == expected
    assert "the split settings changed since champion" in verdict.text()
    assert not verdict.promote and [c.name for c in verdict.failures] == ["comparison"]
    assert f"only {expected} images of the {len(new.test)} test images were seen by neither model" in verdict.text()


def test_with_the_champion_alias_removed_outside_graft_the_gate_compares_with_the_last_champion(folders, tmp_path, feature_cache_dir):
    """Removing `champion` in the MLflow UI (to pause, say) is no evidence for a weaker model: the next run's challenger
    must beat the version that was champion last, not pass as 'no champion yet'."""
    from components.registry.history import read_history
    from components.registry.tracking import tracking_uri
    from mlflow import MlflowClient

    before, after = folders
    _, first = _deployed(before, tmp_path / "first", feature_cache_dir, *WEAK)
    assert first.aliases == ("champion",)
    params = load_params(REPO / "params.yaml", [f"tracking.store_dir={tmp_path / 'mlflow'}"])
    client = MlflowClient(tracking_uri(params), tracking_uri(params))
    client.delete_registered_model_alias(first.model_name, "champion")  # by hand, as the MLflow UI does
    _, second = _deployed(after, tmp_path / "second", feature_cache_dir, *WEAK)
    assert second.verdict.champion_version == first.version and not second.verdict.promote
    assert f"no `champion` alias: it was removed outside Graft; compared with v{first.version}" in second.verdict.text()
    assert "no champion yet" not in second.verdict.text() and second.aliases == ("challenger",)
    removal = read_history(client, first.model_name)[-1]  # registration noticed the removal and recorded it
    assert (removal.action, removal.removed, removal.previous) == ("manual", True, first.version)
    assert "**No champion**" in client.get_registered_model(first.model_name).description
