"""MLflow tracking: where runs go, and one parent run per pipeline run.

Everything is addressed by explicit run id through `MlflowClient`, so stages
may run in any thread or process (Prefect task runners) and still log to the
same run. Nothing here runs at import time.

Logging calls overwrite what they set, so each retries transient MLflow failures
on its own (`components.registry.mlflow_calls.call`); creating a run does not, since a
retry after a lost response would make a second one. A server that refuses the
credentials or a permission gives a `TrackingAuthError` saying what to set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from components.core.config import Params
from components.core.errors import GraftError
from components.registry import mlflow_calls

log = logging.getLogger(__name__)


T = TypeVar("T")


# mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; remember what Graft set, so a
# later call in the same process still tells the user's own setting from Graft's.
_uri_set_by_graft: str | None = None


def tracking_uri(params: Params) -> str:
    """`MLFLOW_TRACKING_URI` when the user set it, else SQLite under `tracking.store_dir`."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and env != _uri_set_by_graft:
        return env
    return f"sqlite:///{params.tracking.store_dir / 'mlflow.db'}"


def use_tracking_uri(uri: str) -> None:
    """Point the MLflow fluent API (model URIs, artifact downloads) at `uri`."""
    import mlflow

    global _uri_set_by_graft
    user_set = os.environ.get("MLFLOW_TRACKING_URI") not in (None, _uri_set_by_graft)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if not user_set:
        _uri_set_by_graft = uri


def open_tracking_store(params: Params) -> str:
    """Point MLflow at the tracking/registry store and make sure the experiment exists."""
    from mlflow import MlflowClient

    uri = tracking_uri(params)
    if uri.startswith("sqlite:///"):
        params.tracking.store_dir.mkdir(parents=True, exist_ok=True)
    use_tracking_uri(uri)
    client = MlflowClient(uri, uri)
    name = params.tracking.experiment
    with mlflow_calls.auth_explained(uri, f"opening MLflow experiment '{name}'"):
        if client.get_experiment_by_name(name) is None:
            location = None
            if uri.startswith("sqlite:///"):
                location = (params.tracking.store_dir / "artifacts").resolve().as_uri()
            try:
                client.create_experiment(name, artifact_location=location)
            except Exception:  # noqa: BLE001 - a concurrent run created it first
                if client.get_experiment_by_name(name) is None:
                    raise
    return uri


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
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step or 0) for k, v in values.items()]
        self._call("logging metrics to", lambda: self.client.log_batch(self.run_id, metrics=metrics))

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

    def child(self, name: str) -> Run:
        """A nested run under this one (shown beneath it in the MLflow UI)."""
        parent = self._call("reading", lambda: self.client.get_run(self.run_id))
        with mlflow_calls.auth_explained(self.uri, f"creating child run '{name}' of run {self.run_id}"):
            tags = {"mlflow.parentRunId": self.run_id}
            run = self.client.create_run(parent.info.experiment_id, run_name=name, tags=tags)
        return Run(run.info.run_id, self.uri)

    def finish(self, status: str = "FINISHED") -> None:
        self._call(f"marking {status}", lambda: self.client.set_terminated(self.run_id, status))


@contextmanager
def parent_run(params: Params, run_name: str | None = None, tags: dict[str, str] | None = None) -> Iterator[Run]:
    """Open the pipeline's parent run; it ends FAILED if the body raises, KILLED if it is interrupted."""
    from mlflow import MlflowClient

    uri = open_tracking_store(params)
    client = MlflowClient(uri, uri)
    with mlflow_calls.auth_explained(uri, f"starting a run in MLflow experiment '{params.tracking.experiment}'"):
        experiment = client.get_experiment_by_name(params.tracking.experiment)
        created = client.create_run(experiment.experiment_id, run_name=run_name, tags=tags or {})
    run = Run(created.info.run_id, uri)
    log.info("MLflow run %s in experiment '%s' at %s", run.run_id, params.tracking.experiment, uri)
    try:
        yield run
    except BaseException as exc:
        # an error ends the run FAILED; an interrupt (Ctrl-C, SIGTERM: not an Exception) ends it KILLED
        status = "FAILED" if isinstance(exc, Exception) else "KILLED"
        try:
            run.finish(status)
        except GraftError as error:  # the body's error is the one to report
            log.warning("could not mark run %s %s (%s); it stays RUNNING in the MLflow UI", run.run_id, status, error)
        raise
    run.finish("FINISHED")
