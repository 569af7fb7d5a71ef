"""The serving image, checked without a Docker engine: it runs `graft serve` with a health check on the Open Inference
Protocol's readiness, and its CUDA is the locked wheels' CUDA, which onnxruntime-gpu's CUDA provider loads completely.

`docker build` cannot run here (no engine); hadolint lints the file (`tests/flows/test_orchestration.py`).
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import requires, version
from pathlib import Path

import pytest

from tests.conftest import REPO

SITE_PACKAGES = "/opt/venv/lib/python3.11/site-packages"


def _stage(name: str) -> list[str]:
    """The Dockerfile's lines of stage `name`, continuation lines joined."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines, current = [], None
    for line in text.splitlines():
        if line.startswith("FROM "):
            current = line.split()[-1]
        elif current == name and line.strip() and not line.lstrip().startswith("#"):
            lines.append(line.strip())
    return lines


def _env(lines: list[str], key: str) -> str:
    found = next(line for line in lines if line.startswith("ENV ") and f"{key}=" in line)
    return re.search(rf"{key}=(\S+)", found)[1]


def test_the_serving_image_runs_graft_serve_and_checks_readiness_on_the_open_inference_protocol(tmp_path):
    from components.serve.server import LiveModel, ServeSettings, create_app
    from tests.models import tiny_onnx

    lines = _stage("serve")
    assert any(line.startswith('ENTRYPOINT ["graft", "serve"]') for line in lines)
    healthcheck = next(line for line in lines if line.startswith("HEALTHCHECK"))
    assert "http://127.0.0.1:8000/v2/health/ready" in healthcheck
    cmd = next(line for line in lines if line.startswith("CMD"))
    assert '"--host", "0.0.0.0"' in cmd and '"--port", "8000"' in cmd
    routes = {route.path for route in create_app(LiveModel(str(tiny_onnx(tmp_path / "model.onnx"))), ServeSettings()).routes}
    assert "/v2/health/ready" in routes


def test_both_images_carry_the_cuda_of_the_locked_torch_wheel():
    """torch 2.14.1's wheel names its CUDA through pip dependencies; the images install those very wheels."""
    lock = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().splitlines() if "==" in line and not line.startswith("#"))
    cuda_toolkit = next(r for r in requires("torch") if r.startswith("cuda-toolkit"))
    assert f"=={lock['cuda-toolkit'].rsplit('.', 1)[0]}" in cuda_toolkit  # torch pins the toolkit the lock holds (13.0.x)
    runtime = version("nvidia-cuda-runtime")
    assert runtime.split(".")[:2] == lock["cuda-toolkit"].split(".")[:2] == ["13", "0"]
    install = " ".join(line for line in _stage("serve") if line.startswith("RUN"))
    for wheel in ("onnxruntime-gpu", "nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cufft", "nvidia-curand", "nvidia-cudnn-cu13"):
        assert wheel in install and wheel in lock, wheel  # installed with `-c requirements.lock`: the lock's version
    assert "-c requirements.lock" in install
    assert any("pip install -r requirements.lock" in line for line in _stage("train"))
    for stage in ("train", "serve"):
        assert not any("nvidia/cuda" in line for line in _stage(stage))  # no second CUDA from a base image


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ldd")
def test_onnxruntime_gpus_cuda_provider_finds_every_library_in_the_folders_the_images_name():
    import onnxruntime

    lines = _stage("serve")
    folders = _env(lines, "LD_LIBRARY_PATH").split(":")
    assert folders == _env(_stage("train"), "LD_LIBRARY_PATH").split(":")
    here = str(Path(onnxruntime.__file__).parents[1])
    local = ":".join(folder.replace(SITE_PACKAGES, here) for folder in folders)
    provider = Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    linked = subprocess.run(["ldd", str(provider)], capture_output=True, text=True, env={"LD_LIBRARY_PATH": local}, timeout=60).stdout
    missing = sorted(re.findall(r"(\S+) => not found", linked))
    assert missing == ["libcuda.so.1"], linked  # the driver's library, which the NVIDIA container toolkit mounts
    for library in ("libcublasLt.so.13", "libcudart.so.13", "libcurand.so.10"):
        assert re.search(rf"{re.escape(library)} => {re.escape(here)}/nvidia/", linked), library
    cudnn = Path(here) / "nvidia" / "cudnn" / "lib" / "libcudnn.so.9"
    assert cudnn.is_file() and str(cudnn.parent).replace(here, SITE_PACKAGES) in folders  # onnxruntime opens cuDNN 9 at run time


def test_the_training_image_trains_on_the_mounted_folder_as_it_is_and_records_the_commit_it_was_built_from(tmp_path, monkeypatch):
    """The image has no git history and no DVC remote: a data.dvc baked into it would refuse every folder but the
    demo's (and could never pull); the commit comes from the build (`--build-arg GRAFT_GIT_COMMIT=...`)."""
    from components.core.lineage import COMMIT_ENV, git_commit
    from components.data.versions import data_version, dir_md5

    lines = _stage("train")
    copied = " ".join(line for line in lines if line.startswith("COPY"))
    assert "data.dvc" not in copied and ".dvc/" not in copied and "dvc.yaml" in copied
    assert f"ARG {COMMIT_ENV}=unknown" in lines and f"ENV {COMMIT_ENV}=${{{COMMIT_ENV}}}" in lines
    last_run = max(i for i, line in enumerate(lines) if line.startswith("RUN"))
    assert lines.index(f"ARG {COMMIT_ENV}=unknown") > last_run  # a new commit rebuilds no installed layer

    image = tmp_path / "app"  # what the image holds: no .git, no data.dvc, a folder of the user's own images
    (image / "data" / "cat").mkdir(parents=True)
    (image / "data" / "cat" / "1.png").write_bytes(b"not checked here")
    assert data_version(image / "data") == dir_md5(image / "data")
    monkeypatch.setenv(COMMIT_ENV, "0123abc")
    assert git_commit(image) == "0123abc"
    monkeypatch.delenv(COMMIT_ENV)
    assert git_commit(image) == "unknown"
