"""Faults around deploy: a flaky MLflow, SIGKILL mid-export and mid-registration, a full disk, two flows at once.

The registry tests run against a real `mlflow server` on localhost; faults are injected by a
small HTTP proxy in front of it that answers 5xx (or swallows a response) for chosen endpoints.
Kills and full disks happen in child processes (SIGKILL, RLIMIT_FSIZE) so the test process survives.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from components.core.errors import RegistryError
from components.registry import mlflow_calls
from components.registry.history import latest_move, move_alias, read_history
from components.registry.versions import alias_version
from tests import services
from tests.conftest import REPO
from tests.deploy.fixtures import NAME, deploy_tiny, dump_deploy_inputs, tiny_model  # noqa: F401

# ---------------------------------------------------------------- a real MLflow server and a proxy that breaks it


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` (SQLite + local artifacts) on a free localhost port; its URL."""
    with services.mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@dataclass
class Fault:
    """Break the next `times` requests whose path contains `path`.

    mode: "503" answers 503 without forwarding; "lost" forwards (so the server acts) and then answers 502,
    as a proxy does when the server's response is lost; "400" answers a JSON 400 (a real error);
    "race" forwards and then answers the 400 that MLflow's SQL store gives the loser of two simultaneous
    inserts of the same new key (the row exists, as the winner wrote it).
    """

    path: str
    mode: str
    times: int
    method: str | None = None
    """Only requests of this HTTP method (None: any)."""
    hits: int = 0


@dataclass
class FaultProxy:
    url: str
    faults: list[Fault] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def calls(self, path: str) -> int:
        return sum(path in seen for seen in self.requests)


@pytest.fixture
def proxy(mlflow_server, monkeypatch):
    """A proxy in front of `mlflow_server`; MLflow's own HTTP retries are off, so Graft's are what is tested."""
    upstream = http.client.urlsplit(mlflow_server)
    state = FaultProxy("")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # noqa: ANN002 - quiet
            pass

        def _handle(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                state.requests.append(self.path)
                fault = next((f for f in state.faults if f.path in self.path and f.hits < f.times
                              and f.method in (None, self.command)), None)
                if fault:
                    fault.hits += 1
            if fault and fault.mode == "503":
                return self._answer(503, b"Service Unavailable", "text/plain")
            if fault and fault.mode == "400":
                return self._answer(400, json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": "injected"}).encode(), "application/json")
            connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            content = response.read()
            connection.close()
            if fault and fault.mode == "lost":
                return self._answer(502, b"Bad Gateway", "text/plain")
            if fault and fault.mode == "race":
                message = "(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_tags.workspace, registered_model_tags.key"
                return self._answer(400, json.dumps({"error_code": "BAD_REQUEST", "message": message}).encode(), "application/json")
            self._answer(response.status, content, response.getheader("Content-Type") or "application/json")

        def _answer(self, status: int, content: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(mlflow_calls, "FIRST_DELAY_S", 0.01)
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri, uri)


DEPLOY_TAGS = ("sha256.model.onnx", "parity.max_abs_diff", "parity.top1_agreement", "test.accuracy", "split.manifest_sha256",
               "gate.verdict", "data_md5")
"""Tags `deploy()` sets on every version it registers, in the create call itself."""


def _publish(uri: str, tiny_model, name: str, work: Path) -> str:  # noqa: ANN001
    """`deploy()` of the tiny model as `name` through `uri` (the first one becomes champion, identical later ones do not)."""
    return deploy_tiny(tiny_model, uri, name, work).version


def _assert_every_version_has_all_its_tags(client, name: str) -> list:  # noqa: ANN001
    versions = client.search_model_versions(f"name = '{name}'")
    for version in versions:
        missing = [key for key in DEPLOY_TAGS if key not in version.tags]
        assert not missing, f"v{version.version} lacks {missing}"
    return versions


# ---------------------------------------------------------------- 1. MLflow answers 5xx for a while


def test_a_flaky_registry_is_retried_and_a_lost_create_response_makes_no_duplicate(proxy, tiny_model, tmp_path):  # noqa: F811
    name = "faults-flaky"
    proxy.faults = [
        Fault("registered-models/create", "503", 1),
        Fault("model-versions/create", "lost", 1),  # the server creates the version, the answer is lost
        Fault("model-versions/search", "503", 1),  # the search before the retry fails too: still no second create
        Fault("mlflow-artifacts/artifacts", "503", 1),
        Fault("registered-models/alias", "503", 2),
        Fault("model-versions/set-tag", "503", 1),
    ]
    version = _publish(proxy.url, tiny_model, name, tmp_path)

    assert all(fault.hits == fault.times for fault in proxy.faults), proxy.faults
    client = _client(proxy.url)
    versions = _assert_every_version_has_all_its_tags(client, name)
    assert [v.version for v in versions] == [version] == ["1"]  # the lost create was found, not repeated
    assert proxy.calls("model-versions/create") == 1  # the retry searched first and found it
    assert mlflow_calls.REGISTRATION_TAG not in versions[0].tags  # the retry's token is gone once the version exists
    assert alias_version(client, name) == version and alias_version(client, name, "challenger") is None
    assert [(m.version, m.action) for m in read_history(client, name)] == [(version, "gate")]


def test_a_registry_that_keeps_failing_gives_one_clear_error_and_leaves_the_champion(proxy, tiny_model, tmp_path):  # noqa: F811
    name = "faults-down"
    first = _publish(proxy.url, tiny_model, name, tmp_path / "first")
    proxy.faults = [Fault("model-versions/create", "503", 100)]

    with pytest.raises(RegistryError) as err:
        _publish(proxy.url, tiny_model, name, tmp_path / "second")
    message = str(err.value)
    assert f"registering a version of '{name}'" in message and f"failed {mlflow_calls.ATTEMPTS} times" in message
    assert "503" in message and "check that the MLflow server" in message
    assert proxy.faults[0].hits == mlflow_calls.ATTEMPTS
    client = _client(proxy.url)
    assert [v.version for v in _assert_every_version_has_all_its_tags(client, name)] == [first]
    assert alias_version(client, name) == first and alias_version(client, name, "challenger") is None
    assert len(read_history(client, name)) == 1


def test_a_real_error_from_the_registry_is_not_retried(proxy, tiny_model, tmp_path):  # noqa: F811
    name = "faults-refused"
    first = _publish(proxy.url, tiny_model, name, tmp_path / "first")
    proxy.faults = [Fault("registered-models/alias", "400", 100, method="POST")]
    with pytest.raises(RegistryError, match="not a temporary fault, so it was not retried") as err:
        _publish(proxy.url, tiny_model, name, tmp_path / "second")
    assert "setting alias 'challenger'" in str(err.value)
    assert proxy.faults[0].hits == 1
    proxy.faults = []
    client = _client(proxy.url)
    assert alias_version(client, name) == first  # challenger failed, so champion was never tried
    assert len(_assert_every_version_has_all_its_tags(client, name)) == 2


def test_a_key_another_run_inserted_at_the_same_moment_is_set_again_not_failed(proxy, tiny_model, tmp_path):  # noqa: F811
    """Two flows setting the same new tag or alias at once: MLflow's SQL store fails the second insert (seen in CI)."""
    name = "faults-upsert-race"
    proxy.faults = [
        Fault("model-versions/set-tag", "race", 1),
        Fault("registered-models/alias", "race", 1, method="POST"),
    ]
    version = _publish(proxy.url, tiny_model, name, tmp_path)

    assert all(fault.hits == 1 for fault in proxy.faults), proxy.faults
    client = _client(proxy.url)
    assert alias_version(client, name) == version and alias_version(client, name, "challenger") is None
    assert latest_move(client.get_model_version(name, version).tags).startswith("the gate of graft run ")
    assert [(m.version, m.action) for m in read_history(client, name)] == [(version, "gate")]


# ---------------------------------------------------------------- 2. SIGKILL during export and during registration

_CHILD = r"""
import json, os, sys, time
from pathlib import Path

work, inputs, uri, hold = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]

def stop_here():
    (work / "reached").touch()
    time.sleep(600)  # the test SIGKILLs us here

import onnx
from mlflow import MlflowClient

if hold == "export":  # half of the ONNX bytes are on disk when the kill comes
    def half_save(proto, path, *args, **kwargs):
        data = proto.SerializeToString()
        with open(path, "wb") as file:
            file.write(data[: len(data) // 2])
        stop_here()
    onnx.save_model = half_save
elif hold == "register":  # the version exists, its aliases do not yet
    real_create = MlflowClient.create_model_version
    def create_then_stop(self, *args, **kwargs):
        real_create(self, *args, **kwargs)
        stop_here()
    MlflowClient.create_model_version = create_then_stop

from tests.deploy.fixtures import deploy_dumped

print(json.dumps({"version": deploy_dumped(inputs, uri, "graft-test", work).version}))
"""


def _run_child(work: Path, inputs: Path, uri: str, hold: str, timeout: float = 240) -> subprocess.CompletedProcess | None:
    """Run `_CHILD` (`deploy()` itself); with `hold`, SIGKILL it once it reaches that point (returns None then)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(work), str(inputs), uri, hold], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if hold == "none":
        out, err = child.communicate(timeout=timeout)
        assert child.returncode == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1])
    deadline = time.monotonic() + timeout
    while not (work / "reached").exists():
        assert child.poll() is None, child.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the child never reached the kill point"
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    (work / "reached").unlink()
    assert child.returncode == -signal.SIGKILL
    return None


@pytest.mark.slow
@pytest.mark.parametrize("hold", ["export", "register"])
def test_sigkill_during_export_or_registration_leaves_the_previous_model_and_a_rerun_completes(hold, tiny_model, tmp_path):  # noqa: F811
    """`deploy()` SIGKILLed with half of the ONNX file written, or right after the version was created: the champion
    stays, no file is torn where readers look, no version lacks its tags; the rerun registers and sets the aliases."""
    from components.registry.tracking import tracking_uri
    from components.runtime.model import OnnxClassifier
    from tests.deploy.fixtures import deploy_params

    uri = tracking_uri(deploy_params(tiny_model, tmp_path))
    champion = deploy_tiny(tiny_model, uri, NAME, tmp_path / "previous", experiment="graft").version
    client = _client(uri)
    assert alias_version(client, NAME) == champion
    work = tmp_path / "deploy"
    work.mkdir()
    shutil.copyfile(tiny_model.onnx_path, work / "model.onnx")  # the last export, still where readers look
    before = hashlib.sha256((work / "model.onnx").read_bytes()).hexdigest()
    inputs = dump_deploy_inputs(tiny_model, tmp_path / "inputs.pickle")

    _run_child(work, inputs, uri, hold)

    if hold == "export":
        assert hashlib.sha256((work / "model.onnx").read_bytes()).hexdigest() == before  # never half-written
    OnnxClassifier(work / "model.onnx")  # a complete model
    assert len(list(work.glob(".model.onnx.*.tmp"))) == (hold == "export")  # only the temp file is torn
    versions = _assert_every_version_has_all_its_tags(client, NAME)  # none without its tags
    assert len(versions) == (2 if hold == "register" else 1)
    assert alias_version(client, NAME) == champion and alias_version(client, NAME, "challenger") is None

    rerun = _run_child(work, inputs, uri, "none")
    assert not list(work.glob(".model.onnx.*.tmp"))
    OnnxClassifier(work / "model.onnx")
    assert alias_version(client, NAME, "challenger") == rerun["version"] != champion
    assert alias_version(client, NAME) == champion  # the same model again: the gate keeps the champion
    assert client.get_model_version(NAME, rerun["version"]).tags["sha256.model.onnx"] == hashlib.sha256((work / "model.onnx").read_bytes()).hexdigest()
    assert [m.version for m in read_history(client, NAME)] == [champion]


# ---------------------------------------------------------------- 3. disk full

_FULL_DISK = r"""
import json, resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG instead of killing us
what, target, checkpoint = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

def limit_file_size():  # room for half of the previous file: the disk fills up mid-write
    room = target.stat().st_size // 2
    resource.setrlimit(resource.RLIMIT_FSIZE, (room, resource.RLIM_INFINITY))

import torch
from components.core.errors import GraftError
try:
    if what == "checkpoint":
        from components.train.loop import save_checkpoint
        content = torch.load(checkpoint, map_location="cpu", weights_only=True)
        limit_file_size()
        save_checkpoint(target, **content)
    else:
        import onnx
        from components.deploy.export import export_onnx
        from components.train.stage import load_classifier
        real_save = onnx.save_model
        def save_on_a_full_disk(*args, **kwargs):
            limit_file_size()
            return real_save(*args, **kwargs)
        onnx.save_model = save_on_a_full_disk
        model, _ = load_classifier(checkpoint)
        export_onnx(model, target, 64, 18, {"classes": '["0", "1", "7"]', "image_size": "64"})
    print(json.dumps({"raised": None}))
except GraftError as exc:
    print(json.dumps({"raised": type(exc).__name__, "message": str(exc)}))
"""


@pytest.mark.parametrize("what", ["checkpoint", "onnx"])
def test_a_full_disk_gives_a_clear_error_and_keeps_the_previous_file(what, tiny_model, tmp_path):  # noqa: F811
    from components.runtime.model import OnnxClassifier
    from components.train.stage import load_classifier

    checkpoint = tiny_model.work / "run" / "model.pt"
    target = tmp_path / ("model.pt" if what == "checkpoint" else "model.onnx")
    shutil.copyfile(checkpoint if what == "checkpoint" else tiny_model.onnx_path, target)
    before = target.read_bytes()

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _FULL_DISK, what, str(target), str(checkpoint)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["raised"] == "DiskFullError", result
    assert str(target) in result["message"] and "free disk space" in result["message"]
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # the temp file was removed
    if what == "checkpoint":
        model, _ = load_classifier(target)
        assert model.head.weight.shape[0] == 3  # the previous checkpoint, whole
    else:
        assert OnnxClassifier(target).classes == ("0", "1", "7")


# ---------------------------------------------------------------- 4. two flows at once

_CONCURRENT = r"""
import json, sys, time
from pathlib import Path
from mlflow import MlflowClient

uri, inputs, go, me, peer = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5])

def meet():
    me.touch()
    deadline = time.monotonic() + 120
    while not peer.exists() and time.monotonic() < deadline:
        time.sleep(0.02)

real_set_tag = MlflowClient.set_model_version_tag
def set_tag_after_the_peer_has_read(self, name, version, key, value):
    # both flows have read the history before either writes to it: the worst interleaving
    if key.startswith("graft.moved.") and not me.exists():
        meet()
    return real_set_tag(self, name, version, key, value)
MlflowClient.set_model_version_tag = set_tag_after_the_peer_has_read

from tests.deploy.fixtures import deploy_dumped
while not go.exists():
    time.sleep(0.02)
print(json.dumps({"version": deploy_dumped(inputs, uri, "faults-concurrent", me.parent / me.name.replace("at-history", "work")).version}))
"""


@pytest.mark.slow
def test_two_flows_registering_the_same_name_at_once_get_distinct_versions_and_keep_both_history_entries(
    mlflow_server, tiny_model, tmp_path  # noqa: F811
):
    name = "faults-concurrent"
    client = _client(mlflow_server)
    if client.get_experiment_by_name("faults") is None:
        client.create_experiment("faults")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    go = tmp_path / "go"
    inputs = dump_deploy_inputs(tiny_model, tmp_path / "inputs.pickle")
    children = [
        subprocess.Popen([sys.executable, "-c", _CONCURRENT, mlflow_server, str(inputs), str(go),
                          str(tmp_path / f"at-history-{me}"), str(tmp_path / f"at-history-{1 - me}")],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for me in (0, 1)
    ]
    time.sleep(1)
    go.touch()
    results = []
    for child in children:
        out, err = child.communicate(timeout=240)
        assert child.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1])["version"])

    assert sorted(results) == ["1", "2"]
    assert [v.version for v in sorted(_assert_every_version_has_all_its_tags(client, name), key=lambda v: v.version)] == ["1", "2"]
    assert alias_version(client, name) in results
    moves = read_history(client, name)
    assert sorted(m.version for m in moves if m.action == "gate") == ["1", "2"]


def test_two_simultaneous_promotions_keep_both_history_entries(proxy, tiny_model, monkeypatch, tmp_path):  # noqa: F811
    """Both moves read the history before either writes (forced): neither entry may be lost."""
    from mlflow import MlflowClient

    name = "faults-promote-race"
    first = _publish(proxy.url, tiny_model, name, tmp_path / "first")  # champion: there was none
    second = _publish(proxy.url, tiny_model, name, tmp_path / "second")  # the same model again: challenger only
    third = _publish(proxy.url, tiny_model, name, tmp_path / "third")
    barrier = threading.Barrier(2, timeout=60)
    waited = threading.local()
    real_set_tag = MlflowClient.set_model_version_tag

    def set_tag_after_the_other_has_read(self, model, version, key, value):  # noqa: ANN001
        if key.startswith("graft.moved.") and not getattr(waited, "done", False):
            waited.done = True
            barrier.wait()
        return real_set_tag(self, model, version, key, value)

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", set_tag_after_the_other_has_read)
    errors: list[BaseException] = []

    def promote(version: str) -> None:
        try:
            move_alias(_client(proxy.url), name, version, "promote", f"flow {version}", "race")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in (second, third)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    moves = read_history(_client(proxy.url), name)
    assert [m.version for m in moves[:1]] == [first]
    assert sorted(m.version for m in moves if m.action == "promote") == sorted([second, third])
    assert all(m.previous == first for m in moves if m.action == "promote")
    assert alias_version(_client(proxy.url), name) in (second, third)


def test_a_dvc_remote_that_hangs_is_a_retryable_error_and_no_dvc_at_all_says_what_to_install(tmp_path, monkeypatch):
    import components.data.versions as versions
    from components.core.errors import DataError, RemoteError
    from components.core.transient import is_transient

    tracked = tmp_path / "images.dvc"
    tracked.write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: images\n")
    hangs = tmp_path / "dvc"
    hangs.write_text("#!/bin/sh\nsleep 30\n")
    hangs.chmod(0o755)
    monkeypatch.setattr(versions, "_dvc", lambda: str(hangs))
    monkeypatch.setattr(versions, "PULL_TIMEOUT_S", 1)
    started = time.monotonic()
    with pytest.raises(RemoteError, match=r"dvc pull images.dvc did not finish in 1 s; check the remote") as err:
        versions.pull(tracked)
    assert time.monotonic() - started < 10 and is_transient(err.value)  # the flow's retries try it again

    monkeypatch.setattr(versions, "_dvc", lambda: str(tmp_path / "no-such-dvc"))
    with pytest.raises(DataError, match=r"images.dvc is tracked by DVC, but there is no `dvc` command") as err:
        versions.pull(tracked)
    assert not is_transient(err.value)
