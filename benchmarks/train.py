"""Fine-tune benchmark: what the feature cache buys, how fast fine-tuning runs, transfer versus scratch.

    .venv/bin/python benchmarks/train.py [--threads 1] [--epochs 10] [--quick]

1. Epoch time of `feature_extraction` with the feature cache (a pass over the
   cached feature matrix) and without it (every epoch through the frozen
   backbone), on the demo digits (all 1,797) at 64 px.
2. Training throughput (images/s) of `fine_tune` on this CPU, at 64 px; on a
   CUDA machine the same run uses mixed precision and channels-last, and is
   reported as such.
3. Transfer versus scratch: validation accuracy and training time of
   `feature_extraction`, `fine_tune` and `scratch` trained on 10/25/50/100% of
   the training labels (stratified; the validation split stays whole), on the
   digits and on the natural-photo texture set (`components.demo.write_textures`),
   both 600 images (60 per class) at 32 px.

Writes benchmarks/results/train.{json,md} and train_transfer.png, and logs them
to the MLflow experiment `graft-benchmarks` in the repo's store.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from components.choose.ranking import ChooseResult
from components.core.config import Params, load_params
from components.data.demo import write_digits, write_textures
from components.data.folders import scan
from components.data.split import Split
from components.train.network import resolve_precision
from components.train.stage import fine_tune, predict_logits

RESULTS = ROOT / "benchmarks" / "results"
BACKBONE = "efficientnet_lite0"
FRACTIONS = (0.1, 0.25, 0.5, 1.0)
STRATEGIES = ("feature_extraction", "fine_tune", "scratch")

log = logging.getLogger("benchmarks.train")


def params_for(data_dir: Path, work: Path, size: int, *extra: str) -> Params:
    return load_params(
        ROOT / "params.yaml",
        [f"data.dir={data_dir}", f"data.cache_dir={work / 'cache'}", f"data.image_size={size}",
         f"deploy.output_dir={work / 'outputs'}", f"tracking.store_dir={work / 'mlflow'}", *extra],
    )


def choice(size: int) -> ChooseResult:
    return ChooseResult(chosen=BACKBONE, image_size=size, score_name="logme", reason="benchmark", candidates=(), seconds=0.0)


def val_accuracy(params: Params, split: Split, result) -> float:  # noqa: ANN001 - TrainResult
    logits = predict_logits(params, result, [s.path for s in split.val])
    return float((logits.argmax(1) == np.array([s.label for s in split.val])).mean())


def labelled_subset(split: Split, fraction: float, seed: int = 0) -> Split:
    """Keep `fraction` of each class's training images (at least one); validation unchanged."""
    rng = np.random.default_rng(seed)
    kept = []
    for label in range(len(split.classes)):
        members = [s for s in split.train if s.label == label]
        take = max(1, round(fraction * len(members)))
        kept += [members[i] for i in sorted(rng.choice(len(members), size=take, replace=False))]
    return dataclasses.replace(split, train=tuple(sorted(kept, key=lambda s: str(s.path))))


# --- 1. the feature cache ------------------------------------------------------------------------


def cache_benchmark(data_dir: Path, work: Path, size: int, uncached_epochs: int) -> dict:
    """Per-epoch time of feature extraction on cached features versus through the frozen backbone."""
    split = scan(data_dir)
    params = params_for(data_dir, work, size, "train.patience=1000", "train.resume=false")
    warm = fine_tune(params.model_copy(update={"train": params.train.model_copy(update={"epochs": 1})}), split, choice(size), work / "warm")
    cached = fine_tune(params.model_copy(update={"train": params.train.model_copy(update={"epochs": 50})}), split, choice(size), work / "cached")
    # augmentation with every transform switched off: the exact work of an uncached epoch, same pixels
    plain = params.train.model_copy(update={
        "epochs": uncached_epochs, "augment": True, "augment_crop_scale": 1.0, "augment_rotate": 0.0, "augment_color": 0.0,
    })
    uncached = fine_tune(params.model_copy(update={"train": plain}), split, choice(size), work / "uncached")
    cached_epoch = statistics.median(row["time/epoch_seconds"] for row in cached.history)
    uncached_epoch = statistics.median(row["time/epoch_seconds"] for row in uncached.history)
    return {
        "images": {"train": len(split.train), "val": len(split.val)},
        "image_size": size,
        "first_run_features_computed": warm.features_computed,
        "cached_run_features_from_cache": cached.features_cached,
        "cached_epoch_seconds": cached_epoch,
        "cached_epochs_timed": cached.epochs_run,
        "uncached_epoch_seconds": uncached_epoch,
        "uncached_epochs_timed": uncached.epochs_run,
        "speedup": uncached_epoch / cached_epoch,
        "feature_extraction_once_seconds": warm.seconds,
    }


# --- 2. fine-tune throughput ---------------------------------------------------------------------


def throughput_benchmark(data_dir: Path, work: Path, size: int, epochs: int) -> dict:
    split = scan(data_dir)
    params = params_for(data_dir, work, size, "train.strategy=fine_tune", f"train.epochs={epochs}", "train.patience=1000")
    precision = resolve_precision(params.train)
    result = fine_tune(params, split, choice(size), work / "throughput")
    rates = [row["train/images_per_second"] for row in result.history]
    return {
        "device": precision.describe(),
        "image_size": size,
        "unfreeze": params.train.unfreeze,
        "batch_size": params.train.batch_size,
        "train_images": len(split.train),
        "images_per_second_per_epoch": rates,
        "images_per_second": statistics.median(rates[1:] if len(rates) > 1 else rates),
    }


# --- 3. transfer versus scratch ------------------------------------------------------------------


def transfer_benchmark(name: str, data_dir: Path, work: Path, size: int, epochs: int) -> list[dict]:
    split = scan(data_dir)
    rows = []
    for strategy in STRATEGIES:
        # feature extraction on cached features: the defaults (up to 200 epochs, patience 5) cost seconds;
        # the strategies that train the backbone get the same fixed budget of epochs
        budget = [] if strategy == "feature_extraction" else [f"train.epochs={epochs}", "train.patience=5", "train.batch_size=32"]
        params = params_for(data_dir, work, size, f"train.strategy={strategy}", *budget)
        for fraction in FRACTIONS:
            subset = labelled_subset(split, fraction)
            started = time.perf_counter()
            result = fine_tune(params, subset, choice(size), work / f"{name}-{strategy}-{fraction}")
            seconds = time.perf_counter() - started
            accuracy = val_accuracy(params, subset, result)
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
        classes = {"digits": 10, "textures": 10}.get(dataset)
        if classes:
            ax.axhline(1 / classes, color="grey", linestyle=":", label="chance")
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


def markdown(report: dict) -> str:
    cache, speed, settings = report["cache"], report["throughput"], report["settings"]
    lines = [
        "# Fine-tune benchmark",
        "",
        f"Machine: {report['machine']}; torch {report['torch']}; {settings['threads']} thread(s); "
        f"load average before/after {report['load_before']} / {report['load_after']} (the 2 cores were shared).",
        "",
        "## Feature cache",
        "",
        f"`feature_extraction` on the demo digits ({cache['images']['train']} train / {cache['images']['val']} val) at "
        f"{cache['image_size']} px: an epoch on cached features takes **{cache['cached_epoch_seconds'] * 1000:.1f} ms**, "
        f"an epoch through the frozen backbone **{cache['uncached_epoch_seconds']:.1f} s**: "
        f"**{cache['speedup']:,.0f}x** faster (goal: 10x). Median over {cache['cached_epochs_timed']} and "
        f"{cache['uncached_epochs_timed']} epochs; the one-off feature extraction took {cache['feature_extraction_once_seconds']:.1f} s.",
        "",
        "## Fine-tune throughput",
        "",
        f"`fine_tune` (last {speed['unfreeze']} blocks + head, batch {speed['batch_size']}, {speed['image_size']} px) on "
        f"{speed['device']}: **{speed['images_per_second']:.0f} training images/s** (per epoch: "
        + ", ".join(f"{r:.0f}" for r in speed["images_per_second_per_epoch"]) + ").",
        f"GPU (mixed precision, channels-last): {report['gpu']}.",
        "",
        "## Transfer versus scratch",
        "",
        f"{settings['transfer']}",
        "",
        "| dataset | strategy | " + " | ".join(f"{100 * f:g}% labels" for f in FRACTIONS) + " | train time (s) at " + " / ".join(f"{100 * f:g}%" for f in FRACTIONS) + " |",
        "|---|---|" + "---|" * (len(FRACTIONS) + 1),
    ]
    for dataset in sorted({r["dataset"] for r in report["transfer"]}):
        for strategy in STRATEGIES:
            cells = sorted((r["fraction"], r) for r in report["transfer"] if r["dataset"] == dataset and r["strategy"] == strategy)
            lines.append(
                f"| {dataset} | {strategy} | " + " | ".join(f"{r['val_accuracy']:.3f}" for _, r in cells)
                + " | " + " / ".join(f"{r['train_seconds']:.1f}" for _, r in cells) + " |"
            )
    lines += ["", "![accuracy against labelled fraction](train_transfer.png)", ""]
    return "\n".join(lines)


def log_to_mlflow(report: dict, files: list[Path]) -> str | None:
    """Log the report to the `graft-benchmarks` experiment of the repo's MLflow store."""
    from components.registry.tracking import parent_run

    params = load_params(ROOT / "params.yaml", ["tracking.experiment=graft-benchmarks"])
    with parent_run(params, run_name="benchmarks/train.py") as run:
        run.log_params(report["settings"])
        run.log_metrics({"cache/speedup": report["cache"]["speedup"], "fine_tune/images_per_second": report["throughput"]["images_per_second"]})
        for row in report["transfer"]:
            run.log_metrics({f"transfer/{row['dataset']}/{row['strategy']}/val_accuracy": row["val_accuracy"]}, step=int(row["fraction"] * 100))
        for path in files:
            run.log_artifact(path, "benchmarks")
        return run.run_id


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the cores are shared)")
    parser.add_argument("--epochs", type=int, default=10, help="epoch budget of fine_tune and scratch in the transfer runs")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    load_before = round(os.getloadavg()[0], 2)
    started = time.perf_counter()
    per_class, transfer_size, cache_size = (10, 32, 32) if args.quick else (60, 32, 64)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        demo = ROOT / "data" if (ROOT / "data" / "0").is_dir() and not args.quick else write_digits(work / "demo", per_class=per_class * 3)
        cache = cache_benchmark(demo, work / "cache-bench", cache_size, uncached_epochs=2)
        log.info("cache: %s", cache)
        speed = throughput_benchmark(demo, work / "speed", cache_size, epochs=1 if args.quick else 2)
        log.info("throughput: %s", speed)
        digits = write_digits(work / "digits", per_class=per_class)
        textures = write_textures(work / "textures", per_class=per_class, size=64)
        transfer = transfer_benchmark("digits", digits, work / "t-digits", transfer_size, args.epochs)
        transfer += transfer_benchmark("textures", textures, work / "t-textures", transfer_size, args.epochs)
    gpu = "not measured: no CUDA device on this machine" if not torch.cuda.is_available() else "measured above (device line)"
    report = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "torch": torch.__version__,
        "load_before": load_before,
        "load_after": round(os.getloadavg()[0], 2),
        "seconds": round(time.perf_counter() - started, 1),
        "settings": {
            "threads": args.threads,
            "backbone": BACKBONE,
            "transfer": (
                f"{BACKBONE}; {per_class} images per class (digits: the first {per_class} of each of the 10 digits; "
                f"textures: {per_class} random 64 px crops of each of 10 scikit-image photos), 80/20 split, trained on "
                f"{', '.join(f'{100 * f:g}%' for f in FRACTIONS)} of the training labels (stratified) and scored on the whole "
                f"validation split; {transfer_size} px; feature_extraction with the defaults of params.yaml (cached "
                f"features, up to 200 epochs, patience 5); fine_tune (last 3 blocks, backbone lr x0.1, BN frozen) and scratch "
                f"with {args.epochs} epochs max, patience 5, batch 32, warm-up 1 epoch then cosine; seed 42"
            ),
        },
        "cache": cache,
        "throughput": speed,
        "gpu": gpu,
        "transfer": transfer,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    json_path = RESULTS / f"train{suffix}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png = plot(transfer, RESULTS / f"train_transfer{suffix}.png")
    md = RESULTS / f"train{suffix}.md"
    md.write_text(markdown(report))
    if not args.quick:
        report["mlflow_run_id"] = log_to_mlflow(report, [json_path, md, png])
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(md.read_text())
    print(f"wrote {json_path}, {md}, {png} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
