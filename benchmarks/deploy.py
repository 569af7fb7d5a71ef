"""Deploy benchmark: the demo model in PyTorch eager and onnxruntime (fp32, optimised, fp16, INT8) on this CPU.

    .venv/bin/python benchmarks/deploy.py [--backbone efficientnet_lite0] [--runs 200] [--rounds 3] [--force]

Trains the head on the demo digits (params.yaml: 112 px, feature extraction), exports and
parity-checks it, builds the variants exactly as the deploy stage does (each judged on the test
split and, for the CPU variants, timed against fp32), then times every engine: latency (p50/p99)
at batch 1 and throughput at batch 32, in `--rounds` rounds (each engine once per round, so all
see the same load; figures are the medians of the rounds), with onnxruntime's and torch's default
threads. Beside each: achieved GFLOP/s (the model's multiply-adds x 2 x images/s) against what this
CPU reaches on a large matrix product, and each variant's test-accuracy change. Then INT8 against fp32
in back-to-back pairs (`paired_ratios`), on onnxruntime's default threads and on one: the INT8 goal is
judged on the median of the pairs' ratios, which holds while the shared host's speed swings.

It also shows where INT8's loss came from (`components.deploy.int8`): the same graph quantised
without bias correction, with the weights alone quantised, with signed int8 activations (S8S8),
and with every convolution quantised. Accuracy figures do not depend on the load and are always
written; timings are written only when the machine was quiet before and during the run
(`benchmarks/machine.py`), unless --force (then they are marked as taken on a busy machine).
GPU rows (CUDA and TensorRT, fp32 and fp16) are measured where an NVIDIA GPU is present, and
listed as not measured otherwise. Writes benchmarks/results/deploy.{json,md}; with --image-size other than
params.yaml's, deploy_<size>px.{json,md}.

    .venv/bin/python benchmarks/deploy.py --thread-gains [--force]

times only what onnxruntime's second thread gives an INT8 GEMM and an fp32 GEMM of the model's pointwise
convolutions' shapes, by map size (`thread_gains`), and writes benchmarks/results/deploy_threads.{json,md}.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from benchmarks.machine import Verdict, Watch, peak_gflops, state  # noqa: E402
from components.choose.latency import time_calls  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def macs_per_image(path: Path) -> int:
    """Multiply-adds of one image through an ONNX model (Conv, Gemm, MatMul), from its inferred shapes."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*model.graph.value_info, *model.graph.output]}
    weights = {init.name: numpy_helper.to_array(init).shape for init in model.graph.initializer}
    macs = 0
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[1] in weights:
            out = shapes[node.output[0]]
            macs += int(np.prod(out)) * int(np.prod(weights[node.input[1]][1:]))
        elif node.op_type in ("Gemm", "MatMul") and node.input[1] in weights:
            macs += int(np.prod(weights[node.input[1]]))
    return macs


def _times(call, x: np.ndarray, runs: int) -> list[float]:  # noqa: ANN001 - any callable on a batch
    """Seconds of each timed call, after a warm-up long enough for the previous engine's threads to go quiet."""
    return time_calls(call, x, runs, warmup=max(3, runs // 10))


def time_engines(engines: dict[str, object], one: np.ndarray, many: np.ndarray, runs: int, rounds: int, verdict: Verdict) -> dict[str, dict]:
    """Each engine at batch 1 (`runs` calls) and batch 32 (`runs // 10` calls), once per round, rounds interleaved.

    `engines` maps a name to a factory of the callable: each engine is opened for its turn and closed after it, so
    one onnxruntime session is alive at a time (idle sessions' thread pools spinning beside the timed one read
    several times slow)."""
    per_round: dict[str, list[tuple[list[float], list[float]]]] = {name: [] for name in engines}
    with Watch() as watch:
        for _ in range(rounds):
            for name, make in engines.items():
                call = make()
                per_round[name].append((_times(call, one, runs), _times(call, many, max(3, runs // 10))))
                del call
    verdict.saw("engines", watch)
    out = {}
    for name, measured in per_round.items():
        p50 = statistics.median(float(np.percentile(b1, 50)) for b1, _ in measured)
        p99 = statistics.median(float(np.percentile(b1, 99)) for b1, _ in measured)
        batch = statistics.median(statistics.median(b32) for _, b32 in measured)
        out[name] = {
            "p50_ms_batch1": round(p50 * 1000, 3), "p99_ms_batch1": round(p99 * 1000, 3),
            "images_per_s_batch32": round(len(many) / batch, 1),
            "rounds_p50_ms_batch1": [round(float(np.percentile(b1, 50)) * 1000, 3) for b1, _ in measured],
        }
    out["_others_cores"] = watch.others_cores
    return out


PAIRS = 7
"""fp32/INT8 pairs per thread count in `paired_ratios`."""


def _session_call(path: Path, threads: int):  # noqa: ANN202 - a callable on a uint8 batch
    """A CPU session on `path` (on a GPU machine too: the pairs compare the CPU variants) with `threads` (0: onnxruntime's default)."""
    from components.runtime.providers import open_session

    session = open_session(path, threads, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})


def paired_ratios(fp32_path: Path, int8_path: Path, one: np.ndarray, many: np.ndarray, runs: int, verdict: Verdict) -> dict[str, dict]:
    """INT8 against fp32 in `PAIRS` back-to-back pairs per thread count (onnxruntime's default, then one), each pair's
    ratio taken within the pair, the two alternating which goes first.

    The host shares its cores with other machines, which no load average shows: the same fp32 session at batch 1
    on two threads read 1.4 ms and 2.3 ms a minute apart (2026-12-07, AMD host), since each of the graph's
    parallel steps waits for the slower thread. Timed seconds apart, fp32 and INT8 see the same host, so the
    median of the pairs' ratios (with their range) holds where a ratio of two engines timed minutes apart does
    not. One session is alive at a time."""
    out: dict[str, dict] = {}
    with Watch() as watch:
        for threads in (0, 1):
            batch1, batch32 = [], []
            for pair in range(PAIRS):
                order = ("fp32", "int8") if pair % 2 == 0 else ("int8", "fp32")
                measured = {}
                for name in order:
                    call = _session_call(fp32_path if name == "fp32" else int8_path, threads)
                    b1 = _times(call, one, runs)
                    b32 = _times(call, many, max(3, runs // 10))
                    measured[name] = (statistics.median(b1), statistics.median(b32))
                    del call
                batch1.append(measured["fp32"][0] / measured["int8"][0])
                batch32.append(measured["fp32"][1] / measured["int8"][1])
            out["default threads" if threads == 0 else "1 thread"] = {
                f"batch_{size}": {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2),
                                  "pairs": [round(v, 2) for v in values]}
                for size, values in ((1, batch1), (32, batch32))
            }
    verdict.saw("pairs", watch)
    return out


def diagnose_int8(fp32_path: Path, calibration: np.ndarray, images: np.ndarray, labels: np.ndarray, work: Path, verdict: Verdict) -> list[dict]:
    """Where INT8's accuracy goes: the recipe against the same graph quantised other ways (accuracy on the test split;
    speed at batch 1 against fp32, one onnxruntime thread, in back-to-back pairs)."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from components.deploy.int8 import (
        CALIBRATION_BATCH,
        INT8_OP_TYPES,
        _Calibration,
        correct_weight_bias,
        float_nodes,
        quantise,
        rounded_like_onnxruntime,
        to_int8,
    )
    from components.deploy.variants import time_against_fp32
    from components.runtime.cpu import cpu_facts
    from components.runtime.model import OnnxClassifier

    prepared = work / "prepared.onnx"
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    model = onnx.load(str(prepared))
    head = [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")][-1:]
    reference = OnnxClassifier(fp32_path, ["CPUExecutionProvider"]).predict_proba(images)

    def quantised(name: str, source_model, activations, exclude) -> Path:  # noqa: ANN001
        source, target = work / f"{name}.src.onnx", work / f"{name}.onnx"
        onnx.save(source_model, str(source))
        quantize_static(str(source), str(target), _Calibration("images", calibration, CALIBRATION_BATCH), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=activations, weight_type=QuantType.QInt8, reduce_range=False,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=list(INT8_OP_TYPES), nodes_to_exclude=exclude)
        meta = onnx.load(str(fp32_path)).metadata_props
        out = onnx.load(str(target))
        del out.metadata_props[:]
        out.metadata_props.extend(meta)
        onnx.save(out, str(target))
        return target

    def weights_only(bias_corrected: bool) -> Path:
        source = correct_weight_bias(model, "images", calibration, [], 8) if bias_corrected else onnx.ModelProto.FromString(model.SerializeToString())
        convs = {n.input[1] for n in source.graph.node if n.op_type == "Conv"}
        for init in source.graph.initializer:
            if init.name in convs:
                init.CopyFrom(numpy_helper.from_array(rounded_like_onnxruntime(numpy_helper.to_array(init), 8).astype(np.float32), init.name))
        target = work / f"weights-only-{bias_corrected}.onnx"
        proto = onnx.load(str(fp32_path))  # keep Graft's metadata on the file
        del source.metadata_props[:]
        source.metadata_props.extend(proto.metadata_props)
        onnx.save(source, str(target))
        return target

    def recipe_file(name: str, bits: int | None) -> Path:
        path = work / f"{name}.onnx"
        to_int8(fp32_path, path, calibration) if bits is None else quantise(fp32_path, path, calibration, bits)
        proto = onnx.load(str(path))
        proto.metadata_props.extend(onnx.load(str(fp32_path)).metadata_props)
        onnx.save(proto, str(path))
        return path

    bits = 8 if cpu_facts().vnni else 7
    cases = [
        (f"Graft's recipe: U8S8, {bits}-bit weights, bias-corrected, stem and first block fp32", recipe_file("recipe", None), True),
        *([] if cpu_facts().vnni else [("the recipe with 8-bit weights, as a CPU with VNNI builds it (this CPU has none)", recipe_file("recipe-8", 8), True)]),
        ("the same without bias correction", quantised("no-correction", model, QuantType.QUInt8, float_nodes(model)), True),
        ("every convolution int8, bias-corrected", quantised("all-convs", correct_weight_bias(model, "images", calibration, [], 8), QuantType.QUInt8, head), True),
        ("every convolution int8, no bias correction", quantised("all-plain", model, QuantType.QUInt8, head), True),
        ("S8S8 (int8 activations), as the recipe otherwise", quantised("s8s8", correct_weight_bias(model, "images", calibration, float_nodes(model), 8),
                                                                      QuantType.QInt8, float_nodes(model)), True),
        ("8-bit weights only, activations fp32, no bias correction", weights_only(False), False),
        ("8-bit weights only, activations fp32, bias-corrected", weights_only(True), False),
    ]
    rows = []
    for label, path, timed in cases:
        probs = OnnxClassifier(path, ["CPUExecutionProvider"]).predict_proba(images)
        row = {
            "case": label,
            "accuracy_change_points": round(float(((probs.argmax(1) == labels).mean() - (reference.argmax(1) == labels).mean()) * 100), 2),
            "top1_agreement": round(float((probs.argmax(1) == reference.argmax(1)).mean()), 4),
        }
        if timed:
            with Watch() as watch:
                speed = time_against_fp32(fp32_path, path, images, ["CPUExecutionProvider"])
            verdict.saw(f"int8 case: {label}", watch)
            row.update(speedup_batch1=round(speed.speedup_batch1, 2), speedup_batch32=round(speed.speedup_batch, 2))
        rows.append(row)
        print(row, flush=True)
    return rows


GAIN_PIXELS = {"4 x 4": 16, "7 x 7": 49, "14 x 14": 196, "28 x 28": 784}
"""Output pixels at batch 1 of the maps EfficientNet-Lite0 writes at 112 px: the rows of each pointwise convolution's GEMM."""

GAIN_CHANNELS = (192, 1152, 192)
"""The 4 x 4 blocks' pointwise convolutions (expand 192 -> 1152, project back), the same at every map size so only the rows change."""

GAIN_CHAIN = 5
"""Expand-project pairs per probe model: ten GEMMs per call."""


GAIN_GEMMS = GAIN_CHAIN * (len(GAIN_CHANNELS) - 1)
"""GEMMs per probe call: the per-GEMM times are a call's time over this."""


def gemm_chain(rows: int, int8: bool) -> bytes:
    """An ONNX model of `GAIN_GEMMS` GEMMs through `GAIN_CHANNELS` on a `rows`-row input: QLinearMatMul (uint8
    activations, int8 weights, onnxruntime's INT8 kernels) or MatMul (fp32), with random weights."""
    from onnx import TensorProto, helper, numpy_helper

    channels = GAIN_CHANNELS
    rng = np.random.default_rng(0)
    nodes, initializers, x = [], [], "x"
    for repeat in range(GAIN_CHAIN):
        for step, (k, n) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
            p = f"gemm{repeat}_{step}_"
            if int8:
                initializers += [
                    numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), p + "w"),
                    numpy_helper.from_array(np.array(0.05, np.float32), p + "scale"), numpy_helper.from_array(np.array(128, np.uint8), p + "zero"),
                    numpy_helper.from_array(np.array(0.01, np.float32), p + "w_scale"), numpy_helper.from_array(np.array(0, np.int8), p + "w_zero"),
                ]
                nodes.append(helper.make_node("QLinearMatMul", [x, p + "scale", p + "zero", p + "w", p + "w_scale", p + "w_zero", p + "scale", p + "zero"], [p + "y"]))
            else:
                initializers.append(numpy_helper.from_array((rng.standard_normal((k, n)) * 0.05).astype(np.float32), p + "w"))
                nodes.append(helper.make_node("MatMul", [x, p + "w"], [p + "y"]))
            x = p + "y"
    kind = TensorProto.UINT8 if int8 else TensorProto.FLOAT
    graph = helper.make_graph(nodes, "gemm_chain", [helper.make_tensor_value_info("x", kind, [rows, channels[0]])],
                              [helper.make_tensor_value_info(x, kind, [rows, channels[-1]])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def _gemm_call(model: bytes, threads: int):  # noqa: ANN202 - a callable on the chain's input
    import onnxruntime as ort

    from components.runtime.providers import session_options

    session = ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {"x": batch})


def thread_gains(verdict: Verdict, pixels: dict[str, int] = GAIN_PIXELS, calls: int = 300, rounds: int = 3) -> list[dict]:
    """What onnxruntime's second thread gives one INT8 GEMM and one fp32 GEMM of the shapes of the demo model's pointwise
    convolutions, by map size: microseconds per GEMM on one thread and on two, and the gain. Each round times one
    thread, then two, one session alive at a time; the figures are the medians of the rounds.

    The INT8 convolutions of the 4 x 4 and 7 x 7 maps gain little from a second thread (benchmarks/README.md, INT8 at batch 1). These GEMMs split
    along the output channels too (MLAS's QGEMM partitions both ways), so they show whether splitting the work another way
    would help, or whether small INT8 GEMMs simply finish too soon for a second thread to pay."""
    rng = np.random.default_rng(0)
    out = []
    with Watch() as watch:
        for name, rows in pixels.items():
            row: dict[str, object] = {"map": name, "gemm": f"{rows} x {GAIN_CHANNELS[0]} @ {GAIN_CHANNELS[0]} x {GAIN_CHANNELS[1]}, then back"}
            for int8 in (True, False):
                model = gemm_chain(rows, int8)
                x = rng.integers(0, 256, (rows, GAIN_CHANNELS[0]), dtype=np.uint8) if int8 else rng.standard_normal((rows, GAIN_CHANNELS[0])).astype(np.float32)
                per_op = {1: [], 2: []}
                for _ in range(rounds):
                    for threads in (1, 2):
                        call = _gemm_call(model, threads)
                        per_op[threads].append(statistics.median(time_calls(call, x, calls, warmup=20)) / GAIN_GEMMS)
                        del call  # one session alive at a time
                kind = "int8" if int8 else "fp32"
                one, two = statistics.median(per_op[1]), statistics.median(per_op[2])
                row[f"{kind}_us_1_thread"], row[f"{kind}_us_2_threads"] = round(one * 1e6, 1), round(two * 1e6, 1)
                row[f"{kind}_gain"] = round(one / two, 2)
                row[f"{kind}_gain_by_round"] = [round(a / b, 2) for a, b in zip(per_op[1], per_op[2], strict=True)]
            row["int8_vs_fp32_1_thread"] = round(row["fp32_us_1_thread"] / row["int8_us_1_thread"], 2)
            row["int8_vs_fp32_2_threads"] = round(row["fp32_us_2_threads"] / row["int8_us_2_threads"], 2)
            out.append(row)
    verdict.saw("thread gains", watch)
    return out


def thread_gains_markdown(result: dict) -> str:
    machine, cpu, verdict = result["machine"], result["machine"]["cpu"], result["verdict"]
    lines = [
        "# What a second thread gives INT8 and fp32 GEMMs of the demo model's shapes (onnxruntime, CPU)",
        "",
        f"Run {machine['at']} on {cpu['model']}, {cpu['cores']} cores ({' '.join(cpu['flags'])}); onnxruntime {machine['versions'].get('onnxruntime')}. "
        f"Load average (1, 5, 15 min) {machine['load_average_1_5_15']} at the end. Timings: "
        + ("written (the machine was quiet)." if verdict["quiet"] else f"NOT written: {verdict['reason']}" + (" (--force: written anyway, do not quote)" if result["run"]["forced"] else "") + "."),
        f"Each row: a chain of {GAIN_GEMMS} GEMMs (the 4 x 4 blocks' pointwise convolutions, "
        f"{GAIN_CHANNELS[0]} -> {GAIN_CHANNELS[1]} -> {GAIN_CHANNELS[0]} channels) with as many rows as the map has pixels at batch 1; "
        "INT8 is QLinearMatMul (uint8 x int8), fp32 MatMul. Microseconds per GEMM, medians of "
        f"{result['run']['rounds']} rounds of {result['run']['calls']} calls; each gain is the ratio of the medians, with the rounds' own ratios in brackets.",
        "",
        "| map (rows) | INT8 1 thread → 2 | gain (rounds) | fp32 1 thread → 2 | gain (rounds) | INT8 x fp32, 1 thread | 2 threads |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        rows = GAIN_PIXELS.get(row["map"], "?")
        if row.get("int8_us_1_thread") is None:
            lines.append(f"| {row['map']} ({rows}) | busy | | | | | |")
            continue
        spread = {kind: f"{min(row[f'{kind}_gain_by_round'])}-{max(row[f'{kind}_gain_by_round'])}" for kind in ("int8", "fp32")}
        lines.append(f"| {row['map']} ({rows}) | {row['int8_us_1_thread']} → {row['int8_us_2_threads']} µs | {row['int8_gain']}x ({spread['int8']}) | "
                     f"{row['fp32_us_1_thread']} → {row['fp32_us_2_threads']} µs | {row['fp32_gain']}x ({spread['fp32']}) | "
                     f"{row['int8_vs_fp32_1_thread']}x | {row['int8_vs_fp32_2_threads']}x |")
    return "\n".join(lines)


def run_thread_gains(force: bool, calls: int = 300, rounds: int = 3) -> int:
    """`--thread-gains`: only `thread_gains`, written to benchmarks/results/deploy_threads.{json,md}."""
    verdict = Verdict()
    if verdict.before:
        print(f"machine busy before starting: {verdict.before}; timings only with --force", flush=True)
    rows = thread_gains(verdict, calls=calls, rounds=rounds)
    result = {"machine": state(), "verdict": verdict.to_dict(), "rows": rows, "run": {"calls": calls, "rounds": rounds, "forced": force}}
    if not verdict.quiet and not force:
        result["rows"] = [{"map": row["map"], "gemm": row["gemm"]} for row in rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "deploy_threads.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "deploy_threads.md").write_text(thread_gains_markdown(result) + "\n")
    print(thread_gains_markdown(result))
    return 0 if verdict.quiet or force else 3


def results_stem(image_size: int | None, default_size: int | None, size: int) -> str:
    """The results files' name: `deploy` at params.yaml's data.image_size, `deploy_<size>px` at another (`--image-size`)."""
    return "deploy" if image_size == default_size else f"deploy_{size}px"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--runs", type=int, default=200, help="timed calls at batch 1 per round (batch 32: a tenth)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all engines (medians are reported)")
    parser.add_argument("--force", action="store_true", help="write timings even from a busy machine (marked as such)")
    parser.add_argument("--no-diagnosis", action="store_true", help="skip the INT8 breakdown")
    parser.add_argument("--image-size", type=int, default=None, help="pixels (default: params.yaml's data.image_size); another size "
                        "writes benchmarks/results/deploy_<size>px.{json,md} beside the default's")
    parser.add_argument("--thread-gains", action="store_true", help="only time what a second thread gives INT8 and fp32 GEMMs "
                        "of the model's shapes (benchmarks/results/deploy_threads.{json,md}; about a minute)")
    args = parser.parse_args()
    if args.thread_gains:
        return run_thread_gains(args.force, rounds=args.rounds)
    verdict = Verdict()
    if verdict.before:
        print(f"machine busy before starting: {verdict.before}; accuracy will be written, timings only with --force", flush=True)

    import onnxruntime as ort
    import torch

    from components.backbones.zoo import get_spec
    from components.choose.ranking import ChooseResult
    from components.core.config import load_params
    from components.data.folders import scan
    from components.data.images import load_batch
    from components.data.split import SplitSettings, stratified_sample
    from components.deploy.export import export_and_verify
    from components.deploy.variants import build_variants
    from components.runtime.model import OnnxClassifier
    from components.runtime.providers import has_nvidia_gpu
    from components.train.stage import fine_tune, load_classifier

    overrides = ["train.strategy=feature_extraction"] + ([f"data.image_size={args.image_size}"] if args.image_size else [])
    default_size = load_params(ROOT / "params.yaml", []).data.image_size
    params = load_params(ROOT / "params.yaml", overrides)
    size = params.data.image_size or get_spec(args.backbone).input_size
    stem = results_stem(params.data.image_size, default_size, size)
    split = scan(params.data.dir, SplitSettings.from_config(params.data))
    work = Path(tempfile.mkdtemp(prefix="graft-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # about 130 MB of models: gone when the benchmark ends
    print(f"training the {args.backbone} head at {size}px on {len(split.train)} images ...", flush=True)
    trained = fine_tune(params, split, ChooseResult(args.backbone, size, "logme", "benchmark", (), 0.0), work)
    model, _ = load_classifier(trained.checkpoint_path)
    spec = get_spec(trained.backbone)
    meta = {"classes": list(split.classes), "image_size": size, "mean": list(spec.mean), "std": list(spec.std), "backbone": trained.backbone, "data_md5": "benchmark"}
    exported = export_and_verify(model, work / "model.onnx", size, params.deploy.opset, meta, [s.path for s in split.val[:64]], params.deploy.parity_atol)
    test_images, labels = load_batch([s.path for s in split.test], size), np.array([s.label for s in split.test])
    calibration = load_batch([s.path for s in stratified_sample(split.train, params.deploy.calibration_images, params.data.seed)], size)
    print("building variants as the deploy stage does ...", flush=True)
    started = time.perf_counter()
    report = build_variants(exported.onnx_path, ("optimized", "fp16", "int8"), test_images, labels, calibration, params.deploy.max_variant_drop)
    variants_seconds = time.perf_counter() - started

    macs = macs_per_image(exported.onnx_path)
    rng = np.random.default_rng(0)
    one, many = test_images[:1], test_images[rng.choice(len(test_images), 32, replace=False)]
    cpu = ["CPUExecutionProvider"]
    engines: dict[str, object] = {}
    with torch.inference_mode():
        eager_acc = float((model(torch.from_numpy(test_images)).argmax(1).numpy() == labels).mean())
    engines["pytorch eager fp32"] = lambda: lambda x: model(torch.from_numpy(x))
    files = {"fp32": exported.onnx_path, **{v.name: v.path for v in report.variants}}
    for name, path in files.items():
        engines[f"onnxruntime {name}"] = lambda path=path: OnnxClassifier(path, cpu).predict_proba
    print("timing ...", flush=True)
    with torch.inference_mode():
        timings = time_engines(engines, one, many, args.runs, args.rounds, verdict)
    others = timings.pop("_others_cores")
    int8 = report.get("int8")
    paired = paired_ratios(exported.onnx_path, int8.path, one, many, args.runs // 2, verdict) if int8 and int8.path and int8.path.is_file() else None

    rows = []
    for engine, timing in timings.items():
        name = engine.split()[-1] if engine.startswith("onnxruntime") else "eager"
        variant = report.get(name)
        rows.append({
            "engine": engine, **timing,
            "gflops_batch32": round(2 * macs * timing["images_per_s_batch32"] / 1e9, 1),
            "accuracy": eager_acc if name == "eager" else (report.fp32_accuracy if name == "fp32" else variant.accuracy),
            "accuracy_change": 0.0 if name in ("eager", "fp32") else variant.accuracy_change,
            "published": None if name == "eager" else (True if name == "fp32" else variant.published),
            "deploy_verdict": None if variant is None else variant.reason,
            "size_mb": None if name == "eager" else round(files[name].stat().st_size / 1e6, 2),
        })
    fp32 = timings["onnxruntime fp32"]
    ratios = {
        "ort_fp32_vs_eager_batch1": round(timings["pytorch eager fp32"]["p50_ms_batch1"] / fp32["p50_ms_batch1"], 2),
        **{f"{name}_vs_fp32_batch1": round(fp32["p50_ms_batch1"] / timings[f"onnxruntime {name}"]["p50_ms_batch1"], 2) for name in files if name != "fp32"},
        **{f"{name}_vs_fp32_batch32": round(timings[f"onnxruntime {name}"]["images_per_s_batch32"] / fp32["images_per_s_batch32"], 2) for name in files if name != "fp32"},
    }
    gpu_rows = gpu_timings(exported.onnx_path, one, many, args.runs) if has_nvidia_gpu() and "CUDAExecutionProvider" in ort.get_available_providers() else [
        {"engine": f"onnxruntime {v} ({p})", "status": "not measured: no NVIDIA GPU on this machine"} for p in ("CUDA", "TensorRT") for v in ("fp32", "fp16")
    ]
    diagnosis = None if args.no_diagnosis else diagnose_int8(exported.onnx_path, calibration, test_images, labels, work, verdict)
    result = {
        "machine": state(), "peak": peak_gflops(), "verdict": verdict.to_dict(), "others_cores_while_timing": others,
        "model": {"backbone": trained.backbone, "image_size": size, "classes": len(split.classes), "test_images": len(labels),
                  "macs_per_image": macs, "parity_max_abs_diff": exported.max_abs_diff, "fp32_accuracy": report.fp32_accuracy},
        "max_variant_drop": params.deploy.max_variant_drop,
        "variants_seconds": round(variants_seconds, 1),
        "cpu": rows, "gpu": gpu_rows, "ratios": ratios, "int8_paired": paired,
        "goals": {
            # judged on the pairs at onnxruntime's default threads (`paired_ratios`: robust to the host's swings)
            "int8_2x_fp32_at_batch_1_and_32": bool(paired and all(paired["default threads"][f"batch_{size}"]["median"] >= 2 for size in (1, 32))),
            "int8_within_1_point": bool(int8 and -int8.accuracy_change <= 0.01 + 1e-9),
        },
        "int8_diagnosis": diagnosis,
        "variants": report.to_dict(),
        "run": {"runs": args.runs, "rounds": args.rounds, "forced": args.force},
    }
    if not verdict.quiet and not args.force:
        for row in result["cpu"]:
            for key in ("p50_ms_batch1", "p99_ms_batch1", "images_per_s_batch32", "gflops_batch32", "rounds_p50_ms_batch1"):
                row[key] = None
        result["ratios"] = {key: None for key in ratios}
        result["int8_paired"] = None
        result["goals"]["int8_2x_fp32_at_batch_1_and_32"] = None
        for row in diagnosis or []:
            row.pop("speedup_batch1", None), row.pop("speedup_batch32", None)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return 0 if verdict.quiet or args.force else 3


def gpu_timings(fp32_path: Path, one: np.ndarray, many: np.ndarray, runs: int) -> list[dict]:
    """CUDA and TensorRT, fp32 and fp16: latency, throughput, and the seconds to open a session (TensorRT:
    building its engines into an empty cache, then opening again from that cache)."""
    from components.runtime.model import OnnxClassifier
    from components.runtime.providers import TENSORRT_CACHE_ENV
    from components.runtime.variant_files import variant_path

    os.environ[TENSORRT_CACHE_ENV] = tempfile.mkdtemp(prefix="graft-bench-tensorrt-")  # empty: the first open builds
    atexit.register(shutil.rmtree, os.environ[TENSORRT_CACHE_ENV], ignore_errors=True)

    rows = []
    for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        for name in ("fp32", "fp16"):
            path = variant_path(fp32_path, name)
            if not path.is_file():
                path = path.parent / "rejected" / path.name
            try:
                opened: list[float] = []
                for _ in range(2 if provider == "TensorrtExecutionProvider" else 1):  # TensorRT: building its engines, then from its cache
                    started = time.perf_counter()
                    session = OnnxClassifier(path, [provider, "CPUExecutionProvider"])
                    session.predict_proba(many)  # the engine for batch 32 is built, or read, here too
                    opened.append(round(time.perf_counter() - started, 2))
                b1, b32 = _times(session.predict_proba, one, runs), _times(session.predict_proba, many, max(3, runs // 10))
                rows.append({"engine": f"onnxruntime {name} ({provider})", "provider_used": session.provider,
                             "p50_ms_batch1": round(float(np.percentile(b1, 50)) * 1000, 3),
                             "p99_ms_batch1": round(float(np.percentile(b1, 99)) * 1000, 3),
                             "images_per_s_batch32": round(len(many) / statistics.median(b32), 1),
                             "open_s": opened[0], **({"open_from_engine_cache_s": opened[1]} if len(opened) > 1 else {})})
            except Exception as exc:  # noqa: BLE001 - report, do not hide, a provider that fails
                rows.append({"engine": f"onnxruntime {name} ({provider})", "error": str(exc)[:300]})
    return rows


def _cell(value: object, unit: str = "") -> str:
    return "busy" if value is None else f"{value}{unit}"


def markdown(result: dict) -> str:
    model, machine, verdict = result["model"], result["machine"], result["verdict"]
    cpu = machine["cpu"]
    lines = [
        f"# Deploy benchmark: {model['backbone']} at {model['image_size']} px, {model['classes']} classes",
        "",
        f"Run {machine['at']} on {cpu['model']}, {cpu['cores']} cores ({' '.join(cpu['flags'])}); "
        f"{', '.join(f'{k} {v}' for k, v in machine['versions'].items())}; torch threads {machine['torch_threads']}. "
        f"Load average (1, 5, 15 min) {machine['load_average_1_5_15']} at the end; other processes "
        f"{result['others_cores_while_timing']} cores while timing. Timings: "
        + ("written (the machine was quiet)." if verdict["quiet"] else f"NOT written: {verdict['reason']}" + (" (--force: written anyway, do not quote)" if result["run"]["forced"] else "") + "."),
        f"This CPU on a large matrix product: {result['peak']['matmul_fp32_gflops']} GFLOP/s fp32, {result['peak']['matmul_bf16_gflops']} bf16. "
        f"The model: {model['macs_per_image'] / 1e6:.0f} M multiply-adds per image. Accuracy on {model['test_images']} test images; "
        f"fp32 ONNX {model['fp32_accuracy']:.4f}. Medians of {result['run']['rounds']} rounds, onnxruntime's and torch's default threads.",
        "",
        "| engine | p50 ms (batch 1) | p99 ms (batch 1) | images/s (batch 32) | GFLOP/s (batch 32) | accuracy | change vs fp32 | published | MB |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in result["cpu"]:
        published = "-" if row["published"] is None else ("yes" if row["published"] else "no")
        lines.append(
            f"| {row['engine']} | {_cell(row['p50_ms_batch1'])} | {_cell(row['p99_ms_batch1'])} | {_cell(row['images_per_s_batch32'])} | "
            f"{_cell(row['gflops_batch32'])} | {row['accuracy']:.4f} | {row['accuracy_change'] * 100:+.1f} pts | {published} | {row['size_mb'] or '-'} |"
        )
    for row in result["gpu"]:
        if "p50_ms_batch1" in row:
            lines.append(f"| {row['engine']} | {row['p50_ms_batch1']} | {row['p99_ms_batch1']} | {row['images_per_s_batch32']} | | - | - | - | - |")
        else:
            lines.append(f"| {row['engine']} | {row.get('status') or row.get('error')} | | | | | | | |")
    ratios = result["ratios"]
    lines += [
        "",
        f"Ratios of the rounds' medians (they swing with the shared host; the pairs below hold better): onnxruntime fp32 {_cell(ratios.get('ort_fp32_vs_eager_batch1'), 'x')} eager at batch 1; "
        f"INT8 {_cell(ratios.get('int8_vs_fp32_batch1'), 'x')} fp32 at batch 1 and {_cell(ratios.get('int8_vs_fp32_batch32'), 'x')} at batch 32 "
        f"(goal 2x, judged on the pairs below: {'busy' if result['goals']['int8_2x_fp32_at_batch_1_and_32'] is None else ('met' if result['goals']['int8_2x_fp32_at_batch_1_and_32'] else 'NOT met')}); "
        f"INT8 within 1 point: {'met' if result['goals']['int8_within_1_point'] else 'NOT met'}. "
        f"Variants built and judged in {result['variants_seconds']} s.",
    ]
    if result.get("int8_paired"):
        lines += ["", f"INT8 against fp32 in {PAIRS} back-to-back pairs per thread count (each pair's ratio within the pair; the goal is "
                  "judged on these, at onnxruntime's default threads): " + "; ".join(
                      f"{threads}: batch 1 **{r['batch_1']['median']}x** ({r['batch_1']['min']}-{r['batch_1']['max']}), "
                      f"batch 32 **{r['batch_32']['median']}x** ({r['batch_32']['min']}-{r['batch_32']['max']})"
                      for threads, r in result["int8_paired"].items()) + "."]
    lines += ["", "Deploy's own verdicts:", ""]
    lines += [f"- {v['reason']}" for v in result["variants"]["variants"]]
    opened = [row for row in result["gpu"] if "open_s" in row]
    if opened:
        lines += ["", "Seconds to open a session and run a first batch of 32 (TensorRT: building its engines into an empty cache, "
                  "then again from that cache): " + "; ".join(
                      f"{row['engine']} {row['open_s']} s" + (f", from the cache {row['open_from_engine_cache_s']} s" if "open_from_engine_cache_s" in row else "")
                      for row in opened) + "."]
    if result["int8_diagnosis"]:
        lines += ["", "## Where INT8's accuracy goes (test split; speed: 1 onnxruntime thread, against fp32)", "",
                  "| quantised as | accuracy change | top-1 agreement with fp32 | x fp32 batch 1 | x fp32 batch 32 |", "|---|---:|---:|---:|---:|"]
        if not result["machine"]["cpu"]["vnni"]:
            lines[-2:-2] = ["This CPU has no VNNI: the rows other than the recipe's use 8-bit weights, whose integer kernels saturate "
                            "here (`components/runtime/cpu.py`), so their losses include that.", ""]
        for row in result["int8_diagnosis"]:
            lines.append(f"| {row['case']} | {row['accuracy_change_points']:+.2f} pts | {row['top1_agreement']:.1%} | "
                         f"{row.get('speedup_batch1', '-')} | {row.get('speedup_batch32', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
