"""Which failures are worth retrying: an unreachable or overloaded service, not a wrong input."""

from __future__ import annotations

from components.errors import GraftError, RemoteError

# MLflow REST error codes a retry can cure (the server is restarting, busy, or rate-limiting), and
# what MLflow's REST client says when it gave up reaching the server (error code INTERNAL_ERROR).
_TRANSIENT_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
_UNREACHABLE = ("Max retries exceeded", "Connection refused", "Connection aborted", "Read timed out")


def is_transient(exc: BaseException | None) -> bool:
    """True for network errors, timeouts, a failed DVC remote and MLflow's temporary errors.

    Graft's own errors other than `RemoteError` are the user's to fix (a bad parameter, a corrupt
    image), so retrying them only delays the message.
    """
    if exc is None:
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
    except ImportError:
        pass
    try:
        from mlflow.exceptions import MlflowException

        if isinstance(exc, MlflowException):
            return exc.error_code in _TRANSIENT_MLFLOW_CODES or any(text in str(exc) for text in _UNREACHABLE)
    except ImportError:
        pass
    return isinstance(exc.__cause__, BaseException) and is_transient(exc.__cause__)
