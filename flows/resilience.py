"""Retry settings for tasks that talk to services: the MLflow server, the DVC remote.

Only transient failures are retried (`components.core.transient.is_transient`), with
exponential back-off and jitter; training and other pure computation never is.
"""

from __future__ import annotations

from prefect.tasks import exponential_backoff

from components.core.transient import is_transient


def retry_if_transient(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    """Retry when the task failed for a reason a retry can cure (network, timeout, remote)."""
    return is_transient(state.data if isinstance(state.data, BaseException) else None)


def service_retries(first_delay_s: float = 2.0) -> dict:
    """`@task(**service_retries())`: 3 retries after about 2, 4 and 8 s (each +-50% jitter)."""
    return {
        "retries": 3,
        "retry_delay_seconds": exponential_backoff(backoff_factor=first_delay_s),
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": retry_if_transient,
    }
