"""Promises about the repository's shape that users and tools rely on."""

import subprocess
import sys
from pathlib import Path

import yaml

from components.data.versions import data_version, dir_md5, recorded_md5

REPO = Path(__file__).resolve().parent.parent


def test_mlflow_folder_does_not_shadow_the_package():
    assert (REPO / "mlflow").is_dir()
    assert not (REPO / "mlflow" / "__init__.py").exists()


def test_required_top_level_entries_exist():
    for name in ("flows", "components", "data.dvc", "dvc.yaml", "mlflow", "tests", "Dockerfile", "pyproject.toml",
                 "README.md", "Makefile", "params.yaml", "requirements.lock"):
        assert (REPO / name).exists(), name


def test_lock_file_meets_the_security_floors():
    pins = dict(line.split("==", 1) for line in (REPO / "requirements.lock").read_text().splitlines() if "==" in line)
    def version(name):
        return tuple(int(p) for p in pins[name].split("+")[0].split(".")[:2])
    assert version("torch") >= (2, 10)
    assert version("onnx") >= (1, 21)
    assert version("mlflow") >= (3, 9)
    assert version("fastapi") < (0, 155)
    assert pins["prefect"].startswith("3.8.")


def test_demo_data_is_exactly_what_data_dvc_names():
    """`make run` pulls the demo data from the DVC remote in the repo; afterwards `dvc status` is clean."""
    expected = recorded_md5(REPO / "data.dvc")
    assert data_version(REPO / "data") == expected
    assert dir_md5(REPO / "data") == expected
    status = subprocess.run([str(Path(sys.executable).parent / "dvc"), "status", "data.dvc"], cwd=REPO, capture_output=True, text=True)
    assert status.returncode == 0 and "changed" not in status.stdout, status.stdout
    assert len(list((REPO / "data").rglob("*.png"))) == 1797


def test_dvc_stages_list_the_params_they_read():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages, "dvc.yaml declares no stage"
    for stage in stages.values():
        assert stage.get("params"), stage
