"""Real services the tests start on localhost: a free port, a wait for health, a clean stop, `mlflow server`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent


def clean_env() -> dict[str, str]:
    """This process's environment without the MLflow and Prefect settings a test may have changed."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, seconds: float) -> None:
    """Until `url` answers 200; fails early if `process` exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds:.0f}s")


def stop(process: subprocess.Popen, first: int = signal.SIGTERM) -> None:
    """Stop a process started with `start_new_session=True` and its children: `first`, then SIGKILL after 20 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, first)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def mlflow_server(folder: Path, *extra: str, env: dict[str, str] | None = None, seconds: float = 120) -> Iterator[str]:
    """`mlflow server` with SQLite and artifacts under `folder`, on a free localhost port; yields its URL."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "mlflow.log", "w") as log:
        process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", *extra, "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts"),
             "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/health", process, seconds)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(process)
