"""Work repeated in the background while a block runs: `graft serve`'s alias poll, a run's MLflow heartbeat."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def every(seconds: float, action: Callable[[], None], name: str) -> Iterator[None]:
    """Call `action` every `seconds` (first after `seconds`) from a daemon thread named `name` while the block runs;
    the thread is stopped when the block ends and waited for at most 5 s (an action stuck on the network must not hold
    up the end of a run or a server: the daemon thread dies with the process). `action` handles its own errors: one
    that escapes ends the repetition."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(seconds):
            action()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
