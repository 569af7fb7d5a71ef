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
_stop: str | None = None
_checkpoint = False


def request_stop(why: str) -> None:
    """A stop was asked for (a signal, a lost service): from now on every stage, step and epoch the run reaches
    raises KeyboardInterrupt.

    The interrupt itself is raised wherever the run is when the signal comes. This is the net for the rare one
    Python swallows: a KeyboardInterrupt raised while a garbage-collection callback runs is printed as
    "Exception ignored" and lost, and the run would go on to register.
    """
    global _stop
    with _lock:
        _stop = _stop or why


def _check() -> None:
    if _stop is not None:
        raise KeyboardInterrupt(_stop)


def enter_stage(name: str) -> None:
    """The run has started stage `name` (choose, fine-tune, evaluate, deploy)."""
    global _stage, _step
    _check()
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
    _check()
    with _lock:
        _step = step


def where() -> str:
    """'fine-tune at epoch 7 of 200', 'deploy at registration', 'choose', 'after data' between stages,
    or 'start-up' before any stage."""
    with _lock:
        if _stage is None:
            return "start-up"
        return f"{_stage} at {_step}" if _step else _stage


def checkpoint_kept() -> None:
    """An epoch checkpoint of this run exists (written, or resumed from): a stop now can be resumed from it."""
    global _checkpoint
    with _lock:
        _checkpoint = True


def has_checkpoint() -> bool:
    with _lock:
        return _checkpoint


def as_when(place: str) -> str:
    """A `where()` as words that follow "stopped": 'during fine-tune at epoch 7 of 200', 'after deploy'."""
    return place if place.startswith("after ") else f"during {place}"


def when() -> str:
    """`as_when(where())`."""
    return as_when(where())


def stop_reason() -> str | None:
    """Why a stop was asked for ('SIGINT', 'SIGTERM', a lost service), or None."""
    with _lock:
        return _stop


def stopped_by(exc: BaseException) -> str:
    """What stopped a run that ended with `exc`: the signal the stop was asked for with, else what `exc` says (Prefect
    raises its own TerminationSignal for a SIGTERM before Graft's handler sees it)."""
    reason = stop_reason()
    if reason:
        return reason
    if type(exc).__name__ == "TerminationSignal":
        return "SIGTERM"
    return "SIGINT" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__


def reset() -> None:
    """Forget where the last run was, and any stop it was asked for (a new run in the same process starts here)."""
    global _stage, _step, _stop, _checkpoint
    with _lock:
        _stage = _step = _stop = None
        _checkpoint = False
