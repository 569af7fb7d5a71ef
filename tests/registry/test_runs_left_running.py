"""Runs whose process was killed outright (`kill -9`, out of memory) are ended KILLED by the next `graft run`: on that
machine by their pid, from another container or machine once their heartbeat has been silent 15 minutes; runs of live
processes, runs still beating, and runs without Graft's process tags are left RUNNING.

A real SQLite MLflow store; the "killed" process is a real one that has exited, so its pid is free.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from components.core.processes import start_mark, still_running, this_process
from components.registry import tracking
from components.registry.tracking import (
    HEARTBEAT_TAG,
    NOTE_TAG,
    PROCESS_TAGS,
    SILENCE_TAG,
    end_runs_left_running,
    parent_run,
    process_tags,
)


@pytest.fixture
def store(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    return client, client.create_experiment("left-running", artifact_location=(tmp_path / "artifacts").as_uri()), uri


def _exited_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _run(client, experiment_id: str, tags: dict[str, str], parent: str | None = None, started: datetime | None = None) -> str:  # noqa: ANN001
    tags = {**tags, **({"mlflow.parentRunId": parent} if parent else {})}
    start_time = int(started.timestamp() * 1000) if started else None
    return client.create_run(experiment_id, start_time=start_time, tags=tags).info.run_id


def test_a_run_of_a_killed_process_and_its_children_end_killed_and_others_stay_running(store):
    client, experiment_id, uri = store
    dead_pid = _exited_pid()
    boot = process_tags()[PROCESS_TAGS["started"]].partition(":")[0]
    dead = {**process_tags(), PROCESS_TAGS["pid"]: str(dead_pid), PROCESS_TAGS["started"]: f"{boot}:1"}
    killed = _run(client, experiment_id, dead)
    child = _run(client, experiment_id, {}, parent=killed)
    live = _run(client, experiment_id, process_tags())  # this very process
    elsewhere = _run(client, experiment_id, {**dead, PROCESS_TAGS["host"]: "another-machine"})
    untagged = _run(client, experiment_id, {})

    ended = end_runs_left_running(client, experiment_id, uri)

    assert sorted(ended) == sorted([killed, child])
    status = {run_id: client.get_run(run_id).info.status for run_id in (killed, child, live, elsewhere, untagged)}
    assert status == {killed: "KILLED", child: "KILLED", live: "RUNNING", elsewhere: "RUNNING", untagged: "RUNNING"}
    note = client.get_run(killed).data.tags[NOTE_TAG]
    assert note.startswith("**Ended unseen**") and f"pid {dead[PROCESS_TAGS['pid']]}" in note
    assert client.get_run(killed).info.run_name.startswith("killed · ")
    assert end_runs_left_running(client, experiment_id, uri) == []  # nothing twice


def test_a_pid_taken_by_a_later_process_does_not_keep_a_dead_run_running(store):
    """Pids are reused: a live process with the recorded pid but another start time is not the one that ran it."""
    client, experiment_id, uri = store
    me = this_process()
    if not me["started"]:
        pytest.skip("no /proc here: only the pid is known, and a live pid counts as the same process")
    boot, ticks = me["started"].split(":")
    earlier = {**process_tags(), PROCESS_TAGS["started"]: f"{boot}:{int(ticks) - 1}"}
    stale = _run(client, experiment_id, earlier)

    assert end_runs_left_running(client, experiment_id, uri) == [stale]
    assert client.get_run(stale).info.status == "KILLED"


def test_a_process_record_is_read_back_as_running_only_while_that_process_runs():
    me = this_process()
    if not me["started"] or not me["namespace"]:
        pytest.skip("no /proc here: nothing can be judged, and nothing is")
    boot = me["started"].partition(":")[0]
    assert still_running(me) is True
    assert still_running({**me, "pid": str(_exited_pid())}) is False
    assert still_running({**me, "pid": ""}) is None
    assert start_mark(_exited_pid()) == ""
    # the same hostname elsewhere: another machine (another boot id, another or no machine id), another container
    assert still_running({**me, "pid": str(_exited_pid()), "started": "another-boot:1", "machine": "another-machine"}) is None
    assert still_running({**me, "pid": str(_exited_pid()), "started": "another-boot:1", "machine": ""}) is None
    assert still_running({**me, "pid": str(_exited_pid()), "namespace": "pid:[1]"}) is None
    # this machine before a reboot: the process ended with it
    if me["machine"]:
        assert still_running({**me, "started": "an-earlier-boot:1"}) is False
    assert boot and still_running({**me, "started": f"{boot}:{int(me['started'].partition(':')[2]) + 1}"}) is False


def test_a_live_run_of_another_container_or_machine_with_this_hostname_is_never_ended(store):
    """Containers that share the host's name (`--network host`) and VMs left with a default hostname: their pids
    mean nothing here, so their runs stay RUNNING whatever pid they recorded."""
    client, experiment_id, uri = store
    dead_pid = str(_exited_pid())
    container = _run(client, experiment_id, {**process_tags(), PROCESS_TAGS["pid"]: dead_pid,
                                              PROCESS_TAGS["namespace"]: "pid:[4026532999]"})
    machine = _run(client, experiment_id, {**process_tags(), PROCESS_TAGS["pid"]: dead_pid,
                                            PROCESS_TAGS["started"]: "0f0e-another-boot:12345",
                                            PROCESS_TAGS["machine"]: "another-machine-id"})
    assert end_runs_left_running(client, experiment_id, uri) == []
    assert {client.get_run(r).info.status for r in (container, machine)} == {"RUNNING"}


def test_a_run_of_another_container_or_machine_ends_killed_at_its_last_heartbeat_once_found_silent_15_minutes(store):
    """A container's or another machine's pid means nothing here: its run is known dead when `graft run`s 15 minutes
    apart (by their own clocks) find the same heartbeat, and ends at that last sign of life (so the UI's duration is
    how long it ran), with its child runs. A heartbeat found for the first time, however old by the writer's clock
    (its clock may be off, or MLflow was away), is only recorded."""
    client, experiment_id, uri = store
    now = datetime.now(timezone.utc)
    container = {**process_tags(), PROCESS_TAGS["pid"]: "7", PROCESS_TAGS["namespace"]: "pid:[4026532999]"}
    machine = {**process_tags(), PROCESS_TAGS["host"]: "worker-3", PROCESS_TAGS["started"]: "another-boot:1"}

    def beat(minutes_ago: int, seen_minutes_ago: int | None = None, seen_beat: int | None = None) -> dict[str, str]:
        alive = (now - timedelta(minutes=minutes_ago)).isoformat(timespec="milliseconds")
        tags = {HEARTBEAT_TAG: alive}
        if seen_minutes_ago is not None:
            seen_alive = alive if seen_beat is None else (now - timedelta(minutes=seen_beat)).isoformat(timespec="milliseconds")
            tags[SILENCE_TAG] = json.dumps({"alive_at": seen_alive, "seen_at": (now - timedelta(minutes=seen_minutes_ago)).isoformat()})
        return tags

    hour_ago = now - timedelta(hours=1)
    silent = _run(client, experiment_id, {**container, **beat(20, seen_minutes_ago=16)}, started=hour_ago)
    child = _run(client, experiment_id, {}, parent=silent, started=now - timedelta(minutes=10))  # began after the last beat
    silent_elsewhere = _run(client, experiment_id, {**machine, **beat(17, seen_minutes_ago=16)}, started=hour_ago)
    beating = _run(client, experiment_id, {**container, **beat(1, seen_minutes_ago=16, seen_beat=17)}, started=hour_ago)
    seen_lately = _run(client, experiment_id, {**machine, **beat(40, seen_minutes_ago=14)}, started=hour_ago)
    found_first = _run(client, experiment_id, {**container, **beat(300)}, started=hour_ago)  # a writer's clock 5 h behind
    never_beat = _run(client, experiment_id, container)  # an older Graft's run: nothing tells

    assert sorted(end_runs_left_running(client, experiment_id, uri)) == sorted([silent, child, silent_elsewhere])
    runs = {r: client.get_run(r) for r in (silent, child, silent_elsewhere, beating, seen_lately, found_first, never_beat)}
    assert [runs[r].info.status for r in (silent, child, silent_elsewhere)] == ["KILLED"] * 3
    assert [runs[r].info.status for r in (beating, seen_lately, found_first, never_beat)] == ["RUNNING"] * 4
    last = datetime.fromisoformat(runs[silent].data.tags[HEARTBEAT_TAG])
    assert runs[silent].info.end_time == int(last.timestamp() * 1000)  # not when it was noticed
    assert runs[child].info.end_time == runs[child].info.start_time  # never before it began
    note = runs[silent].data.tags[NOTE_TAG]
    assert note.startswith("**Ended unseen**") and f"no sign of life since {last:%Y-%m-%d %H:%M UTC}" in note
    assert f"pid 7 on {container[PROCESS_TAGS['host']]})" in note
    assert f"pid {machine[PROCESS_TAGS['pid']]} on worker-3)" in runs[silent_elsewhere].data.tags[NOTE_TAG]
    # what this run found is recorded for the next: the beating run's new heartbeat, the first sighting
    for run_id in (beating, found_first):
        seen = json.loads(runs[run_id].data.tags[SILENCE_TAG])
        assert seen["alive_at"] == runs[run_id].data.tags[HEARTBEAT_TAG]
        assert abs((datetime.fromisoformat(seen["seen_at"]) - now).total_seconds()) < 60
    assert SILENCE_TAG not in runs[never_beat].data.tags
    assert end_runs_left_running(client, experiment_id, uri) == []  # found again at once: not 15 minutes apart


def test_a_parent_run_beats_while_it_lasts_and_stops_beating_when_it_ends(tiny_params, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setattr(tracking, "HEARTBEAT_S", 0.3)
    with parent_run(tiny_params) as run:
        first = MlflowClient(run.uri, run.uri).get_run(run.run_id).data.tags[HEARTBEAT_TAG]
        time.sleep(2.2)
        later = MlflowClient(run.uri, run.uri).get_run(run.run_id).data.tags[HEARTBEAT_TAG]
        assert datetime.fromisoformat(later) > datetime.fromisoformat(first)
        assert any(thread.name == "graft-mlflow-heartbeat" for thread in threading.enumerate())
    assert not any(thread.name == "graft-mlflow-heartbeat" for thread in threading.enumerate())
    assert MlflowClient(run.uri, run.uri).get_run(run.run_id).info.status == "FINISHED"
