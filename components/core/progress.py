"""Where a run is: the stage and the step it is on, for the line an interrupted run prints.

The flow names each stage as it starts it (`report.summary.Stopwatch` does), and long steps
inside a stage note their progress ("epoch 7 of 200"). Nothing else reads this; it is one
process's notion of where it stands, not shared state between runs.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_stage: str | None = None
_step: str | None = None


def enter_stage(name: str) -> None:
    """The run has started stage `name` (choose, fine-tune, evaluate, deploy)."""
    global _stage, _step
    with _lock:
        _stage, _step = name, None


def leave_stage(name: str) -> None:
    """Stage `name` is over; the run is between stages until the next one starts."""
    global _stage, _step
    with _lock:
        _stage, _step = f"after {name}", None


def note(step: str) -> None:
    """The stage is at `step` (e.g. "epoch 7 of 200", "registration")."""
    global _step
    with _lock:
        _step = step


def where() -> str:
    """'fine-tune at epoch 7 of 200', 'deploy at registration', 'choose', 'after data' between stages,
    or 'start-up' before any stage."""
    with _lock:
        if _stage is None:
            return "start-up"
        return f"{_stage} at {_step}" if _step else _stage


def reset() -> None:
    """Forget where the last run was (a new run in the same process starts from here)."""
    global _stage, _step
    with _lock:
        _stage = _step = None
