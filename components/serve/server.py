"""`graft serve`: an HTTP service for one registered model, reloaded when its alias moves.

    POST /predict    an image upload (multipart form, one or more files), a raw image body
                     (Content-Type image/*), or JSON {"images": [<base64>, ...]}
    GET  /health     liveness, the version served, the provider, the last reload error, a refused version
    GET  /metadata   classes, input size, mean/std, backbone, data md5, variant, limits
    /v2/...          the Open Inference Protocol (KServe V2) that Triton and KServe clients speak
                     (`components.serve.open_inference`): health, model metadata, tensors in, probabilities out

Every request is bounded: bodies over `deploy.serve_max_upload_mb` get 413,
batches over `deploy.serve_max_batch` get 413, anything that is not an image
gets 415, and a request still running after `deploy.serve_timeout_seconds`
gets 504 and its work stops there (`components.runtime.model.Stop`). Error bodies are `{"error": "..."}` in plain words; stack traces go
to the server log only. Imports no torch.

A new version is swapped in only once it passes every check a load makes
(`components.runtime.trust`: its source, the sha256 of the file against what
registration recorded, its signature when GRAFT_VERIFY_KEY is set). One that
fails is refused: the last good model keeps serving, the log says so once per
refusal, and `/health` reports `"status": "degraded"` with the refused version
and why. When `champion` is moved onto a version whose gate or parity check
failed, it is served (the alias is the user's call) with a warning in the log
and in `/health`. A move of `champion` made outside Graft (the MLflow UI) is
recorded in the alias history when the poll sees it, and the model page is
rewritten (`LiveModel.notice_moves`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import io
import logging
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
from fastapi import Request
from PIL import Image, UnidentifiedImageError

from components.core.errors import GraftError, IntegrityError, RequestProblem
from components.core.lineage import CHAMPION, MOVE_TAG_PREFIX
from components.core.periodic import every
from components.data.images import IMAGE_EXTENSIONS, MAX_PIXELS, to_model_input, to_rgb
from components.registry.versions import parse_registry_uri, registry_version
from components.runtime.model import OnnxClassifier, Stop, Stopped
from components.runtime.providers import use_spin_waiting
from components.serve import open_inference

log = logging.getLogger(__name__)


TOP_K = 3


@dataclass(frozen=True)
class ServeSettings:
    """Limits and polling of one server (from the `deploy.serve_*` parameters)."""

    poll_seconds: float = 10.0
    max_upload_bytes: int = 10 * 1024 * 1024
    max_batch: int = 32
    timeout_seconds: float = 10.0
    variant: str = "fp32"

    @classmethod
    def from_params(cls, params, variant: str = "fp32") -> ServeSettings:  # noqa: ANN001 - components.core.config.Params
        cfg = params.deploy
        return cls(cfg.serve_poll_seconds, int(cfg.serve_max_upload_mb * 1024 * 1024), cfg.serve_max_batch, cfg.serve_timeout_seconds, variant)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


REFUSED_RECHECK_SECONDS = 300.0
"""How long a version refused by the trust checks is left alone while the alias keeps naming it and its tags do not
change: each check downloads its files again (with signatures on, the whole folder), every poll, on every replica."""


def _tag_items(found) -> tuple:  # noqa: ANN001 - mlflow ModelVersion
    """The version's tags that bear on trusting it (not the alias history's entries, which this server writes too)."""
    return tuple(sorted((k, v) for k, v in (found.tags or {}).items() if not k.startswith(MOVE_TAG_PREFIX)))


class LiveModel:
    """The model being served; swapped in one step when the registry alias points elsewhere.

    A reload that fails (the new version cannot be downloaded or opened, or fails its
    integrity checks) leaves the current model serving and reports the problem in `/health`.
    """

    def __init__(self, uri: str, variant: str = "fp32") -> None:
        self.uri = uri
        self.variant = variant
        self._registry = parse_registry_uri(uri)
        self._lock = threading.Lock()
        self._model = OnnxClassifier.load(uri, variant=variant)
        self.loaded_at = _now()
        self.last_check: str | None = None
        self.last_error: str | None = None
        self.refused_version: str | None = None
        """The version the alias names that failed its integrity checks and is not served."""
        self._refused: tuple[str, tuple, str] | None = None
        """That version, its tags and why, when it was refused; `_refused_at` when (monotonic seconds)."""
        self._refused_at = 0.0
        self.reloads = 0
        self.alias_seen = self._model.source.version
        """The version the alias last named when this server read it (served, or refused)."""
        self._noticed: tuple | None = None
        """What `notice_moves` last saw: the version served, the refused one, the last error."""

    @property
    def model(self) -> OnnxClassifier:
        with self._lock:
            return self._model

    def refresh(self) -> bool:
        """Reload if the alias now names another version; True when a new model was swapped in."""
        if self._registry is None or self._registry[1] is None:
            return False  # a file, bundle or fixed version never moves
        name, alias, _ = self._registry
        self.last_check = _now()
        version = None
        found = None
        try:
            found = registry_version(name, alias, None)
            version = self.alias_seen = str(found.version)
            if version == self.model.source.version:
                self.last_error = self.refused_version = None  # the alias is back on what is served
                return False
            if self._refused is not None and self._refused[:2] == (version, _tag_items(found)) \
                    and time.monotonic() - self._refused_at < REFUSED_RECHECK_SECONDS:
                # refused already, and neither its tags nor enough time have changed that: not fetched again, still refused
                self.refused_version, self.last_error = version, self._refused[2]
                return False
            fresh = OnnxClassifier.load(self.uri, variant=self.variant)
        except GraftError as exc:
            self._keep_serving(version, exc, found)
            return False
        with self._lock:
            previous, self._model = self._model, fresh
            self.loaded_at, self.last_error, self.refused_version, self._refused = _now(), None, None, None
            self.reloads += 1
        log.info("%s moved: now serving %s (was v%s)", self.uri, fresh.source.describe(), previous.source.version)
        return True

    def _keep_serving(self, version: str | None, exc: GraftError, found=None) -> None:  # noqa: ANN001 - mlflow ModelVersion
        """Record why `version` (`found`) is not served; log it once per distinct problem (polling retries it quietly)."""
        repeated = self.last_error == str(exc)
        self.last_error = str(exc)
        served = self.model.source.version
        if isinstance(exc, IntegrityError):
            self.refused_version = version
            self._refused, self._refused_at = (version, _tag_items(found) if found is not None else (), str(exc)), time.monotonic()
            if not repeated:
                log.error("refused %s v%s, still serving the last good model, v%s: %s", self.uri, version, served, exc)
        elif not repeated:
            log.error("reload of %s failed, still serving v%s: %s", self.uri, served, exc)

    def notice_moves(self) -> None:
        """When `champion` moved or was removed since the last poll: record a move made outside Graft (the MLflow UI) in
        the alias history and rewrite the model page (`components.registry.history.notice_outside_moves`), so neither
        waits for Graft's next move. A registry this server may only read is left as it is (logged once)."""
        if self._registry is None or self._registry[1] != CHAMPION:
            return
        seen = (self.model.source.version, self.refused_version, self.last_error)
        if seen == self._noticed:
            return
        self._noticed = seen
        from components.registry.history import notice_outside_moves
        from components.registry.tracking import consumer_store
        from mlflow import MlflowClient

        try:
            notice_outside_moves(MlflowClient(consumer_store()), self._registry[0], "graft serve", self.alias_seen)
        except GraftError as exc:
            log.info("a move of %s outside Graft is not recorded in the alias history (%s); Graft's next move records it",
                     self.uri, str(exc).splitlines()[0][:300])

    def polling(self, seconds: float) -> AbstractContextManager[None]:
        """Check the alias every `seconds` in a background thread while the block runs."""

        def poll() -> None:
            try:
                self.refresh()
                self.notice_moves()
            except Exception:  # noqa: BLE001 - keep polling whatever MLflow raises
                log.exception("alias poll failed")

        return every(seconds, poll, "graft-alias-poll")


class PixelBudget:
    """How many pixels the server's requests may hold decoded at once, in all.

    A 200 KB PNG can claim 60 million pixels, a quarter of a gigabyte once decoded; a few such uploads at once, each
    under the upload and pixel limits, took a server from 220 MB to 4.2 GB, and the allocator kept 3.7 GB of it
    afterwards. Each image now decodes only once its pixels fit in the budget (`MAX_PIXELS`, the largest image
    accepted), so the decoded images of all requests together stay within one largest image's memory; small
    images pass side by side. An image waits for room while its request's time allows (`deploy.serve_timeout_seconds`:
    504 after it), and after a large one the memory it took goes back to the system (glibc's `malloc_trim`).
    """

    TRIM_PIXELS = 4_000_000
    """From this many pixels, the memory an image's decoding freed is handed back to the system at once."""

    def __init__(self, capacity: int = MAX_PIXELS) -> None:
        self.capacity, self.used, self.peak = capacity, 0, 0
        self._room = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()

    @contextmanager
    def hold(self, pixels: int, stop: Stop | None = None) -> Iterator[None]:
        """Hold `pixels` of the budget while the block runs; images are let in in the order they asked (first come,
        first served), so a stream of small images never keeps a large one waiting until its time runs out."""
        need, turn = min(pixels, self.capacity), object()
        with self._room:
            self._queue.append(turn)
            try:
                while self._queue[0] is not turn or self.used + need > self.capacity:
                    if stop is not None:
                        stop.check()  # the request timed out while it waited: give up the wait
                    self._room.wait(0.05)
            finally:
                self._queue.remove(turn)
                self._room.notify_all()  # the next in line may fit now
            self.used += need
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._room:
                self.used -= need
                self._room.notify_all()
            if pixels >= self.TRIM_PIXELS:
                _return_freed_memory()


def _return_freed_memory() -> None:
    """glibc keeps freed blocks in per-thread arenas for reuse; `malloc_trim` returns what it can to the system."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes

        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (musl, macOS): the allocator keeps its own ways
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


DECODING = PixelBudget()
"""The process's budget: one `graft serve` per process."""


def decode_image(data: bytes, name: str, size: int, stop: Stop | None = None, budget: PixelBudget = DECODING) -> np.ndarray:
    """Decode uploaded bytes into the model's uint8 S x S x 3 input, as `components.data.images` does for files; the
    decoding waits for room in `budget` (`PixelBudget`)."""
    if not data:
        raise RequestProblem(400, f"{name}: empty upload; send the image's bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise RequestProblem(413, f"{name}: {width}x{height} pixels is over the {MAX_PIXELS:,}-pixel limit; resize it")
            with budget.hold(width * height, stop):
                image.load()
                return to_model_input(to_rgb(image), size)
    except (RequestProblem, Stopped):
        raise
    # Pillow reports malformed data with more than OSError: an in-memory TIFF whose strip offset
    # is past 2**63 raises OverflowError (found by tests/serve/test_fuzz.py); some plugins raise EOFError
    # or struct.error on truncated headers.
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, OverflowError, EOFError, struct.error, Image.DecompressionBombError) as exc:
        kinds = ", ".join(sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS))
        raise RequestProblem(415, f"{name}: not a readable image ({exc.__class__.__name__}); send one of {kinds}") from exc


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestProblem(413, f"request body of {int(declared):,} bytes is over the {limit:,}-byte limit (deploy.serve_max_upload_mb)")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestProblem(413, f"request body is over the {limit:,}-byte limit (deploy.serve_max_upload_mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _uploads(request: Request, settings: ServeSettings) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in the request, whatever its form."""
    from starlette.datastructures import UploadFile

    body = await _read_body(request, settings.max_upload_bytes)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":

        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=settings.max_batch, max_fields=settings.max_batch)
        except Exception as exc:  # noqa: BLE001 - starlette/multipart raise several types for a bad form
            if "Too many files" in str(exc) or "Too many fields" in str(exc):  # starlette stops counting at the limit
                raise RequestProblem(413, f"more than {settings.max_batch} images in one request is over the limit of {settings.max_batch} "
                                          "(deploy.serve_max_batch); split the batch") from exc
            raise RequestProblem(400, f"cannot read the multipart form ({exc}); send files as -F file=@image.png") from exc
        files = [(value.filename or key, await value.read()) for key, value in form.multi_items() if isinstance(value, UploadFile)]
    elif kind == "application/json":
        files = _json_images(body)
    elif kind.startswith("image/") or kind == "application/octet-stream":
        files = [("body", body)]
    else:
        raise RequestProblem(415, f"content type '{kind or 'none'}' is not accepted; send multipart/form-data, image/*, or JSON {{\"images\": [base64, ...]}}")
    if not files:
        raise RequestProblem(400, "no image in the request; send a file (-F file=@image.png) or JSON {\"images\": [base64, ...]}")
    if len(files) > settings.max_batch:
        raise RequestProblem(413, f"{len(files)} images in one request is over the limit of {settings.max_batch} (deploy.serve_max_batch); split the batch")
    return files


def _json_images(body: bytes) -> list[tuple[str, bytes]]:
    import json

    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise RequestProblem(400, f"the body is not valid JSON ({exc}); send {{\"images\": [base64, ...]}}") from exc
    except RecursionError as exc:  # '[[[[...' a hundred thousand deep
        raise RequestProblem(400, "the JSON is nested too deeply; send {\"images\": [base64, ...]}") from exc
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list) or not all(isinstance(item, str) for item in images):
        raise RequestProblem(400, "JSON must be {\"images\": [\"<base64 image>\", ...]}")
    decoded = []
    for index, text in enumerate(images):
        try:
            decoded.append((f"images[{index}]", base64.b64decode(text.split(",", 1)[-1], validate=True)))
        except (binascii.Error, ValueError) as exc:
            raise RequestProblem(400, f"images[{index}] is not valid base64 ({exc})") from exc
    return decoded


async def _in_time(settings: ServeSettings, what: str, work: Callable, model: OnnxClassifier, inputs: object) -> object:
    """`work(model, inputs, stop)` in a worker thread, or 504 once it runs past `deploy.serve_timeout_seconds`; the
    work is then stopped where it is (between images, or inside onnxruntime's run), so its thread is free again."""
    from starlette.concurrency import run_in_threadpool

    stop = Stop()
    try:
        return await asyncio.wait_for(run_in_threadpool(_until_stopped, work, model, inputs, stop), settings.timeout_seconds)
    except asyncio.TimeoutError as exc:
        stop.stop()
        raise RequestProblem(504, f"{what} took longer than {settings.timeout_seconds:g} s (deploy.serve_timeout_seconds); send fewer images") from exc


def _until_stopped(work: Callable, model: OnnxClassifier, inputs: object, stop: Stop) -> object:
    started = time.perf_counter()
    try:
        return work(model, inputs, stop)
    except Exception as exc:
        if not stop.stopped:
            raise
        # the request already got its 504; onnxruntime's terminated run raises its own error, which is expected here
        log.info("stopped a request's work %.2f s after it started, past the time limit (%s)", time.perf_counter() - started,
                 "between images" if isinstance(exc, Stopped) else "inside onnxruntime's run")
        return None


def _infer(model: OnnxClassifier, images: np.ndarray, stop: Stop) -> np.ndarray:
    return model.predict_proba(images, stop=stop)


def _classify(model: OnnxClassifier, files: list[tuple[str, bytes]], stop: Stop) -> list[dict]:
    decoded = []
    for name, data in files:
        stop.check()
        decoded.append(decode_image(data, name, model.image_size, stop))
    probs = model.predict_proba(np.stack(decoded), stop=stop)
    rows = []
    for (name, _), row in zip(files, probs, strict=True):
        order = np.argsort(-row)[: min(TOP_K, len(row))]
        rows.append({
            "file": name,
            "label": model.classes[int(order[0])],
            "score": round(float(row[order[0]]), 6),
            "top": [{"label": model.classes[int(i)], "score": round(float(row[i]), 6)} for i in order],
        })
    return rows


def served_name(model: OnnxClassifier) -> str:
    """The model's name in Open Inference Protocol paths: the registered name, else the file's stem."""
    from pathlib import Path

    return model.source.name or Path(model.source.uri).stem or "model"


def served_version(model: OnnxClassifier) -> str:
    """The version in Open Inference Protocol answers: the registered version, else 1."""
    return model.source.version or "1"


def _model_facts(model: OnnxClassifier) -> dict:
    source = model.source
    return {
        "uri": source.uri, "name": source.name, "version": source.version, "alias": source.alias, "variant": source.variant,
        "provider": model.provider, "sha256": source.sha256, "signed_by": source.signed_by, "note": source.note,
    }


def create_app(live: LiveModel, settings: ServeSettings):  # noqa: ANN201 - fastapi.FastAPI
    """The FastAPI application serving `live`."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="Graft model server", version="1", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestProblem)
    async def refused(_: Request, exc: RequestProblem) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "invalid request; see GET /metadata for what /predict accepts"}, status_code=422)

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        incident = uuid.uuid4().hex[:12]
        log.error("request failed (incident %s)", incident, exc_info=exc)
        return JSONResponse({"error": f"internal error (incident {incident}); see the server log"}, status_code=500)

    @app.get("/health")
    async def health() -> dict:
        model = live.model
        return {
            "status": "degraded" if live.last_error else "ok",
            "model": _model_facts(model),
            "loaded_at": live.loaded_at,
            "reloads": live.reloads,
            "last_check": live.last_check,
            "last_reload_error": live.last_error,
            "refused_version": live.refused_version,
            "warning": model.source.warning,
        }

    @app.get("/metadata")
    async def metadata() -> dict:
        model = live.model
        meta = model.metadata
        return {
            "model": _model_facts(model),
            "classes": list(model.classes),
            "image_size": model.image_size,
            **{key: _loads(meta[key]) for key in ("preprocessing", "mean", "std", "backbone", "data_md5", "temperature") if key in meta},
            "input": "POST /predict: multipart files, an image/* body, or JSON {\"images\": [base64, ...]}",
            "limits": {"max_upload_bytes": settings.max_upload_bytes, "max_batch": settings.max_batch, "timeout_seconds": settings.timeout_seconds},
        }

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        started = time.perf_counter()
        model = live.model  # one model for the whole request, even if a reload happens meanwhile
        files = await _uploads(request, settings)
        rows = await _in_time(settings, "prediction", _classify, model, files)
        return {"model": _model_facts(model), "predictions": rows, "seconds": round(time.perf_counter() - started, 4)}

    _open_inference_routes(app, live, settings)
    return app


def _open_inference_routes(app, live: LiveModel, settings: ServeSettings) -> None:  # noqa: ANN001 - fastapi.FastAPI
    """The Open Inference Protocol (KServe V2) routes on `app`, serving the same model as `/predict`."""
    from fastapi.responses import Response

    def model_for(name: str, version: str | None = None) -> OnnxClassifier:
        """The model served under `name` (and `version`), or a 400 saying what is served (Triton answers 400 too)."""
        model = live.model
        served, current = served_name(model), served_version(model)
        if name != served:
            raise RequestProblem(400, f"model '{name[:100]}' is not served here; this server serves '{served}' (GET /v2/models/{served})")
        if version is not None and version != current:
            refused = f" (it was refused: {live.last_error})" if version == live.refused_version and live.last_error else ""
            raise RequestProblem(400, f"version '{version[:40]}' of '{served}' is not served{refused}; version {current} is")
        return model

    @app.get("/v2")
    async def server_metadata() -> dict:
        from importlib.metadata import PackageNotFoundError, version

        try:
            graft_version = version("graft")
        except PackageNotFoundError:
            graft_version = "unknown"
        return {"name": "graft", "version": graft_version, "extensions": list(open_inference.EXTENSIONS)}

    @app.get("/v2/health/live")
    async def live_check() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready_check() -> dict:
        # a model is loaded only once it passed every check a load makes, and one refused later is never swapped in
        return {"ready": True}

    async def metadata_v2(name: str, version: str | None = None) -> dict:
        model = model_for(name, version)
        return open_inference.model_metadata(served_name(model), served_version(model), model.input_name, model.output_name,
                                             model.image_size, len(model.classes))

    async def config_v2(name: str, version: str | None = None) -> dict:
        model = model_for(name, version)
        return open_inference.model_config(served_name(model), served_version(model), model.input_name, model.output_name,
                                           model.image_size, len(model.classes), settings.max_batch)

    async def ready_v2(name: str, version: str | None = None) -> dict:
        model = model_for(name, version)
        return {"name": served_name(model), "ready": True}

    async def infer_v2(request: Request, name: str, version: str | None = None) -> Response:
        model = model_for(name, version)
        body = await _read_body(request, settings.max_upload_bytes)
        parsed = open_inference.parse_infer(body, request.headers.get(open_inference.HEADER_LENGTH), model.input_name,
                                            model.output_name, model.image_size, settings.max_batch)
        probabilities = await _in_time(settings, "inference", _infer, model, parsed.images)
        content, headers = open_inference.encode_infer(parsed, probabilities, model.classes, served_name(model), served_version(model))
        return Response(content, headers=headers, media_type=headers["content-type"])

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_api_route(prefix, metadata_v2, methods=["GET"])
        app.add_api_route(f"{prefix}/ready", ready_v2, methods=["GET"])
        app.add_api_route(f"{prefix}/config", config_v2, methods=["GET"])
        app.add_api_route(f"{prefix}/infer", infer_v2, methods=["POST"])


def _loads(value: str) -> object:
    import json

    try:
        return json.loads(value)
    except ValueError:
        return value


def _uvicorn_config(live: LiveModel, settings: ServeSettings, host: str, port: int, log_level: str):  # noqa: ANN202 - uvicorn.Config
    """The HTTP server `serve` runs, and `running_server` (the tests) with it: one set of connection limits."""
    import uvicorn

    return uvicorn.Config(create_app(live, settings), host=host, port=port, log_level=log_level, limit_concurrency=64, timeout_keep_alive=5)


@contextmanager
def running_server(live: LiveModel, settings: ServeSettings, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve in a background thread (port 0: any free port) and yield the base URL; always shut down. The server
    `serve` runs (`_uvicorn_config`), in this process: what the tests start."""
    import uvicorn

    server = uvicorn.Server(_uvicorn_config(live, settings, host, port, "warning"))
    thread = threading.Thread(target=server.run, name="graft-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise GraftError(f"the HTTP server did not start on {host}:{port}; is the port in use?")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        with live.polling(settings.poll_seconds):
            yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def serve(uri: str, host: str, port: int, settings: ServeSettings, loaded: Callable[[OnnxClassifier], None] | None = None) -> None:
    """Run the service in the foreground until interrupted; `loaded` is called once the model passed its checks and
    loaded, before the server listens (a model refused at start-up raises instead)."""
    import uvicorn

    use_spin_waiting(False)  # the model's threads share the cores with the HTTP workers
    live = LiveModel(uri, settings.variant)
    log.info("serving %s on %s at http://%s:%d", live.model.source.describe(), live.model.provider, host, port)
    if loaded is not None:
        loaded(live.model)
    with live.polling(settings.poll_seconds):
        uvicorn.Server(_uvicorn_config(live, settings, host, port, "info")).run()
