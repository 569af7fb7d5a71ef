"""The whole pipeline end to end: real Prefect, real MLflow on SQLite, real onnxruntime."""

import json
import re
from pathlib import Path

import onnx
import pytest

from components.core.config import load_params
from components.deploy.export import HEAD_NODES
from flows.cli import main
from mlflow import MlflowClient
from tests import services
from tests.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture
def run_cli(tmp_path, digits_dir, feature_cache_dir, prefect_harness, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = tiny_overrides(digits_dir, tmp_path, feature_cache_dir)

    def run(*extra: str, summary: str = "summary.json", extra_args: tuple[str, ...] = ()) -> tuple[int, dict | None]:
        args = ["run", "--params", str(REPO / "params.yaml"), "--summary", str(tmp_path / summary), *extra_args]
        for item in [*overrides, *extra]:
            args += ["--set", item]
        code = main(args)
        path = tmp_path / summary
        return code, json.loads(path.read_text()) if path.exists() else None

    run.params = load_params(REPO / "params.yaml", overrides)
    return run


def _client(params):
    uri = f"sqlite:///{params.tracking.store_dir / 'mlflow.db'}"
    return MlflowClient(uri, uri)


def test_flow_registers_a_champion_that_predict_serves(run_cli, digits_dir, capsys, tmp_path):
    code, summary = run_cli()
    assert code == 0
    for key in ("run_id", "data_md5", "chosen", "candidates", "strategy", "timings"):
        assert key in summary
    assert summary["val"]["accuracy"] > 0.6 and "macro_f1" in summary["val"]
    assert summary["test"]["accuracy"] > 0.6 and not summary["test_is_val"]
    assert sum(summary["split"]["counts"].values()) == 60 and summary["split"]["counts"]["test"] > 0
    assert summary["onnx"]["max_abs_diff"] <= 1e-4 and summary["onnx"]["top1_agreement"] == 1.0
    assert Path(summary["onnx"]["path"]).is_file()
    served = onnx.load(summary["onnx"]["path"])  # feature_extraction: the choose stage's backbone graph and the head, not re-exported
    gemm, div, softmax = HEAD_NODES  # the temperature is 1 (no evaluate.temperature_scaling): tidying drops its division
    assert tuple(node.name for node in served.graph.node[-2:]) == (gemm, softmax) and summary["onnx"]["graph"] == "composed"
    assert div not in {node.name for node in served.graph.node} and len(served.graph.node) < 150  # tidied: no Constant or Pad nodes
    assert summary["registered"]["aliases"] == ["champion"]
    assert set(summary["timings"]) == {"data", "choose", "fine_tune", "evaluate", "deploy"}
    assert {c["name"] for c in summary["candidates"]} == {"efficientnet_lite0", "random_efficientnet_lite0"}
    printed = capsys.readouterr().out
    assert "graft predict --model models:/graft-test@champion" in printed
    assert "trained           efficientnet_lite0, feature_extraction" in printed

    client = _client(run_cli.params)
    version = client.get_model_version_by_alias("graft-test", "champion")
    assert version.version == summary["registered"]["version"] or str(version.version) == str(summary["registered"]["version"])
    assert version.tags["data_md5"] == summary["data_md5"]
    for tag in ("git_commit", "backbone", "sha256.model.onnx", "val.accuracy", "test.accuracy", "split.manifest_sha256",
                "parity.max_abs_diff", "gate.reasons"):
        assert tag in version.tags
    assert client.list_artifacts(summary["run_id"], "pytorch_model") == []  # tracking.log_pytorch_model: false
    run = client.get_run(summary["run_id"])
    assert run.data.tags["data_md5"] == summary["data_md5"]
    assert {"val/accuracy", "test/accuracy"} <= set(run.data.metrics)
    # every epoch's metrics reach MLflow (sent in batches), each at its own step
    epochs = summary["train"]["epochs_run"]
    assert [m.step for m in client.get_metric_history(summary["run_id"], "val/loss")] == list(range(1, epochs + 1))
    # without --report, `graft run` writes its run folder and nothing DVC or git track
    assert sorted(p.name for p in run_cli.params.deploy.output_dir.iterdir()) == ["runs"]
    # the run's log, from its first line (before the MLflow run existed) to its upload, in the run folder and on the run
    log_file = run_cli.params.deploy.output_dir / "runs" / summary["run_id"] / "run.log"
    lines = log_file.read_text().splitlines()
    assert "components.data.folders: data " in lines[0] and "classes" in lines[0]
    # (its epoch lines are checked where training surely runs: the shared cache may hold a finished head's checkpoint)
    assert any(re.search(r"components\.train\.stage: fine-tune done: \d+ epochs", line) for line in lines)
    assert any("components.deploy" in line and "ONNX parity on" in line for line in lines)
    assert "run log: " in lines[-1] and summary["run_id"] in lines[-1]
    uploaded = Path(client.download_artifacts(summary["run_id"], "run.log", str(tmp_path / "download")))
    assert uploaded.read_text() == log_file.read_text()
    assert f"log               {log_file}" in printed

    images = sorted((digits_dir / "7").iterdir())[:3] + sorted((digits_dir / "0").iterdir())[:3]
    capsys.readouterr()
    params_file = tmp_path / "params.yaml"
    params_file.write_text(f"tracking:\n  store_dir: {run_cli.params.tracking.store_dir}\n")
    assert main(["predict", "--params", str(params_file), "--model", "models:/graft-test@champion", *map(str, images)]) != 2
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == ["7", "7", "7", "0", "0", "0"]

    # the "next:" line works as printed from the folder the run started in (outside the project, its own store)
    import shlex
    import subprocess

    hint = next(line.strip() for line in printed.splitlines() if " predict --model models:/graft-test@champion IMAGE..." in line)
    assert hint.startswith(f"MLFLOW_TRACKING_URI=sqlite:///{run_cli.params.tracking.store_dir / 'mlflow.db'} /")
    variable, *command = shlex.split(hint.replace("IMAGE...", str(images[0])))
    env = {**services.clean_env(), variable.split("=", 1)[0]: variable.split("=", 1)[1]}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and json.loads(done.stdout)["label"] == "7", done.stderr[-2000:]


def test_evaluate_scores_a_run_on_its_own_images_and_prepare_leaves_the_pipelines_split_alone(run_cli, digits_dir, capsys, tmp_path):
    """A run on one's own images: `graft evaluate --summary` alone scores the run's own test images (the split it wrote
    into its folder, the folder it trained on); `graft prepare --data` names the file to write rather than overwrite
    the DVC pipeline's split."""
    code, summary = run_cli()
    assert code == 0 and Path(summary["files"]["split"]).is_file()
    capsys.readouterr()
    assert main(["evaluate", "--summary", str(tmp_path / "summary.json"), "--out", str(tmp_path / "holdout")]) == 0
    scored = json.loads((tmp_path / "holdout" / "metrics.json").read_text())["test"]
    assert abs(scored["accuracy"] - summary["test"]["accuracy"]) < 1e-6

    assert main(["prepare", "--data", str(digits_dir)]) == 2
    assert "name the file: graft prepare --data " in capsys.readouterr().err and not (tmp_path / "outputs" / "split.json").exists()
    assert main(["prepare", "--data", str(digits_dir), "--set", "data.seed=3", "--split", str(tmp_path / "mine.json")]) == 0
    hint = capsys.readouterr().out
    assert f"graft run --set data.seed=3 --data {digits_dir.resolve()} --summary my-run.json" in hint


def test_report_writes_the_dvc_stage_outputs(run_cli, tmp_path):
    code, summary = run_cli("choose.candidates=[efficientnet_lite0]", "choose.baseline=false")
    assert code == 0
    report = tmp_path / "report"
    code, _ = run_cli("choose.candidates=[efficientnet_lite0]", "choose.baseline=false", extra_args=["--report", str(report), "--no-promote"])
    assert code == 0
    written = sorted(p.relative_to(report).as_posix() for p in report.rglob("*") if p.is_file())
    assert written == ["confusion_matrix.png", "metrics.json", "misclassified.png", "model/model.onnx", "model/model.onnx.sha256",
                       "plots/confusion.json", "plots/reliability.json", "reliability_diagram.png"]
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics) >= {"val", "test", "per_class"}


def test_same_data_and_seed_twice_does_not_replace_the_champion(run_cli, capfd, monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    code, first = run_cli(summary="first.json")
    assert code == 0 and "champion" in first["registered"]["aliases"]
    code, second = run_cli(summary="second.json")
    assert code == 0
    # the gate downloaded the champion to judge against it, without MLflow's progress bars in the run's output
    assert "Downloading artifacts" not in capfd.readouterr().err
    assert second["registered"]["aliases"] == ["challenger"]
    assert "not above" in second["gate"]["reasons"][0]
    champion = _client(run_cli.params).get_model_version_by_alias("graft-test", "champion")
    assert str(champion.version) == str(first["registered"]["version"])
    assert champion.tags["gate.verdict"] == "promote"


def test_a_dvc_experiment_registers_a_challenger_and_never_moves_the_champion(run_cli, monkeypatch, capsys):
    """`dvc exp run` sets DVC_EXP_NAME: the gate judges as always, but only a normal run or a person promotes."""
    weak = ("choose.candidates=[efficientnet_lite0]", "choose.baseline=false", "evaluate.min_accuracy=null")
    code, first = run_cli(*weak, "train.epochs=1", "train.lr=0.00001", summary="weak.json")
    assert code == 0 and "champion" in first["registered"]["aliases"]
    monkeypatch.setenv("DVC_EXP_NAME", "better-head")
    code, second = run_cli(*weak, summary="experiment.json")
    assert code == 0 and second["gate"]["promote"]  # truly better: the gate would promote it
    assert second["registered"]["aliases"] == ["challenger"]
    assert "DVC experiment (better-head)" in second["gate"]["held"] and "graft promote" in second["gate"]["held"]
    assert "held back" in capsys.readouterr().out
    client = _client(run_cli.params)
    assert str(client.get_model_version_by_alias("graft-test", "champion").version) == str(first["registered"]["version"])
    version = client.get_model_version("graft-test", second["registered"]["version"])
    assert version.tags["graft.hold"].startswith("a DVC experiment (better-head)")


def test_bad_input_registers_nothing(run_cli, tmp_path, capsys):
    code, summary = run_cli(f"data.dir={tmp_path / 'no-such-folder'}")
    assert code == 2 and summary is None
    assert "no-such-folder" in capsys.readouterr().err
    db = run_cli.params.tracking.store_dir / "mlflow.db"
    if db.exists():
        assert _client(run_cli.params).search_registered_models() == []


def test_a_failed_run_says_why_in_its_log_file_and_in_its_mlflow_description(run_cli, capsys):
    """A person opening the failed run in MLflow, or its run.log, reads the error the terminal showed."""
    code, summary = run_cli("choose.max_latency_ms=0.001", "choose.candidates=[efficientnet_lite0]")
    assert code == 2 and summary is None
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "choose.max_latency_ms=0.001" in error
    client = _client(run_cli.params)
    (run,) = client.search_runs([client.get_experiment_by_name("graft").experiment_id], "tags.`mlflow.parentRunId` IS NULL")
    assert run.info.status == "FAILED"
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("**Failed** during choose") and error.removeprefix("error: ") in note
    log_file = run_cli.params.deploy.output_dir / "runs" / run.info.run_id / "run.log"
    failed = [line for line in log_file.read_text().splitlines() if "the run failed: " in line]
    assert len(failed) == 1 and error.removeprefix("error: ") in failed[0]
    uploaded = Path(client.download_artifacts(run.info.run_id, "run.log", str(run_cli.params.deploy.output_dir / "download")))
    assert "the run failed: " in uploaded.read_text()  # the copy on the MLflow run says it too


def test_an_unknown_backbone_stops_the_run_before_it_starts_anything(run_cli, capsys):
    code, summary = run_cli("choose.candidates=[efficientnet_lite0, resnet_typo]")
    assert code == 2 and summary is None
    err = capsys.readouterr().err
    assert "unknown backbone 'resnet_typo' in choose.candidates" in err and "Traceback" not in err
    assert not (run_cli.params.deploy.output_dir / "runs").exists()  # no run folder
    client = _client(run_cli.params)
    experiment = client.get_experiment_by_name("graft")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []  # and no FAILED run in MLflow


def test_an_unfreeze_a_candidate_cannot_meet_stops_the_run_before_the_choose_stage(run_cli, capsys):
    code, summary = run_cli("choose.candidates=[efficientnet_lite0, efficientnet_lite2]", "train.strategy=fine_tune", "train.unfreeze=20")
    assert code == 2 and summary is None
    err = capsys.readouterr().err
    assert "train.unfreeze=20 but efficientnet_lite0 has 18 blocks (stem included); use a number up to 18" in err, err[-2000:]
    assert "efficientnet_lite2 has" not in err and "Traceback" not in err  # lite2 has 23: it is not named
    assert not (run_cli.params.deploy.output_dir / "runs").exists()  # no run folder: nothing scored or trained


def test_a_missing_data_folder_or_an_unknown_backbone_is_one_line_of_error(tmp_path):
    """What the terminal shows: Graft's one line, not Prefect's task and flow failure lines around it."""
    import subprocess
    import sys

    (tmp_path / "images.zip").write_bytes(b"PK")
    env = {**services.clean_env(), "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / ".prefect")}
    graft = [sys.executable, "-m", "flows.cli", "run", "--params", str(REPO / "params.yaml")]
    for extra, words in ((["--data", str(tmp_path / "nope")], f"error: data folder '{tmp_path / 'nope'}' does not exist: pass --data DIR"),
                         (["--data", str(tmp_path / "images.zip")], "is a file, not a folder"),
                         (["--set", "choose.candidates=[efficientnet_lite0, resnet_typo]"], "unknown backbone 'resnet_typo' in choose.candidates")):
        done = subprocess.run([*graft, *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and words in done.stderr, done.stderr[-3000:]
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert sum(words in line for line in lines) == 1 and not [line for line in lines if "ERROR" in line], lines


def test_int8_weight_bits_this_cpu_cannot_build_stops_the_run_before_it_trains(run_cli, tmp_path, capsys, monkeypatch):
    import components.deploy.int8 as int8
    from components.runtime.cpu import CpuFacts

    real = int8.cpu_facts()
    monkeypatch.setattr(int8, "cpu_facts", lambda: CpuFacts(real.model, real.cores, ("avx2", "fma")))
    code, summary = run_cli("deploy.variants=[int8]", "deploy.int8_weight_bits=8")
    assert code == 2 and summary is None
    err = capsys.readouterr().err
    assert "deploy.int8_weight_bits is 8" in err and "no VNNI" in err and "auto or 7" in err and "Traceback" not in err
    assert not (run_cli.params.deploy.output_dir / "runs").exists()  # no run folder: nothing trained, logged or registered


def test_a_bad_image_stops_graft_run_with_one_clear_line_and_no_traceback(tmp_path, digits_dir):
    """What a user sees in the terminal: the file and the fix, not a trace through Prefect's engine."""
    import os
    import shutil
    import subprocess
    import sys

    data = tmp_path / "images"
    shutil.copytree(digits_dir, data)
    (data / "7" / "notes.png").write_text("not an image")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "graft"), "run", "--data", str(data), "--set", f"tracking.store_dir={tmp_path / 'mlflow'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"error: {data / '7' / 'notes.png'}: not a readable image" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
