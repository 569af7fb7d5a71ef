"""Shared fixtures: the real params.yaml shrunk to toy size, tiny real image folders, and
an isolated Prefect API and MLflow store per test session."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Isolated, quiet Prefect for the whole session (set before prefect is imported anywhere).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "components")
# tests call the components outside flows too: their log lines have no flow run to go to, which Prefect's API
# handler would otherwise warn about once per logger (dozens of lines in the warnings summary)
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.pop("MLFLOW_TRACKING_URI", None)
# DVC outside a repository with `core.analytics = false` (a test's new repo, its analytics daemon) writes a usage
# report to a temp file and, offline, never sends or deletes it
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the suite in parallel processes on few cores: one math thread each (inherited by
    # the graft processes the tests start), so the workers do not oversubscribe the cores they share
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_variable, "1")

# Prefect sets up its logging (a console handler bound to the sys.stderr of that moment, also on the
# `components` logger) when first imported: import it now, while sys.stderr is pytest's session-long
# capture, not a test's capsys stream that is closed when the test ends.
import prefect  # noqa: E402, F401


@pytest.fixture(autouse=True)
def _prefect_console_on_this_tests_stderr():
    """Prefect's console handler writes to the sys.stderr of the moment Prefect's logging was set up. Anything that
    sets it up again in a test (Prefect's server app does, when built in-process) binds that test's capture stream,
    which is closed once the test ends, and every later Prefect log line then prints a "Logging error" traceback
    into whichever test runs: point the handlers at this test's stderr."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.stream = handler.console.file = sys.stderr
    yield


_CHECKOUT_LITTER = ("mlruns", "mlflow.db", "mlartifacts")
"""What MLflow makes in the current folder when a client, a server or an experiment is set up without Graft's store:
a test that leaves one of these in the checkout ran MLflow against the wrong place."""


@pytest.fixture(autouse=True)
def _no_backbones_registered_by_an_earlier_test():
    """A run registers its `choose.weights` and `choose.custom` for the stages after choose (`register_backbones`), and
    the next run replaces them; a test that looks a name up without a run of its own must see the zoo's spec, not
    the one an earlier test in this process registered (timm's test_convnext pointing at another test's file)."""
    from components.backbones import zoo

    zoo._CONFIGURED.clear()
    yield
    zoo._CONFIGURED.clear()


@pytest.fixture(autouse=True)
def _nothing_left_in_the_checkout():
    before = {name for name in _CHECKOUT_LITTER if (REPO / name).exists()}
    yield
    made = [name for name in _CHECKOUT_LITTER if name not in before and (REPO / name).exists()]
    assert not made, f"the test left {', '.join(made)} in the checkout ({REPO}): point its MLflow client, server or experiment at tmp_path"


@pytest.fixture
def temp_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Python's temp folder is the test's `tmp_path`: MLflow's loaders (`get_model_info`, `*.load_model`) download into
    temp folders they never delete."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    """A throwaway Prefect API (SQLite in a temp folder) for flow tests."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real digit classes, 20 images each, as `<class>/<image>.png`."""
    from components.data.demo import write_digits

    return write_digits(tmp_path_factory.mktemp("digits") / "images", per_class=20, classes=(0, 1, 7))


@pytest.fixture(scope="session")
def feature_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature cache shared by the session, as in real use."""
    return tmp_path_factory.mktemp("feature-cache")


@functools.cache
def _store_template() -> Path:
    """An empty MLflow store at this MLflow's schema: one folder per MLflow version and user in the temp
    folder, made by the first test process that needs it and reused by every later one and later sessions
    (pytest-xdist's workers end without running atexit hooks, so a folder per process was left behind)."""
    import mlflow
    from mlflow import MlflowClient

    from components.registry.tracking import STORE_FILE

    folder = Path(tempfile.gettempdir()) / f"graft-test-mlflow-store-{mlflow.__version__}-{os.getuid()}"
    if not (folder / STORE_FILE).is_file():
        staging = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", dir=folder.parent))
        try:
            uri = f"sqlite:///{staging / STORE_FILE}"
            client = MlflowClient(uri, uri)
            client.search_experiments(max_results=1)  # creates the tracking tables
            client.search_registered_models(max_results=1)  # and the registry's
            with contextlib.suppress(OSError):  # another process may have put its own in place first
                staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder / STORE_FILE


def seeded_store(store_dir: Path) -> Path:
    """`store_dir` holding an empty MLflow store (unless it has one), copied from `_store_template`.

    A new store otherwise costs MLflow's schema migrations, about 1.5 s of CPU, in every test that tracks
    or registers. The copy is what MLflow would create there. Tests of the store's creation itself
    (tests/registry/test_store.py) leave the folder empty.
    """
    from components.registry.tracking import STORE_FILE

    store_dir.mkdir(parents=True, exist_ok=True)
    if not (store_dir / STORE_FILE).exists():
        shutil.copyfile(_store_template(), store_dir / STORE_FILE)
    return store_dir


def tiny_overrides(data_dir: Path, work: Path, cache_dir: Path, seed_store: bool = True) -> list[str]:
    """The real params.yaml, shrunk: small images, few samples, everything under `work` (its MLflow store seeded
    unless `seed_store` is false: for a test whose runs must leave no local store)."""
    if seed_store:
        seeded_store(work / "mlflow")
    return [
        f"data.dir={data_dir}",
        f"data.cache_dir={cache_dir}",
        "data.image_size=64",
        "choose.sample_size=30",
        "choose.candidates=[efficientnet_lite0, random_efficientnet_lite0]",
        # tests run side by side on few cores: their latencies are timed each run and never kept in this machine's
        # records, which real runs read (the records have their own tests)
        "choose.latency_cache=false",
        "choose.shared_exports=false",  # nor the exported backbones: the session's feature cache holds its own
        f"deploy.output_dir={work / 'outputs'}",
        f"deploy.graph_template_dir={cache_dir / 'onnx-graphs'}",  # the session's own, beside its feature cache
        "deploy.parity_images=16",
        "deploy.model_name=graft-test",
        "deploy.variants=[]",  # fp32 only: the variants (INT8's calibration and timing) have their own tests
        "evaluate.min_comparison_images=5",  # the tiny folders hold 13 test images
        f"tracking.store_dir={work / 'mlflow'}",
        "tracking.log_pytorch_model=false",  # ONNX only: the PyTorch model's torch.export has its own tests
    ]


@pytest.fixture
def tiny_params(tmp_path: Path, digits_dir: Path, feature_cache_dir: Path):
    from components.core.config import load_params

    return load_params(REPO / "params.yaml", tiny_overrides(digits_dir, tmp_path, feature_cache_dir))
