"""ONNX files whose external data escapes their folder are refused."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from components.core.errors import UnsafeModelError
from components.runtime.safety import check_external_data
from tests.conftest import REPO


def _model_with_external_weight(folder, location):
    weight = numpy_helper.from_array(np.ones((2, 2), dtype=np.float32), name="w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [weight],
    )
    path = folder / "model.onnx"
    onnx.save_model(helper.make_model(graph), path)  # not load-checked: the point is a hostile file
    return path


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../x.bin"])
def test_locations_outside_the_folder_are_refused(tmp_path, location):
    (tmp_path / "m").mkdir()
    path = _model_with_external_weight(tmp_path / "m", location)
    with pytest.raises(UnsafeModelError, match="outside the model's folder"):
        check_external_data(path)


def test_symlink_leading_outside_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 16)
    (tmp_path / "m" / "weights.bin").symlink_to(tmp_path / "outside.bin")
    path = _model_with_external_weight(tmp_path / "m", "weights.bin")
    with pytest.raises(UnsafeModelError):
        check_external_data(path)


def test_data_beside_the_model_is_accepted(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights.bin").write_bytes(np.ones((2, 2), dtype=np.float32).tobytes())
    path = _model_with_external_weight(tmp_path / "m", "weights.bin")
    assert check_external_data(path) == [(tmp_path / "m" / "weights.bin").resolve()]


def test_the_consumer_refuses_a_hostile_model_before_onnxruntime_opens_it(tmp_path):
    from components.runtime.model import OnnxClassifier

    (tmp_path / "m").mkdir()
    path = _model_with_external_weight(tmp_path / "m", "../../../etc/passwd")
    with pytest.raises(UnsafeModelError):
        OnnxClassifier(path)


UNPICKLERS = {"torch.load", "torch.serialization.load", "pickle.load", "pickle.loads", "pickle.Unpickler", "joblib.load",
              "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "pd.read_pickle", "pandas.read_pickle"}


def test_nothing_graft_loads_unpickles_arbitrary_objects():
    """Every torch.load in components/ and flows/ passes weights_only=True, numpy never unpickles, and nothing
    else that unpickles is called or imported (tests/train/test_train.py feeds a malicious file to the loaders)."""
    import ast

    offenders = []
    for source in [*(REPO / "components").rglob("*.py"), *(REPO / "flows").rglob("*.py")]:
        where = source.relative_to(REPO)
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in {"torch", "torch.serialization", "pickle", "joblib", "dill", "cloudpickle"}:
                offenders += [f"{where}:{node.lineno} imports {node.module}.{a.name}" for a in node.names
                              if a.name in {"load", "loads", "Unpickler", "*"}]
            if isinstance(node, ast.Import):
                offenders += [f"{where}:{node.lineno} imports {a.name}" for a in node.names if a.name in {"pickle", "dill", "cloudpickle", "joblib"}]
            if not isinstance(node, ast.Call):
                continue
            called, flags = ast.unparse(node.func), {k.arg: ast.unparse(k.value) for k in node.keywords}
            if called in {"torch.load", "torch.serialization.load"} and flags.get("weights_only") != "True":
                offenders.append(f"{where}:{node.lineno} {called} without weights_only=True")
            elif called in UNPICKLERS - {"torch.load", "torch.serialization.load"}:
                offenders.append(f"{where}:{node.lineno} {called}")
            elif called in {"np.load", "numpy.load"} and flags.get("allow_pickle", "False") != "False":
                offenders.append(f"{where}:{node.lineno} {called} with allow_pickle={flags['allow_pickle']}")
    assert offenders == []
