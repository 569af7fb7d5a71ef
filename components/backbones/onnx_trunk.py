"""The frozen trunk on onnxruntime: a backbone's exported graph, cut where the trunk ends.

A candidate's exported graph (uint8 N x S x S x 3 images in, features out) already computes the
frozen trunk: the trunk's output is one of its tensors. Which one is found by value, not by name:
the graph runs once on a probe batch with every four-dimensional float tensor exposed, and the
first of the trunk's shape that equals PyTorch's trunk output on that batch, to float rounding, is
where the graph is cut (`onnx.utils.Extractor`). A graph where none matches gives None, and the
trunk runs in PyTorch as before.

On this CPU onnxruntime runs EfficientNet-Lite0's first 15 blocks at 112 px several times faster
than PyTorch's eager kernels (see `components.train.trunk`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.runtime.providers import session_options

log = logging.getLogger(__name__)

RTOL = 1e-3
"""How close a graph tensor must be to PyTorch's trunk output, relative to that output's largest value, to be
taken as the trunk's end (onnxruntime and PyTorch differ by about 2e-6 of it; another tensor of the same
shape differs by its whole size)."""


@dataclass
class OnnxTrunk:
    """The cut graph on onnxruntime: uint8 images in, the trunk's float32 rows out."""

    session: object  # onnxruntime.InferenceSession
    tensor: str
    max_difference: float

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.session.get_inputs()[0].name: images})[0]


def _float_tensors_4d(model) -> list[str]:  # noqa: ANN001 - onnx.ModelProto
    from onnx import TensorProto

    return [
        info.name for info in model.graph.value_info
        if info.type.tensor_type.elem_type == TensorProto.FLOAT and len(info.type.tensor_type.shape.dim) == 4
    ]


def _session(model):  # noqa: ANN001, ANN202 - onnx.ModelProto -> onnxruntime.InferenceSession
    """On the CPU, where PyTorch computes the frozen blocks it stands in for, with Graft's session options."""
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])


def cut_at_trunk(onnx_path: Path, probe: np.ndarray, expected: np.ndarray) -> OnnxTrunk | None:
    """The graph at `onnx_path` cut where it computes `expected` (PyTorch's trunk output for the uint8 `probe`).

    Returns:
        The cut graph on onnxruntime, or None when no tensor of the graph matches (another architecture's
        layout, another export): the caller runs the trunk in PyTorch.
    """
    import onnx
    from onnx import shape_inference, utils

    model = shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    names = _float_tensors_4d(model)
    if not names:
        return None
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {output.name for output in exposed.graph.output}
    exposed.graph.output.extend(info for info in model.graph.value_info if info.name in set(names) - known)
    outputs = [output.name for output in exposed.graph.output]
    values = dict(zip(outputs, _session(exposed).run(outputs, {model.graph.input[0].name: probe}), strict=True))
    scale = max(float(np.abs(expected).max()), 1e-6)
    order = {name: i for i, name in enumerate(n for node in model.graph.node for n in node.output)}
    for name in sorted((n for n in names if n in values), key=lambda n: order.get(n, len(order))):
        value = values[name]
        if value.shape != expected.shape:
            continue
        difference = float(np.abs(value - expected).max())
        if difference <= RTOL * scale:
            cut = utils.Extractor(model).extract_model([model.graph.input[0].name], [name])
            return OnnxTrunk(_session(cut), name, difference / scale)
    return None
