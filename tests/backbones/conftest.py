"""Fixtures for the weights tests: a loopback server standing in for the download hosts, and
empty caches ($TORCH_HOME, $HF_HOME) for each test, pointed at by the libraries' own variables."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import torch

from tests.backbones.weights_server import WeightsServer


@pytest.fixture
def weights_server():
    server = WeightsServer().start()
    yield server
    server.stop()


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights_server: WeightsServer) -> dict[str, Path]:
    """Empty torch and Hub caches for this test, the Hub's address on the loopback server, online."""
    torch_home, hf_home = tmp_path / "torch-home", tmp_path / "hf-home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_ENDPOINT", weights_server.address)
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return {"torch": torch_home / "hub" / "checkpoints", "hub": hf_home / "hub"}


def torch_file(state: dict[str, torch.Tensor]) -> bytes:
    """A state dict as the bytes of a .pth file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def safetensors_file(state: dict[str, torch.Tensor]) -> bytes:
    """A state dict as the bytes of a .safetensors file."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def files_under(folder: Path) -> list[Path]:
    """Every file (or link) below `folder`, lock files aside."""
    return sorted(p for p in folder.rglob("*") if (p.is_file() or p.is_symlink()) and ".locks" not in p.parts)
