"""Scheduled retraining: check first, train only when the data or the parameters changed.

    graft schedule --cron "0 3 * * 1" [--collision enqueue|cancel_new]   # serve it from this process
    graft schedule --cron "0 3 * * 1" --pool graft-local                 # or: register it for a work pool
    prefect deploy --name graft-retrain                                  # the same from prefect.yaml

Each run reads the data version (`data.dvc`, no pull) and fingerprints the
training parameters; when both match the registered champion (or the latest
challenger the gate kept out), it records "nothing to do" and stops. Otherwise
it pulls the data and runs the training flow as a subflow. The deployment
allows one run at a time; a run that collides with a running one waits
(ENQUEUE) or is cancelled (CANCEL_NEW).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from components.core.config import REPO_ROOT, Params, find_params_file, load_params
from components.core.errors import ConfigError
from components.data.versions import data_version
from components.deploy.retrain import RetrainDecision, decide, decision_markdown, record_decision
from flows.resilience import service_retries
from flows.runners import with_task_runner
from flows.training import train_flow

DEPLOYMENT_NAME = "graft-retrain"
COLLISION_STRATEGIES = ("enqueue", "cancel_new")


@task(name="check-for-changes", cache_policy=NO_CACHE, **service_retries())
def check_task(params: Params) -> RetrainDecision:
    return decide(params)


@task(name="record-check", cache_policy=NO_CACHE, **service_retries())
def record_task(params: Params, decision: RetrainDecision) -> None:
    from components.registry.tracking import tracking_uri
    from mlflow import MlflowClient

    uri = tracking_uri(params)
    record_decision(MlflowClient(uri, uri), decision)


@task(name="pull-data", cache_policy=NO_CACHE, **service_retries())
def pull_task(params: Params) -> str:
    return data_version(params.data.dir)


@flow(name="graft-retrain")
def retrain_flow(params_file: str | None = None, overrides: list[str] | None = None, force: bool = False) -> dict:
    """Train when the data or the training parameters differ from the registered model's; else stop.

    Args:
        params_file: The params file (default: ./params.yaml, else this project's, as every `graft` command).
        overrides: `section.key=value` strings, as `graft run --set`.
        force: Train even when nothing changed.
    """
    params = load_params(find_params_file(params_file), list(overrides or []))
    decision = check_task(params)
    if force:
        decision = decision.force()
    record_task(params, decision)
    create_markdown_artifact(key="graft-retrain-check", markdown=decision_markdown(decision), description=decision.action)
    # in the run's Prefect log too (the worker's output, the UI's log tab), not only in the artifact
    get_run_logger().info("%s: %s", decision.action, decision.reason)
    result = {
        "action": decision.action,
        "reason": decision.reason,
        "model_name": decision.model_name,
        "data_md5": decision.data_md5,
        "params_sha": decision.params_sha,
        "champion_version": decision.champion_version,
        "summary": None,
    }
    if not decision.retrain:
        return result
    pull_task(params)
    result["summary"] = with_task_runner(train_flow)(params)
    return result


def concurrency(collision: str) -> ConcurrencyLimitConfig:
    """One run at a time; `collision` says what happens to a run that finds another running.

    Raises:
        ConfigError: `collision` is not one of `COLLISION_STRATEGIES`.
    """
    if collision.lower() not in COLLISION_STRATEGIES:
        raise ConfigError(f"--collision '{collision}' is not one of {', '.join(COLLISION_STRATEGIES)}")
    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy[collision.upper()])


def retrain_deployment(
    cron: str | None,
    collision: str = "enqueue",
    params_file: str | None = None,
    overrides: list[str] | None = None,
    name: str = DEPLOYMENT_NAME,
    timezone: str = "UTC",
    work_pool: str | None = None,
):  # noqa: ANN201 - prefect RunnerDeployment
    """The retraining deployment: a cron schedule (None for runs on demand only), one run at a time.

    With `work_pool`, a worker of that pool runs it in this project folder (`.apply()` registers it);
    without, `prefect.serve` runs it from the serving process.
    """
    from prefect.schedules import Cron

    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule
        from pydantic import ValidationError

        try:
            CronSchedule(cron=cron, timezone=timezone)
        except ValidationError as exc:
            raise ConfigError(
                f"--cron '{cron}' / --timezone '{timezone}' is not a valid schedule ({exc.errors()[0]['msg']}); "
                'e.g. --cron "0 3 * * 1" (Mondays 03:00) --timezone Europe/Berlin'
            ) from exc
    deployment = retrain_flow.to_deployment(
        name=name,
        schedules=[Cron(cron, timezone=timezone)] if cron else None,
        parameters={"params_file": params_file, "overrides": list(overrides or []), "force": False},
        concurrency_limit=concurrency(collision),
        description="Graft retraining: train only when data.dvc or the training parameters changed.",
        tags=["graft"],
        **({"work_pool_name": work_pool, "job_variables": {"working_dir": str(REPO_ROOT)}} if work_pool else {}),
    )
    if work_pool:
        # the worker starts in REPO_ROOT: name the flow relative to it, not to wherever `graft schedule` ran
        deployment.entrypoint = f"{Path(__file__).resolve().relative_to(REPO_ROOT).as_posix()}:retrain_flow"
    return deployment
