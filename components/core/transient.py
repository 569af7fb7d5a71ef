"""Which failures are worth retrying: an unreachable or overloaded service, not a wrong input.
"""

from __future__ import annotations

import re

from components.core.errors import GraftError, RemoteError

# MLflow REST error codes a retry can cure (the server is restarting, busy, or rate-limiting), and
# what MLflow's REST client says when it gave up reaching the server (error code INTERNAL_ERROR).
_TRANSIENT_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


_UNREACHABLE = ("Max retries exceeded", "Connection refused", "Connection aborted", "Read timed out")


# what MLflow's client says when the server answered 5xx, or dropped the connection, or its SQLite store was busy
_HTTP_5XX = re.compile(r"error code 5\d\d\b|too many 5\d\d error responses")


_TRANSIENT_TEXT = ("database is locked", "Connection reset", "RemoteDisconnected", "timed out")


READ_ONLY_TEXT = ("readonly database", "read-only file system", "Read-only file system")
"""What a store that may not be written says (SQLite's "attempt to write a readonly database", a read-only mount):
MLflow labels the first TEMPORARILY_UNAVAILABLE, but no retry cures it."""


def is_transient(exc: BaseException | None) -> bool:
    """True for network errors, timeouts, a failed DVC remote and MLflow's temporary errors.

    Graft's own errors other than `RemoteError` are the user's to fix (a bad parameter, a corrupt
    image), so retrying them only delays the message.
    """
    if exc is None:
        return False
    if any(fragment in str(exc) for fragment in READ_ONLY_TEXT):
        return False
    if isinstance(exc, RemoteError):
        return True
    if isinstance(exc, GraftError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import requests

        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
        if isinstance(exc, requests.HTTPError):  # artifact uploads and downloads raise these
            return exc.response is not None and exc.response.status_code >= 500
    except ImportError:
        pass
    try:
        from mlflow.exceptions import MlflowException, RestException

        if isinstance(exc, RestException):  # the server answered: its status says whether it was a 5xx
            return exc.error_code in _TRANSIENT_MLFLOW_CODES or exc.get_http_status_code() >= 500
        if isinstance(exc, MlflowException):  # raised by the client: only its text tells
            text = str(exc)
            return (exc.error_code in _TRANSIENT_MLFLOW_CODES or bool(_HTTP_5XX.search(text))
                    or any(fragment in text for fragment in _UNREACHABLE + _TRANSIENT_TEXT))
    except ImportError:
        pass
    return isinstance(exc.__cause__, BaseException) and is_transient(exc.__cause__)
