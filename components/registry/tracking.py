"""MLflow tracking: which store runs and consumers use, and one parent run per pipeline run.

Where the store is, in this order: `MLFLOW_TRACKING_URI` (or an URI set with `mlflow.set_tracking_uri`)
wins; then the project's own store (SQLite under `tracking.store_dir`) when Graft runs inside the project;
else a consumer gets one `TrackingStoreError` naming the variable to set. Only `graft run` (through
`open_tracking_store`) creates the project's store, and two runs creating it at once are serialised by a
file lock beside it; nothing else creates one, so no `mlflow.db` appears where a consumer happens to run
(MLflow's own default is `./mlflow.db`).

Everything is addressed by explicit run id through `MlflowClient`, so stages
may run in any thread or process (Prefect task runners) and still log to the
same run. Nothing here runs at import time.

Logging calls overwrite what they set, so each retries transient MLflow failures
on its own (`components.registry.mlflow_calls.call`); creating a run does not, since a
retry after a lost response would make a second one. A server that refuses the
credentials or a permission gives a `TrackingAuthError` saying what to set.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from components.core import progress
from components.core.config import PARAMS_FILE, REPO_ROOT, Params, load_params
from components.core.errors import GraftError, RegistryError, TrackingAuthError, TrackingStoreError, error_text
from components.core.periodic import every
from components.core.processes import still_running, this_process
from components.core.transient import is_transient
from components.registry import mlflow_calls

log = logging.getLogger(__name__)

METRICS_RETRY_S = 30
"""After MLflow failed to take a training run's epoch metrics, how long they wait before the next try."""


T = TypeVar("T")


TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


STORE_FILE = "mlflow.db"
"""The SQLite file of the project's own store, in `tracking.store_dir`."""


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""MLflow 3's experiment type; `custom_model_development` makes its UI show training runs, not GenAI traces."""


# mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; remember what Graft set, so a
# later call in the same process still tells the user's own setting from Graft's.
_uri_set_by_graft: str | None = None


def tracking_uri(params: Params) -> str:
    """`MLFLOW_TRACKING_URI` when the user set it, else SQLite under `tracking.store_dir`."""
    env = os.environ.get(TRACKING_URI_ENV)
    if env and env != _uri_set_by_graft:
        return env
    return f"sqlite:///{params.tracking.store_dir / STORE_FILE}"


def use_tracking_uri(uri: str) -> None:
    """Point the MLflow fluent API (model URIs, artifact downloads) at `uri`."""
    import mlflow

    global _uri_set_by_graft
    user_set = os.environ.get(TRACKING_URI_ENV) not in (None, _uri_set_by_graft)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if not user_set:
        _uri_set_by_graft = uri


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for any other store)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def project_params_file(cwd: Path | None = None) -> Path | None:
    """The params file of the Graft project the working directory is in: `./params.yaml`, or the project's own
    when the working directory lies inside the project folder; None elsewhere."""
    cwd = (cwd or Path.cwd()).resolve()
    if (cwd / PARAMS_FILE).is_file():
        return cwd / PARAMS_FILE
    if cwd.is_relative_to(REPO_ROOT) and (REPO_ROOT / PARAMS_FILE).is_file():
        return REPO_ROOT / PARAMS_FILE
    return None


def _uri_examples() -> str:
    """Stores this environment can open, as examples for a message (an image with mlflow-skinny has no SQLAlchemy)."""
    import importlib.util

    if importlib.util.find_spec("sqlalchemy") is None:
        return ("e.g. http://mlflow.example.com:5000; this environment has mlflow-skinny, without SQLAlchemy, so a SQLite "
                "or database store is read through an `mlflow server` in front of it")
    return f"e.g. http://mlflow.example.com:5000, or sqlite:////abs/path/mlflow/{STORE_FILE}"


def _existing_store(uri: str, why: str) -> str:
    """`uri`, once its SQLite file exists (a consumer must not create an empty store by opening it)."""
    path = _sqlite_path(uri)
    if path is not None and not path.is_file():
        raise TrackingStoreError(
            f"there is no MLflow store at {path} ({why}): `graft run` creates it there; to read another registry, "
            f"set {TRACKING_URI_ENV} ({_uri_examples()})"
        )
    return uri


def consumer_store(params: Params | None = None) -> str:
    """Point MLflow at the registry a consumer reads, and return its URI; never creates a store.

    In this order: `MLFLOW_TRACKING_URI` when the user set it; the store of `params` (an explicit `--params`
    file); an URI already set in this process (`mlflow.set_tracking_uri` in the user's code, or Graft's own run);
    the project's own store when the working directory is inside a Graft project (`project_params_file`).

    Raises:
        TrackingStoreError: none of these names a store, or the project's store has not been created yet;
            the message names `MLFLOW_TRACKING_URI`.
    """
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    import mlflow

    env = os.environ.get(TRACKING_URI_ENV)
    if env and env != _uri_set_by_graft:
        uri, why = env, f"{TRACKING_URI_ENV} names it"
    elif params is not None:
        uri, why = tracking_uri(params), "tracking.store_dir of the params file given"
    elif is_tracking_uri_set():
        return _opened(_existing_store(mlflow.get_tracking_uri(), "the tracking URI set in this process"))
    else:
        found = project_params_file()
        if found is None:
            raise TrackingStoreError(
                f"no MLflow registry to read models:/ URIs from: set {TRACKING_URI_ENV} to your tracking server or store "
                f"({_uri_examples()}), "
                "or run from inside the Graft project"
            )
        uri, why = tracking_uri(load_params(found)), f"the store of the project at {found.parent}"
    uri = _opened(_existing_store(uri, why))
    use_tracking_uri(uri)
    return uri


_opened_stores: set[str] = set()


def _opened(uri: str) -> str:
    """`uri`, once a SQLite store there opens (checked once per process): a damaged or foreign file is one
    `TrackingStoreError`, not a traceback from the first MLflow call. Servers are not probed here; their calls
    report their own failures (`components.registry.mlflow_calls`)."""
    if _sqlite_path(uri) is None or uri in _opened_stores:
        return uri
    import importlib.util

    from mlflow import MlflowClient

    if importlib.util.find_spec("sqlalchemy") is None:  # mlflow-skinny (the serving image's): no database stores at all
        raise TrackingStoreError(
            f"this environment's MLflow cannot open a database store such as {uri}: it has no SQLAlchemy (mlflow-skinny, as "
            f"in the serving image); set {TRACKING_URI_ENV} to your MLflow server (http://...), or install mlflow"
        )
    try:
        MlflowClient(uri, uri).search_registered_models(max_results=1)
    except Exception as exc:  # noqa: BLE001 - MLflow and SQLAlchemy raise many types for a store that will not open
        raise TrackingStoreError(
            f"cannot open the MLflow store {uri} ({mlflow_calls.first_line(exc)}); is it an MLflow store of this version "
            f"(`mlflow db upgrade {uri}` migrates an older one)? Or set {TRACKING_URI_ENV} to the registry to read"
        ) from exc
    _opened_stores.add(uri)
    return uri


def empty_store_template():  # noqa: ANN201 - EmptyDatabaseTemplate, imported lazily
    """The empty store of this MLflow version, kept in the user's cache: a new project's store starts as a copy
    (`components.core.empty_database`), which opens at once where creating the schema takes 1.0-1.3 s.

    MLflow writes one row about the store's own place when it creates a store: its Default experiment (id 0),
    with an artifact location under the folder the creating process ran in. The template leaves it out, and
    MLflow writes it afresh when it opens the copy, as for a store it made itself.
    """
    import mlflow

    from components.core.empty_database import EmptyDatabaseTemplate
    from components.core.files import user_cache_dir

    return EmptyDatabaseTemplate(
        user_cache_dir() / "mlflow-db" / f"mlflow-{mlflow.__version__}.db",
        nonempty_tables=("alembic_version", "workspaces"),  # the schema's version and MLflow's default workspace
        scrub=("delete from experiment_tags where experiment_id = 0", "delete from experiments where experiment_id = 0"),
    )


def _create_embedded_store(uri: str, store_dir: Path) -> None:
    """Create (or migrate) the SQLite store once, however many processes open it at the same moment.

    MLflow creates its schema when a process first opens an empty database; two processes doing so at once
    fail with `table ... already exists`. A file lock beside the database makes the first one create it and
    the others wait, then find it made. A new store starts from this MLflow version's empty store when the
    user's cache holds one (`empty_store_template`), and the first store made is kept there.
    """
    from filelock import FileLock, Timeout

    from mlflow import MlflowClient

    def create() -> None:
        client = MlflowClient(uri, uri)
        client.search_experiments(max_results=1)  # creates or migrates the tracking tables
        client.search_registered_models(max_results=1)  # and the registry's, in the same database

    store_dir.mkdir(parents=True, exist_ok=True)
    database, template = store_dir / STORE_FILE, empty_store_template()
    lock = FileLock(str(store_dir / f".{STORE_FILE}.lock"))
    try:
        with lock.acquire(timeout=600):
            new = not database.exists()
            seeded = new and template.seed(database)
            if seeded:
                log.info("new MLflow store %s: it starts from %s (no migrations)", database, template.template)
            try:
                create()
            except Exception as exc:  # noqa: BLE001 - a damaged template: start afresh; anything else is reported below
                if not seeded:
                    raise
                log.warning("the MLflow store copied from %s did not open (%s); deleting that copy and creating a "
                            "new store", template.template, mlflow_calls.first_line(exc))
                _forget_engine(uri)  # MLflow keeps one engine per URI, with connections open on the deleted copy
                template.discard(database)
                seeded = False
                create()
            if new and not seeded:
                template.keep(database)
    except Timeout as exc:
        raise TrackingStoreError(
            f"waited 10 minutes for another process creating the MLflow store at {store_dir}; if none is running, "
            f"delete {lock.lock_file} and rerun"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - MLflow and SQLAlchemy raise many types for a store that will not open
        raise TrackingStoreError(
            f"cannot open the MLflow store {uri} ({mlflow_calls.first_line(exc)}); check that {store_dir} is writable "
            f"and holds a store of this MLflow version (`mlflow db upgrade {uri}` migrates an older one), "
            f"or set {TRACKING_URI_ENV} to another store"
        ) from exc


def _forget_engine(uri: str) -> None:
    """Close and drop the SQLAlchemy engine MLflow keeps for `uri`, so the next client opens the file afresh."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(uri, None)
    if engine is not None:
        engine.dispose()


def open_tracking_store(params: Params) -> str:
    """Point MLflow at the tracking/registry store `graft run` writes to (creating the project's own store
    when needed) and make sure the experiment exists.

    Raises:
        TrackingStoreError: the project's store cannot be created or opened.
        RegistryError: the server kept failing; TrackingAuthError: it refused us.
    """
    from mlflow import MlflowClient

    uri = tracking_uri(params)
    if _sqlite_path(uri) is not None:
        _create_embedded_store(uri, _sqlite_path(uri).parent)
    use_tracking_uri(uri)
    client = MlflowClient(uri, uri)
    name = params.tracking.experiment
    location = experiment_location(params, uri)
    mlflow_calls.call(f"opening MLflow experiment '{name}' at {mlflow_calls.printable_uri(uri)}",
                      lambda: _ensure_experiment(client, name, location), uri=uri)
    return uri


DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
"""The tracking URIs MLflow opens as a database of its own, with no server in between (`postgresql+psycopg2://` too)."""


def experiment_location(params: Params, uri: str) -> str | None:
    """Where a new experiment of the store at `uri` keeps its artifacts: `tracking.store_dir/artifacts` for a database
    MLflow opens itself, the server's own artifact store (None) for a tracking server.

    Without a location, MLflow puts a database's artifacts in `./mlruns` of whatever folder the run starts in.
    """
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme not in DATABASE_SCHEMES:
        return None
    return (params.tracking.store_dir / "artifacts").resolve().as_uri()


def _ensure_experiment(client, name: str, location: str | None) -> None:  # noqa: ANN001 - MlflowClient
    """Create experiment `name` (a training experiment for MLflow's UI) unless it exists, also when a concurrent run creates it."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
        except MlflowException:
            if client.get_experiment_by_name(name) is None:  # else a concurrent run created it first
                raise
    elif EXPERIMENT_KIND_TAG not in found.tags:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")


@dataclass(frozen=True)
class Run:
    """A handle on one MLflow run, usable from any thread."""

    run_id: str
    uri: str

    @property
    def client(self):  # noqa: ANN201 - MlflowClient, imported lazily
        from mlflow import MlflowClient

        return MlflowClient(self.uri, self.uri)

    def _call(self, what: str, action: Callable[[], T]) -> T:
        """`action` with transient failures retried; raises `RegistryError` (or `TrackingAuthError`) naming the run."""
        return mlflow_calls.call(f"{what} run {self.run_id}", action, uri=self.uri)

    def log_params(self, values: dict[str, object]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in values.items()]
        self._call("logging params to", lambda: self.client.log_batch(self.run_id, params=params))

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None:

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step or 0) for k, v in values.items()]
        self._call("logging metrics to", lambda: self.client.log_batch(self.run_id, metrics=metrics))

    @contextmanager
    def epoch_metrics(self, every_s: float = 2.0) -> Iterator[Callable[[dict[str, float], int], None]]:
        """A per-epoch metrics callback that sends in batches: the first epoch at once, then at most every
        `every_s` seconds (or at 900 values, under MLflow's 1,000 per call), and the rest when the block ends,
        however it ends. Each value keeps its own step and time, so MLflow's charts are those of one call per
        epoch; 200 one-millisecond epochs on a small dataset make a few calls instead of 200."""

        from mlflow.entities import Metric

        pending: list[Metric] = []
        last_sent, retry_after = float("-inf"), float("-inf")

        def flush(retried: bool = True) -> None:
            """Send what is pending, 900 values a call; what a failed call did not send stays pending."""
            nonlocal last_sent
            while pending:
                batch = pending[:900]
                send = lambda batch=batch: self.client.log_batch(self.run_id, metrics=batch)  # noqa: E731
                if retried:
                    self._call("logging metrics to", send)
                else:
                    mlflow_calls.call_once(f"logging metrics to run {self.run_id}", send, uri=self.uri)
                del pending[: len(batch)]
            last_sent = time.monotonic()

        def on_epoch(values: dict[str, float], step: int) -> None:
            nonlocal retry_after
            now = int(time.time() * 1000)
            pending.extend(Metric(k, float(v), now, step) for k, v in values.items())
            if time.monotonic() < retry_after or (len(pending) < 900 and time.monotonic() - last_sent < every_s):
                return
            try:
                flush(retried=False)  # one try: a server that is away costs an epoch nothing, and is tried again later
            except RegistryError as exc:
                if isinstance(exc, TrackingAuthError) or not is_transient(exc.__cause__):
                    raise
                retry_after = time.monotonic() + METRICS_RETRY_S
                log.warning("MLflow did not take this epoch's metrics (%s); training goes on, and they are sent with "
                            "later ones (%d waiting; tried again in %d s)", mlflow_calls.first_line(exc.__cause__),
                            len(pending), METRICS_RETRY_S)

        try:
            yield on_epoch
        except BaseException:
            try:  # the epochs trained before a failure or a stop still belong in the run
                flush()
            except Exception as exc:  # noqa: BLE001 - the original error is the one to report
                log.warning("could not log the last epochs' metrics: %s", exc)
            raise
        flush()

    def set_tags(self, values: dict[str, object]) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(k, str(v)[:5000]) for k, v in values.items()]
        self._call("setting tags of", lambda: self.client.log_batch(self.run_id, tags=tags))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._call(f"uploading {path} to", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_dict(self, content: dict, name: str) -> None:
        self._call(f"writing {name} to", lambda: self.client.log_dict(self.run_id, content, name))

    def artifact_uri(self) -> str:
        """Where this run's artifacts live (`.../artifacts`), read from the server."""
        return self._call("reading", lambda: self.client.get_run(self.run_id)).info.artifact_uri

    def experiment_id(self) -> str:
        return self._call("reading", lambda: self.client.get_run(self.run_id)).info.experiment_id

    def child(self, name: str, description: str | None = None) -> Run:
        """A nested run under this one (shown beneath it in the MLflow UI)."""
        parent = self._call("reading", lambda: self.client.get_run(self.run_id))
        tags = {"mlflow.parentRunId": self.run_id, **({NOTE_TAG: description} if description else {})}
        run = mlflow_calls.call_once(
            f"creating child run '{name}' of run {self.run_id}",
            lambda: self.client.create_run(parent.info.experiment_id, run_name=name, tags=tags),
            uri=self.uri,
        )
        return Run(run.info.run_id, self.uri)

    def describe(self, name: str | None = None, description: str | None = None) -> None:
        """Rename the run and set its description (Markdown, shown on its page in the MLflow UI)."""
        if name:
            self._call("renaming", lambda: self.client.update_run(self.run_id, name=name[:250]))
        if description:
            self.set_tags({NOTE_TAG: description})

    def log_dataset(self, dataset: TrainingData) -> None:
        """Record the data the run trained on as an MLflow dataset input (the Dataset column of the UI)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        entity = Dataset(dataset.name, dataset.digest[:36], dataset.source_type, json.dumps(dataset.source),
                         profile=json.dumps(dataset.profile))
        inputs = [DatasetInput(entity, [InputTag("mlflow.data.context", "training")])]
        self._call("logging the dataset input of", lambda: self.client.log_inputs(self.run_id, datasets=inputs))

    def log_model_output(self, model_id: str) -> None:
        """Link a LoggedModel to this run as its output (the Logged models column of the MLflow UI)."""
        from mlflow.entities import LoggedModelOutput

        self._call("linking a logged model to", lambda: self.client.log_outputs(self.run_id, [LoggedModelOutput(model_id, step=0)]))

    def finish(self, status: str = "FINISHED", end_time_ms: int | None = None) -> None:
        """End the run `status`, at `end_time_ms` (ms since the epoch) or now."""
        self._call(f"marking {status}", lambda: self.client.set_terminated(self.run_id, status, end_time=end_time_ms))


NOTE_TAG = "mlflow.note.content"
"""MLflow's tag for a run's description (Markdown)."""


@dataclass(frozen=True)
class TrainingData:
    """The data a run trained on, as MLflow records a dataset: a name, a digest, where it came from, its shape."""

    name: str
    digest: str
    """The DVC md5 of the folder (`<md5>.dir`); MLflow keeps 36 characters."""
    source: dict[str, str]
    source_type: str = "dvc"
    profile: dict[str, object] | None = None


def source_tags(commit: str) -> dict[str, str]:
    """MLflow's own run fields: who ran it, from what, at which commit (the UI's Source and User)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    tags = {"mlflow.source.name": "graft run", "mlflow.source.type": "LOCAL", "mlflow.user": user}
    if commit and commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    return tags


def ended_note(exc: BaseException) -> str:
    """The description of a run that ended early: where, and the error (or the stop) in the words the terminal showed."""
    when = progress.when()
    if isinstance(exc, Exception):
        return f"**Failed** {when}: {error_text(exc)}"
    return (f"**Stopped** ({progress.stopped_by(exc)}) {when}: nothing was registered or promoted "
            "after it. Running the same command again resumes it.")


PROCESS_TAGS = {"host": "graft.host", "pid": "graft.pid", "started": "graft.process_started",
                "namespace": "graft.pid_namespace", "machine": "graft.machine_id"}
"""The tags that name the process running a parent run (`components.core.processes.this_process`): a later run
on the same machine ends a run whose process is gone (`end_runs_left_running`)."""


def process_tags() -> dict[str, str]:
    process = this_process()
    return {tag: process[key] for key, tag in PROCESS_TAGS.items()}


HEARTBEAT_TAG = "graft.alive_at"
"""When the process running a parent run last said it was alive (UTC, ISO 8601): written every `HEARTBEAT_S` while
the run lasts, so a run whose process cannot be looked into from here (another container, another machine) is known
dead once it falls silent (`SILENT_AFTER_S`)."""

HEARTBEAT_S = 60.0

SILENT_AFTER_S = 15 * 60
"""How long a RUNNING parent run of another machine or container must be seen silent before it is ended KILLED: the
same heartbeat found by `graft run`s at least this long apart, by their own clocks (15 beats missed). A writer's
clock that is off, an MLflow outage during which no beat could be written, or a paused container never end a live
run: its next beat, once it can write one, is another value."""

SILENCE_TAG = "graft.silence_seen"
"""On a RUNNING run of another machine or container: which heartbeat (`HEARTBEAT_TAG`) a `graft run` found, and
when by that run's clock (JSON), so a later run can tell that it has not changed since."""


def _now_text() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _beat_time(text: str | None) -> datetime | None:
    try:
        when = datetime.fromisoformat(text) if text else None
    except ValueError:
        return None
    return when if when is not None and when.tzinfo is not None else None


def heartbeat(run: Run) -> AbstractContextManager[None]:
    """Write `HEARTBEAT_TAG` on `run` every `HEARTBEAT_S` from a daemon thread while the block runs.

    A beat that fails (the server away for a moment, SQLite busy) is skipped, and the next one tries again: a beat
    never fails or slows the run."""
    from mlflow.entities import RunTag

    def beat() -> None:
        try:
            run.client.log_batch(run.run_id, tags=[RunTag(HEARTBEAT_TAG, _now_text())])
        except Exception as exc:  # noqa: BLE001 - a missed beat is only a missed beat
            log.debug("heartbeat of MLflow run %s not written (%s)", run.run_id, exc)

    return every(HEARTBEAT_S, beat, "graft-mlflow-heartbeat")


def _left_running(tags: dict[str, str], here: str, now: datetime) -> tuple[str, datetime | None] | None:
    """Why a RUNNING parent run with these tags is known to have lost its process, and its last sign of life;
    None while it may still be running (or cannot be judged)."""
    record = {key: tags.get(tag, "") for key, tag in PROCESS_TAGS.items()}
    last = _beat_time(tags.get(HEARTBEAT_TAG))
    # only a run of this host is looked up by pid: a VM cloned with this machine's /etc/machine-id is another machine
    verdict = still_running(record) if record["host"] == here else None
    if verdict is False:
        return "gone", last
    if verdict is None and last is not None:
        seen = _silence_seen(tags)
        if seen is None:
            return "unseen", last  # the caller records when this beat was first found
        if (now - seen).total_seconds() > SILENT_AFTER_S:
            return "silent", last
    return None


def _silence_seen(tags: dict[str, str]) -> datetime | None:
    """When a `graft run` first found the heartbeat the run has now (`SILENCE_TAG`); None if none has."""
    try:
        seen = json.loads(tags.get(SILENCE_TAG) or "{}")
    except ValueError:
        return None
    return _beat_time(seen.get("seen_at")) if seen.get("alive_at") == tags.get(HEARTBEAT_TAG) else None


def end_runs_left_running(client, experiment_id: str, uri: str) -> list[str]:  # noqa: ANN001 - MlflowClient
    """End KILLED the runs of this experiment still RUNNING whose process is gone.

    A process killed outright (`kill -9`, the out-of-memory killer, a container or machine that went down) cannot end
    its own run, which the MLflow UI then shows running for ever. Each `graft run` looks for such runs before it
    starts its own, and ends KILLED, with a description saying so, those whose process is known to be gone, and their
    child runs:
    - a run of this host whose process, looked up by pid (`PROCESS_TAGS`), no longer runs
      (`components.core.processes.still_running`: the same boot and pid namespace, or the same machine rebooted);
    - a run of another container or machine, which no pid here names, once its heartbeat (`HEARTBEAT_TAG`, written
      every minute while a run lasts) is found unchanged by `graft run`s `SILENT_AFTER_S` apart (the first records
      what it found, `SILENCE_TAG`).
    A run ends at its last heartbeat where it has one, so its duration is how long it really ran. Runs of live
    processes, runs still beating, and runs without the tags (older Graft) are left as they are. Failing to look is a
    warning, never a failed run. Returns the ids of the runs it ended.
    """
    here = this_process()["host"]
    try:
        found = mlflow_calls.call("looking for runs left RUNNING by killed processes", lambda: client.search_runs(
            [experiment_id], f"attributes.status = 'RUNNING' and tags.`{PROCESS_TAGS['pid']}` != ''", max_results=500),
            uri=uri)
        ended = []
        now = datetime.now(timezone.utc)
        for stale in found:
            tags = stale.data.tags
            known = _left_running(tags, here, now)
            if known is None:
                continue
            why, last = known
            if why == "unseen":
                Run(stale.info.run_id, uri).set_tags({SILENCE_TAG: json.dumps(
                    {"alive_at": tags[HEARTBEAT_TAG], "seen_at": now.isoformat(timespec="seconds")})})
                continue
            children = mlflow_calls.call("reading child runs", lambda: client.search_runs(
                [experiment_id], f"attributes.status = 'RUNNING' and tags.`mlflow.parentRunId` = '{stale.info.run_id}'"),
                uri=uri)
            marked = now.strftime("%Y-%m-%d %H:%M UTC")
            who = f"the process that ran it (pid {tags[PROCESS_TAGS['pid']]} on {tags.get(PROCESS_TAGS['host'], '?')})"
            if why == "gone":
                what = f"**Ended unseen**: {who} stopped without ending it: killed (`kill -9`, out of memory) or its machine went down."
            else:
                what = (f"**Ended unseen**: {who} has given no sign of life since {last.strftime('%Y-%m-%d %H:%M UTC')} "
                        f"(a running `graft run` writes one every minute, in the `{HEARTBEAT_TAG}` tag, and it had not "
                        f"changed since {_silence_seen(tags).strftime('%Y-%m-%d %H:%M UTC')}): killed (`kill -9`, out of "
                        "memory), or its container or machine went down.")
            ends = (f"it ends at its last sign of life, {last.strftime('%H:%M UTC')}" if last is not None
                    else "so the run's duration runs until then")
            note = (f"{what} Its last logged metrics and artifacts show how far it got; nothing was registered or "
                    f"promoted after them. Marked KILLED on {marked} by a `graft run` on {here} ({ends}). Running the "
                    "same command again resumes it.")
            end_ms = int(last.timestamp() * 1000) if last is not None else None
            for run in [*children, stale]:
                ended_run = Run(run.info.run_id, uri)
                ended_run.set_tags({NOTE_TAG: note})
                ended_run.describe(name=f"killed · {run.info.run_name}" if run.info.run_name else None)
                # a child started after the last beat, or a run killed before its first: it ends where it began
                ended_run.finish("KILLED", max(end_ms, run.info.start_time) if end_ms is not None else None)
                ended.append(run.info.run_id)
            log.warning("MLflow run %s ('%s') was left RUNNING by a process that %s (pid %s on %s); marked it KILLED",
                        stale.info.run_id, stale.info.run_name,
                        "was killed" if why == "gone" else f"has been silent since {last:%Y-%m-%d %H:%M UTC}",
                        tags[PROCESS_TAGS["pid"]], tags.get(PROCESS_TAGS["host"], "?"))
    except GraftError as error:
        log.warning("could not look for MLflow runs left RUNNING by killed processes (%s); carrying on", error)
        return []
    return ended


@contextmanager
def parent_run(params: Params, run_name: str | None = None, tags: dict[str, str] | None = None) -> Iterator[Run]:
    """Open the pipeline's parent run (named after its data folder until the run renames it); it ends FAILED if the body raises, KILLED if it is interrupted."""
    from mlflow import MlflowClient

    uri = open_tracking_store(params)
    client = MlflowClient(uri, uri)
    name = params.tracking.experiment
    experiment = mlflow_calls.call(f"reading MLflow experiment '{name}'", lambda: client.get_experiment_by_name(name), uri=uri)
    end_runs_left_running(client, experiment.experiment_id, uri)
    tags = {**source_tags((tags or {}).get("git_commit", "")), NOTE_TAG: "Running: choose, fine-tune, evaluate, deploy.",
            **(tags or {}), **process_tags(), HEARTBEAT_TAG: _now_text()}  # last: what a person reads comes first in the
    # MLflow UI's tag list
    created = mlflow_calls.call_once(
        f"starting a run in MLflow experiment '{name}'",
        lambda: client.create_run(experiment.experiment_id, run_name=run_name or f"graft run: {params.data.dir.name}", tags=tags),
        uri=uri,
    )
    run = Run(created.info.run_id, uri)
    log.info("MLflow run %s in experiment '%s' at %s", run.run_id, name, mlflow_calls.printable_uri(uri))
    try:
        with heartbeat(run):
            yield run
    except BaseException as exc:
        # an error ends the run FAILED; an interrupt (Ctrl-C, SIGTERM: not an Exception) ends it KILLED
        status = "FAILED" if isinstance(exc, Exception) else "KILLED"
        try:  # the description says what happened, not "Running: ..." for ever
            run.set_tags({NOTE_TAG: ended_note(exc)})
            run.finish(status)
        except GraftError as error:  # the body's error is the one to report
            log.warning("could not mark run %s %s (%s); it stays RUNNING in the MLflow UI", run.run_id, status, error)
        raise
    run.finish("FINISHED")


@contextmanager
def requirements_pinned_here() -> Iterator[None]:
    """Save MLflow models whose pip requirements are pinned from this very environment, without MLflow's check of them.

    Before it saves a model, MLflow checks each requirement against the installed packages, and first maps every
    installed distribution to its modules: 1.2 s of a run here (about 300 distributions), once per process. Graft's
    requirements are the installed versions themselves (the PyTorch model's `==` pins from `importlib.metadata`,
    the ONNX flavour's defaults from MLflow), so that check cannot find a mismatch. Should MLflow rename the
    check, it runs as before.
    """
    from unittest import mock

    from mlflow.utils import environment

    if not callable(getattr(environment, "warn_dependency_requirement_mismatches", None)):
        yield
        return
    with mock.patch.object(environment, "warn_dependency_requirement_mismatches", lambda requirements: None):
        yield
