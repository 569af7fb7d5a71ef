"""Registered versions as consumers and the flow read them: `models:/` URIs, the version an alias
names, and their files.
"""

from __future__ import annotations

import re
from pathlib import Path

from components.core.errors import GraftError
from components.core.lineage import CHAMPION
from components.registry import mlflow_calls

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


def parse_registry_uri(text: str) -> tuple[str, str | None, str | None] | None:
    """(name, alias, version) of `models:/NAME@ALIAS` or `models:/NAME/VERSION`, else None."""
    match = _REGISTRY_URI.match(text)
    return (match["name"], match["alias"], match["version"]) if match else None


def _missing(exc) -> bool:  # noqa: ANN001 - mlflow MlflowException
    """Whether MLflow's error says the model, version or alias does not exist (not that the call failed)."""
    # MLflow reports a missing model or version as RESOURCE_DOES_NOT_EXIST and a missing alias as
    # INVALID_PARAMETER_VALUE "Registered model alias ... not found."
    missing_alias = exc.error_code == "INVALID_PARAMETER_VALUE" and "not found" in exc.message
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST" or missing_alias


def _read_or_none(client, what: str, read):  # noqa: ANN001, ANN202 - MlflowClient, a call returning a ModelVersion
    from mlflow.exceptions import MlflowException

    def attempt():  # noqa: ANN202
        try:
            return read()
        except MlflowException as exc:
            if _missing(exc):
                return None
            raise

    return mlflow_calls.call(what, attempt, uri=mlflow_calls.server_uri(client))


def version_by_alias(client, name: str, alias: str = CHAMPION):  # noqa: ANN001, ANN201 - MlflowClient, ModelVersion
    """The version `alias` points at, or None when model `name` or its alias does not exist.

    Every reader of an alias (the gate, promotion, the retraining check, consumers) comes here.

    Raises:
        RegistryError: the registry kept failing (transient errors are retried) or refused the call;
            an outage must not read as "no champion".
        TrackingAuthError: the server refused the credentials or the permission.
    """
    return _read_or_none(client, f"reading alias '{alias}' of '{name}'", lambda: client.get_model_version_by_alias(name, alias))


def alias_version(client, name: str, alias: str = CHAMPION) -> str | None:  # noqa: ANN001 - MlflowClient
    """The version number `alias` points at, or None (see `version_by_alias`)."""
    found = version_by_alias(client, name, alias)
    return None if found is None else str(found.version)


def registry_version(name: str, alias: str | None, version: str | None):  # noqa: ANN201 - mlflow ModelVersion
    """The model version an alias or number names, on MLflow's current registry, with a clear error when there is none.

    Raises:
        TrackingAuthError: the server refused the credentials or the permission to read the model.
        RegistryError: the registry kept failing.
        GraftError: the model has no such alias or version.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    if alias:
        what, found = f"alias '{alias}'", version_by_alias(client, name, alias)
    else:
        what = f"version {version}"
        found = _read_or_none(client, f"reading version {version} of '{name}'", lambda: client.get_model_version(name, version))
    if found is None:
        raise GraftError(
            f"model '{name}' has no {what} in the MLflow registry at {client.tracking_uri}; "
            "check the name and alias in the MLflow UI, or pass --params naming the right store"
        )
    return found


def download_artifact(artifact_uri: str, dst: Path) -> Path:
    """Download an MLflow artifact (a file or folder) into `dst`; a refusal or a bad URI is one clear error."""
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst)))
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a bad URI
        refused = mlflow_calls.explain_auth(exc, mlflow.get_tracking_uri(), f"downloading '{artifact_uri}'")
        if refused is not None:
            raise refused from exc
        raise GraftError(f"cannot download '{artifact_uri}' from MLflow ({exc}); check the name/alias in the MLflow UI") from exc
