"""The Open Inference Protocol (KServe V2, as Triton and KServe speak it) over HTTP, for `graft serve`.

    GET  /v2                                    server metadata (name, version, extensions)
    GET  /v2/health/live, /v2/health/ready      liveness; readiness (a model that passed every trust check is loaded)
    GET  /v2/models/{name}[/versions/{v}]       model metadata: the input (UINT8, N x S x S x 3) and output (FP32, N x C)
    GET  /v2/models/{name}[/versions/{v}]/ready
    GET  /v2/models/{name}[/versions/{v}]/config Triton's model configuration extension, as Triton answers it (JSON)
    POST /v2/models/{name}[/versions/{v}]/infer tensors in JSON, or with the binary tensor data extension

A caller written for Triton or KServe (`tritonclient.http`, KServe's V2 clients) works unchanged: the same
requests, the same JSON, `binary_data` tensors after an `Inference-Header-Content-Length` JSON header, and the
classification extension (`"parameters": {"classification": k}` on an output answers the top k as
`"score:index:label"` strings). `{name}` is the registered model's name (a file's stem for a plain file);
the only version served is the one loaded, and a version refused by the trust checks is never reported
ready. Every request keeps `graft serve`'s limits (body size, batch, time). This module only parses and
encodes; `components.serve.server` routes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

from components.core.errors import RequestProblem

HEADER_LENGTH = "inference-header-content-length"
"""The binary tensor data extension's header: the JSON part's length, the tensors' bytes follow it."""


DATATYPES = {"UINT8": np.uint8, "FP32": np.float32, "INT64": np.int64}


EXTENSIONS = ("binary_tensor_data", "classification")


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0
    """Top k as `score:index:label` strings (the classification extension); 0 for the probabilities."""


@dataclass(frozen=True)
class InferRequest:
    """A parsed `/infer` request: the image batch and what to answer."""

    id: str | None
    images: np.ndarray
    outputs: tuple[RequestedOutput, ...]


def _problem(message: str) -> RequestProblem:
    return RequestProblem(400, message)


def _split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON part of the body and the binary tensor data after it."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _problem(f"{HEADER_LENGTH}: {header_length[:40]!r} is not the length of the JSON part of the {len(body)}-byte body")
        json_part, binary = body[: int(header_length)], body[int(header_length):]
    try:
        payload = json.loads(json_part)
    except ValueError as exc:
        raise _problem(f"the inference request is not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise _problem("the inference request's JSON is nested too deeply") from exc
    if not isinstance(payload, dict):
        raise _problem('an inference request is a JSON object: {"inputs": [{"name", "shape", "datatype", "data"}]}')
    return payload, binary


def _parameters(entry: dict, where: str) -> dict:
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _problem(f"{where}.parameters must be a JSON object")
    return parameters


def _tensor(entry: object, binary: bytes, offset: int, input_name: str, image_size: int, max_batch: int) -> tuple[np.ndarray, int]:
    """The image batch of the one input, and how many binary bytes it used."""
    expected = f"{input_name}: UINT8, shape [N, {image_size}, {image_size}, 3], N from 1 to {max_batch}"
    if not isinstance(entry, dict):
        raise _problem(f"each input is a JSON object; this model takes {expected}")
    name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
    if name != input_name:
        raise _problem(f"input {str(name)[:60]!r} is not this model's input; it takes {expected}")
    if datatype != "UINT8":
        raise _problem(f"input {input_name} has datatype {str(datatype)[:20]!r}; send {expected} (RGB pixels 0-255)")
    if (not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or shape[1:] != [image_size, image_size, 3] or shape[0] < 1):
        raise _problem(f"input {input_name} has shape {str(shape)[:60]}; send {expected}")
    if shape[0] > max_batch:
        raise RequestProblem(413, f"{shape[0]} images in one request is over the limit of {max_batch} (deploy.serve_max_batch); split the batch")
    count = int(np.prod(shape))
    size = _parameters(entry, f"input {input_name}").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != count or offset + size > len(binary):
            raise _problem(f"input {input_name}: binary_data_size {str(size)[:20]} does not match its shape {shape} "
                           f"({count} bytes) and the {len(binary) - offset} binary bytes sent")
        return np.frombuffer(binary, dtype=np.uint8, count=count, offset=offset).reshape(shape), size
    data = entry.get("data")
    if data is None:
        raise _problem(f"input {input_name} has neither data nor parameters.binary_data_size")
    try:
        values = np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise _problem(f"input {input_name}: data is not a list of numbers ({exc})") from exc
    if values.size != count or values.dtype.kind not in "iu" or (values.size and (values.min() < 0 or values.max() > 255)):
        raise _problem(f"input {input_name}: data must be {count} integers from 0 to 255 (shape {shape}, flat or nested)")
    return values.astype(np.uint8).reshape(shape), 0


def _outputs(payload: dict, output_name: str) -> tuple[RequestedOutput, ...]:
    binary_default = bool(_parameters(payload, "the request").get("binary_data_output", False))
    requested = payload.get("outputs")
    if requested is None:
        return (RequestedOutput(output_name, binary_default),)
    if not isinstance(requested, list) or not requested:
        raise _problem(f"outputs must be a non-empty list of {{\"name\": \"{output_name}\"}}")
    outputs = []
    for entry in requested:
        if not isinstance(entry, dict) or entry.get("name") != output_name:
            raise _problem(f"this model has one output, {output_name}; asked for {str(entry)[:80]}")
        parameters = _parameters(entry, f"output {output_name}")
        k = parameters.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise _problem(f"output {output_name}: classification must be a whole number of classes, got {str(k)[:20]}")
        outputs.append(RequestedOutput(output_name, bool(parameters.get("binary_data", binary_default)), k))
    return tuple(outputs)


def parse_infer(body: bytes, header_length: str | None, input_name: str, output_name: str, image_size: int, max_batch: int) -> InferRequest:
    """An `/infer` body as the images to classify and the outputs to answer.

    Raises:
        RequestProblem: 400 naming what is wrong and what this model takes; 413 for a batch over the limit.
    """
    payload, binary = _split_body(body, header_length)
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise _problem(f"this model takes exactly one input, {input_name}: UINT8 [N, {image_size}, {image_size}, 3]")
    images, used = _tensor(inputs[0], binary, 0, input_name, image_size, max_batch)
    if used != len(binary):
        raise _problem(f"{len(binary) - used} binary bytes after the tensors that no input claims")
    request_id = payload.get("id")
    return InferRequest(str(request_id)[:200] if request_id is not None else None, images, _outputs(payload, output_name))


def _classification(probabilities: np.ndarray, k: int, classes: tuple[str, ...]) -> np.ndarray:
    """Triton's classification extension: the top k of each row as `score:index:label`, best first."""
    k = min(k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1)[:, :k]
    return np.array([[f"{row[i]:f}:{i}:{classes[i]}" for i in top] for row, top in zip(probabilities, order, strict=True)], dtype=object)


def _bytes_tensor(strings: np.ndarray) -> bytes:
    """BYTES elements as the binary extension sends them: each a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(encoded)) + encoded for encoded in (s.encode() for s in strings.ravel()))


def encode_infer(request: InferRequest, probabilities: np.ndarray, classes: tuple[str, ...], model_name: str,
                 version: str) -> tuple[bytes, dict[str, str]]:
    """The `/infer` response body and its headers (JSON, or JSON then binary tensors when asked)."""
    outputs, chunks = [], []
    for output in request.outputs:
        if output.classification:
            values = _classification(probabilities, output.classification, classes)
            entry = {"name": output.name, "datatype": "BYTES", "shape": list(values.shape)}
            raw = _bytes_tensor(values) if output.binary else None
            data = values.tolist()
        else:
            entry = {"name": output.name, "datatype": "FP32", "shape": list(probabilities.shape)}
            raw = np.ascontiguousarray(probabilities, dtype=np.float32).tobytes() if output.binary else None
            data = probabilities.astype(np.float32).ravel().tolist()
        if raw is None:
            entry["data"] = data if output.classification == 0 else [s for row in data for s in row]
        else:
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        outputs.append(entry)
    response = {"model_name": model_name, "model_version": version, "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    head = json.dumps(response).encode()
    if not chunks:
        return head, {"content-type": "application/json"}
    return head + b"".join(chunks), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def model_metadata(name: str, version: str, input_name: str, output_name: str, image_size: int, classes: int) -> dict:
    """`GET /v2/models/{name}`: the one version served, its input and its output."""
    return {
        "name": name,
        "versions": [version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": input_name, "datatype": "UINT8", "shape": [-1, image_size, image_size, 3]}],
        "outputs": [{"name": output_name, "datatype": "FP32", "shape": [-1, classes]}],
    }


def model_config(name: str, version: str, input_name: str, output_name: str, image_size: int, classes: int, max_batch: int) -> dict:
    """`GET /v2/models/{name}/config`: Triton's model configuration for what is served, in the JSON form Triton answers
    (`tritonclient`'s `get_model_config`), with the same tensors as the `config.pbtxt` of `graft bundle --format triton`.
    `max_batch_size` is `deploy.serve_max_batch`; `graft serve` batches no requests together, so there is no batcher."""
    return {
        "name": name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": {"specific": {"versions": [int(version)] if version.isdigit() else []}},
        "max_batch_size": max_batch,
        "input": [{"name": input_name, "data_type": "TYPE_UINT8", "format": "FORMAT_NONE", "dims": [image_size, image_size, 3]}],
        "output": [{"name": output_name, "data_type": "TYPE_FP32", "dims": [classes], "label_filename": "labels.txt"}],
    }
