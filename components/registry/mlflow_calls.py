"""Every MLflow call Graft makes that can fail on a server hiccup, each retried on its own.

The deploy task as a whole is never retried (a rerun could register a second
version), so each registry call here retries itself: transient failures only
(connection refused or reset, timeouts, HTTP 5xx, MLflow's TEMPORARILY_UNAVAILABLE,
a locked SQLite store), a bounded number of times with exponential back-off and
jitter. Anything else (a 4xx, a wrong name) fails at once. Either way the caller
gets one `RegistryError` naming the call, the number of tries and what to check.

A 401 or 403 is never retried either: `explain_auth` turns it into a `TrackingAuthError`
that names the server and says which environment variables to set, or what permission
to ask for. Tracking (`components.registry.tracking`) and consumers (`components.runtime`)
use it too, so every refusal reads the same.

Creating a model version is the one call that is not idempotent: when its response
is lost, the version may exist although the call failed. Every create therefore
carries a one-off `graft.registration_id` tag, and before trying again the versions
of the same run are searched for it, so a retry reuses the version instead of
making a duplicate.
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from components.core.errors import GraftError, RegistryError, TrackingAuthError
from components.core.transient import READ_ONLY_TEXT, is_transient

log = logging.getLogger(__name__)


T = TypeVar("T")


ATTEMPTS = 4
"""Tries per call: the first and 3 retries, as `flows.resilience.service_retries` gives a task."""


FIRST_DELAY_S = 1.0
"""Wait before the first retry; doubled for each further one (with +-50% jitter), at most `MAX_DELAY_S`."""


MAX_DELAY_S = 8.0


REGISTRATION_TAG = "graft.registration_id"


_AUTH_ERROR_CODES = {"UNAUTHENTICATED": 401, "CUSTOMER_UNAUTHORIZED": 401, "PERMISSION_DENIED": 403}


def auth_status(exc: BaseException) -> int | None:
    """401 or 403 when `exc`, or an exception it was raised from, is the MLflow server refusing access; else None."""
    import requests
    from mlflow.exceptions import MlflowException

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TrackingAuthError):
            return None  # already explained
        if isinstance(exc, requests.HTTPError) and exc.response is not None and exc.response.status_code in (401, 403):
            return exc.response.status_code  # artifact uploads and downloads
        if isinstance(exc, MlflowException) and exc.error_code in _AUTH_ERROR_CODES:
            return _AUTH_ERROR_CODES[exc.error_code]
        exc = exc.__cause__
    return None


def printable_uri(uri: str) -> str:
    """`uri` with any `user:password@` removed, so it can be printed."""
    parts = urlsplit(uri)
    if not parts.netloc or "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def explain_auth(exc: BaseException, uri: str | None, what: str) -> TrackingAuthError | None:
    """A `TrackingAuthError` saying what to do when `exc` is a 401 or 403 from MLflow, else None.

    The message names the server, the user (from MLFLOW_TRACKING_USERNAME) and the variables to
    set; it never holds the password.

    Args:
        exc: What the MLflow call raised.
        uri: The tracking or registry URI the call went to (None: MLflow's current one).
        what: The refused call, naming the experiment, run or model ("reading experiment 'graft'").
    """
    status = auth_status(exc)
    if status is None:
        return None
    if uri is None:
        import mlflow

        uri = mlflow.get_tracking_uri()
    server = f"the MLflow server at {printable_uri(str(uri))}"
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    has_password = bool(os.environ.get("MLFLOW_TRACKING_PASSWORD"))
    if status == 403:
        return TrackingAuthError(
            f"{what}: {server} denied {f'user {user!r}' if user else 'this client'} permission for this (HTTP 403); "
            "ask an MLflow admin to grant that user permission on the experiment or model named here "
            "(EDIT to write, READ to read)"
        )
    if user and has_password:
        refused = f"refused the credentials of user '{user}' (HTTP 401)"
    elif user or has_password:
        missing = "MLFLOW_TRACKING_PASSWORD" if user else "MLFLOW_TRACKING_USERNAME"
        refused = f"requires a login and {missing} is not set (HTTP 401)"
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        refused = "refused the token in MLFLOW_TRACKING_TOKEN (HTTP 401)"
    else:
        refused = "requires a login and no credentials were given (HTTP 401)"
    return TrackingAuthError(
        f"{what}: {server} {refused}; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
        "to a valid MLflow account and rerun"
    )


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message, at most 300 characters, for one-line errors."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _store_tracebacks_quiet() -> None:
    """Drop the traceback MLflow's SQL store logs for each database error it then raises (`mlflow.store.db.utils`):
    Graft reports every such error itself, in one line (retried first when it is temporary)."""
    global _quieted
    if not _quieted:
        logging.getLogger("mlflow.store.db.utils").addFilter(
            lambda record: not str(record.msg).startswith("SQLAlchemy database error"))
        _quieted = True


_quieted = False


def explain_read_only(exc: BaseException, what: str, uri: str | None) -> RegistryError | None:
    """A `RegistryError` saying what to do when `exc` is a store that may not be written (never retried), else None."""
    text = str(exc)
    if not any(fragment in text for fragment in READ_ONLY_TEXT):
        return None
    if "readonly database" not in text:  # a read-only file system: the artifact store's, or the store's; its path says
        return RegistryError(f"{what} failed: it writes to a read-only file system ({first_line(exc)}); mount that "
                             "folder writable, or point the store or its artifact root at one this process may write")
    store = f"the MLflow store at {printable_uri(uri)}" if uri else "the MLflow store"
    return RegistryError(
        f"{what} failed: {store} may only be read here ({first_line(exc)}); to write it, give this user write access "
        "to the store (for SQLite: the .db file and its folder), or set MLFLOW_TRACKING_URI to a store it may write. "
        "(SQLite says the same of a database file moved or replaced while open: then run the command again)"
    )


def _delay(retry: int) -> float:
    return min(FIRST_DELAY_S * 2 ** (retry - 1), MAX_DELAY_S) * random.uniform(0.5, 1.5)


def call(
    what: str, action: Callable[[], T], find_done: Callable[[], T | None] | None = None, uri: str | None = None
) -> T:
    """Run `action`, retrying transient failures up to `ATTEMPTS` tries in all.

    Args:
        what: What the call does, for the log and the error ("setting alias 'champion' of 'm' to v3").
        action: The call itself.
        find_done: For a call that is not idempotent: after a failed try, returns its result if
            that try did take effect after all (the response was lost), else None. It must
            succeed before `action` is tried again.
        uri: The MLflow server the call goes to, for the message when it refuses access.

    Raises:
        TrackingAuthError: the server refused the credentials or a permission (never retried).
        RegistryError: `action` failed for good; the message says what, after how many tries, and what to check.
    """
    _store_tracebacks_quiet()
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
            refused = explain_auth(exc, uri, what)
            if refused is not None:
                raise refused from exc
            if isinstance(exc, TrackingAuthError):  # already explained by a nested call
                raise
            if not is_transient(exc):
                error = explain_read_only(exc, what, uri) or RegistryError(
                    f"{what} failed: {first_line(exc)}; this is not a temporary fault, so it was not retried")
                raise error from exc
            if attempt == ATTEMPTS:
                raise RegistryError(
                    f"{what} failed {ATTEMPTS} times, the last with: {first_line(exc)}; check that the MLflow server "
                    "(MLFLOW_TRACKING_URI, or tracking.store_dir for a local store) is up, answers `/health` and has "
                    "disk space, then rerun; the steps after this one did not run"
                ) from exc
            check_first = find_done is not None
            wait = _delay(attempt)
            log.warning("%s failed (%s); try %d of %d in %.1f s", what, first_line(exc), attempt + 1, ATTEMPTS, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def call_once(what: str, action: Callable[[], T], uri: str | None = None) -> T:
    """Run `action` once (creating a run is not retried: a lost response would make a second one).

    Raises:
        TrackingAuthError: the server refused the credentials or a permission.
        RegistryError: any other failure, in one line naming the call and what to check.
    """
    _store_tracebacks_quiet()
    try:
        return action()
    except GraftError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow, requests and SQLAlchemy raise many types
        refused = explain_auth(exc, uri, what)
        if refused is not None:
            raise refused from exc
        read_only = explain_read_only(exc, what, uri)
        if read_only is not None:
            raise read_only from exc
        raise RegistryError(
            f"{what} failed: {first_line(exc)}; check that the MLflow server (MLFLOW_TRACKING_URI, or "
            "tracking.store_dir for a local store) is up and answers, then rerun"
        ) from exc


def server_uri(client) -> str | None:  # noqa: ANN001 - MlflowClient
    """The tracking URI `client` talks to, for messages (None for a stand-in without one)."""
    return getattr(client, "tracking_uri", None)


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

    call(f"creating registered model '{name}'", create, uri=server_uri(client))


def create_version(client, name: str, source: str, run_id: str, tags: dict[str, str], description: str,  # noqa: ANN001, ANN201 - MLflow types
                   model_id: str | None = None):
    """Create a version of `name` with every tag in one call; a retry never makes a second one.

    The one-off `graft.registration_id` tag that lets a retry find the version a lost response made is removed
    once the version exists (best effort: a leftover one is harmless).
    """
    token = uuid.uuid4().hex
    tags = {**tags, REGISTRATION_TAG: token}
    quoted = name.replace("'", "\\'")

    def find_done():  # noqa: ANN202
        for version in client.search_model_versions(f"name = '{quoted}' and run_id = '{run_id}'"):
            if version.tags.get(REGISTRATION_TAG) == token:
                return version
        return None

    created = call(
        f"registering a version of '{name}' from run {run_id}",
        lambda: client.create_model_version(name, source, run_id=run_id, tags=tags, description=description, model_id=model_id),
        find_done,
        uri=server_uri(client),
    )
    try:
        delete_version_tag(client, name, str(created.version), REGISTRATION_TAG)
    except RegistryError as exc:
        log.warning("could not remove the registration token of '%s' v%s (%s); it is harmless", name, created.version, exc)
    return created


_UPSERT_RACE = ("UNIQUE constraint failed", "duplicate key", "Duplicate entry")
"""SQLite's, PostgreSQL's and MySQL's words for an insert that broke a unique key."""


def _upsert(write: Callable[[], None]) -> Callable[[], None]:
    """`write` (setting an alias or a tag), made once more when a concurrent writer inserted the same key first.

    MLflow's SQL store sets an alias or tag by reading, then inserting when the key is new. When two
    runs set the same new key at once, the second insert breaks the unique key and the server answers
    400. The row exists by then, so writing again updates it; any other error is raised as it came.
    """
    from mlflow.exceptions import MlflowException

    def once_more_after_a_race() -> None:
        try:
            write()
        except MlflowException as exc:
            if not any(words in str(exc) for words in _UPSERT_RACE):
                raise
            log.info("another run set the same key at the same moment (%s); setting it again", first_line(exc))
            write()

    return once_more_after_a_race


def set_alias(client, name: str, alias: str, version: str) -> None:  # noqa: ANN001
    call(
        f"setting alias '{alias}' of '{name}' to v{version}",
        _upsert(lambda: client.set_registered_model_alias(name, alias, str(version))),
        uri=server_uri(client),
    )


def set_model_tag(client, name: str, key: str, value: str) -> None:  # noqa: ANN001
    call(
        f"setting tag {key} of '{name}'",
        _upsert(lambda: client.set_registered_model_tag(name, key, value)),
        uri=server_uri(client),
    )


def delete_model_tag(client, name: str, key: str) -> None:  # noqa: ANN001
    from mlflow.exceptions import MlflowException

    def delete() -> None:
        try:
            client.delete_registered_model_tag(name, key)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":  # already gone (e.g. our own lost try)
                raise

    call(f"deleting tag {key} of '{name}'", delete, uri=server_uri(client))


def set_version_tag(client, name: str, version: str, key: str, value: str) -> None:  # noqa: ANN001
    call(
        f"setting tag {key} of '{name}' v{version}",
        _upsert(lambda: client.set_model_version_tag(name, str(version), key, value)),
        uri=server_uri(client),
    )


def log_artifacts(client, run_id: str, local_dir: str, artifact_path: str) -> None:  # noqa: ANN001
    """Upload a folder to the run (files are overwritten on retry, so it is idempotent)."""
    call(
        f"uploading {local_dir} to run {run_id} as '{artifact_path}'",
        lambda: client.log_artifacts(run_id, local_dir, artifact_path),
        uri=server_uri(client),
    )


def delete_alias(client, name: str, alias: str) -> None:  # noqa: ANN001
    """Remove `alias` from `name` (already gone counts as done)."""
    from mlflow.exceptions import MlflowException

    def delete() -> None:
        try:
            client.delete_registered_model_alias(name, alias)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise

    call(f"removing alias '{alias}' of '{name}'", delete, uri=server_uri(client))


def delete_version_tag(client, name: str, version: str, key: str) -> None:  # noqa: ANN001
    from mlflow.exceptions import MlflowException

    def delete() -> None:
        try:
            client.delete_model_version_tag(name, str(version), key)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise

    call(f"deleting tag {key} of '{name}' v{version}", delete, uri=server_uri(client))


def update_model_description(client, name: str, description: str) -> None:  # noqa: ANN001
    call(
        f"updating the description of '{name}'",
        lambda: client.update_registered_model(name, description=description),
        uri=server_uri(client),
    )
