"""The field's zoo through `graft run` (real Prefect, MLflow on SQLite, onnxruntime), weights in the usual caches.

ResNet-50's file is generated at the exact place torch.hub keeps it ($TORCH_HOME/hub/checkpoints/
resnet50-0676ba61.pth) and timm's ConvNeXt-Atto's is downloaded from a loopback Hub into $HF_HOME;
both hold random weights (no real ones can be fetched here), so the scores are not compared. Then the
network is gone and HF_HUB_OFFLINE is set: everything must come from the caches.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from components.backbones.spec import IMAGENET_MEAN, IMAGENET_STD, settle_batchnorm
from components.backbones.zoo import get_spec
from flows.cli import main
from mlflow import MlflowClient
from tests.backbones.conftest import safetensors_file, sha
from tests.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow

TIMM_NAME = "timm/convnext_atto.d2_in1k"
COMMIT = "5a0f2c7e9b1d3f4a6c8e0b2d4f6a8c0e2b4d6f8a"


@pytest.fixture
def filled_caches(caches, weights_server, monkeypatch):
    """ResNet-50 in $TORCH_HOME as torch.hub would leave it, ConvNeXt-Atto fetched into $HF_HOME; then offline."""
    torch.manual_seed(0)
    resnet_path = get_spec("resnet50").weights_path()
    assert resnet_path == caches["torch"] / "resnet50-0676ba61.pth"
    resnet_path.parent.mkdir(parents=True)
    resnet = torchvision.models.resnet50()
    # BatchNorm statistics as a trained network has them, not placeholders (see settle_batchnorm)
    settle_batchnorm(resnet, 32, IMAGENET_MEAN, IMAGENET_STD, seed=0)
    torch.save(resnet.state_dict(), resnet_path)

    content = safetensors_file(timm.create_model("convnext_atto.d2_in1k", pretrained=False).state_dict())
    weights_server.add_hub_file(TIMM_NAME, "model.safetensors", content, COMMIT)
    assert get_spec(TIMM_NAME).ensure_weights("auto") is None
    weights_server.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"resnet50": resnet_path, "timm_sha256": sha(content)}


@pytest.fixture
def graft_run(tmp_path, digits_dir, feature_cache_dir, prefect_harness, monkeypatch, capsys):
    """`graft run` through flows.cli.main on tiny digits, returning its exit code, summary and printed text."""
    monkeypatch.chdir(tmp_path)
    overrides = tiny_overrides(digits_dir, tmp_path, feature_cache_dir) + [
        "choose.latency_runs=3", "deploy.variants=[]", "deploy.parity_images=8", "evaluate.min_accuracy=null",
    ]

    def run(*extra: str) -> tuple[int, dict, str]:
        summary = tmp_path / "summary.json"
        args = ["run", "--params", str(REPO / "params.yaml"), "--summary", str(summary)]
        for item in [*overrides, *extra]:
            args += ["--set", item]
        code = main(args)
        return code, json.loads(summary.read_text()) if summary.exists() else {}, capsys.readouterr().out

    run.store = tmp_path / "mlflow" / "mlflow.db"
    return run


def _version_tags(graft_run, summary) -> dict[str, str]:
    """The version's tags, with the weights' provenance registration keeps beside them in `registration.json`."""
    import mlflow

    uri = f"sqlite:///{graft_run.store}"
    client = MlflowClient(uri, uri)
    version = summary["registered"]["version"]
    folder = client.get_model_version_download_uri("graft-test", version).rstrip("/")
    mlflow.set_tracking_uri(uri)
    downloads = graft_run.store.parent / f"registration-v{version}"
    details = json.loads(Path(mlflow.artifacts.download_artifacts(f"{folder}/registration.json", dst_path=str(downloads))).read_text())
    return {**client.get_model_version("graft-test", version).tags, **details["model"]}


def test_graft_run_ranks_resnet50_a_timm_backbone_and_lite0_from_their_caches(filled_caches, graft_run):
    code, summary, printed = graft_run(f"choose.candidates=[resnet50, {TIMM_NAME}, efficientnet_lite0]", "choose.baseline=false")
    assert code == 0, printed[-3000:]
    rows = {row["name"]: row for row in summary["candidates"]}
    assert set(rows) == {"resnet50", TIMM_NAME, "efficientnet_lite0"}
    for name, row in rows.items():
        assert row["status"] == "ok" and row["logme"] is not None and row["latency_ms"] > 0, (name, row["status"])
        assert row["image_size"] == 64
    assert "scored at 64px: " in printed and all(name in printed.split("scored at 64px: ")[1].splitlines()[0] for name in rows)
    tags = _version_tags(graft_run, summary)
    chosen = get_spec(summary["chosen"])
    assert tags["weights.source"] == chosen.weights_source and len(tags["weights.sha256"]) == 64


def test_the_seeds_recipe_resnet50_features_then_its_last_block_with_batchnorm_frozen(filled_caches, graft_run):
    code, summary, printed = graft_run(
        "choose.candidates=[resnet50]", "choose.baseline=false", "data.image_size=32",
        "train.strategy=two_stage", "train.unfreeze=1", "train.freeze_bn=true", "train.epochs=2", "train.batch_size=16",
        "train.lr=0.0001", "train.augment=true",  # random weights: a gentle head on random crops underfits, so stage 2 (the last block) improves on it
    )
    assert code == 0, printed[-3000:]
    assert summary["chosen"] == "resnet50" and summary["strategy"] == "two_stage"
    assert summary["onnx"]["top1_agreement"] == 1.0 and summary["onnx"]["graph"] == "traced"  # deploy.exporter's default
    start = torch.load(filled_caches["resnet50"], weights_only=True)
    trained = torch.load(summary["files"]["checkpoint"], weights_only=True)["backbone_state"]
    changed = {key for key, tensor in trained.items() if not torch.equal(tensor, start[key])}
    assert changed and all(key.startswith("layer4.") for key in changed)  # only the last block trained
    assert not any(key.endswith(("running_mean", "running_var")) for key in changed)  # BatchNorm frozen
    tags = _version_tags(graft_run, summary)
    assert tags["weights.url"] == "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    assert tags["weights.revision"] == "ResNet50_Weights.IMAGENET1K_V1"
    assert tags["weights.sha256"] == sha(filled_caches["resnet50"].read_bytes())
    card = Path(summary["files"]["model_card"]).read_text()
    assert f"**Weights sha256:** `{tags['weights.sha256']}`" in card


def test_a_timm_backbone_is_ranked_fine_tuned_exported_and_served(filled_caches, graft_run, digits_dir, tmp_path, capsys):
    code, summary, printed = graft_run(
        f"choose.candidates=[{TIMM_NAME}]", "data.image_size=32",
        "train.strategy=fine_tune", "train.unfreeze=1", "train.epochs=2", "train.batch_size=16",
    )
    assert code == 0, printed[-3000:]
    rows = {row["name"]: row for row in summary["candidates"]}
    assert set(rows) == {TIMM_NAME, f"random_{TIMM_NAME}"} and summary["chosen"] == TIMM_NAME
    assert summary["onnx"]["max_abs_diff"] <= 1e-4 and summary["onnx"]["top1_agreement"] == 1.0 and summary["onnx"]["graph"] == "traced"
    tags = _version_tags(graft_run, summary)
    assert tags["backbone"] == TIMM_NAME and tags["weights.revision"] == COMMIT
    assert tags["weights.sha256"] == filled_caches["timm_sha256"]
    card = Path(summary["files"]["model_card"]).read_text()
    assert "Hugging Face Hub timm/convnext_atto.d2_in1k" in card and "**Licence:** apache-2.0" in card

    images = sorted((digits_dir / "7").iterdir())[:2]
    params_file = tmp_path / "serve-params.yaml"
    params_file.write_text(f"tracking:\n  store_dir: {graft_run.store.parent}\n")
    assert main(["predict", "--params", str(params_file), "--model", "models:/graft-test@champion", *map(str, images)]) == 0
    predictions = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(predictions) == 2 and all(p["label"] in {"0", "1", "7"} and 0 < p["score"] <= 1 for p in predictions)
