"""What a promoter meets in the MLflow UI after `graft run`: a model page and version pages read at a glance, MLflow's
own fields filled (source, commit, dataset, LoggedModel, run names and descriptions), everything else one click away."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.core.lineage import DECISION_METRICS
from flows.cli import main
from tests.conftest import REPO, tiny_overrides

DECISION_TAGS = {"gate.verdict", "gate.reasons", "data_md5", "backbone", "git_commit", "parity.max_abs_diff", "parity.top1_agreement",
                 "variants", *(f"{split}.{metric}" for split in ("test", "val") for metric in DECISION_METRICS)}
"""About a dozen tags a promoter reads; the rest of a version's tags are the digests consumers check and what Graft reads back."""


@pytest.mark.slow
def test_after_graft_run_mlflow_shows_a_readable_model_page_version_run_and_logged_model(
    tmp_path, digits_dir, feature_cache_dir, prefect_harness, monkeypatch
):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    overrides = [*tiny_overrides(digits_dir, tmp_path, feature_cache_dir), "deploy.variants=[fp16, int8]", "tracking.log_pytorch_model=true"]
    args = ["run", "--params", str(REPO / "params.yaml"), "--summary", str(tmp_path / "summary.json")]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    name, number = "graft-test", summary["registered"]["version"]

    # the version: a dozen decision tags, the digests consumers check, nothing else on the page
    version = client.get_model_version(name, number)
    tags = version.tags
    assert DECISION_TAGS <= set(tags)
    machine = {key for key in tags if key.startswith("sha256.")} | {"params_sha", "split.manifest_sha256"}
    history = {key for key in tags if key.startswith("graft.moved.")}
    assert set(tags) == DECISION_TAGS | machine | history, sorted(set(tags) - DECISION_TAGS - machine - history)
    assert len(tags) <= 20 and len(history) == 1 and all(len(value) <= 600 for key, value in tags.items() if key != "gate.reasons")
    assert tags["variants"].endswith(" vs fp32") and "int8" in tags["variants"]
    # the verdict first (the versions table shows the description's start), then what it classifies
    assert version.description.startswith("Gate: PROMOTE: ")
    assert "\n\nClassifies RGB images into 3 classes (`0`, `1`, `7`)" in version.description and summary["data_md5"] in version.description
    assert f"(#/experiments/1/runs/{summary['run_id']}/artifacts/model_card/model_card.html)" in version.description
    # what the run did not take from the project's params.yaml is on the page the verdict is read from
    assert "- **Not as in params.yaml**: " in version.description and "`data.image_size` 64 (params.yaml: 112)" in version.description
    assert "`choose.sample_size` 30 (params.yaml: " in version.description and "`data.dir`" not in version.description

    # the model as an MLflow 3 LoggedModel of the run, the version made from it; everything else in registration.json
    model_id = version.source.removeprefix("models:/")
    model = client.get_logged_model(model_id)
    assert model.source_run_id == summary["run_id"] and json.loads(model.tags["mlflow.modelVersions"]) == [{"name": name, "version": number}]
    run = client.get_run(summary["run_id"])
    assert [output.model_id for output in run.outputs.model_outputs] == [model_id]
    logged_pytorch = {item.path for item in client.list_artifacts(summary["run_id"], "pytorch_model")}
    assert {"pytorch_model/MLmodel", "pytorch_model/data"} <= logged_pytorch  # tracking.log_pytorch_model: true
    mlflow.set_tracking_uri(uri)
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path / "model")))
    details = json.loads((folder / "registration.json").read_text())
    assert details["logged_model_id"] == model_id and details["run_id"] == summary["run_id"]
    assert {"onnxruntime", "torch", "mlflow", "python"} <= set(details["runtime"]) and details["onnx"]["opset"] == 18
    assert {row["name"] for row in details["variants"]["table"]} == {"fp16", "int8"}
    assert details["data"]["classes"] == ["0", "1", "7"] and details["model"]["weights.source"]
    # both models' pip requirements hold in this environment: the check MLflow would make before saving them, which
    # Graft skips (`requirements_pinned_here`), would find nothing
    from mlflow.utils.requirements_utils import _check_requirement_satisfied

    pytorch_folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{summary['run_id']}/pytorch_model", dst_path=str(tmp_path / "pt")))
    for requirements in (folder / "requirements.txt", pytorch_folder / "requirements.txt"):
        lines = [line for line in requirements.read_text().splitlines() if line.strip()]
        assert any(line.startswith("mlflow==") for line in lines) and len(lines) >= 3, lines
        assert [line for line in lines if _check_requirement_satisfied(line) is not None] == [], requirements

    # the run: a readable name, a description with the verdict, its source, commit and dataset
    assert run.info.run_name == f"promoted v{number} · {name} · efficientnet_lite0 · feature_extraction"  # what the run did: stays true
    assert run.data.tags["mlflow.note.content"].startswith("**Promoted to champion.**")
    assert "(champion when registered; the model's Aliases column shows where they are now)" in run.data.tags["mlflow.note.content"]
    assert run.data.tags["mlflow.source.name"] == "graft run" and run.data.tags["mlflow.source.git.commit"]
    (dataset,) = run.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == ("images", summary["data_md5"])
    assert json.loads(dataset.dataset.profile)["images"] == 60
    children = client.search_runs(["1"], f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    assert sorted(child.info.run_name for child in children) == ["efficientnet_lite0 (chosen)", "random_efficientnet_lite0"]

    # the model page: what it classifies, the champion and why; no history or bookkeeping tags
    registered = client.get_registered_model(name)
    assert not [key for key in registered.tags if key.startswith("graft.")]
    assert registered.description.startswith("Classifies RGB images into 3 classes")
    assert f"**Champion: v{number}** (efficientnet_lite0" in registered.description and "**No challenger**" in registered.description
    assert registered.description.endswith("the Aliases column is always current.")  # a move in the UI may be newer
    assert client.get_experiment("1").tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow's UI: training runs


def test_the_model_description_names_the_champion_the_challenger_and_why():
    from types import SimpleNamespace

    from components.registry.history import describe_model

    champion = SimpleNamespace(version="3", description="Gate: PROMOTE: ...\n\nClassifies RGB images into 10 classes.",
                               tags={"backbone": "efficientnet_lite1", "test.accuracy": "0.9167", "test.macro_f1": "0.9100",
                                     "gate.reasons": "PROMOTE: accuracy 0.9167 beats champion v2's 0.9000",
                                     "graft.moved.0001795835805145047502": json.dumps({
                                         "alias": "champion", "version": "3", "previous": "2", "action": "promote", "who": "alice@host",
                                         "when": "2026-11-28T03:15:00+00:00", "why": "better"})})
    challenger = SimpleNamespace(version="4", description="", tags={"backbone": "efficientnet_lite0", "test.accuracy": "0.9000",
                                                                     "gate.verdict": "keep champion"})
    text = describe_model("graft-digits", champion, challenger)
    assert text.startswith("Classifies RGB images into 10 classes.\n\n**Champion: v3** (efficientnet_lite1, test accuracy 0.9167")
    assert "made champion by `graft promote` by alice@host on 2026-11-28 03:15 UTC" in text and "beats champion v2's 0.9000" in text
    assert "**Challenger: v4** (efficientnet_lite0, test accuracy 0.9000)" in text and "Gate: keep champion" in text
    assert 'OnnxClassifier.load("models:/graft-digits@champion")' in text and "graft history --name graft-digits" in text
    assert "**No champion yet**" in describe_model("m", None, challenger)
    held = SimpleNamespace(version="5", description="", tags={"graft.hold": "--no-promote: challenger only, champion not moved by this run",
                                                             "gate.verdict": "promote"})
    assert "the newest version, not champion. **Held**: --no-promote: challenger only" in describe_model("m", champion, held)
    removed = describe_model("m", None, challenger, last=champion)
    assert "**No champion**: no version holds the `champion` alias" in removed
    assert "The last champion the history records that still exists is v3 (efficientnet_lite1, test accuracy 0.9167)" in removed
    assert removed.startswith("Classifies RGB images into 10 classes.")  # from the last champion, with no other version
    assert "Classifies RGB images into 10 classes." in describe_model("m", None, None, last=champion)
    # a long verdict ends after its last whole reason that fits, and says where the rest is: no number cut in two
    reasons = "; ".join(f"reason {i}: macro_f1 0.{i:04d} is below the floor 0.7000" for i in range(1, 30))
    long = SimpleNamespace(version="6", description="", tags={**challenger.tags, "gate.reasons": reasons})
    gate = describe_model("m", champion, long).split("**Challenger: v6**")[1].split("Gate: ", 1)[1].split("\n")[0]
    assert gate.endswith("0.7000; ... (all of it on v6)") and len(gate) < 440 and reasons.startswith(gate.split(" ...")[0])
