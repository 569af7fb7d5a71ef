"""Small real models for tests that need an ONNX file but not a trained network, and a decompression bomb."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def tiny_onnx(path: Path, classes: tuple[str, ...] = ("0", "1", "7"), image_size: int = 8) -> Path:
    """A real ONNX classifier with Graft's metadata: softmax of the mean pixel per channel (3 classes)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["pixels"], ["means"], axes=[1, 2], keepdims=0),
            helper.make_node("Softmax", ["means"], ["probabilities"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", image_size, image_size, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.helper.set_model_props(model, {"classes": json.dumps(list(classes)), "image_size": str(image_size)})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path
