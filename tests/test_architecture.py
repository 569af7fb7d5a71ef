"""The house rules: stage packages layered one way, and the light commands light.

`lint-imports` checks the contracts in pyproject.toml ([tool.importlinter]) against the
code's own imports, function-level ones included. The commands a serving machine or a
DVC stage runs (`graft prepare`, `evaluate`, `predict`, `serve`) are run for real here
and must never import torch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import services
from tests.conftest import REPO
from tests.models import tiny_onnx

LINT = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("components/data/folders.py", "from components.train.stage import fine_tune", "stages import only earlier stages"),
        ("components/runtime/model.py", "import torch", "never import torch"),
        ("components/core/files.py", "from components.data.images import load_image", "stages import only earlier stages"),
        ("components/evaluate/metrics.py", "import prefect", "never import prefect"),
        ("components/serve/server.py", "from components.deploy.stage import deploy", "never import torch"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line, contract):
    """A copy of the code with one forbidden import added: `lint-imports` fails and names the contract."""
    for part in ("components", "flows"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # added by the test\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    broken = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    assert any(contract in row for row in broken), result.stdout[-3000:]


def _graft(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`graft ARGS` in a fresh interpreter that records every import (`-X importtime`)."""
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "flows.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env={**services.clean_env(), "PYTHONPATH": str(REPO)})


def _imported(stderr: str) -> set[str]:
    """Top-level packages named in `-X importtime` output."""
    return {line.split("|")[-1].strip().split(".")[0] for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.fixture(scope="module")
def light_project(tmp_path_factory, digits_dir):
    """A project folder with its own params.yaml, the tiny digits and a tiny real ONNX model with a run summary."""
    root = tmp_path_factory.mktemp("light")
    shutil.copytree(digits_dir, root / "images")
    (root / "params.yaml").write_text(yaml.safe_dump({"data": {"dir": "images"}, "tracking": {"store_dir": "mlflow"}}))
    model = tiny_onnx(root / "model" / "model.onnx", ("0", "1", "7"))
    (root / "summary.json").write_text(json.dumps({"onnx": {"path": str(model)}, "val": {}, "test": {}}))
    return root, model


def test_prepare_evaluate_predict_and_serve_never_import_torch(light_project):
    root, model = light_project
    image = next((root / "images" / "7").iterdir())
    runs = {
        "prepare": _graft("prepare", "--split", "split.json", cwd=root),
        "evaluate": _graft("evaluate", "--summary", "summary.json", "--split", "split.json", "--out", "holdout", cwd=root),
        "predict": _graft("predict", "--model", str(model), str(image), cwd=root),
    }
    for command, result in runs.items():
        assert result.returncode == 0, f"graft {command}: {result.stderr[-3000:]}"
        assert not {"torch", "torchvision", "prefect"} & _imported(result.stderr), command
    # evaluate scored every test image of the split: its accuracy is what its confusion rows say
    rows = json.loads((root / "holdout" / "confusion.json").read_text())
    assert len(rows) == len(json.loads((root / "split.json").read_text())["test"]) > 0
    accuracy = json.loads((root / "holdout" / "metrics.json").read_text())["test"]["accuracy"]
    assert accuracy == pytest.approx(sum(row["actual"] == row["predicted"] for row in rows) / len(rows))
    assert json.loads(runs["predict"].stdout)["label"] in ("0", "1", "7")

    port = services.free_port()
    with open(root / "serve.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "flows.cli", "serve", "--model", str(model), "--port", str(port)],
                                   cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**services.clean_env(), "PYTHONPATH": str(REPO)})
        try:
            services.wait_http(f"http://127.0.0.1:{port}/health", process, 120)
        finally:
            services.stop(process)
    served = (root / "serve.log").read_text()
    assert "import time:" in served and not {"torch", "torchvision", "prefect"} & _imported(served)


def test_each_dvc_stage_lists_the_code_it_runs():
    """`dvc repro` reruns a stage when its code changes only if dvc.yaml lists that code: every Graft module
    the light stages import lies under one of their deps."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    entry = {"prepare": "components.data.stage", "evaluate": "components.evaluate.holdout"}
    for stage, module in entry.items():
        listing = subprocess.run(
            [sys.executable, "-c", f"import sys, {module}, flows.cli; print('\\n'.join(sorted(sys.modules)))"],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout.split()
        files = set()
        for name in listing:
            if name.split(".")[0] in ("components", "flows"):
                path = Path(*name.split("."))
                files.add(path / "__init__.py" if (REPO / path).is_dir() else path.with_suffix(".py"))
        deps = [Path(dep) for dep in stages[stage]["deps"]]
        uncovered = sorted(str(f) for f in files if not any(f == dep or dep in f.parents for dep in deps))
        assert uncovered == [], f"dvc.yaml stage {stage} imports {uncovered} without listing them in deps"
