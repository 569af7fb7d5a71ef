"""Load benchmark: `graft serve` in its own process on localhost, hammered from this one.

    .venv/bin/python benchmarks/load.py [--requests 10000] [--concurrency 4] [--time-limit 900]

Trains a small head (efficientnet_lite0 at 64 px on three demo digit classes, as the tests
do), exports it, registers it in a throwaway SQLite MLflow store and makes it the
`champion`; then starts `graft serve --model models:/graft-load@champion` as a separate
process and sends single-image multipart uploads of the real demo digits from
`--concurrency` client threads. Measures throughput, p50/p99 latency, errors, how many
answers name the image's true class, and the server's resident memory (VmRSS) before the
first request and after every 1,000. Writes benchmarks/results/load.{json,md}.
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
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

NAME = "graft-load"
CLASSES = (0, 1, 7)


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
    overrides = [f"data.dir={images}", f"data.cache_dir={work / 'cache'}", "data.image_size=64",
                 f"deploy.output_dir={work / 'outputs'}", f"deploy.model_name={NAME}", f"tracking.store_dir={work / 'mlflow'}"]
    params = load_params(ROOT / "params.yaml", overrides)
    split = scan(params.data.dir)
    print(f"training a {len(split.classes)}-class head on {len(split.train)} images ...", flush=True)
    trained = fine_tune(params, split, ChooseResult("efficientnet_lite0", 64, "logme", "fixed for the benchmark", (), 0.0), work / "run")
    model, _ = load_classifier(trained.checkpoint_path)
    spec = get_spec(trained.backbone)
    meta = {"classes": list(split.classes), "image_size": 64, "mean": list(spec.mean), "std": list(spec.std),
            "backbone": trained.backbone, "data_md5": "benchmark"}
    exported = export_and_verify(model, work / "model" / "model.onnx", 64, 18, meta, [s.path for s in split.val], 1e-4)
    with parent_run(params, run_name="load-benchmark") as run:
        source = log_onnx_model(run, exported.onnx_path, 64, len(split.classes))
        version = register_version(run, NAME, source, {"onnx.sha256": "benchmark"}, "load benchmark")
        move_alias(run.client, NAME, version, "gate", "benchmarks/load.py", "load benchmark")
    params_path = work / "serve-params.yaml"
    params_path.write_text(f"tracking:\n  store_dir: {work / 'mlflow'}\n")
    samples = [(s.path, split.classes[s.label]) for s in [*split.train, *split.val]]
    return params_path, samples


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_server(params_path: Path, port: int, log_path: Path) -> subprocess.Popen:
    import httpx

    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    log = open(log_path, "w")  # noqa: SIM115 - lives as long as the server
    server = subprocess.Popen([str(Path(sys.executable).parent / "graft"), "serve", "--model", f"models:/{NAME}@champion",
                               "--params", str(params_path), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=params_path.parent)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"graft serve exited with {server.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    server.terminate()
    raise TimeoutError(f"graft serve did not answer /health within 180 s; see {log_path}")


class Load:
    """`concurrency` threads sending uploads until `count` more have been answered (or the deadline)."""

    def __init__(self, url: str, samples: list[tuple[bytes, str, str]], concurrency: int, deadline: float) -> None:
        self.url, self.samples, self.concurrency, self.deadline = url, samples, concurrency, deadline
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.correct = 0
        self._lock = threading.Lock()
        self._sent = 0
        self._left = 0

    def run(self, count: int) -> None:
        self._left = count
        threads = [threading.Thread(target=self._client) for _ in range(self.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _client(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=30) as http:
            while time.monotonic() < self.deadline:
                with self._lock:
                    if self._left <= 0:
                        return
                    self._left -= 1
                    index, self._sent = self._sent, self._sent + 1
                data, name, truth = self.samples[index % len(self.samples)]
                started = time.perf_counter()
                try:
                    response = http.post("/predict", files={"file": (name, data, "image/png")})
                    outcome = "ok" if response.status_code == 200 else f"HTTP {response.status_code}"
                    label = response.json()["predictions"][0]["label"] if outcome == "ok" else None
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    outcome, label = exc.__class__.__name__, None
                elapsed = time.perf_counter() - started
                with self._lock:
                    self.latencies.append(elapsed)
                    if outcome != "ok":
                        self.errors[outcome] = self.errors.get(outcome, 0) + 1
                    self.correct += label == truth


def markdown(result: dict) -> str:
    rss = result["server_rss_mib"]
    lines = [
        f"# Load benchmark: `graft serve` from a second process, {result['requests_done']:,} requests",
        "",
        f"{result['machine']} (1-minute load average {result['load_average_1min_at_end']} at the end). Model: {result['model']}. Requests: single-image multipart uploads of the demo digits, "
        f"{result['concurrency']} client threads (httpx, keep-alive) on the same host.",
        "",
        "| requests | concurrency | throughput (req/s) | p50 ms | p99 ms | errors | correct labels | RSS before | RSS after 1,000 | RSS after all | RSS growth 1,000 to end |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['requests_done']:,} | {result['concurrency']} | {result['throughput_rps']} | {result['p50_ms']} | {result['p99_ms']} | "
        f"{result['errors']} | {result['correct_fraction']:.4f} | {rss['before']} MiB | {rss['after_1000']} MiB | {rss['after_all']} MiB | "
        f"{result['rss_growth_after_warmup_mib']:+.1f} MiB |",
        "",
        "RSS after every 1,000 requests (MiB): " + ", ".join(f"{v}" for v in rss["every_1000"]),
        "",
        f"Goals: zero errors ({'met' if result['errors'] == 0 else 'NOT met'}); memory flat after warm-up "
        f"({'met' if result['memory_flat'] else 'NOT met'}: growth from 1,000 requests to the end within 10 MiB).",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=900, help="seconds of load at most (default 900)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="graft-load-"))
    server = None
    try:
        params_path, pairs = build_champion(work)
        samples = [(path.read_bytes(), path.name, truth) for path, truth in pairs]
        server = start_server(params_path, args.port, work / "serve.log")
        url = f"http://127.0.0.1:{args.port}"
        before = rss_kib(server.pid)
        load = Load(url, samples, args.concurrency, time.monotonic() + args.time_limit)
        every, started = [], time.perf_counter()
        for done in range(0, args.requests, 1000):
            load.run(min(1000, args.requests - done))
            every.append(round(rss_kib(server.pid) / 1024, 1))
            print(f"{len(load.latencies):,} requests, {sum(load.errors.values())} errors, server RSS {every[-1]} MiB", flush=True)
            if time.monotonic() >= load.deadline:
                print(f"stopped at the {args.time_limit:g} s time limit", flush=True)
                break
        seconds = time.perf_counter() - started
        alive = server.poll() is None and __import__("httpx").get(f"{url}/health", timeout=10).status_code == 200
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            server.wait(timeout=30)
    latencies = np.array(load.latencies) * 1000
    errors = sum(load.errors.values())
    rss = {"before": round(before / 1024, 1), "after_1000": every[0], "after_all": every[-1], "every_1000": every}
    import onnxruntime

    result = {
        "requests_asked": args.requests,
        "requests_done": len(latencies),
        "concurrency": args.concurrency,
        "seconds": round(seconds, 2),
        "throughput_rps": round(len(latencies) / seconds, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies, 99)), 2),
        "max_ms": round(float(latencies.max()), 2),
        "errors": errors,
        "errors_by_kind": load.errors,
        "correct_fraction": round(load.correct / len(latencies), 4),
        "server_rss_mib": rss,
        "rss_growth_after_warmup_mib": round(every[-1] - every[0], 1),
        "memory_flat": abs(every[-1] - every[0]) <= 10,
        "server_alive_after": alive,
        "model": f"models:/{NAME}@champion (efficientnet_lite0, 64 px, {len(CLASSES)} classes, onnxruntime fp32, CPU)",
        "machine": f"{os.cpu_count()} CPU cores, {platform.platform()}, Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}",
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),  # other work on the machine skews the timings
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "load.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    print(f"\nwrote {args.out / 'load.json'} and {args.out / 'load.md'}; server log: {work / 'serve.log'}")
    shutil.rmtree(work / "cache", ignore_errors=True)
    return 0 if errors == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
