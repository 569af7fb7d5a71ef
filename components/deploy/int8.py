"""The INT8 variant: onnxruntime static quantisation, with the weights' rounding bias corrected first.

The recipe, in onnxruntime's own order: `quant_pre_process` (constant folding, BatchNorm folded into
the convolutions), QDQ format, per-channel symmetric int8 weights, MinMax activation ranges from
`deploy.calibration_images` training images. Measured on the demo model (EfficientNet-Lite0 at
112 px, digits, AMD EPYC with AVX-512 VNNI; `benchmarks/deploy.py`):

- **Signed int8 activations (S8S8), onnxruntime's first suggestion, ran barely faster than fp32
  here** (1.1x at batch 1; 0.8x with every convolution quantised): its x86 kernels are built for
  uint8 activations. uint8 activations x int8 weights (U8S8) ran about 2.3x fp32, and with VNNI
  their 32-bit sums do not saturate.
- **The loss was not the kernels.** The same QDQ graph evaluated in float (graph optimisation off,
  no integer kernels) lost as much as the fused kernels (about 5 points on the test split with every
  convolution quantised), uint8 and int8 activations lost the same, and 8-bit weights alone,
  activations left in float, lost 3.3. qdq_loss_debug shows no single lossy layer: the
  signal-to-quantisation-noise ratio falls block by block, from 21 dB after the first block to
  12 dB at the pooled features.
- **The cause is the rounding of the weights acting as a bias.** These images are 8x8 scans
  magnified 14 times: nearly every 3x3 window a filter sees is flat, and on a flat window a
  filter's output is (the sum of its weights) x (the pixel). The rounding errors of a channel's
  weights then add up to the same offset on every image instead of averaging out: a systematic
  shift of that channel, which the layers after it carry and amplify. Correcting each
  convolution's bias by the shift its rounded weights cause on the calibration images' mean
  input (bias correction, Nagel et al. 2019, "Data-Free Quantization Through Weight
  Equalization and Bias Correction", section 4.2, with empirical means) took weight-only
  quantisation from -3.3 to -0.4 points, and every convolution quantised from -5.4 (-4.3 on the
  traced graph) to -1.1.
- **The stem and the first block stay fp32** (`INT8_FLOAT_LEADING_CONVS`): quantising them too cost
  1.1 points, and made the model slower, not faster (1.9x fp32 at batch 1 against 2.3x: a
  3-channel input gives the integer GEMM too little to do). The head (the last Gemm) stays fp32
  too: 10 x 1280 weights, nothing to win, and the logits keep their resolution.

The image's normalisation is then read as one DequantizeLinear where it is exact (`fold_input_normalisation`:
EfficientNet-Lite's (x - 127) / 128 on the uint8 pixels), 3-7% off INT8's time at batch 1 on two threads.

Weights use all 8 bits where the building CPU has VNNI (AVX-512 VNNI, AVX-VNNI or AMX) and 7
(-63..63, with `reduce_range`) where it does not, because there onnxruntime's kernels add pairs of
uint8 x int8 products in saturating 16-bit sums (VPMADDUBSW) and 2 x 255 x 127 does not fit. The file
records which, and the CPU it was built on (`graft.int8_*` metadata). The weights' scales are computed
here (`weight_scales`) and given to the quantiser, so the bias correction and the file agree on them.

An 8-bit file loses accuracy on a CPU without VNNI (the demo model, built for VNNI and run on an AVX2-only
AMD EPYC on 2026-12-07: 86.2% against fp32's 90.9%; the 7-bit file built there: 90.6%). Where the serving
CPUs may lack VNNI, `deploy.int8_weight_bits: 7` builds the portable file on any machine; and
`OnnxClassifier.load(..., variant="auto")` does not pick an 8-bit INT8 file on such a CPU
(`components.runtime.cpu.int8_loss_here`).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from components.core.errors import VariantError
from components.runtime.cpu import cpu_facts

log = logging.getLogger(__name__)


INT8_OP_TYPES = ("Conv", "Gemm", "MatMul", "Add", "Clip", "Relu")
"""Operators quantised to INT8; preprocessing (Cast, Div, Sub) and the softmax stay fp32,
so the uint8 input is read exactly and the output stays a probability vector."""


INT8_FLOAT_LEADING_CONVS = 3
"""Convolutions kept fp32 from the input on: EfficientNet-Lite's stem and its first block
(depthwise and projection). See the module docstring for the measurements."""


INT8_HEAD_OP_TYPES = ("Gemm", "MatMul")
"""The last of these is the head; it stays fp32."""


CALIBRATION_BATCH = 8


class _Calibration:
    """Feeds calibration images to onnxruntime's quantiser in batches of equal size."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int) -> None:
        self._batches = iter(list(_batches(images, batch_size)))
        self._input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input_name: batch}

    def rewind(self) -> None:  # part of onnxruntime's CalibrationDataReader protocol; read once here
        return None


def _batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Equal batches (the quantiser's calibration stacks them); all images when there are fewer than one batch."""
    usable = len(images) - len(images) % batch_size if len(images) >= batch_size else len(images)
    for start in range(0, usable, batch_size):
        yield images[start : start + batch_size]


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(previous, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(previous)


def float_nodes(model) -> list[str]:  # noqa: ANN001 - onnx.ModelProto
    """Nodes `to_int8` leaves in fp32: the first `INT8_FLOAT_LEADING_CONVS` convolutions and the head."""
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"][:INT8_FLOAT_LEADING_CONVS]
    head = [node.name for node in model.graph.node if node.op_type in INT8_HEAD_OP_TYPES][-1:]
    return convs + head


def _attribute(node, name: str, default):  # noqa: ANN001, ANN202 - onnx.NodeProto, attribute value
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


class _PatchMeans:
    """Mean over images and output positions of the input value under each kernel tap: C x kh x kw.

    For a convolution y = W * x + b, the mean of y over positions is sum(W * these means) + b, so a
    change dW of the weights shifts each output channel's mean by sum(dW * these means) (borders included).
    """

    def __init__(self, node, kernel: tuple[int, int]) -> None:  # noqa: ANN001 - onnx.NodeProto
        self.kernel = kernel
        self.strides = tuple(_attribute(node, "strides", [1, 1]))
        self.dilations = tuple(_attribute(node, "dilations", [1, 1]))
        self.pads = list(_attribute(node, "pads", [0, 0, 0, 0]))
        auto_pad = _attribute(node, "auto_pad", b"NOTSET")
        self.auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        self.total: np.ndarray | None = None
        self.count = 0

    def _padding(self, height: int, width: int) -> list[int]:
        if self.auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
            return self.pads
        pads = []
        for size, k, s, d in zip((height, width), self.kernel, self.strides, self.dilations, strict=True):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads.append((large, small) if self.auto_pad == "SAME_LOWER" else (small, large))
        return [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]

    def add(self, x: np.ndarray) -> None:
        n, c, h, w = x.shape
        top, left, bottom, right = self._padding(h, w)
        # every tap sums the same images: add them up once, then each tap reads one C x H x W plane
        padded = np.pad(x.sum(axis=0, dtype=np.float64), ((0, 0), (top, bottom), (left, right)))
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        out_h = (h + top + bottom - (kh - 1) * dh - 1) // sh + 1
        out_w = (w + left + right - (kw - 1) * dw - 1) // sw + 1
        sums = np.empty((c, kh, kw), dtype=np.float64)
        for i in range(kh):
            for j in range(kw):
                window = padded[:, i * dh : i * dh + sh * (out_h - 1) + 1 : sh, j * dw : j * dw + sw * (out_w - 1) + 1 : sw]
                sums[:, i, j] = window.sum(axis=(1, 2))
        self.total = sums if self.total is None else self.total + sums
        self.count += n * out_h * out_w

    def means(self) -> np.ndarray:
        return self.total / max(self.count, 1)


def weight_scales(weight: np.ndarray, bits: int) -> np.ndarray:
    """Per-output-channel (axis 0) symmetric scales of `weight`, float32: the channel's largest |value| over
    2^(bits-1) - 1, computed as onnxruntime's quantiser computes them (in float64, 1 for an all-zero channel).

    `to_int8` hands these to the quantiser (`TensorQuantOverrides`), so the weights it writes are the
    ones the bias correction assumed (`rounded_like_onnxruntime`), 7-bit included: left to itself, the
    quantiser's reduced range is -64..64, not -63..63.
    """
    qmax = 2 ** (bits - 1) - 1
    flat = weight.reshape(len(weight), -1)
    absmax = np.maximum(-np.minimum(flat.min(axis=1), 0), np.maximum(flat.max(axis=1), 0)).astype(np.float64)
    scale = absmax / qmax
    return np.where(scale < np.finfo(np.float32).tiny, 1.0, scale).astype(np.float32)


def rounded_like_onnxruntime(weight: np.ndarray, bits: int) -> np.ndarray:
    """`weight` after `to_int8`'s per-channel symmetric quantisation (`weight_scales`), in float64.

    Rounded as onnxruntime rounds: the float32 weight over the float32 scale, to the nearest even.
    """
    scale = weight_scales(weight, bits).reshape(-1, *[1] * (weight.ndim - 1))
    return np.round(weight.astype(np.float32) / scale).astype(np.float64) * scale


def _weight_overrides(model, skip: Sequence[str], bits: int) -> dict[str, list[dict]]:  # noqa: ANN001 - onnx.ModelProto
    """onnxruntime's `TensorQuantOverrides` giving each quantised convolution's weights their `weight_scales`.

    With the scales given, the quantiser also skips computing them in a Python loop per channel
    (about 0.5 s of a 2.3 s INT8 build for EfficientNet-Lite0; the same scales, so the same int8 weights).
    """
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    overrides = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.name not in skip and node.input[1] in initializers:
            scales = weight_scales(numpy_helper.to_array(initializers[node.input[1]]), bits)
            channels = [{"scale": scale, "zero_point": np.int8(0)} for scale in scales]
            channels[0]["axis"] = 0
            overrides[node.input[1]] = channels
    return overrides


def correct_weight_bias(model, input_name: str, images: np.ndarray, skip: Sequence[str], bits: int):  # noqa: ANN001, ANN201 - onnx.ModelProto
    """Shift each convolution's bias by minus the mean shift its rounded weights cause (see the module docstring).

    Every Conv not in `skip` whose weights are an initializer is corrected; the means come from one
    fp32 pass over `images`. Returns a corrected copy.
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    initializers = {init.name: init for init in model.graph.initializer}
    convs = [node for node in model.graph.node if node.op_type == "Conv" and node.name not in skip and node.input[1] in initializers]
    if not convs:
        return model
    means = {node.name: _PatchMeans(node, tuple(numpy_helper.to_array(initializers[node.input[1]]).shape[2:])) for node in convs}
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    del probe.graph.output[:]
    inputs = list(dict.fromkeys(node.input[0] for node in convs))
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in inputs)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors exactly as named
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for batch in _batches(images, CALIBRATION_BATCH):
        values = dict(zip(inputs, session.run(inputs, {input_name: batch}), strict=True))
        for node in convs:
            means[node.name].add(values[node.input[0]])
    for node in convs:
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
        delta = rounded_like_onnxruntime(weight, bits) - weight
        groups = int(_attribute(node, "group", 1))
        per_group_in, per_group_out = weight.shape[1], weight.shape[0] // groups
        patch = means[node.name].means()
        shift = np.array([
            (delta[o] * patch[(o // per_group_out) * per_group_in : (o // per_group_out + 1) * per_group_in]).sum()
            for o in range(len(weight))
        ])
        if len(node.input) > 2 and node.input[2] in initializers:
            bias = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64)
            initializers[node.input[2]].CopyFrom(numpy_helper.from_array((bias - shift).astype(np.float32), node.input[2]))
        elif len(node.input) == 2:
            name = f"{node.name}_graft_bias"
            model.graph.initializer.append(numpy_helper.from_array((-shift).astype(np.float32), name))
            node.input.append(name)
    return model


def weight_bits(setting: int | str | None = None) -> int:
    """The INT8 weights' bits for `deploy.int8_weight_bits`: 7 or 8 as set, else (`auto`, None) 8 where this CPU has VNNI.

    Raises:
        VariantError: 8 on a CPU without VNNI, which could not judge the file (its kernels saturate: see the module
            docstring), or a value other than auto, 7 and 8.
    """
    vnni = cpu_facts().vnni
    if setting in (None, "auto"):
        return 8 if vnni else 7
    if setting == 7:
        return 7
    if setting == 8 and vnni:
        return 8
    if setting == 8:
        raise VariantError(
            f"deploy.int8_weight_bits is 8, but this CPU ({cpu_facts().describe()}) has no VNNI, so the INT8 model could not "
            "be judged here (its integer kernels saturate); build it on a CPU with VNNI, or set deploy.int8_weight_bits: auto or 7"
        )
    raise VariantError(f"deploy.int8_weight_bits is {setting!r}; set auto, 7 (any x86 CPU) or 8 (CPUs with VNNI)")


def _constant(model, name: str) -> np.ndarray | None:  # noqa: ANN001 - onnx.ModelProto
    from onnx import numpy_helper

    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def fold_input_normalisation(model) -> str | None:  # noqa: ANN001 - onnx.ModelProto, changed in place
    """The export's normalisation of the uint8 image (Cast to float, / 255, - mean, / std) as one DequantizeLinear,
    where 255 x mean is a whole number on every channel (EfficientNet-Lite's (x - 127) / 128): the image is then read
    as the quantised tensor it is, in one pass over it instead of four. Returns what it folded, or None (another chain,
    or a mean that is no whole number of pixel levels: nothing changes).

    The result differs from the float chain by float rounding only (about 1e-7 of the input's range). Measured on the
    demo model (Lite0 at 112 px, AMD EPYC with VNNI, 2026-12-07): INT8 at batch 1 on two threads 3-7% sooner, pairs
    of runs taken in turn; the same fold on the fp32 file gained 0.5-3%, within the host's noise, so the fp32 export
    keeps the float chain (a lone DequantizeLinear on its input would read as a quantised network to TensorRT)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    if len(graph.input) != 1 or graph.input[0].type.tensor_type.elem_type != TensorProto.UINT8:
        return None
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {value.name for value in graph.output}

    def only_consumer(name: str):  # noqa: ANN202 - onnx.NodeProto or None
        found = consumers.get(name, [])
        return found[0] if len(found) == 1 and name not in outputs else None

    first = only_consumer(graph.input[0].name)
    if first is not None and first.op_type == "Transpose":
        first = only_consumer(first.output[0])
    chain = [first]
    for _ in range(3):
        chain.append(only_consumer(chain[-1].output[0]) if chain[-1] is not None else None)
    if [getattr(node, "op_type", None) for node in chain] != ["Cast", "Div", "Sub", "Div"]:
        return None
    cast, by_std = chain[0], chain[-1]
    if _attribute(cast, "to", None) != TensorProto.FLOAT or any(node.input[0] != before.output[0] for before, node in zip(chain, chain[1:], strict=False)):
        return None
    divisor, mean, std = (_constant(model, node.input[1]) for node in chain[1:])
    if divisor is None or mean is None or std is None or divisor.size != 1 or mean.size != std.size or mean.size not in (1, 3):
        return None
    levels = mean.astype(np.float64).ravel() * float(divisor.ravel()[0])
    zero_point = np.round(levels)
    if np.abs(levels - zero_point).max() > 1e-3 or zero_point.min() < 0 or zero_point.max() > 255:
        return None
    spread = std.astype(np.float64).ravel() * float(divisor.ravel()[0])  # std in pixel levels: 128 for EfficientNet-Lite
    spread = np.where(np.abs(spread - np.round(spread)) < 1e-3, np.round(spread), spread)  # 128.0000076 (float32's 0.50196) is 128
    scale = (1.0 / spread).astype(np.float32)
    zero_point = zero_point.astype(np.uint8)
    per_tensor = bool(np.all(scale == scale[0]) and np.all(zero_point == zero_point[0]))
    if not per_tensor and (mean.shape != std.shape or mean.ndim != 4 or mean.shape[1] != 3):
        return None  # a per-channel fold needs both constants on the channel axis of N x C x H x W
    prefix = "graft_input_normalisation"
    graph.initializer.extend([
        numpy_helper.from_array(scale[:1].reshape(()) if per_tensor else scale, f"{prefix}_scale"),
        numpy_helper.from_array(zero_point[:1].reshape(()) if per_tensor else zero_point, f"{prefix}_zero_point"),
    ])
    fold = helper.make_node("DequantizeLinear", [cast.input[0], f"{prefix}_scale", f"{prefix}_zero_point"], [by_std.output[0]],
                            name=f"/{prefix}", **({} if per_tensor else {"axis": 1}))
    position = list(graph.node).index(cast)
    for node in chain:
        graph.node.remove(node)
    graph.node.insert(position, fold)
    # the chain's constants (255, mean, std) now feed nothing: onnxruntime would warn of each at every load
    constants = {name for node in chain for name in node.input[1:]}
    used = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    for initializer in [i for i in graph.initializer if i.name in constants and i.name not in used]:
        graph.initializer.remove(initializer)
    for node in [n for n in graph.node if n.op_type == "Constant" and set(n.output) <= constants - used]:
        graph.node.remove(node)
    levels_text = f"{int(zero_point[0])}" if per_tensor else ", ".join(str(int(z)) for z in zero_point)
    scale_text = f"{float(scale[0]):g}" if per_tensor else ", ".join(f"{float(s):g}" for s in scale)
    return f"DequantizeLinear(image, scale {scale_text}, zero point {levels_text})"


def to_int8(source: Path, target: Path, calibration_images: np.ndarray, bits_setting: int | str | None = None) -> dict[str, str]:
    """Static INT8 quantisation of `source` into `target` (see the module docstring for the recipe).

    Args:
        source: The fp32 model.
        target: Where the INT8 model goes.
        calibration_images: uint8 images that calibrate the activation ranges.
        bits_setting: `deploy.int8_weight_bits` (`weight_bits`): auto (None), 7 or 8.

    Returns:
        The `graft.int8_*` metadata to stamp on the file: scheme, weight bits, fp32 nodes, build CPU.

    Raises:
        VariantError: no calibration images; `bits_setting` 8 on a CPU without VNNI.
    """
    return quantise(source, target, calibration_images, weight_bits(bits_setting))


def quantise(source: Path, target: Path, calibration_images: np.ndarray, bits: int) -> dict[str, str]:
    """`to_int8` with `bits`-bit weights whatever this CPU is (the deploy benchmark runs an 8-bit file on a CPU without
    VNNI with it, to show what that costs)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration_images) == 0:
        raise VariantError("no calibration images for INT8; set deploy.calibration_images >= 1 or drop int8 from deploy.variants")
    cpu = cpu_facts()
    input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="graft-int8-") as tmp:
        prepared, corrected = Path(tmp) / "prepared.onnx", Path(tmp) / "corrected.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        kept_float = float_nodes(model)
        onnx.save(correct_weight_bias(model, input_name, calibration_images, kept_float, bits), str(corrected))
        overrides = _weight_overrides(model, kept_float, bits)
        with _quiet_root_logger():  # the quantiser logs a line per rescaled weight on the root logger
            quantize_static(
                str(corrected),
                str(target),
                _Calibration(input_name, calibration_images, CALIBRATION_BATCH),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                reduce_range=bits == 7,
                calibrate_method=CalibrationMethod.MinMax,
                op_types_to_quantize=list(INT8_OP_TYPES),
                nodes_to_exclude=kept_float,
                extra_options={"TensorQuantOverrides": overrides},
            )
    quantised = onnx.load(str(target))
    folded = fold_input_normalisation(quantised)
    if folded:
        onnx.save(quantised, str(target))
    return {
        "graft.calibration_images": str(len(calibration_images)),
        "graft.int8_scheme": f"QDQ, uint8 activations, per-channel {bits}-bit int8 weights, bias-corrected, MinMax ranges",
        "graft.int8_weight_bits": str(bits),
        "graft.int8_float_nodes": ",".join(kept_float),
        "graft.int8_built_on": cpu.describe(),
        "graft.int8_exact_on": "CPUs with VNNI (avx512_vnni, avx_vnni or amx_int8)" if bits == 8 else "any x86-64 CPU",
        "graft.int8_input": folded or "the export's float normalisation (Cast, Div, Sub, Div)",
    }
