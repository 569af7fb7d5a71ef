"""The MLflow calls of the deploy step, each retried on its own when the server hiccups.

The deploy task as a whole is never retried (a rerun could register a second
version), so each registry call here retries itself: transient failures only
(connection refused or reset, timeouts, HTTP 5xx, MLflow's TEMPORARILY_UNAVAILABLE,
a locked SQLite store), a bounded number of times with exponential back-off and
jitter. Anything else (a 4xx, a wrong name) fails at once. Either way the caller
gets one `RegistryError` naming the call, the number of tries and what to check.

Creating a model version is the one call that is not idempotent: when its response
is lost, the version may exist although the call failed. Every create therefore
carries a one-off `graft.registration_id` tag, and before trying again the versions
of the same run are searched for it, so a retry reuses the version instead of
making a duplicate.
"""

from __future__ import annotations

import logging
import random
import re
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from components.errors import RegistryError
from components.transient import is_transient

log = logging.getLogger(__name__)

T = TypeVar("T")

ATTEMPTS = 4
"""Tries per call: the first and 3 retries, as `flows.resilience.service_retries` gives a task."""
FIRST_DELAY_S = 1.0
"""Wait before the first retry; doubled for each further one (with +-50% jitter), at most `MAX_DELAY_S`."""
MAX_DELAY_S = 8.0
REGISTRATION_TAG = "graft.registration_id"

_HTTP_5XX = re.compile(r"error code 5\d\d\b|too many 5\d\d error responses")
_TRANSIENT_TEXT = ("database is locked", "Connection reset", "RemoteDisconnected", "timed out")


def is_retryable(exc: BaseException) -> bool:
    """True when trying the same call again may succeed: the service, not the request, failed."""
    if is_transient(exc):
        return True
    import requests
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(exc, requests.HTTPError):  # artifact uploads raise these
        return exc.response is not None and exc.response.status_code >= 500
    if isinstance(exc, RestException):  # the server answered: its error code says whether it was a 5xx
        return exc.get_http_status_code() >= 500
    if isinstance(exc, MlflowException):  # raised by the client: only the text tells a 5xx or a dropped connection
        text = str(exc)
        return bool(_HTTP_5XX.search(text)) or any(fragment in text for fragment in _TRANSIENT_TEXT)
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _delay(retry: int) -> float:
    return min(FIRST_DELAY_S * 2 ** (retry - 1), MAX_DELAY_S) * random.uniform(0.5, 1.5)


def call(what: str, action: Callable[[], T], find_done: Callable[[], T | None] | None = None) -> T:
    """Run `action`, retrying transient failures up to `ATTEMPTS` tries in all.

    Args:
        what: What the call does, for the log and the error ("setting alias 'champion' of 'm' to v3").
        action: The call itself.
        find_done: For a call that is not idempotent: after a failed try, returns its result if
            that try did take effect after all (the response was lost), else None. It must
            succeed before `action` is tried again.

    Raises:
        RegistryError: `action` failed for good; the message says what, after how many tries, and what to check.
    """
    check_first = False
    for attempt in range(1, ATTEMPTS + 1):
        try:
            if check_first:
                done = find_done()
                if done is not None:
                    log.info("%s: the failed try had taken effect; reusing its result", what)
                    return done
                check_first = False
            return action()
        except Exception as exc:  # noqa: BLE001 - sorted into retryable or not just below
            if not is_retryable(exc):
                raise RegistryError(f"{what} failed: {_first_line(exc)}; this is not a temporary fault, so it was not retried") from exc
            if attempt == ATTEMPTS:
                raise RegistryError(
                    f"{what} failed {ATTEMPTS} times, the last with: {_first_line(exc)}; check that the MLflow server "
                    "(MLFLOW_TRACKING_URI, or tracking.store_dir for a local store) is up, answers `/health` and has "
                    "disk space, then rerun; the steps after this one did not run"
                ) from exc
            check_first = find_done is not None
            wait = _delay(attempt)
            log.warning("%s failed (%s); try %d of %d in %.1f s", what, _first_line(exc), attempt + 1, ATTEMPTS, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def ensure_registered_model(client, name: str, description: str) -> None:  # noqa: ANN001 - MlflowClient
    """Create registered model `name` unless it exists (also when another run creates it meanwhile)."""
    from mlflow.exceptions import MlflowException

    def create() -> None:
        try:
            client.get_registered_model(name)
            return
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            client.create_registered_model(name, description=description)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # created by another run, or by our own lost try
                raise

    call(f"creating registered model '{name}'", create)


def create_version(client, name: str, source: str, run_id: str, tags: dict[str, str], description: str):  # noqa: ANN001, ANN201 - MLflow types
    """Create a version of `name` with every tag in one call; a retry never makes a second one."""
    token = uuid.uuid4().hex
    tags = {**tags, REGISTRATION_TAG: token}
    quoted = name.replace("'", "\\'")

    def find_done():  # noqa: ANN202
        for version in client.search_model_versions(f"name = '{quoted}' and run_id = '{run_id}'"):
            if version.tags.get(REGISTRATION_TAG) == token:
                return version
        return None

    return call(
        f"registering a version of '{name}' from run {run_id}",
        lambda: client.create_model_version(name, source, run_id=run_id, tags=tags, description=description),
        find_done,
    )


def set_alias(client, name: str, alias: str, version: str) -> None:  # noqa: ANN001
    call(f"setting alias '{alias}' of '{name}' to v{version}", lambda: client.set_registered_model_alias(name, alias, str(version)))


def set_model_tag(client, name: str, key: str, value: str) -> None:  # noqa: ANN001
    call(f"setting tag {key} of '{name}'", lambda: client.set_registered_model_tag(name, key, value))


def delete_model_tag(client, name: str, key: str) -> None:  # noqa: ANN001
    from mlflow.exceptions import MlflowException

    def delete() -> None:
        try:
            client.delete_registered_model_tag(name, key)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":  # already gone (e.g. our own lost try)
                raise

    call(f"deleting tag {key} of '{name}'", delete)


def set_version_tag(client, name: str, version: str, key: str, value: str) -> None:  # noqa: ANN001
    call(f"setting tag {key} of '{name}' v{version}", lambda: client.set_model_version_tag(name, str(version), key, value))


def log_artifacts(client, run_id: str, local_dir: str, artifact_path: str) -> None:  # noqa: ANN001
    """Upload a folder to the run (files are overwritten on retry, so it is idempotent)."""
    call(f"uploading {local_dir} to run {run_id} as '{artifact_path}'", lambda: client.log_artifacts(run_id, local_dir, artifact_path))
