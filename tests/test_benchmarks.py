"""The benchmark scripts stay runnable: each one imports, and has the `main` its README command runs.

They are too slow for the suite (minutes each), so this only catches what breaks them before they
start: a syntax error or a renamed component they import.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))


def test_there_are_benchmarks():
    assert {path.stem for path in BENCHMARKS} >= {"pipeline", "choose", "train", "deploy", "load"}


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda path: path.name)
def test_the_benchmark_imports_and_has_a_main(script: Path):
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the `if __name__ == "__main__"` guard keeps it from running
    assert callable(getattr(module, "main", None)), f"{script.name} has no main()"
