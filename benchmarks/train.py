"""Fine-tune benchmark: the feature cache, the cached trunk, CPU bfloat16, transfer versus scratch.

    .venv/bin/python benchmarks/train.py [--epochs 3] [--threads N] [--transfer] [--force] [--quick]

1. Feature cache: an epoch of `feature_extraction` on cached features against one through the
   frozen backbone, on the demo digits at 64 px.
2. Cached trunk (`train.cache_trunk`), with params.yaml's defaults (112 px, `unfreeze: 3`): epochs
   of `fine_tune` and of `two_stage`'s second stage through the whole backbone (float32, as before),
   on the cached trunk in float32, and with the defaults (the tail in bfloat16 where the CPU has it),
   `--epochs` each; the losses and validation accuracy of every epoch side by side (the same model),
   achieved GFLOP/s of one training step (torch's FLOP counter) beside images/s, and the one-off
   pass that fills the trunk cache. Then `fine_tune` to its early stop with the defaults and in
   float32: epochs, best epoch and test accuracy of each (bfloat16 changes nothing but the time).
3. Transfer versus scratch (`--transfer`, about 15 minutes): validation accuracy of
   `feature_extraction`, `fine_tune` and `scratch` on 10/25/50/100% of the training labels, on the
   digits and the natural-photo textures at 32 px. Without it, the committed results are kept.

Timings are written only when the machine was quiet before and during the run
(`benchmarks/machine.py`; --force writes them marked as busy); losses and accuracies always.
Writes benchmarks/results/train.{json,md} (and train_transfer.png with --transfer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from benchmarks.machine import Verdict, Watch, cores, peak_gflops, state  # noqa: E402
from components.choose.ranking import ChooseResult  # noqa: E402
from components.core.config import Params, load_params  # noqa: E402
from components.data.demo import write_digits, write_textures  # noqa: E402
from components.data.folders import scan  # noqa: E402
from components.data.split import Split, SplitSettings  # noqa: E402
from components.train.stage import fine_tune, predict_logits  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BACKBONE = "efficientnet_lite0"
FRACTIONS = (0.1, 0.25, 0.5, 1.0)
STRATEGIES = ("feature_extraction", "fine_tune", "scratch")
TRUNK_GOAL = 4.0
"""fine_tune and two_stage epochs at least this many times faster with the defaults (issue 17)."""

log = logging.getLogger("benchmarks.train")


def params_for(data_dir: Path, work: Path, *extra: str) -> Params:
    return load_params(
        ROOT / "params.yaml",
        [f"data.dir={data_dir}", f"data.cache_dir={work / 'cache'}", f"deploy.output_dir={work / 'outputs'}",
         f"tracking.store_dir={work / 'mlflow'}", *extra],
    )


def choice(size: int) -> ChooseResult:
    return ChooseResult(chosen=BACKBONE, image_size=size, score_name="logme", reason="benchmark", candidates=(), seconds=0.0)


def accuracy_on(params: Params, samples, result) -> float:  # noqa: ANN001 - samples, TrainResult
    logits = predict_logits(params, result, [s.path for s in samples])
    return float((logits.argmax(1) == np.array([s.label for s in samples])).mean())


def labelled_subset(split: Split, fraction: float, seed: int = 0) -> Split:
    """Keep `fraction` of each class's training images (at least one); validation unchanged."""
    rng = np.random.default_rng(seed)
    kept = []
    for label in range(len(split.classes)):
        members = [s for s in split.train if s.label == label]
        take = max(1, round(fraction * len(members)))
        kept += [members[i] for i in sorted(rng.choice(len(members), size=take, replace=False))]
    return dataclasses.replace(split, train=tuple(sorted(kept, key=lambda s: str(s.path))))


def with_train(params: Params, **changes: object) -> Params:
    return params.model_copy(update={"train": params.train.model_copy(update=changes)})


# --- 1. the feature cache ------------------------------------------------------------------------


def cache_benchmark(data_dir: Path, work: Path, verdict: Verdict, uncached_epochs: int) -> dict:
    """Per-epoch time of feature extraction on cached features versus through the frozen backbone."""
    params = params_for(data_dir, work, "data.image_size=64", "train.patience=1000", "train.resume=false")
    split = scan(data_dir, SplitSettings.from_config(params.data))
    warm = fine_tune(with_train(params, epochs=1), split, choice(64), work / "warm")
    with Watch() as watch:
        cached = fine_tune(with_train(params, epochs=50), split, choice(64), work / "cached")
        # augmentation with every transform switched off: the exact work of an uncached epoch, same pixels
        plain = with_train(params, epochs=uncached_epochs, augment=True, augment_crop_scale=1.0, augment_rotate=0.0, augment_color=0.0)
        uncached = fine_tune(plain, split, choice(64), work / "uncached")
    verdict.saw("feature cache", watch)
    cached_epoch = statistics.median(row["time/epoch_seconds"] for row in cached.history)
    uncached_epoch = statistics.median(row["time/epoch_seconds"] for row in uncached.history)
    return {
        "images": {"train": len(split.train), "val": len(split.val)}, "image_size": 64,
        "first_run_features_computed": warm.features_computed, "cached_run_features_from_cache": cached.features_cached,
        "cached_epoch_seconds": cached_epoch, "cached_epochs_timed": cached.epochs_run,
        "uncached_epoch_seconds": uncached_epoch, "uncached_epochs_timed": uncached.epochs_run,
        "speedup": uncached_epoch / cached_epoch, "first_run_seconds": warm.seconds,
    }


# --- 2. the cached trunk -------------------------------------------------------------------------


PATHS = {
    "whole backbone, float32 (before)": {"cache_trunk": False, "mixed_precision": False},
    "cached trunk, float32": {"cache_trunk": True, "mixed_precision": False},
    "cached trunk, defaults": {},
}


def step_flops(params: Params, split: Split, size: int, cached: bool) -> float:
    """FLOPs of one training step per image: the forward pass that runs (torch's FLOP counter) plus a backward
    pass of twice the forward of the blocks that train (the counter overcounts depthwise convolutions' backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from components.backbones.unfreeze import select_trainable
    from components.backbones.zoo import get_spec
    from components.train.network import build_model
    from components.train.trunk import trunk_split

    model = build_model(get_spec(BACKBONE), size, len(split.classes), params.train.seed).eval()
    cut = trunk_split(model, select_trainable(model.backbone, params.train.unfreeze), size)
    images = torch.zeros((1, 3, size, size))

    def forward_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            module(x)
        return counter.get_total_flops()

    with torch.no_grad():
        rows = cut.trunk(images)
    tail = forward_flops(cut.tail, rows) + forward_flops(model.head, torch.zeros(1, model.head.in_features))
    forward = tail if cached else forward_flops(model.backbone, images) + forward_flops(model.head, torch.zeros(1, model.head.in_features))
    return forward + 2 * tail


def trunk_benchmark(data_dir: Path, work: Path, verdict: Verdict, epochs: int, early_stop_epochs: int) -> dict:
    """fine_tune and two_stage epochs through the whole backbone, on the cached trunk, and with the defaults."""
    base = params_for(data_dir, work, "train.patience=1000", "train.resume=false", f"train.epochs={epochs}")
    size = base.data.image_size
    split = scan(data_dir, SplitSettings.from_config(base.data))
    started = time.perf_counter()
    fine_tune(with_train(base, strategy="fine_tune", epochs=1), split, choice(size), work / "fill")  # fills the trunk cache
    fill_seconds = time.perf_counter() - started
    out: dict[str, object] = {"image_size": size, "unfreeze": base.train.unfreeze, "batch_size": base.train.batch_size,
                              "images": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
                              "first_run_seconds_filling_the_cache": round(fill_seconds, 1), "strategies": {}}
    for strategy in ("fine_tune", "two_stage"):
        runs = {}
        for label, changes in PATHS.items():
            params = with_train(base, strategy=strategy, **changes)
            with Watch() as watch:
                result = fine_tune(params, split, choice(size), work / f"{strategy}-{len(runs)}")
            verdict.saw(f"{strategy}: {label}", watch)
            rows = [row for row in result.history if strategy == "fine_tune" or "lr/backbone" in row]  # two_stage: stage 2
            runs[label] = {
                "epoch_seconds": [round(row["time/epoch_seconds"], 3) for row in rows],
                "median_epoch_seconds": round(statistics.median(row["time/epoch_seconds"] for row in rows), 3),
                "images_per_second": round(statistics.median(row["train/images_per_second"] for row in rows), 1),
                "val_loss": [round(row["val/loss"], 5) for row in rows], "val_accuracy": [round(row["val/accuracy"], 4) for row in rows],
                "train_loss": [round(row["train/loss"], 5) for row in rows],
            }
            log.info("%s, %s: %s", strategy, label, runs[label])
        before = runs["whole backbone, float32 (before)"]["median_epoch_seconds"]
        for label, run in runs.items():
            run["speedup"] = round(before / run["median_epoch_seconds"], 2)
        whole, cached = runs["whole backbone, float32 (before)"], runs["cached trunk, float32"]
        out["strategies"][strategy] = {
            "runs": runs,
            "largest_val_loss_difference_cached_vs_whole": max(abs(a - b) for a, b in zip(whole["val_loss"], cached["val_loss"], strict=True)),
            "goal_met": runs["cached trunk, defaults"]["speedup"] >= TRUNK_GOAL,
        }
    flops = {"whole backbone": step_flops(base, split, size, cached=False), "cached trunk": step_flops(base, split, size, cached=True)}
    fine = out["strategies"]["fine_tune"]["runs"]
    out["gflops_per_image_step"] = {k: round(v / 1e9, 3) for k, v in flops.items()}
    out["achieved_gflops"] = {
        "whole backbone, float32 (before)": round(flops["whole backbone"] * fine["whole backbone, float32 (before)"]["images_per_second"] / 1e9, 1),
        "cached trunk, float32": round(flops["cached trunk"] * fine["cached trunk, float32"]["images_per_second"] / 1e9, 1),
        "cached trunk, defaults": round(flops["cached trunk"] * fine["cached trunk, defaults"]["images_per_second"] / 1e9, 1),
    }
    out["to_early_stop"] = early_stop_runs(base, split, size, work, verdict, early_stop_epochs)
    return out


def early_stop_runs(base: Params, split: Split, size: int, work: Path, verdict: Verdict, epochs: int) -> dict:
    """fine_tune with the defaults and in float32, each to its early stop: same epochs, same test accuracy?"""
    out = {}
    for label, changes in (("defaults", {}), ("float32", {"mixed_precision": False})):
        params = with_train(base, strategy="fine_tune", epochs=epochs, patience=load_params(ROOT / "params.yaml").train.patience, **changes)
        with Watch() as watch:
            result = fine_tune(params, split, choice(size), work / f"early-{label}")
        verdict.saw(f"fine_tune to early stop, {label}", watch)
        out[label] = {
            "epochs": result.epochs_run, "best_epoch": result.best_epoch, "best_val_loss": round(result.best_val_loss, 5),
            "val_accuracy": round(result.history[result.best_epoch - 1]["val/accuracy"], 4),
            "test_accuracy": round(accuracy_on(params, split.test, result), 4), "seconds": round(result.seconds, 1),
        }
        log.info("fine_tune to early stop, %s: %s", label, out[label])
    return out


# --- 3. transfer versus scratch ------------------------------------------------------------------


def transfer_benchmark(name: str, data_dir: Path, work: Path, size: int, epochs: int) -> list[dict]:
    split = scan(data_dir, SplitSettings(val_fraction=0.2, test_fraction=0.0, seed=42))
    rows = []
    for strategy in STRATEGIES:
        # feature extraction on cached features: the defaults (up to 200 epochs, patience 5) cost seconds;
        # the strategies that train the backbone get the same fixed budget of epochs
        budget = [] if strategy == "feature_extraction" else [f"train.epochs={epochs}", "train.patience=5", "train.batch_size=32"]
        params = params_for(data_dir, work, f"data.image_size={size}", f"train.strategy={strategy}", *budget)
        for fraction in FRACTIONS:
            subset = labelled_subset(split, fraction)
            started = time.perf_counter()
            result = fine_tune(params, subset, choice(size), work / f"{name}-{strategy}-{fraction}")
            seconds = time.perf_counter() - started
            accuracy = accuracy_on(params, subset.val, result)
            rows.append({
                "dataset": name, "strategy": strategy, "fraction": fraction, "train_images": len(subset.train),
                "val_images": len(subset.val), "val_accuracy": accuracy, "train_seconds": seconds,
                "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
            })
            log.info("%s %s %.0f%%: val accuracy %.3f in %.1fs", name, strategy, fraction * 100, accuracy, seconds)
    return rows


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for strategy in STRATEGIES:
            points = sorted((r["fraction"], r["val_accuracy"]) for r in rows if r["dataset"] == dataset and r["strategy"] == strategy)
            ax.plot([100 * f for f, _ in points], [a for _, a in points], marker="o", label=strategy)
        ax.axhline(0.1, color="grey", linestyle=":", label="chance")
        ax.set_xscale("log")
        ax.set_xticks([100 * f for f in FRACTIONS], [f"{100 * f:g}%" for f in FRACTIONS])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("training labels used")
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"{dataset}: transfer vs scratch ({BACKBONE})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- the report ----------------------------------------------------------------------------------


def _t(value: float | None, fmt: str) -> str:
    return "busy" if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    machine, verdict, cache, trunk = report["machine"], report["verdict"], report["cache"], report["trunk"]
    cpu = machine["cpu"]
    lines = [
        "# Fine-tune benchmark",
        "",
        f"Run {machine['at']} on {cpu['model']}, {cpu['cores']} cores ({' '.join(cpu['flags'])}); torch {machine['versions'].get('torch')}, "
        f"{report['threads']} thread(s); load average {report['load_before']} before, {machine['load_average_1_5_15']} after. "
        f"This CPU on a large matrix product: {report['peak']['matmul_fp32_gflops']} GFLOP/s fp32, {report['peak']['matmul_bf16_gflops']} bf16. "
        "Timings: " + ("written (the machine was quiet)." if verdict["quiet"] else f"NOT written: {verdict['reason']}" + (" (--force: written anyway, do not quote)" if report["forced"] else "") + "."),
        "",
        "## Cached trunk",
        "",
        f"params.yaml's defaults: {BACKBONE} at {trunk['image_size']} px, `unfreeze: {trunk['unfreeze']}`, batch {trunk['batch_size']}, "
        f"{trunk['images']['train']} train / {trunk['images']['val']} val / {trunk['images']['test']} test digits. The first run filled "
        f"the trunk cache (one pass of the frozen blocks, then one epoch) in {_t(trunk['first_run_seconds_filling_the_cache'], '.1f')} s. "
        f"Per epoch (two_stage: its second stage), median of {len(trunk['strategies']['fine_tune']['runs']['cached trunk, defaults']['epoch_seconds'])}:",
        "",
        "| strategy | path | s per epoch | images/s | speed-up | val loss per epoch | val accuracy per epoch |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for strategy, result in trunk["strategies"].items():
        for label, run in result["runs"].items():
            lines.append(
                f"| {strategy} | {label} | {_t(run['median_epoch_seconds'], '.2f')} | {_t(run['images_per_second'], '.0f')} | "
                f"{_t(run['speedup'], '.1f')}x | {', '.join(f'{v:.4f}' for v in run['val_loss'])} | {', '.join(f'{v:.3f}' for v in run['val_accuracy'])} |"
            )
    early = trunk["to_early_stop"]
    goals = {s: r["goal_met"] for s, r in trunk["strategies"].items()}
    lines += [
        "",
        f"Goal: epochs {TRUNK_GOAL:g}x faster with the defaults: " + ", ".join(f"{s} {'busy' if g is None else ('met' if g else 'NOT met')}" for s, g in goals.items()) + ". "
        f"Cached and whole-backbone float32 epochs differ by at most {trunk['strategies']['fine_tune']['largest_val_loss_difference_cached_vs_whole']:.1e} "
        f"in validation loss (fine_tune), {trunk['strategies']['two_stage']['largest_val_loss_difference_cached_vs_whole']:.1e} (two_stage): the same model.",
        f"One training step costs {trunk['gflops_per_image_step']['whole backbone']} GFLOP per image through the whole backbone and "
        f"{trunk['gflops_per_image_step']['cached trunk']} on the cached trunk; achieved: "
        + ", ".join(f"{k} {_t(v, '.1f')} GFLOP/s" for k, v in trunk["achieved_gflops"].items()) + ".",
        "",
        "`fine_tune` to its early stop: "
        + "; ".join(f"{label}: {r['epochs']} epochs (best {r['best_epoch']}), val accuracy {r['val_accuracy']:.4f}, test accuracy "
                    f"{r['test_accuracy']:.4f}, {_t(r['seconds'], '.1f')} s" for label, r in early.items()) + ".",
        "",
        "## Feature cache",
        "",
        f"`feature_extraction` on the demo digits ({cache['images']['train']} train / {cache['images']['val']} val) at 64 px: an epoch on "
        f"cached features takes **{_t(cache['cached_epoch_seconds'] and cache['cached_epoch_seconds'] * 1000, '.1f')} ms**, an epoch through "
        f"the frozen backbone **{_t(cache['uncached_epoch_seconds'], '.1f')} s**: **{_t(cache['speedup'], ',.0f')}x** (goal: 10x).",
        "",
        f"GPU (mixed precision, channels-last): {report['gpu']}.",
    ]
    transfer = report.get("transfer")
    if transfer:
        lines += ["", "## Transfer versus scratch", "", f"{report['transfer_settings']}", "",
                  "| dataset | strategy | " + " | ".join(f"{100 * f:g}% labels" for f in FRACTIONS) + " |",
                  "|---|---|" + "---|" * len(FRACTIONS)]
        for dataset in sorted({r["dataset"] for r in transfer}):
            for strategy in STRATEGIES:
                cells = sorted((r["fraction"], r) for r in transfer if r["dataset"] == dataset and r["strategy"] == strategy)
                lines.append(f"| {dataset} | {strategy} | " + " | ".join(f"{r['val_accuracy']:.3f}" for _, r in cells) + " |")
        lines += ["", "![accuracy against labelled fraction](train_transfer.png)"]
    return "\n".join(lines) + "\n"


TIMING_KEYS = {"median_epoch_seconds", "images_per_second", "speedup", "epoch_seconds", "seconds", "cached_epoch_seconds",
               "uncached_epoch_seconds", "first_run_seconds", "first_run_seconds_filling_the_cache", "goal_met", "train_seconds"}


def blank_timings(value: object) -> object:
    """The report with every timing replaced by None (a busy machine's timings are not written)."""
    if isinstance(value, dict):
        return {k: (None if k in TIMING_KEYS else blank_timings(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [blank_timings(v) for v in value]
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=cores(), help="torch CPU threads (default: every core)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each path in the cached-trunk comparison")
    parser.add_argument("--transfer", action="store_true", help="also run transfer versus scratch (about 15 minutes)")
    parser.add_argument("--transfer-epochs", type=int, default=10, help="epoch budget of fine_tune and scratch in the transfer runs")
    parser.add_argument("--force", action="store_true", help="write timings even from a busy machine (marked as such)")
    parser.add_argument("--quick", action="store_true", help="tiny data, 1 epoch: check the script runs (writes *-quick files)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    verdict = Verdict()
    load_before = [round(x, 2) for x in __import__("os").getloadavg()]
    if verdict.before:
        log.warning("machine busy before starting: %s; losses and accuracies will be written, timings only with --force", verdict.before)
    previous = json.loads((RESULTS / "train.json").read_text()) if (RESULTS / "train.json").is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        demo = write_digits(work / "demo", per_class=30) if args.quick else ROOT / "data"
        trunk = trunk_benchmark(demo, work / "trunk", verdict, 1 if args.quick else args.epochs,
                                3 if args.quick else load_params(ROOT / "params.yaml").train.epochs)
        cache = cache_benchmark(demo, work / "cache-bench", verdict, uncached_epochs=1 if args.quick else 2)
        transfer, settings = previous.get("transfer"), previous.get("transfer_settings") or previous.get("settings", {}).get("transfer")
        if args.transfer:
            per_class = 10 if args.quick else 60
            transfer = transfer_benchmark("digits", write_digits(work / "digits", per_class=per_class), work / "t-digits", 32, args.transfer_epochs)
            transfer += transfer_benchmark("textures", write_textures(work / "textures", per_class=per_class, size=64), work / "t-textures", 32, args.transfer_epochs)
            settings = (
                f"{BACKBONE}; {per_class} images per class (digits: the first of each digit; textures: random 64 px crops of 10 "
                f"scikit-image photos), 80/20 split, trained on {', '.join(f'{100 * f:g}%' for f in FRACTIONS)} of the training labels "
                f"(stratified), scored on the whole validation split; 32 px; feature_extraction with params.yaml's defaults; fine_tune "
                f"(last 3 blocks) and scratch with {args.transfer_epochs} epochs max, patience 5, batch 32; seed 42; {time.strftime('%Y-%m-%d')}"
            )
    report = {
        "machine": state(), "peak": peak_gflops(), "verdict": verdict.to_dict(), "threads": args.threads, "load_before": load_before,
        "forced": args.force, "trunk": trunk, "cache": cache,
        "gpu": "not measured: no CUDA device on this machine" if not torch.cuda.is_available() else "see the device line",
        "transfer": transfer, "transfer_settings": settings,
    }
    if not (verdict.quiet or args.force):
        report["trunk"], report["cache"] = blank_timings(trunk), blank_timings(cache)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (RESULTS / f"train{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.transfer and transfer:
        plot(transfer, RESULTS / f"train_transfer{suffix}.png")
    (RESULTS / f"train{suffix}.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if verdict.quiet or args.force else 3


if __name__ == "__main__":
    sys.exit(main())
