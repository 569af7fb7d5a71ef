"""Does the choose stage pick the backbone that trains best, and at what cost? A regression benchmark.

    .venv/bin/python benchmarks/choose.py                      # all three data sets, timings if the machine is quiet
    .venv/bin/python benchmarks/choose.py --no-timings         # accuracy and regret only (any machine)
    .venv/bin/python benchmarks/choose.py --quick              # small copies of the sets, nothing written

On three data sets that ship offline (the demo digits; `write_textures`, crops of scikit-image's
bundled photos and textures; `write_photos`, small colour crops of the photographs bundled with
scikit-image, scikit-learn and matplotlib), with every offline candidate (the three pre-trained
EfficientNet-Lites and the random Lite0):

1. Selection as `graft run` makes it: `choose_model` with the fine-tune stage's head trainer.
2. Ground truth as a user would get it: each candidate trained by the fine-tune stage itself with
   params.yaml's `train.strategy` (feature_extraction) and settings, scored on validation; also the
   mean over five training seeds, to show how much of a difference is the seed's.
3. For the default selection, for the first-round scores alone (LogME, Graft's score until now, and
   the sample probe) and for the alternatives computed from the same cached features: each one's
   pick, Kendall's tau against the ground truth over the pre-trained candidates, and regret (the best
   trained accuracy minus the pick's, in points).
4. Cost, each the median of --repeats runs: selection on new data (ONNX exports and latency figures
   cached, features not, as in a scheduled retrain) and cold (nothing cached), against one
   `feature_extraction` run and one `fine_tune` run of the chosen backbone from an empty feature cache.
   Timings are measured only when the machine is quiet (see BUSY_LOAD_PER_CORE and
   BUSY_OTHERS_CORES) and written only if it stayed quiet; accuracy figures are written regardless.

The goals (issue 18): regret at most 1 point on every data set, selection on new data at most a
fifth of one fine_tune run and at most twice one feature_extraction run. The exit status is 1 when
a measured figure misses a goal. Results: benchmarks/results/choose.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from benchmarks.machine import cpu_seconds
from components.backbones.features import FeatureCache, OnnxFeatures
from components.backbones.zoo import get_spec
from components.choose.logme import logme
from components.choose.ranking import ChooseResult
from components.choose.stage import choose_model
from components.core.config import Params, load_params
from components.data.demo import write_digits, write_photos, write_textures
from components.data.folders import scan
from components.data.split import Split, SplitSettings, stratified_sample
from components.train.stage import fine_tune
from components.train.strategies import fit_finalist_head, train_head

DATASETS = ("digits", "textures", "photos")
CANDIDATES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "random_efficientnet_lite0")
RESULTS = REPO / "benchmarks" / "results"
REGRET_GOAL = 1.0
"""Points of validation accuracy."""
COST_GOALS = {"fine_tune": 0.2, "feature_extraction": 2.0}
"""Selection on new data against one run of each strategy, at most."""
SEEDS = (42, 0, 1, 2, 3)
"""Training seeds of the seed-averaged ground truth (42 is params.yaml's)."""
BUSY_LOAD_PER_CORE = 0.75
"""Timings are not measured when the 1-minute load average before they start is above this many
processes per core (1.5 on a 2-core machine)."""
BUSY_OTHERS_CORES = 0.5
"""Timings are not written when other processes kept more than this many cores busy, on average,
while they ran (from /proc/stat, less this process's own CPU time)."""

log = logging.getLogger("benchmarks.choose")


# ---------------------------------------------------------------- the machine


def cpu_flags() -> list[str]:
    """The vector-instruction flags that change how fast onnxruntime and torch run here."""
    try:
        line = next(text for text in Path("/proc/cpuinfo").read_text().splitlines() if text.startswith("flags"))
    except (OSError, StopIteration):
        return []
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    return [flag for flag in wanted if flag in line.split(":", 1)[1].split()]


def machine_state() -> dict[str, object]:
    """Where the figures come from: CPU, cores, load, library versions."""
    import onnxruntime
    import scipy
    import sklearn
    import torch

    cpu = platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(text.split(":", 1)[1].strip() for text in lines if text.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "cpu_flags": cpu_flags(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def busy_load() -> float:
    return BUSY_LOAD_PER_CORE * (os.cpu_count() or 1)


class Timer:
    """Repeated timings of one thing, and how much other work shared the machine meanwhile.

    A plain class: `tests/test_benchmarks.py` loads this file without registering it as a module,
    which `dataclasses` needs.
    """

    def __init__(self, runs: list[float], others_cores: float | None) -> None:
        self.runs = runs
        self.others_cores = others_cores
        """Other processes' CPU seconds per wall second while the runs went on."""

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def quiet(self) -> bool:
        return self.others_cores is None or self.others_cores <= BUSY_OTHERS_CORES

    def to_dict(self) -> dict[str, object]:
        return {"median_s": round(self.median, 2), "runs_s": [round(r, 2) for r in self.runs],
                "other_processes_cores": None if self.others_cores is None else round(self.others_cores, 2)}


def timed(repeats: int, prepare: Callable[[], None], run: Callable[[], object]) -> Timer:
    """Time `run` `repeats` times, each after `prepare` (untimed), and watch the other processes."""
    before, started = cpu_seconds(), time.perf_counter()
    runs = []
    for _ in range(repeats):
        prepare()
        t = time.perf_counter()
        run()
        runs.append(time.perf_counter() - t)
    after, wall = cpu_seconds(), time.perf_counter() - started
    others = None
    if before and after:
        others = max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / wall
    return Timer(runs, others)


# ---------------------------------------------------------------- data and parameters


def datasets(work: Path, quick: bool) -> dict[str, Path]:
    """The three offline sets (small copies with --quick)."""
    digits = write_digits(work / "digits", per_class=40) if quick else REPO / "data"
    return {
        "digits": digits,
        "textures": write_textures(work / "textures", per_class=30 if quick else 100, size=128),
        "photos": write_photos(work / "photos", per_class=40 if quick else 80),
    }


def params_for(data_dir: Path, cache_dir: Path, *extra: str) -> Params:
    return load_params(
        REPO / "params.yaml",
        [f"data.dir={data_dir}", f"data.cache_dir={cache_dir}", f"choose.candidates={json.dumps(list(CANDIDATES))}",
         "train.resume=false", *extra],
    )


def with_section(params: Params, section: str, **changes: object) -> Params:
    return params.model_copy(update={section: getattr(params, section).model_copy(update=changes)})


def select(params: Params, split: Split) -> ChooseResult:
    """The default selection, exactly as flows.training wires it (minus the Prefect tasks)."""
    return choose_model(params, split, fit_head=partial(fit_finalist_head, params))


def labels(samples) -> np.ndarray:  # noqa: ANN001 - tuple of Sample
    return np.array([s.label for s in samples], dtype=np.int64)


# ---------------------------------------------------------------- ground truth and the alternatives


def trained_accuracy(params: Params, split: Split, name: str, image_size: int, run_dir: Path) -> float:
    """What a user gets: the fine-tune stage's validation accuracy for `name` with params.yaml's strategy."""
    trained = fine_tune(params, split, ChooseResult(name, image_size, "logme", "benchmark", (), 0.0), run_dir / name)
    return float(trained.history[trained.best_epoch - 1]["val/accuracy"])


def split_features(params: Params, split: Split, name: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    cache = FeatureCache(params.data.cache_dir, get_spec(name), image_size, seed=params.train.seed)
    return cache.get([s.path for s in split.train], params.choose.batch_size), cache.get([s.path for s in split.val], params.choose.batch_size)


def seed_mean_accuracy(params: Params, split: Split, train_x: np.ndarray, val_x: np.ndarray) -> float:
    """The feature_extraction head's validation accuracy averaged over `SEEDS`."""
    accuracies = []
    for seed in SEEDS:
        _, fit = train_head(with_section(params, "train", seed=seed), train_x, labels(split.train), val_x, labels(split.val))
        accuracies.append(fit.history[fit.best_epoch - 1]["val/accuracy"])
    return float(np.mean(accuracies))


def alternative_scores(params: Params, split: Split, train_x: np.ndarray, val_x: np.ndarray) -> dict[str, float]:
    """Scores from one candidate's features of the whole split, for the selections not taken."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    train_y, val_y = labels(split.train), labels(split.val)
    sample = stratified_sample(split.train, params.choose.sample_size, params.data.seed)
    where = {s.path: i for i, s in enumerate(split.train)}
    rows = [where[s.path] for s in sample]
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    with threadpool_limits(1, user_api="blas"):
        _, on_sample = train_head(params, train_x[rows], train_y[rows], val_x, val_y)
        return {
            "logme_whole_split": logme(train_x, train_y),
            "probe_cv_whole_split": float(cross_val_score(probe, train_x, train_y, cv=5).mean()),
            "probe_whole_split_val": float(probe.fit(train_x, train_y).score(val_x, val_y)),
            "knn_whole_split_val": float(KNeighborsClassifier(5, metric="cosine").fit(train_x, train_y).score(val_x, val_y)),
            "head_on_sample_val": float(on_sample.history[on_sample.best_epoch - 1]["val/accuracy"]),
        }


METHODS = {
    "default": "Graft's default: the 3 finalists' heads trained on the whole split, best validation accuracy",
    "logme": "LogME on the sample alone (choose.finalists=1, Graft's selection until now)",
    "probe": "held-out linear probe on the sample alone (choose.finalists=1, choose.score=probe)",
    "finalists2_logme": "the top 2 by LogME trained (choose.finalists=2)",
    "finalists2_probe": "the top 2 by the sample probe trained (choose.finalists=2, choose.score=probe)",
    "logme_whole_split": "LogME on the whole training split",
    "probe_cv_whole_split": "logistic-regression probe, 5-fold cross-validated on the whole training split",
    "probe_whole_split_val": "logistic-regression probe fitted on the whole training split, scored on validation",
    "knn_whole_split_val": "5-nearest-neighbour (cosine) on the whole training split, scored on validation",
    "head_on_sample_val": "the feature_extraction head trained on the sample only, scored on validation",
}
"""Each selection compared, by the key its order is stored under."""


def method_orders(choice: ChooseResult, rows: dict[str, dict]) -> dict[str, list[str]]:
    """Each method's order of the pre-trained candidates, best first."""
    names = [n for n in rows if rows[n]["pretrained"]]

    def by(key: str) -> list[str]:
        return sorted(names, key=lambda n: -rows[n][key])

    def finalists(key: str, k: int) -> list[str]:
        top = by(key)[:k]
        return sorted(top, key=lambda n: -rows[n]["trained_val_accuracy"]) + [n for n in by(key) if n not in top]

    default = [r.name for r in choice.candidates if r.name in names]
    orders = {"default": default, "logme": by("logme"), "probe": by("probe_accuracy"),
              "finalists2_logme": finalists("logme", 2), "finalists2_probe": finalists("probe_accuracy", 2)}
    orders.update({key: by(key) for key in METHODS if key not in orders})
    return orders


def judge(orders: dict[str, list[str]], rows: dict[str, dict]) -> dict[str, dict]:
    """Pick, Kendall tau and regret of every method against the trained ground truth (and the seed mean)."""
    out = {}
    for method, order in orders.items():
        truth = [rows[n]["trained_val_accuracy"] for n in order]
        mean = [rows[n]["trained_val_accuracy_seed_mean"] for n in order]
        pick = order[0]
        out[method] = {
            "pick": pick,
            "order": order,
            "kendall_tau": float(kendalltau(-np.arange(len(order)), truth).statistic),
            "regret_points": round(100 * (max(truth) - rows[pick]["trained_val_accuracy"]), 2),
            "regret_points_seed_mean": round(100 * (max(mean) - rows[pick]["trained_val_accuracy_seed_mean"]), 2),
        }
    return out


# ---------------------------------------------------------------- one data set


def accuracy_part(name: str, data_dir: Path, work: Path, timing: bool) -> tuple[dict, Params, Split, ChooseResult]:
    """Selection, the ground truth and every method's verdict; latency only where timings are allowed."""
    params = params_for(data_dir, work / name / "cache")
    split = scan(params.data.dir, SplitSettings.from_config(params.data))
    log.info("%s: %d train / %d val images, %d classes", name, len(split.train), len(split.val), len(split.classes))
    choice = select(params, split)
    rows: dict[str, dict] = {}
    for row in choice.candidates:
        size = row.image_size or 0
        train_x, val_x = split_features(params, split, row.name, size)
        rows[row.name] = {
            "pretrained": row.pretrained, "status": row.status, "logme": row.logme, "probe_accuracy": row.probe_accuracy,
            "score_rank": row.score_rank, "finalist_val_accuracy": row.val_accuracy, "trained_rank": row.trained_rank,
            "trained_val_accuracy": trained_accuracy(params, split, row.name, size, work / name / "truth"),
            "trained_val_accuracy_seed_mean": seed_mean_accuracy(params, split, train_x, val_x),
            "params_m": row.params_m, "size_mb": row.size_mb, "latency_ms": row.latency_ms if timing else None,
            **alternative_scores(params, split, train_x, val_x),
        }
    judged = judge(method_orders(choice, rows), rows)
    finalists = [row for row in rows.values() if row["finalist_val_accuracy"] is not None]
    pretrained = [row["trained_val_accuracy"] for row in rows.values() if row["pretrained"]]
    result = {
        "dataset": name,
        "images": {"train": len(split.train), "val": len(split.val), "classes": len(split.classes)},
        "image_size": params.data.image_size, "sample_size": params.choose.sample_size,
        "strategy": params.train.strategy,
        "chosen": choice.chosen, "reason": choice.reason, "score_pick": choice.score_pick,
        "candidates": rows, "methods": judged,
        "random_trains_below_every_pretrained": all(
            row["trained_val_accuracy"] < min(pretrained) for row in rows.values() if not row["pretrained"]
        ),
        "finalists_match_the_fine_tune_stage": all(
            abs(row["finalist_val_accuracy"] - row["trained_val_accuracy"]) < 1e-6 for row in finalists
        ),
    }
    return result, params, split, choice


def cost_part(params: Params, split: Split, choice: ChooseResult, work: Path, repeats: int, fine_tune_repeats: int) -> dict:
    """Selection against one run of each strategy, all from the state a scheduled retrain meets."""
    cache = params.data.cache_dir

    def empty(*parts: str) -> Callable[[], None]:
        def remove() -> None:
            for part in parts:
                shutil.rmtree(cache / part, ignore_errors=True)

        return remove

    run_dir = work / "cost-runs"
    chosen = ChooseResult(choice.chosen, choice.image_size, "logme", "benchmark", (), 0.0)
    onnx_path = Path(next(row.onnx_path for row in choice.candidates if row.name == choice.chosen))
    score_only = with_section(params, "choose", finalists=1)
    timers = {
        "selection_new_data": timed(repeats, empty("features"), lambda: select(params, split)),
        "feature_extraction_after_selection": timed(repeats, lambda: select(params, split), lambda: fine_tune(params, split, chosen, run_dir)),
        "selection_new_data_score_only": timed(repeats, empty("features"), lambda: select(score_only, split)),
        "selection_cold": timed(repeats, empty("features", "onnx"), lambda: select(params, split)),
        "feature_extraction_run": timed(repeats, empty("features"), lambda: fine_tune(params, split, chosen, run_dir)),
        "feature_extraction_run_onnx_features": timed(
            repeats, empty("features"), lambda: head_on_onnx_features(params, split, choice.chosen, choice.image_size, onnx_path)
        ),
    }
    if fine_tune_repeats:
        tuned = with_section(params, "train", strategy="fine_tune")
        timers["fine_tune_run"] = timed(fine_tune_repeats, lambda: None, lambda: fine_tune(tuned, split, chosen, run_dir))
    return timers


def head_on_onnx_features(params: Params, split: Split, name: str, image_size: int, onnx_path: Path) -> None:
    """feature_extraction as it would run if the fine-tune stage extracted features with onnxruntime, as
    selection does (it uses eager PyTorch): the stricter yardstick for selection's cost."""
    cache = FeatureCache(params.data.cache_dir, get_spec(name), image_size, seed=params.train.seed)
    extractor = OnnxFeatures(onnx_path)
    train_x = cache.get([s.path for s in split.train], params.choose.batch_size, extractor=extractor)
    val_x = cache.get([s.path for s in split.val], params.choose.batch_size, extractor=extractor)
    train_head(params, train_x, labels(split.train), val_x, labels(split.val))


def ratios(timers: dict) -> dict[str, float]:
    fe = timers["feature_extraction_run"].median
    fe_onnx = timers["feature_extraction_run_onnx_features"].median
    out = {
        "selection_new_data_over_feature_extraction": timers["selection_new_data"].median / fe,
        "selection_new_data_over_feature_extraction_onnx_features": timers["selection_new_data"].median / fe_onnx,
        "selection_cold_over_feature_extraction": timers["selection_cold"].median / fe,
        "score_only_new_data_over_feature_extraction": timers["selection_new_data_score_only"].median / fe,
        "selection_and_training_over_training_alone":
            (timers["selection_new_data"].median + timers["feature_extraction_after_selection"].median) / fe,
    }
    if "fine_tune_run" in timers:
        tuned = timers["fine_tune_run"].median
        out["selection_new_data_over_fine_tune"] = timers["selection_new_data"].median / tuned
        out["selection_cold_over_fine_tune"] = timers["selection_cold"].median / tuned
    return {key: round(value, 3) for key, value in out.items()}


# ---------------------------------------------------------------- goals and the report


def misses(results: list[dict]) -> list[str]:
    """Every measured figure that misses a goal."""
    out = []
    for res in results:
        if not res["finalists_match_the_fine_tune_stage"]:
            out.append(f"{res['dataset']}: a finalist's validation accuracy in selection differs from the fine-tune stage's")
        regret = res["methods"]["default"]["regret_points"]
        if regret > REGRET_GOAL:
            out.append(f"{res['dataset']}: the default selection's regret is {regret} points (goal <= {REGRET_GOAL})")
        cost = res.get("cost_ratios") or {}
        if cost.get("selection_new_data_over_feature_extraction", 0) > COST_GOALS["feature_extraction"]:
            out.append(f"{res['dataset']}: selection costs {cost['selection_new_data_over_feature_extraction']}x one feature_extraction run (goal <= 2)")
        if cost.get("selection_new_data_over_fine_tune", 0) > COST_GOALS["fine_tune"]:
            out.append(f"{res['dataset']}: selection costs {cost['selection_new_data_over_fine_tune']}x one fine_tune run (goal <= 0.2)")
    return out


def _cell(value: float | None, fmt: str) -> str:
    return f"{value:{fmt}}" if value is not None else "-"


def _acc(value: float | None) -> str:
    return _cell(value, ".3f")


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        "# Choose benchmark",
        "",
        "`benchmarks/choose.py`: does the choose stage pick the backbone that trains best, and at what cost?",
        "Ground truth: each candidate trained by the fine-tune stage with params.yaml's `train.strategy` "
        f"({report['results'][0]['strategy']}), scored on validation. Regret: the best trained accuracy minus the pick's, in points.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({', '.join(machine['cpu_flags'])}); Python {machine['python']}, "
        f"torch {machine['torch']}, onnxruntime {machine['onnxruntime']}, numpy {machine['numpy']}, scikit-learn "
        f"{machine['scikit-learn']}. Each data set below says when it ran, the load average then, and what became of its timings.",
        "",
        "| data set | images (train / val / classes) | default pick | regret | tau | LogME pick | LogME regret | LogME tau | selection / feature_extraction run | selection / fine_tune run |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for res in report["results"]:
        d, lm, cost = res["methods"]["default"], res["methods"]["logme"], res.get("cost_ratios") or {}
        images = res["images"]
        lines.append(
            f"| {res['dataset']} | {images['train']} / {images['val']} / {images['classes']} | {d['pick']} | {d['regret_points']:.2f} | "
            f"{d['kendall_tau']:.2f} | {lm['pick']} | {lm['regret_points']:.2f} | {lm['kendall_tau']:.2f} | "
            f"{cost.get('selection_new_data_over_feature_extraction', '-')} | {cost.get('selection_new_data_over_fine_tune', '-')} |"
        )
    for res in report["results"]:
        lines += _dataset_markdown(res)
    lines += ["", "Methods:", ""] + [f"- `{key}`: {text}" for key, text in METHODS.items()]
    return "\n".join(lines) + "\n"


def _dataset_markdown(res: dict) -> list[str]:
    images = res["images"]
    lines = [
        "",
        f"## {res['dataset']} ({images['train']} train / {images['val']} val, {images['classes']} classes, "
        f"{res['image_size']} px, sample {res['sample_size']})",
        "",
        _measured(res),
        "",
        f"Chosen: **{res['chosen']}** ({res['reason']}). Each finalist's validation accuracy in selection is the "
        f"fine-tune stage's: {res['finalists_match_the_fine_tune_stage']}. The random baseline trains below every "
        f"pre-trained candidate: {res['random_trains_below_every_pretrained']}.",
        "",
        "| candidate | LogME | probe (sample) | trained val acc | mean of 5 seeds | LogME (whole split) | probe CV | probe val | k-NN val | head on sample | ms/img | MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in res["candidates"].items():
        lines.append(
            f"| {name} | {c['logme']:.4f} | {_acc(c['probe_accuracy'])} | {c['trained_val_accuracy']:.3f} | "
            f"{c['trained_val_accuracy_seed_mean']:.3f} | {c['logme_whole_split']:.4f} | {c['probe_cv_whole_split']:.3f} | "
            f"{c['probe_whole_split_val']:.3f} | {c['knn_whole_split_val']:.3f} | {c['head_on_sample_val']:.3f} | "
            f"{_cell(c['latency_ms'], '.2f')} | {_cell(c['size_mb'], '.1f')} |"
        )
    lines += ["", "| selection | pick | Kendall tau | regret (points) | regret vs the 5-seed mean |", "|---|---|---:|---:|---:|"]
    for method, m in res["methods"].items():
        lines.append(f"| `{method}` | {m['pick']} | {m['kendall_tau']:.2f} | {m['regret_points']:.2f} | {m['regret_points_seed_mean']:.2f} |")
    if res.get("cost"):
        lines += ["", "| cost (median of runs) | seconds | runs | other processes (cores) |", "|---|---:|---|---:|"]
        for key, timer in res["cost"].items():
            lines.append(f"| {key} | {timer['median_s']} | {timer['runs_s']} | {timer['other_processes_cores']} |")
        lines += ["", "Ratios: " + ", ".join(f"{k} {v}" for k, v in res["cost_ratios"].items())]
    return lines


def _measured(res: dict) -> str:
    measured = res.get("measured", {})
    refused = f"; not written: {res['cost_refused']}" if res.get("cost_refused") else ""
    return (
        f"Run {measured.get('at', '?')}, load average {measured.get('load_average_at_start', '?')} at the start and "
        f"{measured.get('load_average_at_end', '?')} at the end; timings {measured.get('timings', '?')}{refused}."
    )


def run_dataset(name: str, data_dir: Path, work: Path, args: argparse.Namespace, timing: bool, timings_note: str) -> dict:
    started_load = [round(x, 2) for x in os.getloadavg()]
    result, params, split, choice = accuracy_part(name, data_dir, work, timing)
    result["measured"] = {"at": time.strftime("%Y-%m-%d %H:%M"), "load_average_at_start": started_load, "timings": timings_note}
    if timing:
        timers = cost_part(params, split, choice, work / name, args.repeats, args.fine_tune_repeats)
        noisy = {key: round(timer.others_cores or 0, 2) for key, timer in timers.items() if not timer.quiet}
        if noisy:
            result["cost_refused"] = f"other processes kept {noisy} cores busy while timing (limit {BUSY_OTHERS_CORES})"
            log.warning("%s: timings not written: %s", name, result["cost_refused"])
        if not noisy or args.quick:  # --quick writes nothing: show them anyway
            result["cost"] = {key: timer.to_dict() for key, timer in timers.items()}
            result["cost_ratios"] = ratios(timers)
    result["measured"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def merged(results: list[dict]) -> list[dict]:
    """These results, and the committed ones of the data sets not run now (each keeps its own machine state)."""
    path = RESULTS / "choose.json"
    try:
        earlier = {res["dataset"]: res for res in json.loads(path.read_text())["results"]}
    except (OSError, ValueError, KeyError, TypeError):
        earlier = {}
    earlier.update({res["dataset"]: res for res in results})
    return [earlier[name] for name in DATASETS if name in earlier]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--datasets", default=",".join(DATASETS), help="comma-separated subset; the others' committed results are kept"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is reported)")
    parser.add_argument("--fine-tune-repeats", type=int, default=3, help="timed fine_tune runs (0 skips them)")
    parser.add_argument("--no-timings", action="store_true", help="accuracy and regret only")
    parser.add_argument(
        "--quick", action="store_true", help="small copies of the sets, one repeat, timings even on a busy machine, nothing written"
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.fine_tune_repeats = 1, 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "components.backbones.features", "components.train.loop"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    machine = machine_state()
    load = machine["load_average"][0]
    timing = not args.no_timings and (load <= busy_load() or args.quick)
    if args.no_timings:
        timings_note = "not measured (--no-timings)"
    elif not timing:
        timings_note = f"not measured: the 1-minute load average was {load} before starting, above {busy_load():g} ({BUSY_LOAD_PER_CORE} per core)"
    else:
        timings_note = (
            f"medians of {args.repeats} runs ({args.fine_tune_repeats} for fine_tune), written only if other processes kept "
            f"at most {BUSY_OTHERS_CORES} cores busy meanwhile"
            + (" (--quick: measured whatever the load)" if args.quick else f" (load average before starting {load} <= {busy_load():g})")
        )
    log.info("machine: %s; timings %s", machine, timings_note)
    work = Path(tempfile.mkdtemp(prefix="graft-choose-bench-"))
    try:
        sets = datasets(work / "data", args.quick)
        chosen = [name.strip() for name in args.datasets.split(",")]
        results = [run_dataset(name, sets[name], work, args, timing, timings_note) for name in chosen]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.quick:
        results = merged(results)
    report = {"machine": machine, "goals": {"regret_points": REGRET_GOAL, "selection_over": COST_GOALS}, "results": results}
    report["misses"] = misses(results)
    text = markdown(report)
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "choose.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "choose.md").write_text(text)
        print(f"wrote {RESULTS / 'choose.json'} and {RESULTS / 'choose.md'}")
    for miss in report["misses"]:
        print(f"GOAL MISSED: {miss}")
    sys.exit(1 if report["misses"] else 0)


if __name__ == "__main__":
    main()
