"""A long step's progress, where people look: tqdm's bar in a terminal, and log lines for the run's log file and for
output that is not a terminal (a scheduled run, a container, `| tee`), where tqdm draws nothing.

A feature pass over a few thousand images takes minutes on a CPU; without these lines its log says nothing between
"scoring" and the scores.
"""

from __future__ import annotations

import logging
import time

LINE_SECONDS = 10.0
"""At most one progress line this often: a step shorter than that logs none."""


class ProgressLines:
    """`update(n)` as the step goes, `close()` at its end (or use it as a context manager)."""

    def __init__(self, logger: logging.Logger, desc: str, total: int, unit: str = "images", seconds: float | None = None) -> None:
        from tqdm.auto import tqdm

        self.logger, self.desc, self.total, self.unit = logger, desc, total, unit
        self.seconds = LINE_SECONDS if seconds is None else seconds
        self.bar = tqdm(total=total, desc=desc, unit="img" if unit == "images" else unit, leave=False, disable=None)
        self.done = 0
        self.started = self.last = time.monotonic()

    def update(self, count: int) -> None:
        self.bar.update(count)
        self.done += count
        now = time.monotonic()
        if now - self.last < self.seconds or self.done >= self.total:
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        self.logger.info("%s: %s of %s %s (%d%%), %.0f %s/s, about %.0f s left", self.desc, f"{self.done:,}", f"{self.total:,}",
                         self.unit, 100 * self.done // max(self.total, 1), rate, self.unit, (self.total - self.done) / rate)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
