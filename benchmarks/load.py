"""Load benchmark: `graft serve` against `mlflow models serve` on the same registered model.

    .venv/bin/python benchmarks/load.py [--seconds 15] [--concurrency 1 8 32] [--soak 10000] [--force]

Trains a small head (efficientnet_lite0 at 64 px on three demo digit classes, as the tests do),
exports it, registers it in a throwaway SQLite MLflow store and makes it the `champion`. Then, one
server at a time, each in its own process on this machine:

- `graft serve --model models:/graft-load@champion`, sent what its users send: the image file
  (multipart upload; decoding and resizing happen in the server);
- `mlflow models serve -m models:/graft-load@champion --env-manager local` (MLflow's defaults: one
  uvicorn worker), sent what its users send: the model's input as JSON `{"inputs": ...}`, the
  64 x 64 x 3 uint8 array of the same image (decoded and resized by the client, untimed).

At each of `--concurrency` levels, that many client threads (httpx, keep-alive) send single-image
requests for `--seconds`; throughput, p50 and p99 and errors per server and level. Then
`--soak` more requests to `graft serve` with the server's resident memory after every 1,000 (it
must stay flat). Last, whether batching requests together could help: onnxruntime's time per image
at batch 1, 8 and 32 against the server's CPU time per request.

Timings are written only when the machine was quiet before and during the run (the servers' CPU
counts as the benchmark's own; `benchmarks/machine.py`), unless --force.
Writes benchmarks/results/load.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from benchmarks.machine import Verdict, Watch, process_cpu_seconds, state  # noqa: E402

NAME = "graft-load"
CLASSES = (0, 1, 7)
SIZE = 64
GOAL = 5.0
"""graft serve's throughput at least this many times MLflow's (issue 17)."""


def build_champion(work: Path) -> tuple[Path, list[tuple[Path, str]]]:
    """Train, export and register a small model; returns the serve params file and the (image, class) pairs."""
    from components.backbones.zoo import get_spec
    from components.choose.ranking import ChooseResult
    from components.core.config import load_params
    from components.data.demo import write_digits
    from components.data.folders import scan
    from components.deploy.export import export_and_verify
    from components.deploy.register import log_onnx_model, register_version
    from components.registry.history import move_alias
    from components.registry.tracking import parent_run
    from components.train.stage import fine_tune, load_classifier

    images = write_digits(work / "images", per_class=20, classes=CLASSES)
    overrides = [f"data.dir={images}", f"data.cache_dir={work / 'cache'}", f"data.image_size={SIZE}",
                 f"deploy.output_dir={work / 'outputs'}", f"deploy.model_name={NAME}", f"tracking.store_dir={work / 'mlflow'}"]
    params = load_params(ROOT / "params.yaml", overrides)
    split = scan(params.data.dir)
    print(f"training a {len(split.classes)}-class head on {len(split.train)} images ...", flush=True)
    trained = fine_tune(params, split, ChooseResult("efficientnet_lite0", SIZE, "logme", "fixed for the benchmark", (), 0.0), work / "run")
    model, _ = load_classifier(trained.checkpoint_path)
    spec = get_spec(trained.backbone)
    meta = {"classes": list(split.classes), "image_size": SIZE, "mean": list(spec.mean), "std": list(spec.std),
            "backbone": trained.backbone, "data_md5": "benchmark"}
    exported = export_and_verify(model, work / "model" / "model.onnx", SIZE, 18, meta, [s.path for s in split.val], 1e-4)
    with parent_run(params, run_name="load-benchmark") as run:
        source = log_onnx_model(run, exported.onnx_path, SIZE, len(split.classes))
        version = register_version(run, NAME, source, {"onnx.sha256": "benchmark"}, "load benchmark")
        move_alias(run.client, NAME, version, "gate", "benchmarks/load.py", "load benchmark")
    params_path = work / "serve-params.yaml"
    params_path.write_text(f"tracking:\n  store_dir: {work / 'mlflow'}\n")
    samples = [(s.path, split.classes[s.label]) for s in [*split.train, *split.val, *split.test]]
    return params_path, samples


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def descendants(pid: int) -> tuple[int, ...]:
    """The process and every process under it (MLflow's server runs uvicorn in a child)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            todo += [int(p) for p in Path(f"/proc/{current}/task/{current}/children").read_text().split()]
        except OSError:
            pass
    return tuple(found)


def start(command: list[str], env: dict[str, str], cwd: Path, log_path: Path, health: str) -> subprocess.Popen:
    import httpx

    log = open(log_path, "w")  # noqa: SIM115 - lives as long as the server
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{command[0]} exited with {server.returncode}; see {log_path}")
        try:
            if httpx.get(health, timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    stop(server)
    raise TimeoutError(f"{' '.join(command[:3])} did not answer {health} within 300 s; see {log_path}")


def stop(server: subprocess.Popen) -> None:
    import signal

    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


class Client:
    """How one server is called: its URL and one request (method arguments, expected label) per sample."""

    def __init__(self, url: str, path: str, requests: list[tuple[dict, str]], label_of) -> None:  # noqa: ANN001 - response -> label
        self.url, self.path, self.requests, self.label_of = url, path, requests, label_of


class Load:
    """`concurrency` threads sending requests until `count` more are answered, or `seconds` pass."""

    def __init__(self, client: Client, concurrency: int) -> None:
        self.client, self.concurrency = client, concurrency
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.correct = 0
        self._lock = threading.Lock()
        self._sent = 0

    def run(self, count: int | None = None, seconds: float | None = None) -> float:
        deadline = time.monotonic() + (seconds if seconds is not None else 3600)
        left = [count if count is not None else 1 << 62]
        threads = [threading.Thread(target=self._worker, args=(deadline, left)) for _ in range(self.concurrency)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started

    def _worker(self, deadline: float, left: list[int]) -> None:
        import httpx

        with httpx.Client(base_url=self.client.url, timeout=60) as http:
            while time.monotonic() < deadline:
                with self._lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                    index, self._sent = self._sent, self._sent + 1
                kwargs, truth = self.client.requests[index % len(self.client.requests)]
                started = time.perf_counter()
                try:
                    response = http.post(self.client.path, **kwargs)
                    outcome = "ok" if response.status_code == 200 else f"HTTP {response.status_code}"
                    label = self.client.label_of(response.json()) if outcome == "ok" else None
                except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                    outcome, label = exc.__class__.__name__, None
                elapsed = time.perf_counter() - started
                with self._lock:
                    self.latencies.append(elapsed)
                    if outcome != "ok":
                        self.errors[outcome] = self.errors.get(outcome, 0) + 1
                    self.correct += label == truth

    def summary(self, seconds: float, server_cpu: float) -> dict[str, object]:
        latencies = np.array(self.latencies) * 1000
        done = len(latencies)
        return {
            "concurrency": self.concurrency, "requests": done, "seconds": round(seconds, 2),
            "throughput_rps": round(done / seconds, 1),
            "p50_ms": round(float(np.percentile(latencies, 50)), 2) if done else None,
            "p99_ms": round(float(np.percentile(latencies, 99)), 2) if done else None,
            "errors": sum(self.errors.values()), "errors_by_kind": self.errors,
            "correct_fraction": round(self.correct / done, 4) if done else None,
            "server_cpu_ms_per_request": round(server_cpu / max(done, 1) * 1000, 3),
        }


def levels(client: Client, pids: tuple[int, ...], concurrency: list[int], seconds: float, verdict: Verdict, name: str) -> list[dict]:
    rows = []
    Load(client, 2).run(count=50)  # warm-up: first requests allocate
    for level in concurrency:
        load = Load(client, level)
        cpu_before = process_cpu_seconds(pids)
        with Watch(also=pids) as watch:
            elapsed = load.run(seconds=seconds)
        verdict.saw(f"{name} at {level}", watch)
        rows.append({**load.summary(elapsed, process_cpu_seconds(pids) - cpu_before), "others_cores": watch.others_cores})
        print(f"{name}, {level} clients: {rows[-1]}", flush=True)
    return rows


def soak(client: Client, pid: int, count: int, verdict: Verdict) -> dict:
    """`count` requests to graft serve, its resident memory after every 1,000 (flat after warm-up)."""
    before = rss_kib(pid)
    load, every = Load(client, 4), []
    with Watch(also=(pid,)) as watch:
        elapsed = 0.0
        for done in range(0, count, 1000):
            elapsed += load.run(count=min(1000, count - done))
            every.append(round(rss_kib(pid) / 1024, 1))
    verdict.saw("graft serve soak", watch)
    summary = load.summary(elapsed, 0.0)
    summary.pop("server_cpu_ms_per_request")
    return {**summary, "rss_mib": {"before": round(before / 1024, 1), "every_1000": every},
            "rss_growth_after_warmup_mib": round(every[-1] - every[0], 1), "memory_flat": abs(every[-1] - every[0]) <= 10}


def batching(onnx_path: Path, images: np.ndarray) -> dict:
    """onnxruntime's time per image at batch 1, 8 and 32 on this model (the most batching requests could save)."""
    from components.runtime.model import OnnxClassifier

    session = OnnxClassifier(onnx_path, ["CPUExecutionProvider"])
    out = {}
    for size in (1, 8, 32):
        batch = np.resize(images, (size, *images.shape[1:]))
        session.predict_proba(batch)
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(max(1, 64 // size)):
                session.predict_proba(batch)
            runs.append((time.perf_counter() - started) / (max(1, 64 // size) * size))
        out[f"ms_per_image_batch{size}"] = round(statistics.median(runs) * 1000, 3)
    return out


def markdown(result: dict) -> str:
    machine, verdict = result["machine"], result["verdict"]
    cpu = machine["cpu"]
    quiet = verdict["quiet"] or result["forced"]
    lines = [
        "# Load benchmark: `graft serve` against `mlflow models serve`, one registered model",
        "",
        f"Run {machine['at']} on {cpu['model']}, {cpu['cores']} cores; {', '.join(f'{k} {v}' for k, v in machine['versions'].items())}; "
        f"load average {result['load_before']} before, {machine['load_average_1_5_15']} after. Model: {result['model']}. "
        f"Each server in its own process, the clients (httpx threads, keep-alive) in another, all on these {cpu['cores']} cores; "
        f"{result['seconds']} s per level. graft serve gets the image file (multipart upload); MLflow gets JSON "
        f"`{{\"inputs\": ...}}`, the {SIZE}x{SIZE}x3 uint8 array. Timings: "
        + ("written (the machine was quiet)." if verdict["quiet"] else f"NOT written: {verdict['reason']}" + (" (--force: written anyway, do not quote)" if result["forced"] else "") + "."),
        "",
        "| clients | graft serve req/s | p50 ms | p99 ms | errors | MLflow req/s | p50 ms | p99 ms | errors | graft / MLflow |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for graft, mlflow in zip(result["graft"], result["mlflow"], strict=True):
        ratio = graft["throughput_rps"] / mlflow["throughput_rps"] if quiet and mlflow["throughput_rps"] else None
        cells = [graft[k] if quiet else "busy" for k in ("throughput_rps", "p50_ms", "p99_ms")]
        mcells = [mlflow[k] if quiet else "busy" for k in ("throughput_rps", "p50_ms", "p99_ms")]
        lines.append(f"| {graft['concurrency']} | {cells[0]} | {cells[1]} | {cells[2]} | {graft['errors']} | {mcells[0]} | {mcells[1]} | "
                     f"{mcells[2]} | {'busy' if ratio is None else f'{ratio:.1f}x'} |")
    soak_row, batch = result["soak"], result["batching"]
    lines += [
        "",
        f"Goal: graft serve at least {GOAL:g}x MLflow's throughput: " + ("busy" if not quiet else ("met" if result["goal_met"] else "NOT met")) + ". "
        f"Correct labels: graft {result['graft'][-1]['correct_fraction']}, MLflow {result['mlflow'][-1]['correct_fraction']} (same model).",
        "",
        f"Soak: {soak_row['requests']:,} more requests to graft serve from 4 clients, {soak_row['errors']} errors; resident memory "
        f"{soak_row['rss_mib']['before']} MiB before, then after every 1,000: {', '.join(map(str, soak_row['rss_mib']['every_1000']))} MiB "
        f"(flat: {'yes' if soak_row['memory_flat'] else 'NO'}, {soak_row['rss_growth_after_warmup_mib']:+.1f} MiB from 1,000 to the end).",
        "",
        f"Batching requests together: onnxruntime takes {batch['ms_per_image_batch1']} ms per image at batch 1, {batch['ms_per_image_batch8']} at 8, "
        f"{batch['ms_per_image_batch32']} at 32; graft serve spends {result['graft_cpu_ms_per_request']} ms of CPU per request at "
        f"{result['graft'][-1]['concurrency']} clients. Batching could save at most "
        f"{result['batching_saves_at_most']:.0%} of that" + (" (busy machine: indicative only)" if not verdict["quiet"] else "") + ": "
        + ("worth a setting." if result["batching_saves_at_most"] >= 0.2 else "not added (the model is a small part of a request; "
           "waiting to fill a batch would add latency for little throughput)."),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15, help="seconds of load at each concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--soak", type=int, default=10_000, help="requests of graft serve's memory soak (0: none)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--force", action="store_true", help="write timings even from a busy machine (marked as such)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    verdict = Verdict()
    load_before = [round(x, 2) for x in os.getloadavg()]
    if verdict.before:
        print(f"machine busy before starting: {verdict.before}; timings written only with --force", flush=True)

    import onnxruntime  # noqa: F401 - its version goes into the state

    from components.data.images import load_batch

    work = Path(tempfile.mkdtemp(prefix="graft-load-"))
    params_path, pairs = build_champion(work)
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    bin_dir = Path(sys.executable).parent
    result: dict[str, object] = {}
    try:
        url = f"http://127.0.0.1:{args.port}"
        server = start([str(bin_dir / "graft"), "serve", "--model", f"models:/{NAME}@champion", "--params", str(params_path),
                        "--host", "127.0.0.1", "--port", str(args.port)], env, params_path.parent, work / "graft-serve.log", f"{url}/health")
        try:
            files = [({"files": {"file": (path.name, path.read_bytes(), "image/png")}}, truth) for path, truth in pairs]
            graft = Client(url, "/predict", files, lambda body: body["predictions"][0]["label"])
            result["graft"] = levels(graft, descendants(server.pid), args.concurrency, args.seconds, verdict, "graft serve")
            result["soak"] = soak(graft, server.pid, args.soak, verdict) if args.soak else None
        finally:
            stop(server)
        # MLflow starts `uvicorn` by name: this environment's bin folder goes first on PATH
        mlflow_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow' / 'mlflow.db'}", "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
        server = start([str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
                        "-h", "127.0.0.1", "-p", str(args.port)], mlflow_env, work, work / "mlflow-serve.log", f"{url}/ping")
        try:
            classes = sorted({truth for _, truth in pairs})
            arrays = load_batch([path for path, _ in pairs], SIZE)
            bodies = [({"content": json.dumps({"inputs": array[None].tolist()}), "headers": {"Content-Type": "application/json"}}, truth)
                      for array, (_, truth) in zip(arrays, pairs, strict=True)]
            # the ONNX flavour answers {"predictions": {"<output name>": [[...]]}}
            mlflow = Client(url, "/invocations", bodies, lambda body: classes[int(np.argmax(next(iter(body["predictions"].values()))[0]))])
            result["mlflow"] = levels(mlflow, descendants(server.pid), args.concurrency, args.seconds, verdict, "mlflow models serve")
        finally:
            stop(server)
        result["batching"] = batching(work / "model" / "model.onnx", load_batch([path for path, _ in pairs[:32]], SIZE))
    finally:
        shutil.rmtree(work / "cache", ignore_errors=True)
    graft_cpu = result["graft"][-1]["server_cpu_ms_per_request"]
    batch = result["batching"]
    result.update(
        machine=state(), verdict=verdict.to_dict(), forced=args.force, load_before=load_before, seconds=args.seconds,
        model=f"models:/{NAME}@champion (efficientnet_lite0, {SIZE} px, {len(CLASSES)} classes, onnxruntime fp32, CPU)",
        graft_cpu_ms_per_request=graft_cpu,
        batching_saves_at_most=max(0.0, (batch["ms_per_image_batch1"] - batch["ms_per_image_batch32"]) / graft_cpu) if graft_cpu else 0.0,
        goal_met=all(g["throughput_rps"] >= GOAL * m["throughput_rps"] for g, m in zip(result["graft"], result["mlflow"], strict=True)),
    )
    if not (verdict.quiet or args.force):
        for row in [*result["graft"], *result["mlflow"]]:
            for key in ("throughput_rps", "p50_ms", "p99_ms", "server_cpu_ms_per_request"):
                row[key] = None
        result["goal_met"] = None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "load.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    print(f"\nwrote {args.out / 'load.json'} and {args.out / 'load.md'}; server logs in {work}")
    errors = sum(row["errors"] for row in [*result["graft"], *result["mlflow"]]) + (result["soak"]["errors"] if result["soak"] else 0)
    return 1 if errors else (0 if verdict.quiet or args.force else 3)


if __name__ == "__main__":
    sys.exit(main())
