"""A throwaway MLflow registry (SQLite in a temp folder) holding tiny real ONNX models, registered the
way the deploy stage registers them, for the trust-chain tests. No torch: the models are `tests.models.tiny_onnx`.

Import into a test module with `from tests.runtime.fixtures import ...`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pytest
from PIL import Image

from tests.conftest import REPO, seeded_store
from tests.models import tiny_onnx

NAME = "graft-trust"

SIZE = 8

PASSED_GATE = {"gate.verdict": "promote", "gate.reasons": "PROMOTE: accuracy 0.950 meets the floor", "parity.top1_agreement": "1.0000"}


@dataclass(frozen=True)
class Store:
    """A registry in `work`, with MLflow's default client pointed at it."""

    params: object
    uri: str
    work: Path

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.uri, self.uri)

    def run(self):
        """A new run in the store's experiment."""
        from components.registry.tracking import Run

        experiment = self.client.get_experiment_by_name(self.params.tracking.experiment)
        return Run(self.client.create_run(experiment.experiment_id).info.run_id, self.uri)

    def model_files(self, folder: str, variants: tuple[str, ...] = ("int8",), variant_metadata: dict[str, str] | None = None) -> Path:
        """A fp32 file and its variants in `work/folder`, each a real, different ONNX model (the variants with
        `variant_metadata` added to Graft's); returns the fp32 path."""
        fp32 = tiny_onnx(self.work / folder / "model.onnx", image_size=SIZE)
        for variant in variants:
            tiny_onnx(self.work / folder / f"model.{variant}.onnx", classes=("0", "1", "7"), image_size=SIZE)
            _rename_graph(self.work / folder / f"model.{variant}.onnx", variant, variant_metadata or {})
        return fp32

    def register(self, folder: str, tags: dict[str, str] | None = None, variants: tuple[str, ...] = ("int8",),
                 variant_metadata: dict[str, str] | None = None) -> str:
        """Log and register a fresh model as the deploy stage does; returns its version."""
        from components.deploy.register import log_onnx_model, register_version

        fp32 = self.model_files(folder, variants, variant_metadata)
        run = self.run()
        logged = log_onnx_model(run, fp32, SIZE, 3, variants)
        version = register_version(run, NAME, logged, {**PASSED_GATE, **(tags or {})}, "trust test")
        run.finish()
        return version

    def folder(self, version: str) -> Path:
        """The local artifact folder of a registered version (the attacker's view of the store)."""
        uri = self.client.get_model_version_download_uri(NAME, version)
        return Path(url2pathname(urlsplit(uri).path))

    def params_file(self) -> Path:
        path = self.work / "params.yaml"
        path.write_text(f"tracking:\n  store_dir: {self.params.tracking.store_dir}\n")
        return path


def _rename_graph(path: Path, name: str, metadata: dict[str, str]) -> None:
    """Make a variant file's bytes differ from the fp32 file's (same behaviour, another graph name), and add `metadata`."""
    import onnx

    model = onnx.load(str(path))
    model.graph.name = f"tiny-{name}"
    model.metadata_props.extend(onnx.StringStringEntryProto(key=key, value=value) for key, value in metadata.items())
    onnx.save_model(model, str(path))


@pytest.fixture
def store(tmp_path, monkeypatch) -> Store:
    """A fresh registry; signing and verification off unless a test turns them on."""
    from components.core.config import load_params
    from components.registry.tracking import open_tracking_store
    from components.runtime.signing import SIGNING_KEY_ENV, VERIFY_KEY_ENV

    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    monkeypatch.delenv(VERIFY_KEY_ENV, raising=False)
    params = load_params(REPO / "params.yaml", [f"tracking.store_dir={seeded_store(tmp_path / 'mlflow')}", f"deploy.model_name={NAME}"])
    uri = open_tracking_store(params)
    return Store(params, uri, tmp_path)


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "digit.png"
    Image.new("RGB", (SIZE, SIZE), (200, 10, 10)).save(path)
    return path


def key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """A P-256 key pair as PEM files (what `openssl ecparam -name prime256v1 -genkey` makes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    folder.mkdir(parents=True, exist_ok=True)
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public
