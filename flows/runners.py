"""Where the flow's tasks run: threads here (default), or a Dask cluster, the one engine Graft supports and tests.

    GRAFT_TASK_RUNNER=dask graft run                               # a local Dask cluster, one process per worker
    GRAFT_TASK_RUNNER=dask GRAFT_DASK_ADDRESS=tcp://host:8786 graft run   # an existing Dask scheduler

Only the runner changes: the mapped choose candidates (and any other submitted
task) go to the cluster's workers, which need this project installed and the
data, feature cache and MLflow store at the same paths (a shared filesystem or
object store).
"""

from __future__ import annotations

import os

from components.core.errors import ConfigError

RUNNERS = ("threads", "dask")


def task_runner(kind: str | None = None, address: str | None = None):  # noqa: ANN201 - a prefect TaskRunner
    """The task runner `kind` names (default: $GRAFT_TASK_RUNNER, else threads), or None for Prefect's default.

    Raises:
        ConfigError: an unknown kind, or its Prefect integration is not installed.
    """
    kind = (kind or os.environ.get("GRAFT_TASK_RUNNER") or "threads").lower()
    if kind == "threads":
        return None
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise ConfigError("GRAFT_TASK_RUNNER=dask needs prefect-dask: .venv/bin/pip install 'prefect-dask<0.4'") from exc
        address = address or os.environ.get("GRAFT_DASK_ADDRESS")
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": _dask_workers(), "threads_per_worker": 1})
    if kind == "ray":  # documented once, never tested: prefect-ray is not in the lock, so Graft does not claim it
        raise ConfigError("GRAFT_TASK_RUNNER=ray is not supported: Dask is the engine Graft supports and tests; "
                          "use GRAFT_TASK_RUNNER=dask (GRAFT_DASK_ADDRESS=tcp://scheduler:8786 for an existing cluster)")
    raise ConfigError(f"GRAFT_TASK_RUNNER='{kind}' is not one of {', '.join(RUNNERS)}")


def _dask_workers() -> int:
    """$GRAFT_DASK_WORKERS (default 2): the local Dask cluster's worker processes.

    Raises:
        ConfigError: it is not a whole number of at least 1.
    """
    text = os.environ.get("GRAFT_DASK_WORKERS", "2")
    try:
        workers = int(text)
    except ValueError:
        workers = 0
    if workers < 1:
        raise ConfigError(f"GRAFT_DASK_WORKERS='{text}' is not a whole number of worker processes; e.g. GRAFT_DASK_WORKERS=2")
    return workers


def with_task_runner(flow):  # noqa: ANN001, ANN201 - a prefect Flow
    """`flow` with the task runner GRAFT_TASK_RUNNER asks for; unchanged when it asks for none."""
    runner = task_runner()
    return flow if runner is None else flow.with_options(task_runner=runner)
