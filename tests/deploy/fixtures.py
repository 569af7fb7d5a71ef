"""Fixtures shared by the deploy-side tests: one tiny exported model per session and
a throwaway MLflow registry holding it (v1) and a deliberately different copy (v2).

Import the fixtures into a test module with `from tests.deploy.fixtures import ...`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, seeded_store, tiny_overrides

NAME = "graft-test"


@dataclass(frozen=True)
class TinyModel:
    params: object
    split: object
    model: object
    export: object
    work: Path
    trained: object
    """The `TrainResult` behind the model, for driving `deploy()` itself."""
    evaluation: object
    """Its `EvalResult`."""

    @property
    def onnx_path(self) -> Path:
        return self.export.onnx_path

    def val(self, count: int | None = None) -> tuple[list[Path], np.ndarray]:
        samples = self.split.val[:count]
        return [s.path for s in samples], np.array([s.label for s in samples])


@pytest.fixture(scope="session")
def tiny_model(digits_dir, feature_cache_dir, tmp_path_factory) -> TinyModel:
    """efficientnet_lite0 at 64 px, head trained on 3 digit classes, exported and parity-checked (~30 s)."""
    from components.backbones.zoo import get_spec
    from components.choose.ranking import ChooseResult
    from components.core.config import load_params
    from components.data.folders import scan
    from components.deploy.export import export_and_verify
    from components.evaluate.stage import evaluate
    from components.train.stage import fine_tune, load_classifier

    work = tmp_path_factory.mktemp("tiny-model")
    params = load_params(REPO / "params.yaml", tiny_overrides(digits_dir, work, feature_cache_dir))
    split = scan(params.data.dir)
    choice = ChooseResult("efficientnet_lite0", 64, "logme", "fixed for tests", (), 0.0)
    trained = fine_tune(params, split, choice, work / "run")
    model, _ = load_classifier(trained.checkpoint_path)
    spec = get_spec(trained.backbone)
    meta = {
        "classes": list(split.classes), "image_size": trained.image_size, "mean": list(spec.mean),
        "std": list(spec.std), "backbone": trained.backbone, "data_md5": "test-md5",
    }
    exported = export_and_verify(model, work / "model" / "model.onnx", trained.image_size, 18, meta, [s.path for s in split.val], 1e-4,
                                 template_dir=params.deploy.template_dir)  # as the deploy stage exports a trained backbone's model
    return TinyModel(params, split, model, exported, work, trained, evaluate(params, split, trained, work / "run"))


def served_like_pytorch(onnx_path: Path, model, paths: list[Path]) -> np.ndarray:  # noqa: ANN001 - GraftClassifier
    """Check the deployed file's contract: uint8 images in, probabilities out, both on a `batch` axis; Graft's
    metadata; the full checker; PyTorch's probabilities to 1e-5 on `paths`, the same top-1. Returns the file's probabilities."""
    import onnx
    import torch

    from components.data.images import load_batch
    from components.runtime.model import OnnxClassifier

    proto = onnx.load(str(onnx_path))
    assert [(value.name, value.type.tensor_type.shape.dim[0].dim_param) for value in (*proto.graph.input, *proto.graph.output)] == [
        ("images", "batch"), ("probabilities", "batch")]
    assert {p.key: p.value for p in proto.metadata_props}["classes"] == '["0", "1", "7"]' and proto.producer_name == "graft"
    onnx.checker.check_model(proto, full_check=True)
    images = load_batch(paths, 64)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    served = OnnxClassifier(onnx_path).predict_proba(images)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert (served.argmax(1) == expected.argmax(1)).all()
    return served


def deploy_params(tiny_model: TinyModel, work: Path, name: str = NAME, *extra: str):
    """The tiny model's parameters for a `deploy()` of model `name` from `work` (no fp16/int8 variants: faster)."""
    from components.core.config import load_params

    return load_params(REPO / "params.yaml", [*_store_overrides(tiny_model, work), f"deploy.model_name={name}",
                                              "deploy.variants=[]", "evaluate.min_comparison_images=5", *extra])


def dump_deploy_inputs(tiny_model: TinyModel, path: Path) -> Path:
    """Save what `deploy_tiny` needs, for a child process (`deploy_dumped`) to deploy the same model."""
    import pickle

    path.write_bytes(pickle.dumps(TinyModel(tiny_model.params, tiny_model.split, None, tiny_model.export, tiny_model.work,
                                            tiny_model.trained, tiny_model.evaluation)))
    return path


def deploy_dumped(path: Path, uri: str, name: str, work: Path):  # noqa: ANN201 - DeployResult
    """In a child process: `deploy_tiny` of the model `dump_deploy_inputs` saved."""
    import pickle

    return deploy_tiny(pickle.loads(path.read_bytes()), uri, name, work)


def deploy_tiny(tiny_model: TinyModel, uri: str, name: str, work: Path, experiment: str = "faults"):  # noqa: ANN201 - DeployResult
    """`deploy()` of the tiny model as model `name`, in a new run of `experiment` on the tracking server `uri`."""
    from components.deploy.stage import DeployContext, deploy
    from components.registry.tracking import Run, _ensure_experiment, experiment_location, use_tracking_uri
    from mlflow import MlflowClient

    use_tracking_uri(uri)  # consumers (the gate loading the champion) read the same registry
    client = MlflowClient(uri, uri)
    params = deploy_params(tiny_model, work, name)
    # as `graft run` does: safe when a concurrent run creates it too, its artifacts in the store's folder
    _ensure_experiment(client, experiment, experiment_location(params, uri))
    run = Run(client.create_run(client.get_experiment_by_name(experiment).experiment_id).info.run_id, uri)
    ctx = DeployContext(params, tiny_model.split, run, work, "test-md5", "test")
    result = deploy(ctx, tiny_model.trained, tiny_model.evaluation)
    run.finish()
    return result


def biased_copy(source: Path, target: Path, winner: int, margin: float = 50.0) -> Path:
    """A copy of a Graft ONNX model whose head always prefers class `winner` (a stand-in for a different model)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    gemm = next(node for node in model.graph.node if node.op_type == "Gemm")
    for init in model.graph.initializer:
        if init.name == gemm.input[2]:
            bias = numpy_helper.to_array(init).copy()
            bias[winner] += margin
            init.CopyFrom(numpy_helper.from_array(bias, init.name))
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(target))
    return target


def register(params, onnx_path: Path, tags: dict[str, str] | None = None, variants: tuple[str, ...] = ()) -> str:
    """Log `onnx_path` (and variant files beside it) as deploy does, and register it; returns the version."""
    from components.deploy.register import log_onnx_model, register_version
    from components.registry.tracking import Run, open_tracking_store
    from mlflow import MlflowClient

    uri = open_tracking_store(params)
    client = MlflowClient(uri, uri)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    run = Run(client.create_run(experiment.experiment_id).info.run_id, uri)
    source = log_onnx_model(run, onnx_path, 64, 3, variants)
    base = {
        "parity.max_abs_diff": "1.0e-06", "parity.top1_agreement": "1.0000",
        "val.accuracy": "0.9000", "val.macro_f1": "0.9000", "test.accuracy": "0.9000", "test.macro_f1": "0.9000",
    }
    version = register_version(run, NAME, source, {**base, **(tags or {})}, "test version")
    run.finish()
    return version


@dataclass(frozen=True)
class Registry:
    params: object
    uri: str
    v1: str
    v2: str
    """v2 always answers class index 2 ('7')."""

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.uri, self.uri)


@pytest.fixture(scope="module")
def registry(tiny_model, tmp_path_factory) -> Registry:
    """A fresh MLflow store: v1 = the tiny model (champion, via the history), v2 = a biased copy."""
    from components.core.config import load_params
    from components.registry.history import move_alias
    from components.registry.tracking import tracking_uri

    work = tmp_path_factory.mktemp("registry")
    params = load_params(REPO / "params.yaml", [*_store_overrides(tiny_model, work)])
    first = work / "v1" / "model.onnx"
    first.parent.mkdir(parents=True)
    shutil.copyfile(tiny_model.onnx_path, first)
    v1 = register(params, first)
    v2 = register(params, biased_copy(tiny_model.onnx_path, work / "v2" / "model.onnx", winner=2))
    uri = tracking_uri(params)
    reg = Registry(params, uri, v1, v2)
    move_alias(reg.client, NAME, v1, "gate", "test fixture", "first model")
    return reg


def _store_overrides(tiny_model: TinyModel, work: Path) -> list[str]:
    data = tiny_model.params.data
    seeded_store(work / "mlflow")
    return [f"data.dir={data.dir}", f"data.cache_dir={data.cache_dir}", "data.image_size=64",
            f"deploy.output_dir={work / 'outputs'}", f"deploy.model_name={NAME}", f"tracking.store_dir={work / 'mlflow'}"]


def params_file(registry: Registry, folder: Path) -> Path:
    """A params.yaml naming the registry's store, for CLI calls."""
    path = folder / "params.yaml"
    path.write_text(f"tracking:\n  store_dir: {registry.params.tracking.store_dir}\n")
    return path


@pytest.fixture
def active_registry(registry) -> Registry:
    """`registry`, with MLflow's default client (what consumers use) pointed at it."""
    from components.registry.tracking import use_tracking_uri

    use_tracking_uri(registry.uri)
    return registry
