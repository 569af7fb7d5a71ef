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


NO_MLFLOW_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
"""Graft uses none of MLflow's server-side jobs (GenAI scorers and prompt optimisation): without them, `mlflow server`
starts no job runner and seven fewer Python processes (as `make mlflow-ui` does)."""


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


def stop(process: subprocess.Popen, first: int = signal.SIGTERM, seconds: float = 20) -> None:
    """Stop a process started with `start_new_session=True` and its children: `first`, then SIGKILL after `seconds`."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, first)
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def mlflow_server(folder: Path, *extra: str, env: dict[str, str] | None = None, seconds: float = 120,
                  backend_uri: str | None = None, artifacts: str | None = None, workers: int = 1) -> Iterator[str]:
    """`mlflow server` on a free localhost port, its log in `folder`; yields its URL. By default SQLite and
    artifacts under `folder`; `backend_uri` and `artifacts` name a team's own database and artifact store."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    env = {**(os.environ if env is None else env), **NO_MLFLOW_JOBS}
    with open(folder / "mlflow.log", "w") as log:
        process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", *extra, "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", backend_uri or f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", artifacts or str(folder / "artifacts"), "--workers", str(workers)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/health", process, seconds)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(process)


def postgres_binaries() -> Path | None:
    """The folder of PostgreSQL's `initdb` and `pg_ctl` (Debian's `postgresql` package), or None when not installed."""
    import glob
    import shutil

    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


@contextlib.contextmanager
def postgres_server(database: str = "mlflow", seconds: float = 120) -> Iterator[str]:
    """A throwaway PostgreSQL server on a free localhost port with one database; yields its SQLAlchemy URI.

    PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user (Debian's package
    creates it), in a folder of its own under the system's temp dir (pytest's folders are private to root).
    """
    import shutil
    import tempfile

    bin_dir = postgres_binaries()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="graft-postgres-"))
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "graft", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "postgres.log"), "-w", "-t", str(int(seconds)),
                        "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, timeout=seconds + 10)
        try:
            subprocess.run([str(bin_dir / "createdb") if (bin_dir / "createdb").exists() else "createdb",
                            "-h", "127.0.0.1", "-p", str(port), "-U", "graft", database], check=True, capture_output=True, timeout=60)
            yield f"postgresql://graft@127.0.0.1:{port}/{database}"
        finally:
            subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True, timeout=60)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
"""Credentials moto accepts (any); set so boto3 never looks for real ones."""


@contextlib.contextmanager
def s3_server(bucket: str, seconds: float = 60) -> Iterator[str]:
    """A local S3 server (moto's server mode) on a free port with `bucket` created; yields its endpoint URL."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"{endpoint}/moto-api/", process, seconds)
        boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in S3_ENV.items() if k != "AWS_DEFAULT_REGION"},
                     region_name=S3_ENV["AWS_DEFAULT_REGION"]).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        stop(process)


@contextlib.contextmanager
def team_mlflow_server(backend_uri: str, artifacts: str, folder: Path, env: dict[str, str], seconds: float = 180) -> Iterator[str]:
    """`mlflow server` on a database and an artifact store of a team's own (proxied artifacts); yields its URL."""
    with mlflow_server(folder, env=env, seconds=seconds, backend_uri=backend_uri, artifacts=artifacts, workers=2) as url:
        yield url
