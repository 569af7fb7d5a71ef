"""Work repeated in the background while a block runs: `graft serve`'s alias poll, a run's MLflow heartbeat."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def every(seconds: float, action: Callable[[], None], name: str) -> Iterator[None]:
    """Call `action` every `seconds` (first after `seconds`) from a daemon thread named `name` while the block runs;
    the thread is stopped when the block ends and joined for at most `seconds` + 5 s. `action` handles its own errors:
    one that escapes ends the repetition."""
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
        thread.join(timeout=seconds + 5)
