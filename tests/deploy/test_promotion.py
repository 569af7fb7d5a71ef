"""promote and rollback: the gate's checks first, the alias last, every move in the history."""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from components.core.errors import PromotionError
from components.deploy.promotion import promote, rollback
from components.registry.history import latest_move, read_history
from components.registry.versions import alias_version
from flows.cli import main
from tests.deploy.fixtures import NAME, active_registry, params_file, register, registry, tiny_model  # noqa: F401


def test_promote_then_rollback_walks_the_recorded_history(active_registry):  # noqa: F811
    reg = active_registry
    client = reg.client
    assert alias_version(client, NAME) == reg.v1
    result = promote(client, reg.params, NAME, reg.v2, "better on the new data", who="alice@test")
    assert result.moved and result.previous == reg.v1
    assert {c.name for c in result.checks} >= {"parity", "floor.accuracy", "checksum"}
    assert alias_version(client, NAME) == reg.v2
    last = read_history(client, NAME)[-1]
    assert (last.version, last.previous, last.action, last.who, last.why) == (reg.v2, reg.v1, "promote", "alice@test", "better on the new data")
    assert latest_move(client.get_model_version(NAME, reg.v2).tags).startswith("`graft promote` by alice@test on ")
    assert alias_version(client, NAME, "challenger") is None  # the champion is the newest version: nothing challenges it
    assert "**Champion: v2**" in client.get_registered_model(NAME).description and "**No challenger**" in client.get_registered_model(NAME).description

    back = rollback(client, NAME, "v2 misbehaves", who="bob@test")
    assert (back.previous, back.version) == (reg.v2, reg.v1)
    assert alias_version(client, NAME) == reg.v1
    assert alias_version(client, NAME, "challenger") == reg.v2  # newer than the champion again
    assert read_history(client, NAME)[-1].action == "rollback"
    with pytest.raises(PromotionError, match="no champion before"):
        rollback(client, NAME, "again")  # v1 was the first champion: nothing earlier
    assert alias_version(client, NAME) == reg.v1


def test_a_version_failing_the_checks_is_refused_with_every_reason(active_registry, tmp_path):  # noqa: F811
    reg = active_registry
    bad = register(reg.params, _copy_v1(reg, tmp_path),
                   tags={"parity.max_abs_diff": "3.0e-02", "test.accuracy": "0.2000"})
    # within the tolerance, but the ONNX file and PyTorch disagreed on the class of some images
    disagrees = register(reg.params, _copy_v1(reg, tmp_path / "disagrees"), tags={"parity.top1_agreement": "0.9800"})
    try:
        before = alias_version(reg.client, NAME)
        history = read_history(reg.client, NAME)
        with pytest.raises(PromotionError) as err:
            promote(reg.client, reg.params, NAME, bad, "should fail")
        message = str(err.value)
        assert "3.00e-02" in message and "deploy.parity_atol" in message
        assert "test accuracy 0.200 is below the floor" in message and f"champion stays on v{before}" in message
        with pytest.raises(PromotionError, match=r"max \|diff\| 1.00e-06 .*top-1 agreement 98.00%") as err:
            promote(reg.client, reg.params, NAME, disagrees, "should fail too")
        assert "floor" not in str(err.value)  # parity is its only failed check
        assert alias_version(reg.client, NAME) == before
        assert read_history(reg.client, NAME) == history
        with pytest.raises(PromotionError, match="has no version 99"):
            promote(reg.client, reg.params, NAME, "99", "no such version")
    finally:  # the registry is the module's: leave it with the versions the other tests expect
        for version in (bad, disagrees):
            reg.client.delete_model_version(NAME, version)


def test_a_move_made_in_the_ui_is_recorded_and_rolled_back_from(active_registry):  # noqa: F811
    reg = active_registry
    client = reg.client
    start = alias_version(client, NAME)
    other = reg.v2 if start != reg.v2 else reg.v1
    client.set_registered_model_alias(NAME, "champion", other)  # by hand, outside Graft
    rollback(client, NAME, "undo the hand move", who="carol@test")
    assert alias_version(client, NAME) == start
    manual, undo = read_history(client, NAME)[-2:]
    assert (manual.action, manual.version) == ("manual", other)
    assert (undo.action, undo.previous, undo.version) == ("rollback", other, start)


def test_cli_promote_rollback_and_history(active_registry, tmp_path, capsys):  # noqa: F811
    reg = active_registry
    params = str(params_file(reg, tmp_path))
    start = alias_version(reg.client, NAME)
    target = reg.v2 if start != reg.v2 else reg.v1
    assert main(["promote", "--params", params, "--name", NAME, "--version", target, "--reason", "cli test"]) == 0
    assert f"v{start} -> v{target}" in capsys.readouterr().out
    assert main(["rollback", "--params", params, "--name", NAME]) == 0
    assert alias_version(reg.client, NAME) == start
    assert main(["history", "--params", params, "--name", NAME]) == 0
    out = capsys.readouterr().out
    assert "promote by" in out and "cli test" in out and "rollback by" in out
    assert "champion (none) -> v" in out  # the first move, from no champion
    assert main(["promote", "--params", params, "--name", "no-such-model", "--version", "1"]) == 2
    assert main(["history", "--params", params, "--name", NAME[:-1]]) == 2  # misspelt
    assert f"registered model '{NAME[:-1]}' not found (did you mean '{NAME}'?)" in capsys.readouterr().err


def _copy_v1(reg, tmp_path):
    from components.registry.versions import download_artifact
    from mlflow import MlflowClient

    source = MlflowClient().get_model_version_download_uri(NAME, reg.v1).rstrip("/")
    return download_artifact(f"{source}/model.onnx", tmp_path / "v3")


def test_a_history_written_by_an_older_graft_is_still_read_continued_and_moved_off_the_model_page(active_registry):  # noqa: F811
    """Older Graft kept the history in the registered model's tags: first a JSON list in one tag, then one tag per move.
    Both stay the oldest part of the history; the next move copies them onto their versions and clears the model page."""
    import json

    from components.registry.history import HISTORY_TAG, move_alias

    client = active_registry.client
    name = "graft-legacy-history"
    client.create_registered_model(name)
    template = client.get_model_version(NAME, active_registry.v1)
    v1, v2, v3 = (str(client.create_model_version(name, template.source, run_id=template.run_id).version) for _ in range(3))
    old = {"alias": "champion", "version": v1, "previous": None, "action": "gate", "who": "old graft",
           "when": "2026-01-01T00:00:00+00:00", "why": "first model"}
    newer = {**old, "version": v2, "previous": v1, "action": "promote", "when": "2026-02-01T00:00:00+00:00", "why": "second"}
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps([old]))
    client.set_registered_model_tag(name, f"{HISTORY_TAG}.1769904000000000000.{v2}", json.dumps(newer))
    client.set_registered_model_tag(name, "graft.champion_version", v2)
    client.set_registered_model_alias(name, "champion", v2)
    assert [(m.version, m.action) for m in read_history(client, name)] == [(v1, "gate"), (v2, "promote")]

    move_alias(client, name, v3, "promote", "alice@test", "newer")
    moves = read_history(client, name)
    assert [(m.version, m.previous, m.action) for m in moves] == [(v1, None, "gate"), (v2, v1, "promote"), (v3, v2, "promote")]
    assert not [key for key in client.get_registered_model(name).tags if key.startswith("graft.")]  # the model page is clear
    assert rollback(client, name, "back", who="bob@test").version == v2
    assert rollback(client, name, "back again", who="bob@test").version == v1


def test_the_challenger_follows_a_champion_that_another_run_moves_while_it_is_set(active_registry, monkeypatch):  # noqa: F811
    """Two runs registering at once on a team's registry: the other run moves `champion` to the newest version
    between this one's reading the aliases and writing `challenger`. Reading again after the write, the
    challenger is removed: nothing is newer than the champion that won."""
    from components.registry import history, mlflow_calls

    reg = active_registry
    client = reg.client
    before = alias_version(client, NAME)
    newest = str(max(int(v.version) for v in client.search_model_versions(f"name='{NAME}'")))
    client.set_registered_model_alias(NAME, "champion", reg.v1)  # an older champion: the newest version challenges it
    client.delete_registered_model_alias(NAME, "challenger")  # so that this sync has to write it
    set_alias = mlflow_calls.set_alias

    def and_the_other_run_moves_the_champion(c, name, alias, version):  # noqa: ANN001, ANN202
        set_alias(c, name, alias, version)
        if alias == "challenger":
            client.set_registered_model_alias(NAME, "champion", newest)

    monkeypatch.setattr(mlflow_calls, "set_alias", and_the_other_run_moves_the_champion)
    assert history.sync_challenger(client, NAME) is None
    assert alias_version(client, NAME) == newest and alias_version(client, NAME, "challenger") is None
    monkeypatch.undo()
    client.set_registered_model_alias(NAME, "champion", before)  # the module's registry as the test found it
    history.sync_challenger(client, NAME)


def _versions_of(client, name: str, count: int) -> list[str]:
    """A new registered model `name` with `count` versions made from v1's files (the history does not read the files)."""
    template = client.get_model_version(NAME, client.get_model_version_by_alias(NAME, "champion").version)
    client.create_registered_model(name)
    return [str(client.create_model_version(name, template.source, run_id=template.run_id).version) for _ in range(count)]


def test_moves_and_a_removal_made_in_the_ui_are_noticed_recorded_once_and_the_model_page_follows(active_registry, tmp_path, capsys):  # noqa: F811
    from components.registry.history import last_champion, move_alias, notice_outside_moves

    client, name = active_registry.client, "graft-ui-moves"
    v1, v2, v3 = _versions_of(client, name, 3)
    move_alias(client, name, v1, "gate", "test", "first model")
    client.set_registered_model_alias(name, "champion", v2)  # in the MLflow UI
    assert notice_outside_moves(client, name, "graft serve").version == v2
    last = read_history(client, name)[-1]
    assert (last.action, last.previous, last.version, last.why) == ("manual", v1, v2, "moved outside Graft; noticed by graft serve")
    page = client.get_registered_model(name).description
    assert f"**Champion: v{v2}**" in page and f"**Challenger: v{v3}**" in page
    client.set_registered_model_alias(name, "champion", v3)  # onto the challenger: both aliases name v3 until noticed
    notice_outside_moves(client, name, "graft serve")
    assert alias_version(client, name, "challenger") is None and f"**Champion: v{v3}**" in client.get_registered_model(name).description

    client.delete_registered_model_alias(name, "champion")  # "pause" in the UI
    removal = notice_outside_moves(client, name, "graft serve")
    assert (removal.removed, removal.previous, removal.why) == (True, v3, "removed outside Graft; noticed by graft serve")
    assert notice_outside_moves(client, name, "a second replica") is None  # noticed already: nothing more to record
    # two replicas noticing at the same instant both write an entry: the history reads it once
    from components.registry.history import _encode, _move_key

    client.set_model_version_tag(name, v3, _move_key(), _encode(replace(removal, when="later")))
    assert sum(m.removed for m in read_history(client, name)) == 1
    assert last_champion(client, name) == v3
    page = client.get_registered_model(name).description
    assert "**No champion**" in page and f"The last champion the history records that still exists is v{v3} (" in page
    assert main(["history", "--params", str(params_file(active_registry, tmp_path)), "--name", name]) == 0
    assert f"champion v{v3} -> (removed)  manual" in capsys.readouterr().out

    back = rollback(client, name, "", who="dana@test")  # with the alias gone: back onto the champion that held it last
    assert (back.previous, back.version) == (None, v3) and alias_version(client, name) == v3
    assert read_history(client, name)[-1].why == f"champion alias was removed; back to v{v3}, the last champion"

    # deleting the champion's version takes the alias and that version's history with it: no removal is pinned on
    # the version before it, and the page names the last champion that still exists
    client.delete_model_version(name, v3)
    assert notice_outside_moves(client, name, "graft serve", last_seen=v3) is None
    assert not read_history(client, name)[-1].removed and last_champion(client, name) == v2
    assert f"The last champion the history records that still exists is v{v2} (" in client.get_registered_model(name).description


def test_a_run_whose_gate_judged_against_another_champion_than_the_one_a_person_just_chose_does_not_promote(active_registry):  # noqa: F811
    """The gate compared with v1; meanwhile a promoter made v2 champion in the UI: the verdict says nothing about v2."""
    from types import SimpleNamespace

    from components.deploy.stage import publish
    from components.evaluate.gate import Verdict

    client = active_registry.client
    v1, v2 = active_registry.v1, active_registry.v2
    verdict = Verdict(promote=True, reasons=("PROMOTE: better than v1",), metric="accuracy", challenger_score=1.0, champion_version=v1)
    ctx = SimpleNamespace(run=SimpleNamespace(client=client, run_id="r"), params=active_registry.params, hold=None)
    newest = register(active_registry.params, _copy_v1(active_registry, Path(tempfile.mkdtemp())))
    client.set_registered_model_alias(NAME, "champion", v2)  # in the UI, while the run judged
    try:
        aliases, held = publish(ctx, newest, verdict)
        assert aliases == ("challenger",) and alias_version(client, NAME) == v2
        assert held.startswith(f"champion moved to v{v2} while this run's gate compared with v{v1}: registered as challenger only")
        assert client.get_model_version(NAME, newest).tags["graft.hold"] == held
    finally:
        client.set_registered_model_alias(NAME, "champion", v1)


def test_cli_promote_onto_a_version_the_gate_kept_out_says_so(active_registry, tmp_path, capsys):  # noqa: F811
    reg = active_registry
    params = str(params_file(reg, tmp_path))
    start = alias_version(reg.client, NAME)
    kept_out = register(reg.params, _copy_v1(reg, tmp_path), tags={
        "gate.verdict": "keep champion", "gate.reasons": "KEEP CHAMPION: accuracy 0.800 vs 0.900", "test.accuracy": "0.8000"})
    try:
        assert main(["promote", "--params", params, "--name", NAME, "--version", kept_out]) == 0
        out = capsys.readouterr().out
        assert f"!   v{kept_out}: the gate did not promote it (KEEP CHAMPION: accuracy 0.800 vs 0.900)" in out
        assert f"test accuracy as registered: v{kept_out} 0.8000, v{start} 0.9000" in out
    finally:
        reg.client.set_registered_model_alias(NAME, "champion", start)


def test_the_retraining_check_says_truly_what_the_challengers_gate_said_after_a_move_by_hand(active_registry):  # noqa: F811
    """v2 was promoted by its gate over v1, then a person moved `champion` back to v1: training on the same inputs again
    would make v2 again, so there is nothing to do, but not because 'the gate kept champion v1'."""
    from components.core.lineage import params_fingerprint
    from components.data.versions import current_data_md5
    from components.deploy.retrain import decide
    from components.registry.history import move_alias, notice_outside_moves

    client, name = active_registry.client, "graft-retrain-words"
    v1, v2 = _versions_of(client, name, 2)
    params = active_registry.params
    params = params.model_copy(update={"deploy": params.deploy.model_copy(update={"model_name": name})})
    same = {"data_md5": current_data_md5(params.data.dir), "params_sha": params_fingerprint(params)}
    for key, value in {**same, "gate.verdict": "promote", "gate.champion_version": v1}.items():
        client.set_model_version_tag(name, v2, key, value)
    move_alias(client, name, v1, "gate", "test", "first")
    move_alias(client, name, v2, "gate", "test", "better")
    client.set_registered_model_alias(name, "champion", v1)  # by hand, in the UI
    client.set_registered_model_alias(name, "challenger", v2)
    decision = decide(params, client)
    assert not decision.retrain and decision.matched_version == v2
    assert f"its gate promoted it against v{v1}, and champion is v{v1} now" in decision.reason
    assert "the gate kept" not in decision.reason
    notice_outside_moves(client, name, "graft serve")  # what a running server does within a poll
    client.delete_registered_model_alias(name, "champion")
    decision = decide(params, client)
    assert decision.champion_version == v1 and "no version holds `champion` now" in decision.reason


def test_the_retraining_check_retrains_when_a_weights_file_it_names_holds_other_weights(active_registry, tmp_path):  # noqa: F811
    """`choose.weights` names a path; other weights saved at that path (a colleague's fine-tune, a fixed file) train
    another model, so the retraining check must not answer 'nothing to do'."""
    import torch

    from components.core.lineage import params_fingerprint
    from components.data.versions import current_data_md5
    from components.deploy.retrain import decide
    from components.registry.history import move_alias

    client, name = active_registry.client, "graft-retrain-weights"
    [v1] = _versions_of(client, name, 1)
    weights = tmp_path / "mine.pth"
    torch.save({"w": torch.zeros(3)}, weights)
    params = active_registry.params
    params = params.model_copy(update={
        "deploy": params.deploy.model_copy(update={"model_name": name}),
        "choose": params.choose.model_copy(update={"weights": {"efficientnet_lite0": weights}}),
    })
    for key, value in {"data_md5": current_data_md5(params.data.dir), "params_sha": params_fingerprint(params)}.items():
        client.set_model_version_tag(name, v1, key, value)  # what registration recorded
    move_alias(client, name, v1, "gate", "test", "first")
    assert not decide(params, client).retrain  # the same file: nothing to do
    time.sleep(0.01)
    torch.save({"w": torch.ones(3)}, weights)  # the same path, the same size, other weights
    decision = decide(params, client)
    assert decision.retrain and decision.champion_version == v1, decision.reason


def test_a_graft_serve_that_may_only_read_writes_nothing_when_nothing_moved(active_registry, monkeypatch, caplog):  # noqa: F811
    """Its first poll checks the alias history and the model page; both are up to date, so it writes nothing, and a
    registry it may only read gives no 'champion moved' warning for a move that did not happen."""
    import logging

    from components.registry.history import notice_outside_moves, refresh_model_page
    from mlflow import MlflowClient

    client = active_registry.client
    notice_outside_moves(client, NAME, "an earlier poll")  # the module's registry: moves made by hand in other tests
    refresh_model_page(client, NAME)  # the page as Graft wrote it last
    for method in ("update_registered_model", "set_registered_model_alias", "delete_registered_model_alias",
                   "set_model_version_tag", "set_registered_model_tag"):
        monkeypatch.setattr(MlflowClient, method, lambda *args, method=method, **kwargs: pytest.fail(f"{method}: a write"))
    with caplog.at_level(logging.WARNING, logger="components"):
        assert notice_outside_moves(client, NAME, "graft serve", alias_version(client, NAME)) is None
    assert "moved, but updating" not in caplog.text
