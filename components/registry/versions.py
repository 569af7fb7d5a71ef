"""Registered versions as consumers and the flow read them: `models:/` URIs, the version an alias
names, where their files may come from, and what their tags recorded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

from components.core.errors import GraftError, UntrustedSourceError
from components.core.lineage import (
    CHAMPION,
    GATE_REASONS_TAG,
    GATE_VERDICT_TAG,
    PARITY_AGREEMENT_TAG,
)
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
    from components.registry.tracking import consumer_store
    from mlflow import MlflowClient

    client = MlflowClient(consumer_store())
    if alias:
        what, found = f"alias '{alias}'", version_by_alias(client, name, alias)
    else:
        what = f"version {version}"
        found = _read_or_none(client, f"reading version {version} of '{name}'", lambda: client.get_model_version(name, version))
    if found is None:
        if _read_or_none(client, f"reading registered model '{name}'", lambda: client.get_registered_model(name)) is None:
            raise GraftError(f"there is no registered model '{name}' in the MLflow registry at {client.tracking_uri} "
                             f"({other_names(client, name)}); check the name, or set MLFLOW_TRACKING_URI to the registry that holds it")
        if alias == CHAMPION:  # the model is there: the alias was removed, or the version holding it deleted
            raise GraftError(
                f"no version of '{name}' holds the alias 'champion' in the MLflow registry at {client.tracking_uri} (it was removed, "
                f"or its version deleted); `graft history --name {name}` shows when, `graft rollback --name {name}` puts it back on "
                f"the last champion, or serve a version by number (models:/{name}/V)"
            )
        raise GraftError(
            f"model '{name}' has no {what} in the MLflow registry at {client.tracking_uri}; "
            f"check the name and alias in the MLflow UI, or set MLFLOW_TRACKING_URI to the registry that holds it"
        )
    return found


def other_names(client, name: str) -> str:  # noqa: ANN001 - MlflowClient
    """'did you mean ...' for a misspelt model name, else the names the registry holds."""
    import difflib

    names = sorted(m.name for m in mlflow_calls.call("listing registered models", lambda: client.search_registered_models(max_results=500),
                                                    uri=mlflow_calls.server_uri(client)))
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return f"it holds {', '.join(repr(n) for n in names[:10])}{' and more' if len(names) > 10 else ''}" if names else "it holds no models yet"


def _elsewhere(artifact_uri: str) -> bool:
    """Whether `artifact_uri` is a local file of another machine: a `file:` path none of whose folders (below the top
    two levels) exist here."""
    from urllib.parse import unquote, urlsplit

    if not artifact_uri.startswith("file:"):
        return False
    path = Path(unquote(urlsplit(artifact_uri).path))
    return not any(folder.is_dir() for folder in path.parents if len(folder.parts) > 2)


def download_artifact(artifact_uri: str, dst: Path) -> Path:
    """Download an MLflow artifact (a file or folder) into `dst`; a refusal or a bad URI is one clear error."""
    import mlflow
    from components.registry.tracking import consumer_store

    consumer_store()
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst)))
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a bad URI
        refused = mlflow_calls.explain_auth(exc, mlflow.get_tracking_uri(), f"downloading '{artifact_uri}'")
        if refused is not None:
            raise refused from exc
        if _elsewhere(artifact_uri):  # the registry names files on the machine that registered them
            raise GraftError(
                f"cannot download '{artifact_uri}' ({mlflow_calls.first_line(exc)}): the registry stores its files on a "
                "disk this machine does not see (a local artifact root). Run `mlflow server` with --serve-artifacts (its "
                "artifacts then come over HTTP: mlflow-artifacts:/) or an artifact root every machine reaches (s3://, "
                "gs://, a shared mount at the same path), and register the model again"
            ) from exc
        raise GraftError(f"cannot download '{artifact_uri}' from MLflow ({exc}); check the name/alias in the MLflow UI") from exc


def _split_uri(text: str) -> tuple[str, str, str, bool]:
    """(scheme, host, decoded path, clean) of an artifact URI; a plain absolute path counts as `file`.

    The path is percent-decoded until it stops changing, so `%252e%252e` reads as `..`; it is not clean
    with a `.` or `..` segment, a backslash, a NUL, a query or a fragment.
    """
    parts = urlsplit(text)
    path = parts.path
    for _ in range(5):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    clean = not (parts.query or parts.fragment or "\\" in path or "\x00" in path or {".", ".."} & set(path.split("/")))
    scheme = parts.scheme or ("file" if path.startswith("/") else "")
    return scheme, parts.netloc, path.rstrip("/"), clean


def uri_inside(uri: str, root: str) -> bool:
    """Whether artifact URI `uri` is `root` or lies beneath it, judged on clean, decoded paths (see `_split_uri`)."""
    scheme, host, path, clean = _split_uri(uri)
    root_scheme, root_host, root_path, root_clean = _split_uri(root)
    same_place = (scheme, host) == (root_scheme, root_host)
    return clean and root_clean and same_place and (path == root_path or path.startswith(f"{root_path}/"))


def _resolve_runs_uri(uri: str, run_id: str, run_root: str) -> str | None:
    """`runs:/RUN/path` as a plain artifact URI under `run_root` (None when RUN is another run); others unchanged."""
    if not uri.startswith("runs:/"):
        return uri
    named_run, _, path = uri[len("runs:/"):].partition("/")
    return f"{run_root.rstrip('/')}/{path}" if named_run == run_id else None


LOGGED_MODEL_URI = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]{32})/?$")
"""The source of a version registered from an MLflow 3 LoggedModel (`models:/m-<32 hex>`)."""


def logged_model_id(found) -> str | None:  # noqa: ANN001 - mlflow ModelVersion
    """The LoggedModel a version was registered from, or None for a version registered from a run's folder."""
    match = LOGGED_MODEL_URI.match(found.source or "")
    return match["model_id"] if match else None


def _artifact_root(client, found, what: str, fix: str) -> tuple[str, str]:  # noqa: ANN001 - MlflowClient, ModelVersion
    """(the folder the version's files must lie in, what it is) from the registry's own records.

    A version registered from a run's folder must lie inside that run's artifact folder; one registered from
    a LoggedModel inside the model's artifact folder, and the model must come from the version's run and lie
    inside its experiment's artifact folder (where the server puts it).
    """
    model_id = logged_model_id(found)
    if model_id is None:
        run = _read_or_none(client, f"reading run {found.run_id} of {what}", lambda: client.get_run(found.run_id))
        if run is None:
            raise UntrustedSourceError(f"{what} comes from run {found.run_id}, which no longer exists; refusing to load it; {fix}")
        return run.info.artifact_uri, f"the artifact folder of its run {found.run_id}"
    model = _read_or_none(client, f"reading logged model {model_id} of {what}", lambda: client.get_logged_model(model_id))
    if model is None:
        raise UntrustedSourceError(f"{what} comes from logged model {model_id}, which no longer exists; refusing to load it; {fix}")
    if model.source_run_id != found.run_id:
        raise UntrustedSourceError(
            f"{what}: its logged model {model_id} comes from run {model.source_run_id}, not from the version's run "
            f"{found.run_id}; refusing to load it; {fix}"
        )
    experiment = _read_or_none(client, f"reading experiment {model.experiment_id}", lambda: client.get_experiment(model.experiment_id))
    if experiment is None or not uri_inside(model.artifact_location, experiment.artifact_location):
        raise UntrustedSourceError(
            f"{what}: its logged model {model_id} keeps its files at {model.artifact_location!r}, outside its experiment's "
            f"artifact folder; refusing to load it; {fix}"
        )
    return model.artifact_location, f"the artifact folder of its logged model {model_id} (from run {found.run_id})"


def trusted_download_uri(client, found) -> str:  # noqa: ANN001 - MlflowClient, mlflow ModelVersion
    """Where to download version `found` from, once its files are known to lie where Graft registered them.

    Graft registers a version only from its own run's logged model (or, before MLflow 3 LoggedModels, from its
    run's artifact folder); a source anywhere else (another path on the server, `..` in plain or encoded form, a
    query, no run at all) is the CVE-2023-1177 family, refused here whatever the server accepted. Both the
    recorded source and the URI MLflow resolves it to are checked.

    Raises:
        UntrustedSourceError: naming the version, its source and the folder it should lie in.
        RegistryError: the registry kept failing.
    """
    what = f"{found.name} v{found.version}"
    fix = "delete that version in the MLflow UI and register the model again with `graft run`"
    if not found.run_id:
        raise UntrustedSourceError(
            f"{what} names no run, so its source {found.source!r} cannot be traced to a run's artifact folder; "
            f"refusing to load it; {fix}"
        )
    root, where = _artifact_root(client, found, what, fix)
    download = mlflow_calls.call(
        f"resolving the files of {what}", lambda: client.get_model_version_download_uri(found.name, str(found.version)),
        uri=mlflow_calls.server_uri(client),
    )
    sources = (download,) if logged_model_id(found) else (found.source, download)
    for uri in dict.fromkeys(sources):
        resolved = _resolve_runs_uri(uri, found.run_id, root)
        if resolved is None or not uri_inside(resolved, root):
            raise UntrustedSourceError(
                f"{what}: source {uri!r} lies outside {where} ({root}); "
                f"refusing to load it (a version pointing elsewhere is how CVE-2023-1177 reads other files); {fix}"
            )
    return download


def recorded_concerns(tags: Mapping[str, str]) -> tuple[str, ...]:
    """What a version's own record says against serving it: the gate did not promote it, or ONNX and PyTorch disagreed.

    Only recorded failures count; a version without a gate verdict (registered outside `graft run`) has none.
    """
    concerns = []
    verdict = tags.get(GATE_VERDICT_TAG)
    if verdict is not None and verdict != "promote":
        concerns.append(f"the gate did not promote it ({tags.get(GATE_REASONS_TAG) or verdict})")
    try:
        agreement = float(tags[PARITY_AGREEMENT_TAG])
    except (KeyError, ValueError):
        agreement = None
    if agreement is not None and agreement < 1.0:
        concerns.append(f"its parity check failed (ONNX and PyTorch agreed on {agreement:.2%} of the parity images)")
    return tuple(concerns)


def version_concerns(client, name: str, version: str) -> tuple[str, ...]:  # noqa: ANN001 - MlflowClient
    """`recorded_concerns` of version `version` of `name`; none when the version no longer exists."""
    found = _read_or_none(client, f"reading version {version} of '{name}'", lambda: client.get_model_version(name, version))
    return () if found is None else recorded_concerns(found.tags)
