"""The training flow: choose -> fine-tune -> evaluate -> deploy, each a Prefect task.

Tasks take and return small frozen results (paths, names, metrics); all the
work happens in the component each one calls.
"""

from __future__ import annotations

from pathlib import Path

import time

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from components.choose import CandidateScore, ChooseResult, measure_candidates, plan_candidates, rank, score_candidate
from components.config import Params
from components.data import Split, scan
from components.deploy import DeployResult, deploy
from components.evaluate import EvalResult, evaluate
from components.reporting import log_choice, log_evaluation, log_run_start, log_summary
from components.summary import Stopwatch, build_summary, summary_markdown
from components.tracking import Run, git_commit, parent_run
from components.train import TrainResult, fine_tune
from components.train_logging import log_trained_model
from components.versioning import data_version
from flows.caching import CACHE_EXPIRATION, CANDIDATE_CACHE
from flows.resilience import service_retries


@task(name="scan-data", cache_policy=NO_CACHE, **service_retries())  # retried only when the DVC remote fails
def scan_task(params: Params) -> tuple[Split, str]:
    md5 = data_version(params.data.dir)
    return scan(params.data.dir, params.data.val_fraction, params.data.seed), md5


@task(name="plan-candidates", cache_policy=NO_CACHE)
def plan_task(params: Params, split: Split) -> tuple[str, ...]:
    return plan_candidates(params, split)


# cached on the images, the choose params, the weights and the code (flows/caching.py); results kept in PREFECT_HOME
@task(name="score-candidate", cache_policy=CANDIDATE_CACHE, cache_expiration=CACHE_EXPIRATION, persist_result=True, task_run_name="score-{name}")
def score_candidate_task(params: Params, split: Split, name: str) -> CandidateScore:
    return score_candidate(params, split, name)


@task(name="measure-candidates", cache_policy=NO_CACHE)
def measure_task(params: Params, rows: list[CandidateScore]) -> list[CandidateScore]:
    return measure_candidates(params, rows)


@task(name="rank", cache_policy=NO_CACHE)
def rank_task(params: Params, rows: list[CandidateScore], seconds: float) -> ChooseResult:
    return rank(params, rows, seconds)


def choose_subflow(params: Params, split: Split) -> ChooseResult:
    """Plan, score each candidate as its own (mapped) task, time them one at a time, rank."""
    started = time.perf_counter()
    names = plan_task(params, split)
    rows = score_candidate_task.map(unmapped(params), unmapped(split), names).result()
    rows = measure_task(params, rows)
    return rank_task(params, rows, time.perf_counter() - started)


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
            choice = choose_subflow(params, split)
        log_choice(run, choice, run_dir)
        with clock("fine_tune"):
            trained = fine_tune_task(params, split, choice, run, run_dir)
        log_trained_model(run, trained)
        with clock("evaluate"):
            evaluation = evaluate_task(params, split, trained, run_dir)
        log_evaluation(run, evaluation, params.deploy.output_dir)
        with clock("deploy"):
            deployed = deploy_task(params, split, trained, evaluation, run, run_dir, md5, commit)
        summary = build_summary(run.run_id, params.data.dir, md5, commit, choice, trained, evaluation, deployed, run_dir, clock.seconds)
        log_summary(run, summary, run_dir)
    create_markdown_artifact(key="graft-run-summary", markdown=summary_markdown(summary), description=f"{summary['registered']['name']} v{summary['registered']['version']}")
    return summary
