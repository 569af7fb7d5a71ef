"""Does the choose stage pick well, and cheaply? Rank every offline candidate, then fine-tune each.

For the demo digits and the texture set (`components.demo.write_textures`):
score every offline candidate with the choose stage (cold cache: ONNX export,
features, LogME, probe, latency), then fine-tune each one (feature
extraction: features of the whole split, a linear head with early stopping)
and report Kendall's tau between the selection scores and fine-tuned
validation accuracy, whether the top-ranked candidate is within 1 point of
the best, and the cost of selecting among all versus fine-tuning one.

    .venv/bin/python benchmarks/choose.py   # writes benchmarks/results/choose.{json,md}
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from components.backbones.features import FeatureCache, OnnxFeatures
from components.backbones.zoo import get_spec
from components.choose.stage import choose_model
from components.core.config import load_params
from components.data.demo import write_textures
from components.data.folders import scan
from components.train.stage import fine_tune
from components.train.strategies import train_head

CANDIDATES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "random_efficientnet_lite0"]
RESULTS = REPO / "benchmarks" / "results"


def fine_tune_candidate(params, split, row) -> dict:  # noqa: ANN001
    """Feature-extraction fine-tuning of one candidate, timed from an empty feature cache."""
    started = time.perf_counter()
    spec = get_spec(row.name)
    cache = FeatureCache(params.data.cache_dir / "fine-tune", spec, row.image_size, seed=params.train.seed)
    extractor = OnnxFeatures(Path(row.onnx_path))
    train_x = cache.get([s.path for s in split.train], params.choose.batch_size, extractor=extractor)
    val_x = cache.get([s.path for s in split.val], params.choose.batch_size, extractor=extractor)
    train_y = np.array([s.label for s in split.train])
    val_y = np.array([s.label for s in split.val])
    _, fit = train_head(params, train_x, train_y, val_x, val_y)
    best = min(fit.history, key=lambda h: h["val/loss"])
    history = fit.history
    return {"val_accuracy": best["val/accuracy"], "epochs": len(history), "seconds": time.perf_counter() - started}


def fine_tune_run(params, split, choice, work: Path) -> dict:  # noqa: ANN001
    """A whole `train.strategy=fine_tune` run of the first pre-trained candidate, to its early stop.

    This is what choosing by trial would cost per candidate: `params.yaml`'s own epochs, patience,
    unfrozen blocks and learning rates, from an empty cache, timed as `graft run` trains.
    """
    name = CANDIDATES[0]
    tuned = params.model_copy(update={"train": params.train.model_copy(update={"strategy": "fine_tune"})})
    result = fine_tune(tuned, split, replace(choice, chosen=name, image_size=params.data.image_size), work / "fine-tune-run")
    best = result.history[result.best_epoch - 1]
    return {"seconds": result.seconds, "epochs": result.epochs_run, "best_epoch": result.best_epoch,
            "val_accuracy": best["val/accuracy"]}


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds every process on the machine has been busy, CPU seconds of this process), or None off Linux.

    The difference between two readings, less this process's share, is what other work took from
    the cores meanwhile: timings on a shared machine are only comparable when that is small.
    """
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields
    own = os.times()
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def run(name: str, data_dir: Path, work: Path) -> dict:
    params = load_params(
        REPO / "params.yaml",
        [f"data.dir={data_dir}", f"data.cache_dir={work / name}", f"choose.candidates={json.dumps(CANDIDATES)}"],
    )
    split = scan(params.data.dir, params.data.val_fraction, params.data.seed)
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    begun = started
    choice = choose_model(params, split)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    choose_model(params, split)
    warm = time.perf_counter() - started
    shutil.rmtree(params.data.cache_dir / "features")  # new data on a machine that has run before: exports cached
    started = time.perf_counter()
    choose_model(params, split)
    new_data = time.perf_counter() - started
    shutil.rmtree(params.data.cache_dir / "features")  # the same, with every candidate's latency timed again
    retimed = params.model_copy(update={"choose": params.choose.model_copy(update={"latency_cache": False})})
    started = time.perf_counter()
    choose_model(retimed, split)
    new_data_retimed = time.perf_counter() - started
    cpu_after = cpu_seconds()
    wall = time.perf_counter() - begun
    others = (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1]) if cpu_before and cpu_after else None
    rows = [r for r in choice.candidates if r.logme is not None]
    tuned = {r.name: fine_tune_candidate(params, split, r) for r in rows}
    acc = [tuned[r.name]["val_accuracy"] for r in rows]
    top_by_logme = max(rows, key=lambda r: r.logme)
    best_acc = max(acc)
    pretrained = [i for i, r in enumerate(rows) if r.pretrained]
    one = float(np.mean([t["seconds"] for t in tuned.values()]))
    strategy = fine_tune_run(params, split, choice, work / name)
    full = strategy["seconds"]
    return {
        "dataset": name,
        "images": {"train": len(split.train), "val": len(split.val), "classes": len(split.classes)},
        "image_size": params.data.image_size,
        "sample_size": params.choose.sample_size,
        "chosen": choice.chosen,
        "reason": choice.reason,
        "candidates": [
            {**{k: r.to_dict()[k] for k in ("name", "pretrained", "logme", "probe_accuracy", "params", "size_mb", "latency_ms", "latency_batch_ms", "status")},
             "fine_tuned_val_accuracy": tuned[r.name]["val_accuracy"], "fine_tune_seconds": round(tuned[r.name]["seconds"], 1)}
            for r in rows
        ],
        "kendall_tau_logme": float(kendalltau([r.logme for r in rows], acc).statistic),
        "kendall_tau_probe": float(kendalltau([r.probe_accuracy for r in rows], acc).statistic),
        "kendall_tau_logme_pretrained_only": float(
            kendalltau([rows[i].logme for i in pretrained], [acc[i] for i in pretrained]).statistic
        ),
        "top_logme": top_by_logme.name,
        "top_logme_within_1pt_of_best": bool(tuned[top_by_logme.name]["val_accuracy"] >= best_acc - 0.01),
        "chosen_within_1pt_of_best": bool(tuned[choice.chosen]["val_accuracy"] >= best_acc - 0.01),
        "random_below_every_pretrained_logme": all(
            r.logme < min(p.logme for p in rows if p.pretrained) for r in rows if not r.pretrained
        ),
        "selection_wall_seconds_all": round(wall, 1),
        "other_processes_cpu_seconds_during_selection": round(others, 1) if others is not None else None,
        "selection_seconds_cold": round(cold, 1),
        "selection_seconds_warm": round(warm, 1),
        "selection_seconds_new_data": round(new_data, 1),
        "selection_seconds_new_data_latency_retimed": round(new_data_retimed, 1),
        "fine_tune_one_seconds_mean": round(one, 1),
        "selection_over_fine_tune_cold": round(cold / one, 2),
        "selection_over_fine_tune_warm": round(warm / one, 2),
        "selection_over_fine_tune_new_data": round(new_data / one, 2),
        "fine_tune_strategy_seconds": round(full, 1),
        "fine_tune_strategy_epochs": strategy["epochs"],
        "fine_tune_strategy_best_epoch": strategy["best_epoch"],
        "fine_tune_strategy_val_accuracy": strategy["val_accuracy"],
        "selection_over_fine_tune_strategy_cold": round(cold / full, 2),
        "selection_over_fine_tune_strategy_new_data": round(new_data / full, 2),
        "selection_over_fine_tune_strategy_new_data_latency_retimed": round(new_data_retimed / full, 2),
    }


def markdown(results: list[dict]) -> str:
    lines = [
        "# Choose benchmark",
        "",
        "`benchmarks/choose.py`: selection scores vs feature-extraction fine-tuning (val accuracy).",
        "Latency and cost figures come from a 2-core CPU; `other processes used` says how much else ran meanwhile. Compare them within a run.",
        "",
        "The random baseline is the untrained network with its BatchNorm statistics set by one training-mode pass over",
        "seeded noise (`components.zoo.settle_batchnorm`), i.e. the network training from scratch starts from. With the",
        "placeholder statistics (mean 0, var 1) its activations vanish to ~1e-8 and the digits' features of that nearly",
        "linear random map scored higher than every pre-trained candidate (LogME 0.42, probe 0.94; earlier runs).",
        "Cost columns: cold = first run on a machine (ONNX exports + features); new data = exports cached, features",
        "computed, latency figures reused (a scheduled retrain on changed data, `choose.latency_cache`); warm = everything cached.",
        "",
    ]
    for res in results:
        lines += [
            f"## {res['dataset']} ({res['images']['train']} train / {res['images']['val']} val, {res['images']['classes']} classes, {res['image_size']} px, sample {res['sample_size']})",
            "",
            "| candidate | LogME | probe | fine-tuned val acc | ms/img (b1) | MB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for c in res["candidates"]:
            lines.append(f"| {c['name']} | {c['logme']:.4f} | {c['probe_accuracy']:.3f} | {c['fine_tuned_val_accuracy']:.3f} | {c['latency_ms']:.2f} | {c['size_mb']:.1f} |")
        lines += [
            "",
            f"- chosen: **{res['chosen']}** ({res['reason']})",
            f"- Kendall tau, LogME vs fine-tuned accuracy: {res['kendall_tau_logme']:.2f} (pre-trained only: {res['kendall_tau_logme_pretrained_only']:.2f}); probe: {res['kendall_tau_probe']:.2f}",
            f"- top by LogME ({res['top_logme']}) within 1 point of the best: {res['top_logme_within_1pt_of_best']}; chosen within 1 point: {res['chosen_within_1pt_of_best']}",
            f"- random baseline below every pre-trained candidate (LogME): {res['random_below_every_pretrained_logme']}",
            f"- other processes used {res['other_processes_cpu_seconds_during_selection']} CPU seconds of the "
            f"{os.cpu_count()} x {res['selection_wall_seconds_all']} s the four selections took",
            f"- selection of all {len(res['candidates'])}: {res['selection_seconds_cold']} s cold, {res['selection_seconds_new_data']} s on new data, {res['selection_seconds_warm']} s warm; fine-tuning one: {res['fine_tune_one_seconds_mean']} s; ratio {res['selection_over_fine_tune_cold']} cold / {res['selection_over_fine_tune_new_data']} new data / {res['selection_over_fine_tune_warm']} warm (goal <= 0.2)",
            f"- against one whole `train.strategy=fine_tune` run ({CANDIDATES[0]}, last blocks unfrozen, params.yaml's settings): {res['fine_tune_strategy_seconds']} s, {res['fine_tune_strategy_epochs']} epochs to its early stop (best epoch {res['fine_tune_strategy_best_epoch']}, val accuracy {res['fine_tune_strategy_val_accuracy']:.3f}); selection is {res['selection_over_fine_tune_strategy_cold']}x of that cold, {res['selection_over_fine_tune_strategy_new_data']}x on new data ({res['selection_over_fine_tune_strategy_new_data_latency_retimed']}x with every latency timed again: {res['selection_seconds_new_data_latency_retimed']} s)",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="graft-choose-bench-"))
    try:
        textures = write_textures(work / "textures-data", size=128)
        results = [run("digits", REPO / "data", work), run("textures", textures, work)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "choose.json").write_text(json.dumps({"machine_cpus": os.cpu_count(), "results": results}, indent=2) + "\n")
    (RESULTS / "choose.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
