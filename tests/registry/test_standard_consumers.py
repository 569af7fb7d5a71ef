"""Consumers that know MLflow, not Graft: `mlflow.pyfunc.load_model` and `mlflow models serve` on the champion.

Registration logs the model with MLflow's ONNX flavour as a LoggedModel (signature: uint8 N x S x S x 3 in,
probabilities out; the class names in the MLmodel's metadata), so MLflow's own loaders serve it unchanged.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request

import numpy as np
import pytest

from components.registry.history import move_alias
from components.runtime.model import OnnxClassifier
from tests import services
from tests.runtime.fixtures import NAME, SIZE, store  # noqa: F401


@pytest.fixture
def champion(store):  # noqa: F811
    version = store.register("v1")
    move_alias(store.client, NAME, version, "gate", "test", "first model")
    return store, version


def _batch() -> np.ndarray:
    """Two uint8 NHWC images the tiny model tells apart (it answers the brightest channel)."""
    batch = np.zeros((2, SIZE, SIZE, 3), dtype=np.uint8)
    batch[0, ..., 0] = 200
    batch[1, ..., 2] = 200
    return batch


def test_pyfunc_loads_the_champion_and_answers_uint8_nhwc_batches_as_graft_does(champion, temp_in_tmp_path):
    import mlflow

    store, version = champion
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    answer = model.predict(_batch())
    probabilities = answer["probabilities"] if isinstance(answer, dict) else np.asarray(answer)
    expected = OnnxClassifier.load(f"models:/{NAME}@champion").predict_proba(_batch())
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    assert probabilities.argmax(1).tolist() == [0, 2]
    info = mlflow.models.get_model_info(f"models:/{NAME}/{version}")
    assert info.metadata["classes"] == ["0", "1", "7"]  # what each output column means, for MLflow-only callers
    spec = info.signature.inputs.to_dict()[0]["tensor-spec"]
    assert (spec["dtype"], list(spec["shape"])) == ("uint8", [-1, SIZE, SIZE, 3])
    # the providers are the consumer's to have: CUDA first, so a GPU consumer uses it (not this CPU machine's list)
    assert info.flavors["onnx"]["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_mlflow_models_serve_answers_a_json_request_over_loopback(champion, tmp_path):
    store, _ = champion
    port = services.free_port()
    # MLflow starts `uvicorn` by name, so the environment's bin folder must be on PATH (as after `source .venv/bin/activate`)
    env = {**services.clean_env(), "MLFLOW_TRACKING_URI": store.uri, "PATH": f"{services.BIN}:{services.clean_env().get('PATH', '')}"}
    with open(tmp_path / "serve.log", "w") as log:
        process = subprocess.Popen(
            [str(services.BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            services.wait_http(f"http://127.0.0.1:{port}/ping", process, 180)
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", data=json.dumps({"inputs": _batch().tolist()}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
        finally:
            services.stop(process)
    predictions = answer["predictions"]
    probabilities = np.asarray(predictions["probabilities"] if isinstance(predictions, dict) else predictions)
    assert probabilities.shape == (2, 3) and probabilities.argmax(1).tolist() == [0, 2]
