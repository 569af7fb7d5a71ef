"""`graft serve` speaks the Open Inference Protocol (KServe V2): Triton's own client (`tritonclient[http]`) against a
real uvicorn server, with the trust checks deciding what is ready; `graft bundle --format triton` writes a model
repository whose `config.pbtxt` Triton's own schema accepts."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from components.core.errors import BundleError, IntegrityError
from components.registry.history import move_alias
from components.registry.tracking import use_tracking_uri
from components.runtime.bundle import triton_from_registry
from components.runtime.model import OnnxClassifier
from components.serve.server import LiveModel, ServeSettings, running_server
from flows.cli import main
from tests import services
from tests.conftest import REPO
from tests.runtime.fixtures import NAME, SIZE, store  # noqa: F401

SETTINGS = ServeSettings(poll_seconds=0.2, max_batch=4)


def _batch(count: int = 2) -> np.ndarray:
    batch = np.zeros((count, SIZE, SIZE, 3), dtype=np.uint8)
    batch[0, ..., 0] = 200
    batch[1:, ..., 2] = 200
    return batch


def _infer(client, batch: np.ndarray, binary: bool = True, classes: int = 0, version: str = ""):  # noqa: ANN001, ANN202
    tensor = triton.InferInput("images", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    output = triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=classes)
    return client.infer(NAME, [tensor], model_version=version, outputs=[output])


@pytest.fixture
def served(store):  # noqa: F811
    """`graft serve`'s app on a free port, serving the champion (v1) of a fresh registry."""
    version = store.register("v1")
    move_alias(store.client, NAME, version, "gate", "test", "first model")
    use_tracking_uri(store.uri)
    live = LiveModel(f"models:/{NAME}@champion")
    with running_server(live, SETTINGS) as url:
        yield store, version, live, triton.InferenceServerClient(url.removeprefix("http://"))


def test_triton_clients_classify_through_graft_serve(served):
    store, version, _, client = served
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data", "classification"]
    assert client.get_model_metadata(NAME) == {
        "name": NAME, "versions": [version], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, SIZE, SIZE, 3]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}],
    }
    expected = OnnxClassifier.load(f"models:/{NAME}@champion").predict_proba(_batch())
    for binary in (True, False):  # the binary tensor extension (tritonclient's default) and plain JSON
        answer = _infer(client, _batch(), binary)
        np.testing.assert_allclose(answer.as_numpy("probabilities"), expected, atol=1e-6)
        assert answer.get_response()["model_version"] == version
    top = _infer(client, _batch(), classes=2).as_numpy("probabilities")  # the classification extension: score:index:label
    assert [row[0].decode().split(":")[2] for row in top] == ["0", "7"]
    assert _infer(client, _batch(), version=version).as_numpy("probabilities").shape == (2, 3)


def test_tritons_model_configuration_extension_describes_what_is_served_in_tritons_own_schema(served):
    from google.protobuf import json_format

    _, version, live, client = served
    answer = client.get_model_config(NAME)
    schema = _model_config_schema()
    config = json_format.ParseDict(answer, schema.ModelConfig())  # a field Triton's schema lacks raises
    model = live.model
    assert (config.name, config.platform, config.max_batch_size) == (NAME, "onnxruntime_onnx", SETTINGS.max_batch)
    assert list(config.version_policy.specific.versions) == [int(version)]
    assert (config.input[0].name, list(config.input[0].dims), config.input[0].data_type) == (
        model.input_name, [SIZE, SIZE, 3], schema.TYPE_UINT8)
    assert (config.output[0].name, list(config.output[0].dims), config.output[0].data_type) == (
        model.output_name, [len(model.classes)], schema.TYPE_FP32)
    assert client.get_model_config(NAME, version) == answer
    with pytest.raises(InferenceServerException, match="version '9' of 'graft-trust' is not served"):
        client.get_model_config(NAME, "9")


@pytest.mark.parametrize(("call", "status", "words"), [
    (lambda c: _infer(c, np.zeros((1, 4, 4, 3), np.uint8)), "400", "send images: UINT8, shape [N, 8, 8, 3]"),
    (lambda c: _infer(c, _batch(5)), "413", "over the limit of 4 (deploy.serve_max_batch)"),
    (lambda c: c.infer(NAME, [triton.InferInput("pixels", [1, SIZE, SIZE, 3], "UINT8")]), "400", "'pixels' is not this model's input"),
    (lambda c: c.get_model_metadata("another-model"), "400", f"this server serves '{NAME}'"),
    (lambda c: _infer(c, _batch(), version="9"), "400", "version '9' of 'graft-trust' is not served"),
])
def test_bad_requests_get_a_400_family_answer_in_words(served, call, status, words):
    *_, client = served
    with pytest.raises(InferenceServerException) as err:
        call(client)
    assert err.value.status() == status and words in err.value.message()
    assert client.is_server_ready()


def test_float_pixels_are_refused_naming_the_input_the_model_takes(served):
    *_, client = served
    tensor = triton.InferInput("images", [1, SIZE, SIZE, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, SIZE, SIZE, 3), np.float32))
    with pytest.raises(InferenceServerException, match="datatype 'FP32'; send images: UINT8"):
        client.infer(NAME, [tensor])


def test_a_version_refused_by_the_digest_check_is_never_ready_and_the_last_good_one_keeps_serving(served):
    import time

    store, version, live, client = served
    second = store.register("v2")
    recorded = store.folder(second) / "model.onnx"
    shutil.copyfile(store.folder(second) / "model.int8.onnx", recorded)  # altered in the artifact store
    store.client.set_registered_model_alias(NAME, "champion", second)
    deadline = time.monotonic() + 30
    while live.refused_version != second and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live.refused_version == second
    assert client.is_server_ready() and client.is_model_ready(NAME) and not client.is_model_ready(NAME, second)
    assert client.get_model_metadata(NAME)["versions"] == [version]
    with pytest.raises(InferenceServerException, match="it was refused: .*model.onnx has sha256 .* but registration recorded"):
        _infer(client, _batch(), version=second)
    assert _infer(client, _batch()).get_response()["model_version"] == version


def test_a_server_whose_model_fails_the_digest_check_never_becomes_ready(store, tmp_path):  # noqa: F811
    version = store.register("v1")
    move_alias(store.client, NAME, version, "gate", "test", "first model")
    shutil.copyfile(store.folder(version) / "model.int8.onnx", store.folder(version) / "model.onnx")
    port = services.free_port()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "--model", f"models:/{NAME}@champion", "--port", str(port)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**services.clean_env(), "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": store.uri})
    assert done.returncode == 2 and "refusing to load it" in done.stderr.strip().splitlines()[-1]


def _model_config_schema():  # noqa: ANN202 - Triton's ModelConfig protobuf module
    """Triton's own `ModelConfig` message, from the protobuf module tritonclient ships (no gRPC needed to parse text)."""
    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_graft_bundle_writes_a_triton_model_repository_triton_accepts(store, tmp_path, capsys):  # noqa: F811
    import onnxruntime as ort
    from google.protobuf import text_format

    version = store.register("v1")
    move_alias(store.client, NAME, version, "gate", "test", "first model")
    use_tracking_uri(store.uri)
    assert main(["bundle", "--params", str(store.params_file()), "--model", f"models:/{NAME}@champion",
                 "--out", str(tmp_path / "repo"), "--format", "triton", "--variant", "int8"]) == 0
    folder = tmp_path / "repo" / NAME
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == sorted([
        "SHA256SUMS", f"{version}/model.onnx", "config.pbtxt", "labels.txt"])
    schema = _model_config_schema()
    config = text_format.Parse((folder / "config.pbtxt").read_text(), schema.ModelConfig())  # unknown fields raise
    assert config.name == NAME and config.platform == "onnxruntime_onnx" and config.max_batch_size == 32
    assert config.HasField("dynamic_batching") and list(config.version_policy.specific.versions) == [int(version)]
    session = ort.InferenceSession(str(folder / version / "model.onnx"), providers=["CPUExecutionProvider"])
    (model_input,), (model_output,) = session.get_inputs(), session.get_outputs()
    assert (config.input[0].name, list(config.input[0].dims), config.input[0].data_type) == (
        model_input.name, model_input.shape[1:], schema.TYPE_UINT8)
    assert (config.output[0].name, list(config.output[0].dims), config.output[0].label_filename) == (
        model_output.name, [3], "labels.txt")
    assert (folder / "labels.txt").read_text().split() == ["0", "1", "7"]
    assert session.run(None, {"images": _batch(3)})[0].shape == (3, 3)  # the batch axis Triton's batcher fills
    assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=folder, capture_output=True).returncode == 0
    assert (folder / version / "model.onnx").read_bytes() == (store.folder(version) / "model.int8.onnx").read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "repo").stat().st_mode & 0o777 == 0o777 & ~umask  # as `mkdir` makes it: Triton's user reads it
    from PIL import Image

    image = tmp_path / "image.png"
    Image.fromarray(_batch(1)[0]).save(image)
    capsys.readouterr()
    assert main(["predict", "--model", str(folder), str(image)]) == 2
    assert "is a Triton model repository's model (config.pbtxt), not a Graft bundle" in capsys.readouterr().err
    assert main(["predict", "--model", str(folder / version / "model.onnx"), str(image)]) == 0

    with pytest.raises(BundleError, match="variant 'fp16' was not published"):
        triton_from_registry(f"models:/{NAME}/{version}", tmp_path / "none", "fp16")
    shutil.copyfile(store.folder(version) / "model.int8.onnx", store.folder(version) / "model.onnx")
    with pytest.raises(IntegrityError, match="refusing to load it"):
        triton_from_registry(f"models:/{NAME}/{version}", tmp_path / "tampered")
    assert not (tmp_path / "tampered").exists()
