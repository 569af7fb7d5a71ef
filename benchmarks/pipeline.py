"""Foundation budgets: how long `make run` and `make test` take on this machine.

    .venv/bin/python benchmarks/pipeline.py                 # the flow on the demo data (warm .venv)
    .venv/bin/python benchmarks/pipeline.py --fresh-clone   # + clone, `make run` and `make test` from nothing

Budgets (issue 2): `make run` from a fresh clone <= 15 min including the install,
the flow itself <= 5 min, `make test` on a warm .venv <= 15 min. Results go to
benchmarks/results/pipeline.json (merged with earlier measurements).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "pipeline.json"
BUDGETS_S = {"flow": 300, "make_run_fresh": 900, "make_test_warm": 900}


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    print(f"$ {' '.join(cmd)}  (in {cwd})", flush=True)
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed after {seconds:.0f}s:\n{result.stderr[-3000:]}")
    return seconds


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
    return {"seconds": round(seconds, 1), "stage_seconds": content["timings"], "val_accuracy": content["val"]["accuracy"], "chosen": content["chosen"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh-clone", action="store_true", help="also time make run / make test from a fresh clone")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    results["budgets_s"] = BUDGETS_S
    with tempfile.TemporaryDirectory() as tmp:
        results["flow_warm_cache"] = flow_once(Path(tmp) / "warm")
        shutil.rmtree(REPO / ".cache" / "graft", ignore_errors=True)
        results["flow_cold_cache"] = flow_once(Path(tmp) / "cold")
        if args.fresh_clone:
            clone = Path(tmp) / "clone"
            subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "VIRTUAL_ENV"))}
            results["make_run_fresh_s"] = round(timed(["make", "run"], clone, env), 1)
            results["make_test_warm_s"] = round(timed(["make", "test"], clone, env), 1)
    results["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
