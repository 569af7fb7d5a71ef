"""Every log line of one pipeline run, in `run.log` in its run folder and on its MLflow run.

A run's log otherwise lives only in the terminal that started it (and, for Prefect, in its API's
database). A scheduled run's terminal is nobody's, and the people who open the run in MLflow never saw
it. So the flow keeps each line it logs (INFO and above, the terminal's lines: stages, epochs, exports,
the gate's reasons, warnings) from its first: in memory until the MLflow run, and with it the run folder,
exists, then in `<deploy.output_dir>/runs/<run id>/run.log`, written line by line, so the file is complete
up to the moment a run stops, however it stops. At the end of the run (or when it fails) the file is
uploaded to the MLflow run as `run.log`; an interrupted run uploads nothing (nothing is sent to MLflow
after an interrupt), and its file stays in the run folder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from components.core import progress
from components.core.errors import GraftError, error_text

if TYPE_CHECKING:
    from components.registry.tracking import Run

log = logging.getLogger(__name__)

RUN_LOG = "run.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
HELD_LINES = 10_000
"""Lines kept in memory before the run folder exists (a run logs a few dozen there); past it the oldest go."""


class RunLogFile(logging.Handler):
    """A logging handler that holds lines until `open(path)`, then writes them and every later line there."""

    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        self.path: Path | None = None
        self._held: list[str] = []
        self._stream: TextIO | None = None

    def open(self, path: Path) -> None:
        """Start writing to `path` (appending), beginning with the lines held so far.

        Raises:
            OSError: `path` cannot be written (the caller decides whether the run goes on without it).
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        stream = path.open("a", encoding="utf-8")
        with self.lock:
            stream.writelines(self._held)
            stream.flush()
            self._held.clear()
            self._stream, self.path = stream, path

    @contextmanager
    def kept(self, run: Run, run_dir: Path) -> Iterator[None]:
        """For the body: the lines go to `run_dir/run.log`; then (or when the body raises an error) the file is
        uploaded to `run` as `run.log`. A folder that cannot be written, or an upload MLflow refuses, is a
        warning: the run goes on without its log file."""
        try:
            self.open(run_dir / RUN_LOG)
        except OSError as exc:
            log.warning("cannot write the run's log to %s (%s); it goes to the terminal only", run_dir / RUN_LOG, exc.strerror or exc)
        try:
            yield
        except Exception as exc:
            self._last_line(logging.ERROR, f"the run failed: {error_text(exc)}")
            self._upload(run)
            raise
        except BaseException as exc:
            self._last_line(logging.WARNING, f"the run was stopped ({progress.stopped_by(exc)}) {progress.when()}; "
                                             "nothing is registered or promoted after a stop")
            raise
        self._upload(run)

    def _last_line(self, level: int, message: str) -> None:
        """Why the run ended, in this file only: the terminal shows it once, as the command's own last line."""
        self.handle(logging.LogRecord(__name__, level, __file__, 0, message, None, None))

    def _upload(self, run: Run) -> None:
        if self.path is None:
            return
        log.info("run log: %s (uploading it to MLflow run %s as %s)", self.path, run.run_id, RUN_LOG)
        try:
            run.log_artifact(self.path)
        except GraftError as exc:
            log.warning("could not upload the run's log to MLflow (%s); it stays in %s", exc, self.path)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            if self._stream is None:
                self._held.append(line)
                del self._held[:-HELD_LINES]
            else:
                self._stream.write(line)
                self._stream.flush()  # complete up to the last line, whenever the process ends
        except Exception:  # noqa: BLE001 - logging's own contract: report through handleError, never raise
            self.handleError(record)

    def close(self) -> None:
        with self.lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
        super().close()


OWN_LOGGERS = ("components", "flows")
"""Graft's loggers: at `level` at least while a run's log is kept, also where the process's logging was set up by
someone else (Prefect's own set-up, in the process that runs a scheduled flow, passes only warnings from them)."""


@contextmanager
def capture_run_log(level: int = logging.INFO) -> Iterator[RunLogFile]:
    """A `RunLogFile` on the root logger (every module's lines reach it) for the body; detached and closed after."""
    handler = RunLogFile(level)
    root = logging.getLogger()
    own = [logging.getLogger(name) for name in OWN_LOGGERS]
    levels = [logger.level for logger in own]
    for logger in own:
        if logger.getEffectiveLevel() > level:
            logger.setLevel(level)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        handler.close()
        for logger, before in zip(own, levels, strict=True):
            logger.setLevel(before)
