"""The training flow: choose -> fine-tune -> evaluate -> deploy, each a Prefect task.

Tasks take and return small frozen results (paths, names, metrics); all the
work happens in the component each one calls.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from components.choose.candidates import CandidateScore, check_candidates, score_candidate
from components.choose.finalists import train_finalist
from components.choose.ranking import ChooseResult
from components.choose.report import log_choice
from components.choose.stage import choose_model
from components.core.config import Params
from components.core.lineage import git_commit
from components.data.folders import scan
from components.data.split import Split, SplitSettings
from components.data.versions import data_version
from components.deploy.stage import DeployContext, DeployResult, check_settings, deploy
from components.evaluate.report import log_evaluation
from components.evaluate.stage import EvalResult, evaluate
from components.registry.tracking import Run, parent_run
from components.report.dvc_outputs import write_dvc_outputs
from components.report.log_file import capture_run_log
from components.report.run_log import log_run_start, log_summary
from components.report.summary import RunSummary, Stopwatch
from components.train.report import log_trained_model
from components.train.stage import TrainResult, check_unfreeze, fine_tune, forget_checkpoints
from components.train.strategies import fit_finalist_head
from flows.caching import CACHE_EXPIRATION, CANDIDATE_CACHE, FINALIST_CACHE, score_again_next_time
from flows.resilience import service_retries


@task(name="scan-data", cache_policy=NO_CACHE, **service_retries())  # retried only when the DVC remote fails
def scan_task(params: Params) -> tuple[Split, str]:
    md5 = data_version(params.data.dir)
    return scan(params.data.dir, SplitSettings.from_config(params.data)), md5


# cached on the images, the choose params, the weights and the code (flows/caching.py); results kept in PREFECT_HOME
@task(name="score-candidate", cache_policy=CANDIDATE_CACHE, cache_expiration=CACHE_EXPIRATION, persist_result=True, task_run_name="score-{name}")
def score_candidate_task(params: Params, split: Split, name: str) -> CandidateScore:
    row = score_candidate(params, split, name)
    if row.status.startswith("skipped:"):  # a failure is kept for this run only: the next one scores it again
        score_again_next_time(params, name)
    return row


# cached like the scores, with the `train` settings too: the head is trained with the fine-tune stage's recipe
@task(name="train-finalist", cache_policy=FINALIST_CACHE, cache_expiration=CACHE_EXPIRATION, persist_result=True, task_run_name="finalist-{row.name}")
def train_finalist_task(params: Params, split: Split, row: CandidateScore) -> CandidateScore:
    return train_finalist(params, split, row, partial(fit_finalist_head, params))


def choose_stage(params: Params, split: Split) -> ChooseResult:
    """The choose stage, each candidate scored as its own (mapped, cached) task on the flow's task runner;
    the finalists' heads are trained one after another (cached tasks) with the fine-tune stage's recipe."""

    def score_all(names: tuple[str, ...]) -> list[CandidateScore]:
        return score_candidate_task.map(unmapped(params), unmapped(split), names).result()

    return choose_model(params, split, score_all, train_one=lambda row: train_finalist_task(params, split, row))


@task(name="fine-tune", cache_policy=NO_CACHE)
def fine_tune_task(params: Params, split: Split, choice: ChooseResult, run: Run, run_dir: Path) -> TrainResult:
    with run.epoch_metrics() as on_epoch:
        return fine_tune(params, split, choice, run_dir, on_epoch=on_epoch)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(params: Params, split: Split, trained: TrainResult, run_dir: Path) -> EvalResult:
    return evaluate(params, split, trained, run_dir)


@task(name="deploy", cache_policy=NO_CACHE)
def deploy_task(ctx: DeployContext, trained: TrainResult, evaluation: EvalResult) -> DeployResult:
    return deploy(ctx, trained, evaluation)


@flow(name="graft-train")
def train_flow(params: Params, report_dir: Path | None = None, hold: str | None = None) -> RunSummary:
    """Run the four stages on `params.data.dir` and return the run summary; with `report_dir`, also write
    the DVC train stage's outputs there (metrics, plots, the ONNX model); with `hold`, register the model
    as challenger only, whatever the gate says (`hold` says why)."""
    check_settings(params)  # deploy settings this machine cannot carry out: refused before any training
    check_candidates(params)  # and backbone names that are not there: before the MLflow run and the run folder
    check_unfreeze(params)  # and a train.unfreeze some candidate cannot meet: before the choose stage
    clock = Stopwatch()
    with capture_run_log() as run_log:
        with clock("data"):
            split, md5 = scan_task(params)
        commit = git_commit()
        with parent_run(params, tags={"data_md5": md5, "git_commit": commit}) as run:
            run_dir = params.deploy.output_dir / "runs" / run.run_id
            with run_log.kept(run, run_dir):
                log_run_start(run, params, split, md5, commit)
                with clock("choose"):
                    choice = choose_stage(params, split)
                log_choice(run, choice, run_dir)
                with clock("fine_tune"):
                    trained = fine_tune_task(params, split, choice, run, run_dir)
                if params.tracking.log_pytorch_model:
                    log_trained_model(run, trained, params.data.cache_dir / "pt2", params.tracking.pt2_templates)
                with clock("evaluate"):
                    evaluation = evaluate_task(params, split, trained, run_dir)
                log_evaluation(run, evaluation)
                with clock("deploy"):
                    deployed = deploy_task(DeployContext(params, split, run, run_dir, md5, commit, hold), trained, evaluation)
                forget_checkpoints(params, trained)  # registered: nothing left to resume
                summary = RunSummary(run.run_id, params.data.dir, md5, commit, choice, trained, evaluation, deployed, run_dir, clock.seconds, split)
                log_summary(run, summary)
                if report_dir is not None:
                    write_dvc_outputs(summary, report_dir)
    create_markdown_artifact(key="graft-run-summary", markdown=summary.markdown(), description=summary.model_label)
    return summary
