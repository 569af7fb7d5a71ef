"""Stopping a run: Ctrl-C and SIGTERM end it within seconds, and a lost Prefect API ends it at once.

`graft run` (and `graft retrain`) run inside `stoppable()`:

- **The embedded Prefect API lives in its own session.** Prefect's ephemeral server is a child
  process; in the terminal's process group a Ctrl-C killed it first, and the run then spent minutes
  retrying the dead API. Started here in a session of its own, it outlives the Ctrl-C, so the flow
  run is recorded as crashed, not left running, and the run ends at once. A watchdog notices when
  it dies anyway and stops the run with one line saying so, instead of minutes of retries.
- **SIGINT and SIGTERM interrupt the run** wherever it is: the main thread gets an exception at
  its next Python instruction, so training stops within a batch (the last epoch checkpoint stays),
  and exports, registration and alias moves are abandoned. The MLflow run ends KILLED.

A run against a real Prefect server (PREFECT_API_URL) keeps Prefect's own retry settings.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from components.core import progress
from components.core.errors import OrchestrationError
from flows.prefect_database import NewHomeDatabase

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130
"""What a shell reports for a process ended by SIGINT: 128 + 2."""


@dataclass
class Stop:
    """Why the run is being stopped: a signal, or a service that went away."""

    signal: str | None = None
    lost: str | None = None
    where: str = field(default="start-up")

    def line(self) -> str:
        """The one line the user sees."""
        if self.lost:
            when = progress.as_when(self.where)
            return (
                f"error: {self.lost} {when}; the run stopped there. Run the same command again: "
                "finished stages are cached and training resumes from its last epoch checkpoint"
            )
        if self.where.startswith("fine-tune") and progress.has_checkpoint():
            again = "to resume from its last epoch checkpoint"
        elif self.where.startswith("fine-tune"):
            again = "to start training again (no epoch had finished, so there is no checkpoint to resume from; finished stages are cached)"
        elif self.where.startswith(("evaluate", "deploy", "after fine-tune", "after evaluate")):
            again = "to finish it (the trained model is kept: training does not run again)"
        else:
            again = "to start again (finished work is cached)"
        when = progress.as_when(self.where)
        return f"interrupted ({self.signal}) {when}; nothing was registered or promoted after it. Run the same command {again}"


_WATCHING_ITS_PARENT = """
import os, signal, sys, threading, time

parent = os.getppid()


def watch():  # the graft process that started this server was killed (SIGKILL): it cannot stop us, so we stop
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's own shutdown
    time.sleep(10)
    os._exit(1)


threading.Thread(target=watch, daemon=True).start()
import runpy

sys.argv = ["uvicorn", *sys.argv[1:]]
runpy.run_module("uvicorn", run_name="__main__")
"""
"""`python -m uvicorn`, ending itself once the process that started it is gone: the server runs in a session of its own
(a Ctrl-C in the terminal is for `graft`, which stops it), so nothing else would stop it after a SIGKILL of `graft`."""


class _DetachedPrefectAPI:
    """Prefect's ephemeral API server, in a session of its own so a Ctrl-C meant for the run spares it.

    It runs the command Prefect's own `SubprocessASGIServer` runs (uvicorn on Prefect's app factory,
    the UI off, the caller's Prefect settings in its environment), without importing Prefect's server
    app into this process, and in two steps: `launch` returns at once, `wait` blocks until the API
    answers, so the run's own imports happen while the server starts (its first start in a Prefect
    home also creates the database, several seconds).
    """

    services: bool = False
    """Run Prefect's services (its scheduler among them), as `prefect server start` does: an ephemeral API runs none, so
    the runs a deployment's schedule comes due for are never created. For `graft schedule` without PREFECT_API_URL."""

    STARTUP_FAILED = 3
    """uvicorn's exit code when it could not start: the port was taken between choosing it and binding it
    (start again on another), or the app's own start-up failed (its database, its home folder: say so)."""
    RELAUNCHES = 5

    def __init__(self, services: bool = False) -> None:
        self.services = services
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.relaunches = 0
        self.new_home: NewHomeDatabase | None = None
        self.launched = False

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.address}/api"

    def launch(self) -> None:
        """Start the server process; `wait` for it to answer."""
        import prefect
        from prefect.settings import get_current_settings

        home = Path(get_current_settings().home).expanduser()
        try:  # Prefect makes the folder itself, but not its parents: the server would fail on its database
            home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OrchestrationError(f"PREFECT_HOME={home} cannot be created ({exc.strerror or exc}); "
                                     "point PREFECT_HOME at a folder you can write to") from exc
        if not self.launched:  # a new home starts from the empty database this Prefect version made before
            self.launched = True
            self.new_home = NewHomeDatabase.of(get_current_settings(), prefect.__version__)
            if self.new_home is not None:
                self.new_home.seed()
        self.port = _free_port()
        log.info("starting the embedded Prefect API on %s", self.address)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WATCHING_ITS_PARENT, "--app-dir", str(prefect.__module_path__.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            # PYTHONSAFEPATH: `python -c` would put the current folder first on sys.path, so a project's own click.py
            # or typing.py would stand in for the library the server imports
            env={**os.environ, "PYTHONSAFEPATH": "1", "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_FINAL": "1",
                 **({} if self.services else {"PREFECT__SERVER_EPHEMERAL": "1"}),
                 **get_current_settings().to_environment_variables(exclude_unset=True)},
            start_new_session=True,
        )
        atexit.register(self.stop)

    def wait(self) -> str:
        """Block until the API answers its health check; returns its URL.

        Raises:
            OrchestrationError: it exited, or did not answer within PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.
        """
        import httpx
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, get_current_settings

        deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                code = self.process.poll()
                if code == self.STARTUP_FAILED and _port_taken(self.port) and self.relaunches < self.RELAUNCHES:
                    self.relaunches += 1
                    self.launch()
                    continue
                if code is not None and self.new_home is not None and self.new_home.discard():
                    self.launch()
                    continue
                if code is not None:
                    self.process = None
                    raise OrchestrationError(
                        f"the embedded Prefect API exited with code {code} while starting (its error is printed above); "
                        f"check that PREFECT_HOME ({get_current_settings().home}) can be written, and "
                        "PREFECT_API_DATABASE_CONNECTION_URL where it is set; or set PREFECT_API_URL to a running server")
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        if self.new_home is not None:
                            self.new_home.keep()
                        return self.api_url
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise OrchestrationError(
            f"the embedded Prefect API did not answer within {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value():g} s; "
            "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a slow machine, or set PREFECT_API_URL to a running server"
        )

    def stop(self) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        log.info("stopping the embedded Prefect API on %s", self.address)
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    async def gone(self, within: float = 1.0) -> bool:
        """Whether the server process has exited (or exits within `within` seconds: a refused connection
        can come a moment before the process is reaped)."""
        deadline = time.monotonic() + within
        process = self.process
        while True:
            if process is None or process.poll() is not None:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)


def _port_taken(port: int) -> bool:
    """Whether something else now listens on `port` (so the server's failed start was the port, not the app)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def _free_port() -> int:
    """A localhost port nothing listens on now, as the operating system hands them out."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def _quiet_log_batches(api: _DetachedPrefectAPI) -> Iterator[None]:
    """Prefect's log sender prints "--- Error logging to API ---" for a batch it could not send: say
    nothing when that is because the embedded API has exited (the watchdog's one line says so)."""
    from prefect.logging.handlers import APILogWorker

    send = getattr(APILogWorker, "_handle_batch", None)  # Prefect's own, not a documented hook
    if send is None:
        log.debug("Prefect's log worker has no _handle_batch any more: its messages about a gone API stay")
        yield
        return

    async def handle_batch(worker: APILogWorker, items: list) -> None:
        if await api.gone(within=0):
            return
        try:
            await worker._client.create_logs(items)
        except Exception:  # noqa: BLE001 - Prefect's own handling (one retry, then its message) unless the API is gone
            if not await api.gone():
                await send(worker, items)

    APILogWorker._handle_batch = handle_batch
    try:
        yield
    finally:
        APILogWorker._handle_batch = send


LOST_API_GRACE_S = 10.0
"""How long the main thread has, once the embedded API is gone, to reach its own end before the watchdog ends
the process itself."""


def _watch(api: _DetachedPrefectAPI, stop: Stop, done: threading.Event, main_thread: int) -> None:
    """Stop the run when the embedded API exits while the run still needs it.

    The main thread gets a real SIGINT, not `_thread.interrupt_main()`'s simulated one: a simulated signal is
    only seen at the main thread's next Python instruction, so a main thread blocked in a wait (a lock, a future,
    a sleep) would sleep on, while a real one ends the wait at once. Should the main thread still not reach its
    end within LOST_API_GRACE_S (a call that ignores signals), the watchdog prints the line and ends the process:
    with the API gone the run can record and register nothing more, and every write it makes is atomic.
    """
    while not done.wait(0.5):
        process = api.process
        if process is not None and process.poll() is not None:
            stop.lost = f"the embedded Prefect API ({api.address}) exited with code {process.returncode}"
            stop.where = progress.where()
            _silence_prefect_api_clients()
            progress.request_stop(stop.lost)  # should the interrupt be swallowed, the run's next step raises it
            signal.pthread_kill(main_thread, signal.SIGINT)
            if not done.wait(LOST_API_GRACE_S):
                log.debug("the main thread did not stop within %g s of losing the API", LOST_API_GRACE_S)
                logging.disable(logging.CRITICAL)
                print(stop.line(), file=sys.stderr, flush=True)
                _quiet_exit(1)
            return


def _loggers() -> list[logging.Logger]:
    """The root logger and every named one."""
    return [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]


def _silence_prefect_api_clients() -> None:
    """The API is gone: Prefect's log and event senders would only print retries and tracebacks now."""
    from prefect.logging.handlers import APILogHandler

    for logger in _loggers():
        for handler in list(logger.handlers):
            if isinstance(handler, APILogHandler):
                logger.removeHandler(handler)
    for noisy in (
        "prefect._internal.concurrency",
        "prefect.events.clients",
        "prefect.client",
        "prefect.flow_runs",
        "prefect.task_runs",
    ):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)


def _lost_api(exc: BaseException, url: str) -> bool:
    """Whether `exc` (or what caused it) is a failed request to the Prefect API at `url`."""
    import httpx

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, httpx.TransportError):
            try:
                return str(exc.request.url).startswith(url)
            except RuntimeError:  # no request attached
                return True
        exc = exc.__cause__ or exc.__context__
    return False


SCHEDULE_STOP_GRACE_S = 15.0
"""How long `graft schedule` has, after Ctrl-C or SIGTERM, for Prefect's runner to shut down before it is ended."""


@contextmanager
def serving_schedule(embedded: bool) -> Iterator[Stop]:
    """For `graft schedule` while it serves: with `embedded` (no PREFECT_API_URL), the embedded API with Prefect's
    services running (its scheduler creates the runs the schedule comes due for) as long as the block runs; and
    Ctrl-C or SIGTERM that always stop it. Yields the `Stop` that records the signal.

    Python's `asyncio.run` (inside Prefect's `serve`) answers a first Ctrl-C only by cancelling Prefect's runner
    task, which a flow run's clean-up can swallow: the schedule then served on, and the next cron tick started a
    run (seen on a loaded machine). Here the signal raises KeyboardInterrupt in the main thread itself (Prefect's
    `serve` shuts down on it), and should the process still be there `SCHEDULE_STOP_GRACE_S` later, a watchdog
    stops the API, prints the line and ends it.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    stop, done = Stop(), threading.Event()
    api = _DetachedPrefectAPI(services=True) if embedded else None

    def give_up() -> None:
        if done.wait(SCHEDULE_STOP_GRACE_S):
            return
        logging.disable(logging.CRITICAL)
        if api is not None:
            api.stop()
        print(f"stopped: graft schedule ({stop.signal}); Prefect's runner had not shut down {SCHEDULE_STOP_GRACE_S:g} s "
              "later, so the process was ended", file=sys.stderr, flush=True)
        _quiet_exit(EXIT_INTERRUPTED)

    def watch() -> None:
        threading.Thread(target=give_up, name="graft-schedule-stop", daemon=True).start()

    try:
        with _signals(stop, on_first=watch):
            if api is None:
                yield stop
            else:
                try:
                    api.launch()
                    with temporary_settings({PREFECT_API_URL: api.wait()}):
                        yield stop
                finally:
                    api.stop()
    finally:
        done.set()


@contextmanager
def _prefect_api(stop: Stop, warm_up: Sequence[str] = ()) -> Iterator[None]:
    """The Prefect API the run reports to: PREFECT_API_URL when set, else an embedded one in its own session.

    The modules in `warm_up` are imported while the embedded API starts. A request to that API that fails
    for good (after Prefect's own retries, for a server of yours) stops the run with one line naming the
    API instead of a traceback.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if PREFECT_API_URL.value():
        _import(warm_up)
        try:
            yield
        except Exception as exc:
            if not _lost_api(exc, PREFECT_API_URL.value()):
                raise
            stop.lost, stop.where = (
                f"the Prefect API at {PREFECT_API_URL.value()} stopped answering ({exc})",
                progress.where(),
            )
            raise KeyboardInterrupt from exc
        return
    api = _DetachedPrefectAPI()
    try:
        api.launch()
        _import(warm_up)
        url = api.wait()
    except BaseException:
        api.stop()
        raise
    done = threading.Event()
    watchdog = threading.Thread(target=_watch, args=(api, stop, done, threading.main_thread().ident),
                                name="graft-prefect-watchdog", daemon=True)
    watchdog.start()
    try:
        # a local server does not blink: a refused connection means it is gone, so fail at once
        # heartbeats tell a lasting server that a run died; this one ends with the run, so none is sent (the
        # heartbeat thread sleeps in 1 s steps, and the flow's end waited up to 1 s for it to notice)
        with temporary_settings({PREFECT_API_URL: url, PREFECT_CLIENT_MAX_RETRIES: 0, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), \
                _quiet_log_batches(api):
            try:
                yield
            except Exception as exc:
                if stop.lost is None and not _lost_api(exc, url):
                    raise
                stop.lost = stop.lost or f"the embedded Prefect API ({api.address}) stopped answering"
                raise KeyboardInterrupt from exc  # the run stopped because the API went away: one line, not a traceback
            finally:
                done.set()
                if stop.lost is None:
                    _drain_prefect_services()  # the flow's last logs and events reach the API before it stops
    finally:
        api.stop()


def _import(modules: Sequence[str]) -> None:
    for module in modules:
        importlib.import_module(module)


def _drain_prefect_services() -> None:
    """Send Prefect's queued API logs and events now, while the API is still up (at most a few seconds)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=5, at_exit=False)
        except Exception as exc:  # noqa: BLE001 - the run's outcome matters more than its last log lines
            log.debug("could not drain %s: %s", worker.__name__, exc)


@contextmanager
def _quiet_swallowed_interrupts() -> Iterator[None]:
    """Python prints a KeyboardInterrupt it had to drop (raised inside a garbage-collection callback) as
    "Exception ignored ... Traceback". The stop is recorded (`progress.request_stop`) and the run's next step
    raises it again, so that report says nothing to the user: leave it out; report anything else as Python does."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:  # noqa: ANN001 - sys.UnraisableHookArgs
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


@contextmanager
def _signals(stop: Stop, on_first: Callable[[], None] | None = None) -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread (even where the shell left SIGINT ignored);
    `on_first` runs at the first of them."""

    pool = logging.getLogger("sqlalchemy.pool")
    level = pool.level

    def interrupt(number: int, frame) -> None:
        if stop.signal is None:
            stop.signal, stop.where = signal.Signals(number).name, progress.where()
            if on_first is not None:
                on_first()
        progress.request_stop(stop.lost or stop.signal)  # should this KeyboardInterrupt be swallowed, the next step raises it
        # an interrupt inside a query of MLflow's SQLite store makes SQLAlchemy drop the connection, then log "Error closing
        # cursor" with a traceback when the query unwinds: noise after a stop, never news
        pool.setLevel(logging.CRITICAL)
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        if stop.signal is None:  # after a stop the process is ending: the connections it drops are closed (and
            pool.setLevel(level)  # complained about) as late as its exit, so the pool stays quiet until then
        for number, handler in previous.items():
            signal.signal(number, handler)


def _interruption(exc: BaseException) -> bool:
    """A Ctrl-C, a SIGTERM (Prefect's engine raises its own TerminationSignal for it), or a watchdog stop."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    try:
        from prefect.exceptions import TerminationSignal
    except ImportError:  # pragma: no cover - prefect is a dependency
        return False
    return isinstance(exc, TerminationSignal)


def stoppable(command, warm_up: Sequence[str] = ()) -> int:
    """Run `command` so that an interrupt or a lost embedded API ends it within seconds with one line.

    `warm_up` names modules `command` needs: they are imported while the embedded Prefect API starts.

    Returns:
        `command`'s exit code; 130 after an interrupt, 1 when the embedded API was lost.
    """
    stop = Stop()
    progress.reset()
    finished: list[int] = []
    try:
        with _signals(stop), _quiet_swallowed_interrupts(), _prefect_api(stop, warm_up):
            finished.append(command())
        return finished[0]
    except BaseException as exc:
        if not _interruption(exc):
            raise
        if finished and stop.lost is None:
            # the stop came while the embedded API shut down, after the command had finished (its summary printed,
            # its model registered and promoted): the run is complete, and "run it again" would register it twice
            logging.disable(logging.CRITICAL)
            print(f"{stop.signal or 'a stop'} came after the run had finished; nothing was lost", file=sys.stderr, flush=True)
            _quiet_exit(finished[0], api_up=_external_api_up(stop))
        if stop.signal is None and stop.lost is None:  # Prefect turned our SIGTERM into its own exception
            stop.signal = "SIGTERM" if not isinstance(exc, KeyboardInterrupt) else "SIGINT"
            stop.where = progress.where()
        # worker threads still finishing a step (a candidate being scored) say nothing after the last line
        logging.disable(logging.CRITICAL)
        print(stop.line(), file=sys.stderr, flush=True)
        _quiet_exit(1 if stop.lost else EXIT_INTERRUPTED, api_up=_external_api_up(stop))
    return EXIT_INTERRUPTED  # pragma: no cover - _quiet_exit does not return


def _external_api_up(stop: Stop) -> bool:
    """Whether the run reported to a Prefect server of yours (PREFECT_API_URL) that still answers."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value()) and stop.lost is None


def _quiet_exit(code: int, api_up: bool = False) -> None:
    """End the process now: worker threads still scoring a candidate, and Prefect's background services
    retrying a dead API, would otherwise hold the exit for minutes and print their tracebacks.

    The terminal and the log files are flushed and closed. Prefect's API log handler is flushed only while
    its API is `api_up`: the embedded API has stopped with the run, and flushing to it would only wait for
    connections that fail, then print that they did."""
    if not api_up:
        _silence_prefect_api_clients()
    handlers = dict.fromkeys(handler for logger in _loggers() for handler in logger.handlers)
    for handler in handlers:  # as logging.shutdown() does, for the handlers still attached
        lock = handler.lock
        # a thread stopped halfway through writing a record may hold its handler's lock: do not wait on it for ever
        if lock is not None and not lock.acquire(timeout=1):
            continue
        try:
            handler.flush()
            handler.close()
        except (OSError, ValueError):  # a closed stream: nothing left to write
            pass
        finally:
            if lock is not None:
                lock.release()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
