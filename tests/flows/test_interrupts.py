"""Ctrl-C means stop: real signals to the process group of a real `graft run`, at each stage.

Each run is a separate process group, as a terminal makes one; the signal goes to the whole group,
so the embedded Prefect API gets it too, as it would from a Ctrl-C.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.interrupts import LOST_API_GRACE_S
from mlflow import MlflowClient
from tests import services
from tests.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow

NAME = "graft-interrupts"
LIMIT_S = 15


class GraftRun:
    """`graft run` on tiny data in its own process group, its output in a file."""

    def __init__(self, work: Path, data: Path, cache: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.work, self.log = work, work / f"run-{time.monotonic_ns()}.log"
        overrides = [*tiny_overrides(data, work, cache), f"deploy.model_name={NAME}", "deploy.variants=[int8]",
                     "train.strategy=fine_tune", "train.epochs=25", "train.patience=25", "data.image_size=32",
                     "choose.candidates=[efficientnet_lite0, efficientnet_lite1]", "choose.finalists=1", *extra]
        args = [sys.executable, "-m", "flows.cli", "run", "--params", str(REPO / "params.yaml")]
        for item in overrides:
            args += ["--set", item]
        # a Prefect home whose parent folder does not exist yet: `graft run` makes it
        env = {**services.clean_env(), "PYTHONPATH": str(REPO), "PREFECT_HOME": str(work / "homes" / "prefect"), **(env or {})}
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(args, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, marker: str, seconds: float = 300) -> None:
        deadline = time.monotonic() + seconds
        while marker not in self.output:
            assert self.process.poll() is None, f"exited before '{marker}':\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, f"no '{marker}' within {seconds}s:\n{self.output[-3000:]}"
            time.sleep(0.1)

    def interrupt(self, number: int) -> tuple[int, float]:
        """Send `number` to the run's process group; (exit code, seconds until it ended)."""
        started = time.monotonic()
        os.killpg(self.process.pid, number)
        try:
            code = self.process.wait(timeout=120)
        finally:
            _reap(self.process)
        return code, time.monotonic() - started

    def finish(self) -> int:
        try:
            return self.process.wait(timeout=900)
        finally:
            _reap(self.process)


def _reap(process: subprocess.Popen) -> None:
    """Whatever the test saw, leave no process of the group behind."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _versions(work: Path) -> list:
    db = work / "mlflow" / "mlflow.db"
    if not db.is_file():
        return []
    uri = f"sqlite:///{db}"
    return MlflowClient(uri, uri).search_model_versions(f"name = '{NAME}'")


def _assert_one_clear_line(run: GraftRun, expected: str) -> None:
    output = run.output
    assert "Traceback" not in output and "Error logging to API" not in output, output[-3000:]
    assert output.rstrip().splitlines()[-1].startswith(expected), output[-1500:]


@pytest.fixture
def work(tmp_path, digits_dir):
    return tmp_path, digits_dir, tmp_path / "cache"


def test_an_interrupt_stops_every_stage_within_seconds_registers_nothing_and_the_rerun_resumes(work):
    tmp_path, data, cache = work
    # choose: SIGINT while the candidates are being exported and scored (an empty cache makes that take a while)
    run = GraftRun(tmp_path, data, cache)
    run.wait_for("choose, round 1: scoring")
    code, seconds = run.interrupt(signal.SIGINT)
    assert code == 130 and seconds < LIMIT_S
    _assert_one_clear_line(run, "interrupted (SIGINT) during choose; nothing was registered or promoted after it")

    # fine-tune: SIGTERM (what a scheduler or a container runtime sends) once an epoch checkpoint exists
    run = GraftRun(tmp_path, data, cache)
    run.wait_for("fine-tune: efficientnet_lite")
    deadline = time.monotonic() + 300
    while not list((cache / "resume").glob("*.pt")):
        assert run.process.poll() is None and time.monotonic() < deadline, run.output[-3000:]
        time.sleep(0.1)
    time.sleep(1.0)
    code, seconds = run.interrupt(signal.SIGTERM)
    assert code == 130 and seconds < LIMIT_S
    _assert_one_clear_line(run, "interrupted (SIGTERM) during fine-tune at epoch ")
    assert "Run the same command to resume from its last epoch checkpoint" in run.output

    # deploy: SIGINT after the export; the rerun resumed training from the checkpoint the interrupt left
    run = GraftRun(tmp_path, data, cache)
    run.wait_for("ONNX parity on")
    code, seconds = run.interrupt(signal.SIGINT)
    assert code == 130 and seconds < LIMIT_S
    _assert_one_clear_line(run, "interrupted (SIGINT) during deploy")
    assert "resumed fine-tune from its epoch-" in run.output
    assert _versions(tmp_path) == []  # nothing registered by any of the three

    # the same command once more: training is not repeated, the model is registered once and made champion
    run = GraftRun(tmp_path, data, cache)
    assert run.finish() == 0, run.output[-3000:]
    assert "resumed fine-tune from its epoch-" in run.output
    (version,) = _versions(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    assert client.get_model_version_by_alias(NAME, "champion").version == version.version

    # the UIs tell the truth: each interrupted run is KILLED in MLflow and crashed (not running) in Prefect
    experiment = client.get_experiment_by_name("graft").experiment_id
    parents = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED", "KILLED", "KILLED"]
    # each run's log is in its run folder up to where it stopped; only the finished run uploaded it to MLflow
    for parent in parents:
        log_file = tmp_path / "outputs" / "runs" / parent.info.run_id / "run.log"
        uploaded = [a.path for a in client.list_artifacts(parent.info.run_id) if a.path == "run.log"]
        assert uploaded == (["run.log"] if parent.info.status == "FINISHED" else []), parent.info.status
        assert "choose, round 1: scoring" in log_file.read_text()
    logs = [(tmp_path / "outputs" / "runs" / r.info.run_id / "run.log").read_text() for r in parents if r.info.status == "KILLED"]
    assert any(re.search(r": epoch \d+ of 25, train loss", text) for text in logs)  # stopped in or after fine-tune
    # and says so, last: in the file, and in the MLflow run's description (not "Running: ..." for ever)
    assert sorted(re.search(r"the run was stopped \((SIG\w+)\) (during|after) ", text.splitlines()[-1])[1] for text in logs) == [
        "SIGINT", "SIGINT", "SIGTERM"]
    notes = sorted(r.data.tags["mlflow.note.content"] for r in parents if r.info.status == "KILLED")
    assert [re.match(r"\*\*Stopped\*\* \((SIG\w+)\) (during|after) ", note)[1] for note in notes] == ["SIGINT", "SIGINT", "SIGTERM"], notes
    assert all("nothing was registered or promoted after it" in note for note in notes)
    with sqlite3.connect(tmp_path / "homes" / "prefect" / "prefect.db") as db:
        states = sorted(state for (state,) in db.execute("select state_type from flow_run"))
    assert states == ["COMPLETED", "CRASHED", "CRASHED", "CRASHED"]


def test_a_lost_embedded_prefect_api_ends_the_run_within_seconds_with_one_line(work):
    tmp_path, data, cache = work
    run = GraftRun(tmp_path, data, cache)
    run.wait_for("fine-tune: efficientnet_lite")
    listed = subprocess.run(["pgrep", "-f", f"prefect.server.api.server:create_app .*--port {_prefect_port(run)}"],
                            capture_output=True, text=True).stdout
    servers = [int(pid) for pid in listed.split()]
    assert servers, run.output[-2000:]
    started = time.monotonic()
    for pid in servers:
        os.kill(pid, signal.SIGKILL)
    code = run.finish()
    assert code == 1 and time.monotonic() - started < LIMIT_S
    _assert_one_clear_line(run, "error: the embedded Prefect API (http://127.0.0.1:")
    assert "during fine-tune" in run.output.splitlines()[-1]
    assert _versions(tmp_path) == []


_WAITING_RUN = """
import os, signal, subprocess, sys, threading
from flows.interrupts import stoppable

def command():
    if sys.argv[1] == "deaf":  # a main thread that no signal reaches, as in a native call that ignores them
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
    servers = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split()
    for pid in servers:
        os.kill(int(pid), signal.SIGKILL)
    print("waiting", flush=True)
    threading.Event().wait()  # a lock wait: a simulated interrupt would never end it
    return 0

sys.exit(stoppable(command))
"""


@pytest.mark.parametrize("main_thread", ["waiting", "deaf"])
def test_a_lost_embedded_api_ends_a_run_whose_main_thread_waits_on_a_lock_or_ignores_signals(tmp_path, main_thread):
    env = {**services.clean_env(), "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect")}
    process = subprocess.Popen([sys.executable, "-c", _WAITING_RUN, main_thread], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        seen = []
        while not seen or seen[-1] not in ("waiting\n", ""):  # the API is gone and the main thread waits from here
            seen.append(process.stdout.readline())
        lost = time.monotonic()
        rest, _ = process.communicate(timeout=120)
        seconds = time.monotonic() - lost
    finally:
        _reap(process)
    output = "".join(seen) + rest
    last = output.rstrip().splitlines()[-1]
    assert process.returncode == 1 and "waiting" in output, output[-3000:]
    # a real signal ends the wait within the watchdog's half-second look; the deaf one, within the grace after it
    assert seconds < (LIMIT_S if main_thread == "waiting" else LIMIT_S + LOST_API_GRACE_S), seconds
    assert last.startswith("error: the embedded Prefect API (http://127.0.0.1:") and "exited with code -9" in last
    assert "Traceback" not in output, output[-3000:]


_FINISHED_RUN = """
import sys, time
import flows.interrupts as interrupts

def draining():  # the embedded API's last logs and events on their way: a Ctrl-C may come now
    print("draining", flush=True)
    time.sleep(10)

interrupts._drain_prefect_services = draining

def command():
    print("registered graft-demo v1  aliases: champion", flush=True)
    return 0

sys.exit(interrupts.stoppable(command))
"""


def test_a_stop_after_the_run_finished_says_so_and_keeps_its_exit_code(tmp_path):
    """A Ctrl-C (or a scheduler's SIGTERM) while the embedded API shuts down, after the run registered and promoted its
    model, is not an interrupted run: no "nothing was registered ... run it again" (which would register it twice), no 130."""
    env = {**services.clean_env(), "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect")}
    process = subprocess.Popen([sys.executable, "-c", _FINISHED_RUN], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        seen = []
        while not seen or seen[-1] not in ("draining\n", ""):
            seen.append(process.stdout.readline())
        os.killpg(process.pid, signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        _reap(process)
    output = "".join(seen) + rest
    assert process.returncode == 0, output[-3000:]
    assert output.rstrip().splitlines()[-1] == "SIGINT came after the run had finished; nothing was lost", output[-3000:]
    assert "interrupted" not in output and "Traceback" not in output, output[-3000:]


def test_an_unusable_prefect_home_or_database_ends_the_run_at_once_with_one_line(work):
    tmp_path, data, cache = work
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    run = GraftRun(tmp_path, data, cache, env={"PREFECT_HOME": str(a_file / "prefect")})
    assert run.finish() == 2  # a GraftError: one line, exit code 2
    last = run.output.rstrip().splitlines()[-1]
    assert last.startswith(f"error: PREFECT_HOME={a_file / 'prefect'} cannot be created") and "point PREFECT_HOME at a folder" in last

    # the server starts, then cannot open its database: uvicorn's start-up failure, said once, not retried for minutes
    run = GraftRun(tmp_path, data, cache, env={"PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{a_file}/prefect.db"})
    assert run.finish() == 2  # a GraftError: one line, exit code 2
    last = run.output.rstrip().splitlines()[-1]
    assert last.startswith("error: the embedded Prefect API exited with code 3 while starting"), run.output[-3000:]
    assert "PREFECT_HOME" in last and run.output.count("starting the embedded Prefect API") == 1
    assert _versions(tmp_path) == []


def _prefect_port(run: GraftRun) -> str:
    line = next(line for line in run.output.splitlines() if "starting the embedded Prefect API on http://127.0.0.1:" in line)
    return line.rsplit(":", 1)[1].strip()


def test_a_keyboard_interrupt_python_drops_is_not_reported_and_other_dropped_errors_are(monkeypatch):
    """A KeyboardInterrupt raised inside a garbage-collection callback is dropped by Python; the stop it carried is
    recorded and raised again at the run's next step, so its "Exception ignored" report is left out."""
    from flows.interrupts import _quiet_swallowed_interrupts

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reported.append(unraisable.exc_value))

    class RaisesWhenCollected:
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def __del__(self) -> None:
            raise self.exc

    with _quiet_swallowed_interrupts():
        RaisesWhenCollected(KeyboardInterrupt())
        RaisesWhenCollected(ValueError("still reported"))
    RaisesWhenCollected(KeyboardInterrupt("outside a run"))
    assert [type(exc).__name__ for exc in reported] == ["ValueError", "KeyboardInterrupt"]


EXIT_SCRIPT = r"""
import logging, sys, time
from prefect.logging.handlers import APILogHandler
from flows.interrupts import _quiet_exit

log_file, marker, api_up = sys.argv[1], sys.argv[2], sys.argv[3] == "up"

class SlowApi(APILogHandler):  # what flushing towards a stopped API cost: waiting on failed connections
    def emit(self, record): pass
    def flush(self):
        open(marker, "w").write("flushed")
        time.sleep(2)

root = logging.getLogger()
root.setLevel(logging.INFO)
root.addHandler(logging.FileHandler(log_file))
logging.getLogger("prefect.flow_runs").addHandler(SlowApi())
logging.getLogger("components.choose").info("scored before the stop")
_quiet_exit(130, api_up=api_up)
"""


def _exit(tmp_path: Path, api: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(tmp_path / "run.log"), str(tmp_path / "flushed"), api], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)


def test_the_exit_after_a_stop_writes_the_log_files_and_never_flushes_to_a_stopped_api(tmp_path):
    """The exit after an interrupt flushes and closes the run's log files, and leaves out Prefect's API handler
    when the API has stopped with the run (flushing it waited on failed connections, then printed so)."""
    done = _exit(tmp_path, "stopped")
    assert done.returncode == 130, done.stderr[-2000:]
    assert (tmp_path / "run.log").read_text().splitlines() == ["scored before the stop"]
    assert not (tmp_path / "flushed").exists()
    # a server of yours (PREFECT_API_URL) that still answers gets the last batch
    done = _exit(tmp_path, "up")
    assert done.returncode == 130 and (tmp_path / "flushed").read_text() == "flushed"


_HEARTBEAT = r"""
import sys
from prefect import flow
from flows.interrupts import stoppable

@flow(name="heartbeat-check")
def tiny() -> int:
    return 0

sys.exit(stoppable(tiny))
"""


def _heartbeat_run(tmp_path: Path, **env: str) -> str:
    env = {**services.clean_env(), "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_LOGGING_LEVEL": "DEBUG", **env}
    done = subprocess.run([sys.executable, "-c", _HEARTBEAT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_a_run_on_the_embedded_api_sends_no_heartbeats_and_one_on_your_server_does(tmp_path, prefect_harness):
    """Heartbeats tell a lasting Prefect server that a run died; the embedded API ends with the run, so nothing
    would read them, and the flow's end waited up to 1 s for Prefect's heartbeat thread to wake and stop."""
    from prefect.settings import PREFECT_API_URL

    embedded = _heartbeat_run(tmp_path)
    assert "Finished in state Completed" in embedded, embedded[-3000:]
    assert "heartbeat context" not in embedded, embedded[-3000:]
    yours = _heartbeat_run(tmp_path, PREFECT_API_URL=PREFECT_API_URL.value())
    assert "Finished in state Completed" in yours and "Started flow run heartbeat context" in yours, yours[-3000:]


def test_ctrl_c_before_the_schedule_is_served_stops_graft_schedule_with_one_line(monkeypatch, capsys, tmp_path):
    """Ctrl-C while `graft schedule` still starts (Prefect's runner, which handles it later, is not up yet)."""
    import flows.schedule
    from flows.cli import main

    for key, value in {"PREFECT_HOME": str(tmp_path / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "PREFECT_LOGGING_EXTRA_LOGGERS": "components", "PREFECT_UI_ENABLED": "false",
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
        monkeypatch.setenv(key, os.environ.get(key, value))  # what graft sets for itself, put back afterwards

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(flows.schedule, "retrain_deployment", interrupted)
    assert main(["schedule", "--params", str(REPO / "params.yaml"), "--cron", "0 3 * * 1"]) == 130
    err = capsys.readouterr().err
    assert "stopped: graft schedule was interrupted (Ctrl-C)" in err and "Traceback" not in err


def test_a_sigkilled_run_leaves_no_prefect_api_behind_and_the_next_run_ends_its_mlflow_run(work):
    """SIGKILL reaches only `graft run` (an out-of-memory kill, `kill -9 PID`): the embedded API it started, in a session
    of its own, notices that its parent is gone and ends, instead of holding 200 MB and a port for good. Its MLflow run
    stays RUNNING (nothing can end it) until the next `graft run` on the machine ends it KILLED, saying why."""
    import httpx

    tmp_path, data, cache = work
    run = GraftRun(tmp_path, data, cache)
    try:
        run.wait_for("starting the embedded Prefect API on http://127.0.0.1:")
        port = _prefect_port(run)
        run.wait_for("choose, round 1")
        os.kill(run.process.pid, signal.SIGKILL)  # graft alone, not its process group
        run.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1)
            except httpx.TransportError:
                break  # nothing answers on its port any more
            assert time.monotonic() < deadline, "the embedded Prefect API outlived the run that started it"
            time.sleep(0.5)
    finally:
        _reap(run.process)
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    [left] = client.search_runs([client.get_experiment_by_name("graft").experiment_id],
                                f"tags.`graft.pid` = '{run.process.pid}'")
    assert left.info.status == "RUNNING"

    later = GraftRun(tmp_path, data, cache)
    try:
        later.wait_for("marked it KILLED")
        later.interrupt(signal.SIGINT)
    finally:
        _reap(later.process)
    ended = client.get_run(left.info.run_id)
    assert ended.info.status == "KILLED", later.output[-3000:]
    assert ended.data.tags["mlflow.note.content"].startswith("**Ended unseen**")
    assert f"MLflow run {left.info.run_id} (" in later.output


SERVE_STAND_IN = """
import sys, time
import prefect
import flows.interrupts

flows.interrupts.SCHEDULE_STOP_GRACE_S = 3


def serve(*deployments, **options):  # Prefect's serve: returns after the interrupt, or (as asyncio's cancelled runner
    while True:                      # did on a loaded machine) goes on serving
        try:
            time.sleep(0.05)
        except KeyboardInterrupt:
            if sys.argv[1] == "returns":
                return


prefect.serve = serve
from flows.cli import main

sys.exit(main(["schedule", "--params", sys.argv[2], "--cron", "0 3 * * 1", "--name", "nightly"]))
"""


@pytest.mark.parametrize("runner", ["returns", "swallows the interrupt"])
def test_ctrl_c_stops_graft_schedule_with_one_line_even_where_prefects_runner_serves_on(tmp_path, runner):
    """Ctrl-C while the schedule is served: one line and exit 130, whether Prefect's runner shuts down on it or (a
    first Ctrl-C cancelling a runner task that a flow run's clean-up swallowed) serves on, when a watchdog ends it."""
    env = {**services.clean_env(), "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # a server of the user's: nothing starts an API here
    process = subprocess.Popen([sys.executable, "-c", SERVE_STAND_IN, runner.split()[0], str(REPO / "params.yaml")],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        assert "serving graft-retrain/nightly" in process.stdout.readline()
        time.sleep(0.5)
        started = time.monotonic()
        os.kill(process.pid, signal.SIGINT)
        code = process.wait(timeout=60)
        took = time.monotonic() - started
    finally:
        _reap(process)
    err = process.stderr.read()
    assert code == 130 and "Traceback" not in err, err
    if runner == "returns":
        assert err.strip().splitlines()[-1] == "stopped: graft schedule (SIGINT); graft-retrain/nightly is no longer served"
        assert took < 3
    else:
        assert "stopped: graft schedule (SIGINT); Prefect's runner had not shut down 3 s later" in err and took >= 3
