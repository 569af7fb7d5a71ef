"""Whole runs: what `graft run` costs end to end, where its fixed costs go, and the foundation budgets.

    .venv/bin/python benchmarks/pipeline.py                 # strategies and start-up on a few hundred images
    .venv/bin/python benchmarks/pipeline.py --budgets       # + the flow on the demo data, warm and cold cache
    .venv/bin/python benchmarks/pipeline.py --fresh-clone   # + clone, `make run` and `make test` from nothing

1. Strategies (issue 17): `graft run` on 600 demo digits (about 420 training images, 112 px, the
   three-way split) with `train.strategy=feature_extraction` and with `fine_tune`, each twice: cold
   (new caches, store and Prefect home: the first run of a new project) and warm (the same again: a
   rerun, which trains the same weights and so copies its `pt2` model and variants from the build cache);
   then feature_extraction once more on 600 other digits in the same project (Prefect's
   database and the MLflow store exist, every image is new: a run on new data). A new project is one on a machine
   that has run Graft before: what Graft keeps for every project (`~/.cache/graft`: Prefect's and MLflow's empty
   databases, the candidates' latencies, the zoo backbones' exported graphs) is there after the first round. So each
   round also runs feature_extraction once with its own empty `$XDG_CACHE_HOME`: a machine's first run. The whole sequence runs three
   times (`--rounds`), each round in new folders, and each figure is the round with the median wall time, every
   round's wall time beside it. Each run is one `graft run` process, timed from outside, with a timeline from inside:
   imports, the embedded Prefect API, every stage and every deploy step (`components.core.progress`
   marks them; the benchmark only listens), and its CPU time (with the embedded API's): `cores_busy` is
   the share of the machine's cores it kept busy. The runs get an empty `deploy.graph_template_dir`: were
   the torch.export-based exporter to run (`deploy.exporter: dynamo`, or a failed trace), it would run as
   on a machine's first export. Goals: a cold feature_extraction run under 20 s; a cold fine_tune run at
   most 1.7x the cold feature_extraction run.
   `benchmarks/results/pipeline_timeline.png` draws each run's timeline against the 20 s goal (`--plot`
   draws it again from the results file).
2. Start-up: `python -X importtime` of the flow's modules (the heaviest named), and the embedded
   Prefect API's start alone.
3. Budgets (issue 2, `--budgets`, `--fresh-clone`): `make run` from a fresh clone <= 15 min including
   the install, the flow itself <= 5 min, `make test` on a warm .venv <= 15 min.

Timings are written only when the machine was quiet before and during the runs (`benchmarks/machine.py`),
unless --force. Results go to benchmarks/results/pipeline.json (merged with earlier measurements), with
the host's matrix-product speed when the runs began (`peak`): on a shared host a quiet machine is not always
an equally fast one, and two results are compared by it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from benchmarks.machine import Verdict, Watch, peak_gflops, state  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "pipeline.json"
TIMELINE_PLOT = RESULTS.with_name("pipeline_timeline.png")
BUDGETS_S = {"flow": 300, "make_run_fresh": 900, "make_test_warm": 900}
GOALS = {"feature_extraction_cold_s": 20.0, "fine_tune_over_feature_extraction": 1.7}
OPTIONAL = ("flow_warm_cache", "flow_cold_cache", "make_run_fresh_s", "make_test_warm_s")
"""Sections only `--budgets` and `--fresh-clone` measure: a run without them keeps the file's, under `earlier`."""
PER_CLASS = 60
ROUNDS = 3
"""Rounds of the whole sequence of runs; each figure is the median round's."""

# Runs `graft run` as the `graft` command does (flows.cli.entry, its exit included) with a stopwatch on the
# progress marks the flow already makes; the events are written by an exit handler, which entry runs last.
TIMELINE = r"""
import atexit, json, sys, time
t0 = time.perf_counter()
from components.core import progress
events = []
for fn in ("enter_stage", "leave_stage", "note"):
    original = getattr(progress, fn)
    def marked(step, original=original, fn=fn):
        events.append([round(time.perf_counter() - t0, 3), fn, step])
        return original(step)
    setattr(progress, fn, marked)
path = sys.argv[1]
def write():
    events.append([round(time.perf_counter() - t0, 3), "exit", ""])
    open(path, "w").write(json.dumps(events))
atexit.register(write)
from flows.cli import entry
events.append([round(time.perf_counter() - t0, 3), "imported", "flows.cli"])
sys.argv = [sys.argv[0], *sys.argv[2:]]
entry()  # the flow's own modules are imported while the embedded Prefect API starts
"""


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    print(f"$ {' '.join(cmd)}  (in {cwd})", flush=True)
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed after {seconds:.0f}s:\n{result.stderr[-3000:]}")
    return seconds


def timeline(events: list[list], wall: float) -> dict[str, object]:
    """Seconds of each part of a run: interpreter, imports, Prefect API and flow start, stages, deploy steps, the end."""
    marks = {(kind, name): at for at, kind, name in events}
    imported = marks[("imported", "flows.cli")]
    first = next(at for at, kind, _ in events if kind == "enter_stage")
    stages, steps, current = {}, {}, None
    for (at, kind, name), (after, _, _) in zip(events, events[1:], strict=False):
        if kind == "enter_stage":
            current = name
        if current == "deploy" and kind in ("enter_stage", "note"):
            steps[name if kind == "note" else "start"] = round(after - at, 2)
        if kind == "enter_stage":
            stages[name] = round(marks.get(("leave_stage", name), at) - at, 2)
    last_leave = max(at for at, kind, _ in events if kind == "leave_stage")
    in_process = marks[("exit", "")]
    return {
        "wall_s": round(wall, 2),
        "interpreter_s": round(wall - in_process, 2),
        "imports_s": round(imported, 2),  # the CLI only: the flow's modules load while the embedded API starts
        "prefect_api_and_flow_start_s": round(first - imported, 2),  # the API's start, with the flow's imports beside it
        "stages_s": stages,
        "between_stages_s": round(last_leave - first - sum(stages.values()), 2),
        "after_last_stage_s": round(in_process - last_leave, 2),
        "outside_stages_s": round(wall - sum(stages.values()), 2),
        "deploy_steps_s": steps,
    }


def graft_run(work: Path, data: Path, strategy: str, label: str, verdict: Verdict, templates: Path | None = None,
              user_cache: Path | None = None) -> dict:
    """One `graft run` in its own process, with its timeline; `templates`: its `deploy.graph_template_dir`;
    `user_cache`: its `$XDG_CACHE_HOME` (else the machine's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    (work / "prefect").mkdir(parents=True, exist_ok=True)
    env.update(PREFECT_HOME=str(work / "prefect"), PYTHONPATH=str(REPO))
    if user_cache is not None:
        env["XDG_CACHE_HOME"] = str(user_cache)
    events_path, summary = work / f"{label}.events.json", work / f"{label}.summary.json"
    cmd = [sys.executable, "-c", TIMELINE, str(events_path), "run", "--summary", str(summary),
           "--set", f"data.dir={data}", "--set", f"data.cache_dir={work / 'cache'}", "--set", f"train.strategy={strategy}",
           "--set", f"tracking.store_dir={work / 'mlflow'}", "--set", f"deploy.output_dir={work / 'outputs'}"]
    if templates is not None:
        cmd += ["--set", f"deploy.graph_template_dir={templates}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with Watch() as watch:
        wall = timed(cmd, REPO, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    verdict.saw(label, watch)
    content = json.loads(summary.read_text())
    out = timeline(json.loads(events_path.read_text()), wall)
    # CPU of the run and of what it waited for (the embedded Prefect API): how busy it kept the cores
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out.update(chosen=content["chosen"], test_accuracy=content.get("test", {}).get("accuracy"), stage_seconds=content["timings"],
               others_cores=watch.others_cores, cpu_s=round(cpu, 1), cores_busy=round(cpu / wall / (os.cpu_count() or 1), 2))
    print(label, json.dumps(out), flush=True)
    return out


def strategies(verdict: Verdict, rounds: int = ROUNDS) -> dict:
    """Every run of the sequence below, `rounds` times over, each round in new project folders; each entry is
    the round with the median wall time (its whole timeline), with every round's wall time beside it."""
    from components.data.demo import write_digits

    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_digits(Path(tmp) / "digits", per_class=PER_CLASS)
        other = _other_digits(Path(tmp) / "other-digits")
        for number in range(1, rounds + 1):
            root = Path(tmp) / f"round-{number}"
            templates = root / "graph-templates"  # empty: no torch.export-based export of the architecture before
            runs.setdefault("feature_extraction_first_on_machine", []).append(graft_run(
                root / "first-on-machine", data, "feature_extraction", f"feature_extraction_first_on_machine.round{number}", verdict,
                user_cache=root / "user-cache"))  # its graph templates too: `deploy.graph_template_dir` is null
            for strategy in ("feature_extraction", "fine_tune"):
                for label in ("cold", "warm"):
                    name = f"{strategy}_{label}"
                    runs.setdefault(name, []).append(graft_run(root / strategy, data, strategy, f"{name}.round{number}", verdict, templates))
            # the project as it is after those runs (Prefect's database and the MLflow store exist), new images
            runs.setdefault("feature_extraction_new_images", []).append(graft_run(
                root / "feature_extraction", other, "feature_extraction", f"feature_extraction_new_images.round{number}", verdict, templates))
    out: dict[str, object] = {name: median_run(done) for name, done in runs.items()}
    ratios = [ft["wall_s"] / fe["wall_s"] for fe, ft in zip(runs["feature_extraction_cold"], runs["fine_tune_cold"], strict=True)]
    fe, ratio = out["feature_extraction_cold"]["wall_s"], statistics.median(ratios)
    out["fine_tune_over_feature_extraction"] = round(ratio, 2)  # the median of the rounds' own ratios: each pair shared its hour
    out["fine_tune_over_feature_extraction_rounds"] = [round(r, 2) for r in ratios]
    out["rounds"] = rounds
    out["goals"] = {
        "feature_extraction_cold_under_20_s": fe <= GOALS["feature_extraction_cold_s"],
        "fine_tune_at_most_1_7x": ratio <= GOALS["fine_tune_over_feature_extraction"],
    }
    out["images"] = f"{PER_CLASS * 10} demo digits (write_digits(per_class={PER_CLASS})), params.yaml's three-way split, 112 px"
    return out


def median_run(done: list[dict]) -> dict:
    """The run with the median wall time (the lower middle of an even number), with its own timeline, and the
    median and every round's wall time."""
    walls = [run["wall_s"] for run in done]
    middle = sorted(done, key=lambda run: run["wall_s"])[(len(done) - 1) // 2]
    return {**middle, "wall_s": round(statistics.median(walls), 2), "wall_s_rounds": walls}


def _other_digits(root: Path) -> Path:
    """PER_CLASS other digit scans per class: none of the images the first runs saw."""
    from components.data.demo import write_digits

    write_digits(root, per_class=2 * PER_CLASS)
    for folder in root.iterdir():
        for seen in sorted(folder.iterdir(), key=lambda f: int(f.stem))[:PER_CLASS]:
            seen.unlink()
    return root


def import_times() -> dict:
    """`python -X importtime -c 'import flows.training'` in a fresh interpreter: the total and the heaviest packages."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import flows.training"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=True)
    rows = []
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            _, cumulative, name = line[len("import time:"):].split("|")
            rows.append((len(name) - len(name.lstrip(" ")), int(cumulative), name.strip()))
    top = max(cumulative for depth, cumulative, name in rows if name == "flows.training")
    wanted = ("torch", "prefect", "mlflow", "onnx", "onnxruntime", "torchvision", "timm", "pydantic", "numpy", "PIL", "sklearn", "scipy")
    heavy = {}
    for _, cumulative, name in rows:
        if name in wanted:
            heavy[name] = max(heavy.get(name, 0), cumulative)
    return {"flows_training_s": round(top / 1e6, 2), "packages_s": {k: round(v / 1e6, 2) for k, v in sorted(heavy.items(), key=lambda kv: -kv[1])}}


def prefect_api_start() -> float:
    """Seconds to start (and stop) Prefect's embedded API alone, as `graft run` starts it."""
    code = ("import atexit, shutil, time, tempfile, os; os.environ['PREFECT_HOME'] = home = tempfile.mkdtemp(prefix='graft-bench-prefect-'); "
            "atexit.register(shutil.rmtree, home, ignore_errors=True); "
            "os.environ.setdefault('PREFECT_SERVER_ANALYTICS_ENABLED', 'false'); os.environ.setdefault('PREFECT_UI_ENABLED', 'false'); "
            "os.environ.setdefault('PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS', '120'); "
            "from flows.interrupts import _DetachedPrefectAPI; api = _DetachedPrefectAPI(); t = time.perf_counter(); api.launch(); api.wait(); "
            "print(time.perf_counter() - t); api.stop()")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, check=True)
    return round(float(result.stdout.strip().splitlines()[-1]), 2)


def flow_once(workdir: Path) -> dict:
    """`graft run` on the demo data with a throwaway MLflow store and output folder."""
    summary = workdir / "summary.json"
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    seconds = timed(
        [str(REPO / ".venv/bin/graft"), "run", "--summary", str(summary),
         "--set", f"tracking.store_dir={workdir / 'mlflow'}", "--set", f"deploy.output_dir={workdir / 'outputs'}"],
        REPO, env,
    )
    content = json.loads(summary.read_text())
    return {"seconds": round(seconds, 1), "stage_seconds": content["timings"], "test_accuracy": content.get("test", {}).get("accuracy"), "chosen": content["chosen"]}


RUNS_PLOTTED = {
    "feature_extraction_first_on_machine": "feature_extraction, machine's first run",
    "feature_extraction_cold": "feature_extraction, new project",
    "feature_extraction_warm": "feature_extraction, rerun",
    "feature_extraction_new_images": "feature_extraction, new images",
    "fine_tune_cold": "fine_tune, new project",
    "fine_tune_warm": "fine_tune, rerun",
}


def plot_timeline(results: dict, path: Path = TIMELINE_PLOT) -> Path:
    """One bar per run (the median round): where its wall time went, against the 20 s goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from components.core.files import save_figure

    runs = results["strategies"]
    parts = [("start: imports, Prefect API", "#9e9e9e"), ("data", "#bcaaa4"), ("choose", "#42a5f5"), ("fine-tune", "#66bb6a"),
             ("between stages (MLflow, pt2 model)", "#ffa726"), ("evaluate", "#ab47bc"), ("deploy", "#ef5350"), ("end", "#616161")]
    names = [name for name in RUNS_PLOTTED if name in runs]
    fig, ax = plt.subplots(figsize=(9.5, 0.55 * len(names) + 1.9))
    right = 0.0
    for row, name in enumerate(reversed(names)):
        run = runs[name]
        stages = run["stages_s"]
        widths = [run["interpreter_s"] + run["imports_s"] + run["prefect_api_and_flow_start_s"], stages.get("data", 0.0),
                  stages.get("choose", 0.0), stages.get("fine-tune", 0.0), run["between_stages_s"], stages.get("evaluate", 0.0),
                  stages.get("deploy", 0.0), run["after_last_stage_s"]]
        left = 0.0
        for (label, colour), width in zip(parts, widths, strict=True):
            ax.barh(row, width, left=left, color=colour, label=label if row == 0 else None)
            left += width
        ax.text(left + 0.3, row, f"{run['wall_s']:.1f} s", va="center", fontsize=9)
        right = max(right, left)
    ax.set_xlim(0, max(right, GOALS["feature_extraction_cold_s"]) * 1.12)  # room for the wall-time labels
    ax.axvline(GOALS["feature_extraction_cold_s"], color="black", linestyle="--", linewidth=1)
    ax.text(GOALS["feature_extraction_cold_s"] + 0.2, -0.65, "goal: 20 s", fontsize=8)
    ax.set_yticks(range(len(names)), [RUNS_PLOTTED[name] for name in reversed(names)])
    ax.set_xlabel("seconds")
    machine = results.get("machine", {})
    ax.set_title(f"graft run on 600 digits, the median of {runs.get('rounds', 1)} rounds\n{machine.get('at', '')}, "
                 f"{machine.get('cpu', {}).get('model', '')}, {machine.get('cpu', {}).get('cores', '')} cores", fontsize=10)
    ax.set_ylim(-0.8, len(names) - 0.4)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def merged(previous: dict, measured: dict) -> dict:
    """This run's results, with the optional sections it did not measure kept from the file, under `earlier`.

    Each kept section says when it was measured: the top level is this run's only, so that no figure
    of an older run (older code, another hour of the host) reads as part of this one."""
    earlier = dict(previous.get("earlier", {}))
    when = previous.get("measured_at") or previous.get("machine", {}).get("at", "unknown")
    for key in OPTIONAL:
        if key in previous:
            earlier[key] = {"value": previous[key], "measured_at": when}
    kept = {key: entry for key, entry in earlier.items() if key not in measured}
    return {**measured, **({"earlier": kept} if kept else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", action="store_true", help="also time the flow on the demo data, warm and cold cache")
    parser.add_argument("--fresh-clone", action="store_true", help="also time make run / make test from a fresh clone")
    parser.add_argument("--force", action="store_true", help="write timings even from a busy machine (marked as such)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of the runs (medians are reported; at least 1)")
    parser.add_argument("--plot", action="store_true", help="only draw the timeline figure again from the results file")
    args = parser.parse_args()
    if args.plot:
        print(f"wrote {plot_timeline(json.loads(RESULTS.read_text()))}")
        return
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    verdict = Verdict()
    if verdict.before:
        print(f"machine busy before starting: {verdict.before}; nothing will be written without --force", flush=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    # the host's speed now: a shared host's runs differ by a quarter from hour to hour at the same load
    measured: dict[str, object] = {"peak": peak_gflops()}
    measured.update({"strategies": strategies(verdict, args.rounds), "imports": import_times(), "prefect_api_start_s": prefect_api_start()})
    if args.budgets or args.fresh_clone:
        with tempfile.TemporaryDirectory() as tmp:
            if args.budgets:
                with Watch() as watch:
                    measured["flow_warm_cache"] = flow_once(Path(tmp) / "warm")
                    shutil.rmtree(REPO / ".cache" / "graft", ignore_errors=True)
                    measured["flow_cold_cache"] = flow_once(Path(tmp) / "cold")
                verdict.saw("budgets", watch)
            if args.fresh_clone:
                clone = Path(tmp) / "clone"
                subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
                env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "VIRTUAL_ENV"))}
                measured["make_run_fresh_s"] = round(timed(["make", "run"], clone, env), 1)
                measured["make_test_warm_s"] = round(timed(["make", "test"], clone, env), 1)
    measured.update(machine=state(), verdict=verdict.to_dict(), budgets_s=BUDGETS_S, goals_s=GOALS)
    print(json.dumps(measured, indent=2))
    if not (verdict.quiet or args.force):
        sys.exit(f"not written: {verdict.reason()} (rerun on a quiet machine, or --force to write it marked as busy)")
    results = merged(results, {**measured, "forced": args.force})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {RESULTS} and {plot_timeline(results)}")


if __name__ == "__main__":
    main()
