"""Deploy benchmark: the same model in PyTorch eager and onnxruntime (fp32, optimised, fp16, INT8) on this machine.

    .venv/bin/python benchmarks/deploy.py [--backbone efficientnet_lite0] [--runs 100]

Trains the head on the demo digits (params.yaml, feature extraction), exports and
parity-checks it, builds the variants exactly as the deploy stage does, then
measures latency (p50/p99) at batch 1 and throughput at batch 32 on the CPU, with
each variant's validation-accuracy change beside its speed. GPU rows (CUDA and
TensorRT, fp32 and fp16) are measured when an NVIDIA GPU is present, and listed
as not measured otherwise. Writes benchmarks/results/deploy.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout


def measure(name: str, call, one: np.ndarray, many: np.ndarray, runs: int) -> dict:
    from components.choose.latency import time_calls

    single = np.array(time_calls(call, one, runs, warmup=5)) * 1000
    batch = np.array(time_calls(call, many, max(5, runs // 10), warmup=2))
    return {
        "engine": name,
        "p50_ms_batch1": round(float(np.percentile(single, 50)), 3),
        "p99_ms_batch1": round(float(np.percentile(single, 99)), 3),
        "images_per_s_batch32": round(len(many) / float(np.median(batch)), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--runs", type=int, default=100, help="timed runs at batch 1")
    args = parser.parse_args()

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
    from components.runtime.variant_files import variant_path
    from components.train.stage import fine_tune, load_classifier

    params = load_params(ROOT / "params.yaml")
    size = params.data.image_size or get_spec(args.backbone).input_size
    split = scan(params.data.dir, SplitSettings.from_config(params.data))
    work = Path(tempfile.mkdtemp(prefix="graft-bench-"))
    print(f"training the {args.backbone} head at {size}px on {len(split.train)} images ...", flush=True)
    trained = fine_tune(params, split, ChooseResult(args.backbone, size, "logme", "benchmark", (), 0.0), work)
    model, _ = load_classifier(trained.checkpoint_path)
    spec = get_spec(trained.backbone)
    meta = {"classes": list(split.classes), "image_size": size, "mean": list(spec.mean), "std": list(spec.std), "backbone": trained.backbone, "data_md5": "benchmark"}
    val_paths = [s.path for s in split.val]
    exported = export_and_verify(model, work / "model.onnx", size, params.deploy.opset, meta, val_paths[:64], params.deploy.parity_atol)
    val_images = load_batch(val_paths, size)
    labels = np.array([s.label for s in split.val])
    calibration = load_batch([s.path for s in stratified_sample(split.train, params.deploy.calibration_images, params.data.seed)], size)
    print("building variants ...", flush=True)
    report = build_variants(exported.onnx_path, ("fp16", "int8"), val_images, labels, calibration, params.deploy.max_variant_drop)

    load_before = os.getloadavg()  # the machine is shared: say how busy it was while timing
    rng = np.random.default_rng(0)
    one = val_images[:1]
    many = val_images[rng.choice(len(val_images), 32, replace=False)]
    rows = []
    with torch.no_grad():
        eager = measure("pytorch eager fp32 (CPU)", lambda x: model(torch.from_numpy(x)), one, many, args.runs)
    with torch.no_grad():
        eager_acc = float((model(torch.from_numpy(val_images)).argmax(1).numpy() == labels).mean())
    rows.append({**eager, "variant": "fp32", "accuracy": eager_acc, "accuracy_change": 0.0, "published": True, "size_mb": None})
    cpu = ["CPUExecutionProvider"]
    for name in ("fp32", "optimized", "fp16", "int8"):
        result = report.get(name)
        path = result.path if result else exported.onnx_path
        session = OnnxClassifier(path, cpu)
        row = measure(f"onnxruntime {name} (CPU)", session.predict_proba, one, many, args.runs)
        rows.append({
            **row, "variant": name,
            "accuracy": report.fp32_accuracy if name == "fp32" else result.accuracy,
            "accuracy_change": 0.0 if name == "fp32" else result.accuracy_change,
            "published": True if name == "fp32" else result.published,
            "size_mb": round(path.stat().st_size / 1e6, 2),
        })
        print(rows[-1], flush=True)
    gpu_rows = []
    if has_nvidia_gpu() and "CUDAExecutionProvider" in ort.get_available_providers():
        for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
            for name in ("fp32", "fp16"):
                path = variant_path(exported.onnx_path, name)
                try:
                    session = OnnxClassifier(path, [provider, "CPUExecutionProvider"])
                    gpu_rows.append({**measure(f"onnxruntime {name} ({provider})", session.predict_proba, one, many, args.runs), "provider_used": session.provider})
                except Exception as exc:  # noqa: BLE001 - report, do not hide, a provider that fails
                    gpu_rows.append({"engine": f"onnxruntime {name} ({provider})", "error": str(exc)[:300]})
    else:
        gpu_rows = [{"engine": f"onnxruntime {v} ({p})", "status": "not measured: no NVIDIA GPU on this machine"} for p in ("CUDA", "TensorRT") for v in ("fp32", "fp16")]

    load_after = os.getloadavg()
    ort_fp32 = next(r for r in rows if r["variant"] == "fp32" and r["engine"].startswith("onnxruntime"))
    speedup = eager["p50_ms_batch1"] / ort_fp32["p50_ms_batch1"]
    result = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "onnxruntime": ort.__version__,
                    "load_average_1_5_15min_before": [round(x, 2) for x in load_before],
                    "load_average_1_5_15min_after": [round(x, 2) for x in load_after]},
        "model": {"backbone": trained.backbone, "image_size": size, "classes": len(split.classes), "val_images": len(val_paths),
                  "parity_max_abs_diff": exported.max_abs_diff, "fp32_accuracy": report.fp32_accuracy},
        "max_variant_drop": params.deploy.max_variant_drop,
        "cpu": rows,
        "gpu": gpu_rows,
        "ort_fp32_speedup_vs_eager_batch1": round(speedup, 2),
        "goal_ort_1_5x_faster_at_batch1": speedup >= 1.5,
        "variants": report.to_dict(),
    }
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "deploy.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "deploy.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    model = result["model"]
    lines = [
        f"# Deploy benchmark: {model['backbone']} at {model['image_size']} px, {model['classes']} classes",
        "",
        f"CPU: {result['machine']['cpu_count']} cores, {result['machine']['platform']}; torch {result['machine']['torch']} "
        f"({result['machine']['torch_threads']} threads), onnxruntime {result['machine']['onnxruntime']}. "
        f"Accuracy on {model['val_images']} validation images; fp32 ONNX {model['fp32_accuracy']:.4f}.",
        f"Shared machine: load average (1, 5, 15 min) {result['machine']['load_average_1_5_15min_before']} before timing, "
        f"{result['machine']['load_average_1_5_15min_after']} after.",
        "",
        "| engine | p50 ms (batch 1) | p99 ms (batch 1) | images/s (batch 32) | accuracy | change vs fp32 | published | MB |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in result["cpu"]:
        lines.append(
            f"| {row['engine']} | {row['p50_ms_batch1']} | {row['p99_ms_batch1']} | {row['images_per_s_batch32']} | "
            f"{row['accuracy']:.4f} | {row['accuracy_change'] * 100:+.1f} pts | {'yes' if row['published'] else 'no'} | {row['size_mb'] or '-'} |"
        )
    for row in result["gpu"]:
        if "p50_ms_batch1" in row:
            lines.append(f"| {row['engine']} | {row['p50_ms_batch1']} | {row['p99_ms_batch1']} | {row['images_per_s_batch32']} | - | - | - | - |")
        else:
            lines.append(f"| {row['engine']} | {row.get('status') or row.get('error')} | | | | | | |")
    lines += [
        "",
        f"onnxruntime fp32 is {result['ort_fp32_speedup_vs_eager_batch1']}x faster than PyTorch eager at batch 1 "
        f"(goal 1.5x: {'met' if result['goal_ort_1_5x_faster_at_batch1'] else 'NOT met'}). A variant is published only "
        f"when it loses at most {result['max_variant_drop'] * 100:.1f} accuracy points (deploy.max_variant_drop).",
        "",
        "INT8: static QDQ quantisation calibrated on training images, uint8 activations and per-channel 7-bit int8 "
        "weights (full 8-bit weights saturate 16-bit sums in onnxruntime's x86 kernels on CPUs without VNNI), with "
        "the first convolutions and the head in fp32; see components/variants.py:to_int8.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
