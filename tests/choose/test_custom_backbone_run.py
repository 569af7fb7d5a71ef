"""A backbone of the user's own (`choose.custom`) through `graft run` (real Prefect, MLflow on SQLite, onnxruntime):
chosen, fine-tuned whole (`train.unfreeze=all`, though its blocks cannot be told apart), registered with its model
card; its factory file, named relative to params.yaml, changed between two runs is built and scored again rather
than answered from any cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flows.cli import main
from tests.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow

NETS = """
from torch import nn

ACT = nn.ReLU


def net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), ACT(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
"""


def test_a_custom_backbone_is_chosen_fine_tuned_registered_and_scored_again_once_its_factory_changes(
    tmp_path, digits_dir, prefect_harness, monkeypatch, capsys
):
    project = tmp_path / "project"
    project.mkdir()
    (project / "nets.py").write_text(NETS)
    params = project / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)  # not the project: the factory's path is read from params.yaml's folder
    overrides = tiny_overrides(digits_dir, project, tmp_path / "cache") + [
        "choose.custom={my_net: {factory: 'nets.py:net', input_size: 64}}", "choose.candidates=[my_net]",
        "choose.baseline=false", "choose.latency_runs=3", "train.strategy=fine_tune", "train.unfreeze=all",
        "train.epochs=2", "train.batch_size=16", "evaluate.min_accuracy=null",
    ]

    def run() -> tuple[dict, str]:
        summary = tmp_path / "summary.json"
        summary.unlink(missing_ok=True)
        args = ["run", "--params", str(params), "--summary", str(summary)]
        for item in overrides:
            args += ["--set", item]
        code = main(args)
        printed = capsys.readouterr()
        assert code == 0, (printed.out + printed.err)[-3000:]
        return json.loads(summary.read_text()), printed.out + printed.err

    first, _ = run()
    assert first["chosen"] == "my_net" and first["registered"]["version"]
    card = Path(first["files"]["model_card"]).read_text()
    assert "**Backbone:** `my_net` (custom:" in card and "pre-trained, its own weights" in card

    (project / "nets.py").write_text(NETS.replace("ACT = nn.ReLU", "ACT = nn.Tanh"))
    second, _ = run()
    log = (Path(second["files"]["run_dir"]) / "run.log").read_text()  # the run's own log, whatever the terminal got
    assert re.search(r"my_net: \d+ images, 0 from cache, \d+ computed", log)  # the new code, not the old features
    assert second["candidates"][0]["logme"] != first["candidates"][0]["logme"]
