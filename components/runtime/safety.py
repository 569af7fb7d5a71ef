"""Refuse ONNX files whose external-data references escape the model's own folder.

An ONNX model may keep its weights in side files named by a `location` string;
a hostile file can point that at `../../etc/passwd` or an absolute path, or
ship a symlink that leads outside (the onnx < 1.21 CVEs). Consumers call
`check_external_data` before handing a file to onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

from components.core.errors import GraftError, UnsafeModelError


def _locations(model_path: Path) -> list[str]:
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise many types for a bad file
        raise GraftError(f"{model_path} is not a readable ONNX model ({exc.__class__.__name__}); re-export it with Graft") from exc
    found = []
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                tensors.append(attribute.t)
            tensors.extend(attribute.tensors)
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            found.append(entries.get("location", ""))
    return found


def check_external_data(model_path: Path) -> list[Path]:
    """The external-data files `model_path` uses, all inside its folder.

    Raises:
        UnsafeModelError: a location is absolute, climbs out of the folder, or is a link leading outside.
    """
    folder = model_path.resolve().parent
    files = []
    for location in _locations(model_path):
        candidate = Path(location)
        target = (folder / candidate).resolve()
        if not location or candidate.is_absolute() or not target.is_relative_to(folder):
            raise UnsafeModelError(
                f"{model_path}: external data location '{location}' points outside the model's folder {folder}; "
                "refusing to load it (re-export the model with its data beside it)"
            )
        files.append(target)
    return files
