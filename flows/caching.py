"""Prefect cache keys: a task is skipped when its data, its parameters and the code are what they were.

Results are persisted under PREFECT_HOME (`.prefect/storage` for the `graft`
CLI), so a later run, in another process, finds them.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from datetime import timedelta
from pathlib import Path

from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy

from components.choose.candidates import resolve_spec
from components.core.lineage import code_fingerprint, params_fingerprint, split_fingerprint

log = logging.getLogger(__name__)

# What scoring one candidate reads: the split, the image size and seeds, the choose settings.
CHOOSE_KEYS = ("data.val_fraction", "data.test_fraction", "data.seed", "data.image_size", "choose", "train.seed", "deploy.opset")
CACHE_EXPIRATION = timedelta(days=30)


def _weights_state(params, name: str) -> str:  # noqa: ANN001 - components.core.config.Params
    """The candidate's weights file (and a user backbone's factory file) as it is now (path, size, time): adding a
    missing file or replacing one must not be answered from the cache. A missing file gives a key of its own each
    time, so a failed download is tried again on the next run, not answered from the cache."""
    spec = resolve_spec(params, name)
    code = spec.code_file()  # a user backbone's factory, changed or fixed since: scored again
    factory = f"|factory {code}:{code.stat().st_size}:{code.stat().st_mtime_ns}" if code is not None else ""
    path = spec.weights_path()
    if path is None:
        return f"no weights file{factory}"
    if not path.is_file():
        return f"{path}:missing:{uuid.uuid4().hex}"
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}{factory}"


def _retry_file(params, name: str) -> Path:  # noqa: ANN001 - Params
    return params.data.cache_dir / "choose-retries" / resolve_spec(params, name).slug


def _retry_token(params, name: str) -> str:  # noqa: ANN001 - Params
    try:
        return _retry_file(params, name).read_text()
    except OSError:
        return ""


def score_again_next_time(params, name: str) -> None:  # noqa: ANN001 - Params
    """Give a candidate that could not be scored (a full disk, a file that failed to load or export) a new cache
    key, so the next run scores it again instead of answering the failure from the cache for CACHE_EXPIRATION."""
    path = _retry_file(params, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(uuid.uuid4().hex)
    except OSError as exc:
        log.warning("%s: could not mark its failed score to be made again (%s); rerun with PREFECT_TASKS_REFRESH_CACHE=true "
                    "once the cause is fixed", name, exc)


def _inputs(params, split, name: str, keys: tuple[str, ...]) -> str:  # noqa: ANN001 - Params, Split
    return "|".join((_weights_state(params, name), str(params.data.cache_dir), split_fingerprint(split),
                     params_fingerprint(params, keys), code_fingerprint(), _retry_token(params, name)))


def candidate_cache_key(context, parameters: dict) -> str:  # noqa: ANN001 - prefect TaskRunContext
    """Key of one candidate's score: its name and weights, the images, the choose parameters, the components' code.

    The score names the candidate's ONNX export in `data.cache_dir`; after deleting that folder, run once with
    PREFECT_TASKS_REFRESH_CACHE=true so the scores (and their exports) are made again.
    """
    params, split, name = parameters["params"], parameters["split"], parameters["name"]
    inputs = _inputs(params, split, name, CHOOSE_KEYS)
    return f"score-{resolve_spec(params, name).slug}-{hashlib.sha256(inputs.encode()).hexdigest()[:24]}"


# What training one finalist's head reads besides: the fine-tune stage's settings (its head recipe).
FINALIST_KEYS = (*CHOOSE_KEYS, "train")


def finalist_cache_key(context, parameters: dict) -> str:  # noqa: ANN001 - prefect TaskRunContext
    """Key of one finalist's head trial: what its candidate score's key holds, the `train` settings, and the
    first round's row it starts from (its image size and graph)."""
    params, split, row = parameters["params"], parameters["split"], parameters["row"]
    inputs = "|".join((_inputs(params, split, row.name, FINALIST_KEYS), str(row.image_size), str(row.onnx_path)))
    return f"finalist-{resolve_spec(params, row.name).slug}-{hashlib.sha256(inputs.encode()).hexdigest()[:24]}"


# TASK_SOURCE adds the task function's own source to the key.
CANDIDATE_CACHE = TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=candidate_cache_key)
FINALIST_CACHE = TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=finalist_cache_key)
