"""The training flow: choose -> fine-tune -> evaluate -> deploy, each a Prefect task.

Tasks take and return small frozen results (paths, names, metrics); all the
work happens in the component each one calls.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from components.choose import ChooseResult, choose_model
from components.config import Params
from components.data import Split, scan
from components.deploy import DeployResult, deploy
from components.evaluate import EvalResult, evaluate
from components.reporting import log_choice, log_evaluation, log_run_start, log_summary
from components.summary import Stopwatch, build_summary
from components.tracking import Run, git_commit, parent_run
from components.train import TrainResult, fine_tune
from components.versioning import data_version


@task(name="scan-data", cache_policy=NO_CACHE)
def scan_task(params: Params) -> tuple[Split, str]:
    md5 = data_version(params.data.dir)
    return scan(params.data.dir, params.data.val_fraction, params.data.seed), md5


@task(name="choose", cache_policy=NO_CACHE)
def choose_task(params: Params, split: Split) -> ChooseResult:
    return choose_model(params, split)


@task(name="fine-tune", cache_policy=NO_CACHE)
def fine_tune_task(params: Params, split: Split, choice: ChooseResult, run: Run, run_dir: Path) -> TrainResult:
    return fine_tune(params, split, choice, run_dir, on_epoch=run.log_metrics)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(params: Params, split: Split, trained: TrainResult, run_dir: Path) -> EvalResult:
    return evaluate(params, split, trained, run_dir)


@task(name="deploy", cache_policy=NO_CACHE)
def deploy_task(params: Params, split: Split, trained: TrainResult, evaluation: EvalResult, run: Run, run_dir: Path, data_md5: str, commit: str) -> DeployResult:
    return deploy(params, split, trained, evaluation, run, run_dir, data_md5, commit)


@flow(name="graft-train")
def train_flow(params: Params) -> dict:
    """Run the four stages on `params.data.dir` and return the run summary."""
    clock = Stopwatch()
    with clock("data"):
        split, md5 = scan_task(params)
    commit = git_commit()
    with parent_run(params, tags={"data_md5": md5, "git_commit": commit}) as run:
        run_dir = params.deploy.output_dir / "runs" / run.run_id
        log_run_start(run, params, split, md5, commit)
        with clock("choose"):
            choice = choose_task(params, split)
        log_choice(run, choice, run_dir)
        with clock("fine_tune"):
            trained = fine_tune_task(params, split, choice, run, run_dir)
        with clock("evaluate"):
            evaluation = evaluate_task(params, split, trained, run_dir)
        log_evaluation(run, evaluation, params.deploy.output_dir)
        with clock("deploy"):
            deployed = deploy_task(params, split, trained, evaluation, run, run_dir, md5, commit)
        summary = build_summary(run.run_id, params.data.dir, md5, commit, choice, trained, evaluation, deployed, run_dir, clock.seconds)
        log_summary(run, summary, run_dir)
    return summary
