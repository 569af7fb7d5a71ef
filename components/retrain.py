"""Is there anything to retrain? The data version and the training parameters against the registry's.

A scheduled run asks this before it pulls data or loads a model: it reads the
md5 that `data.dvc` records (or hashes the folder when no `.dvc` file names
it), fingerprints the parameters that change what training produces, and
compares both with the tags of the `champion` version and of the latest
`challenger` (a model trained on the same data and parameters but kept out by
the gate would only be trained again to the same verdict).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from components.config import Params, flatten
from components.data import dir_md5
from components.errors import DataError
from components.versioning import dvc_file_for, recorded_md5

log = logging.getLogger(__name__)

PARAMS_SHA_TAG = "params_sha"
DATA_MD5_TAG = "data_md5"
LAST_CHECK_TAG = "graft.last_check"

# Where things are and what the result is called: they change no weight of the model.
# Any other key, including keys added later, counts as training-relevant.
NOT_TRAINING_RELEVANT = ("data.dir", "data.cache_dir", "deploy.output_dir", "deploy.model_name", "deploy.serve_*", "tracking")


def _matches(key: str, patterns: Sequence[str]) -> bool:
    """`data.seed` matches `data.seed` and `data`; a pattern ending in `*` matches by prefix."""
    return any(key.startswith(p[:-1]) if p.endswith("*") else (key == p or key.startswith(f"{p}.")) for p in patterns)


def params_fingerprint(params: Params, keys: Sequence[str] | None = None) -> str:
    """A short sha256 of the parameters that change what training produces.

    Args:
        params: The run's parameters.
        keys: Only these dotted keys or sections (e.g. `("choose", "data.seed")`); default every
            training-relevant key, i.e. all but the paths and names in `NOT_TRAINING_RELEVANT`.
    """
    flat = flatten(params.model_dump(mode="json"))
    if keys is None:
        chosen = {k: v for k, v in flat.items() if not _matches(k, NOT_TRAINING_RELEVANT)}
    else:
        chosen = {k: v for k, v in flat.items() if _matches(k, keys)}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_fingerprint(*modules: str) -> str:
    """A short sha256 of the source of the named `components` modules (all of them by default)."""
    folder = Path(__file__).resolve().parent
    files = [folder / f"{m}.py" for m in modules] if modules else sorted(folder.glob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def split_fingerprint(split) -> str:  # noqa: ANN001 - components.data.Split
    """A short sha256 of a split's classes and images (path, label, size, modification time).

    Cheap (one `stat` per image, no reading), and it changes whenever an image is added, removed,
    relabelled or rewritten: a cache keyed on it is never stale, at worst recomputed after a checkout.
    """
    digest = hashlib.sha256(json.dumps(list(split.classes)).encode())
    for part, samples in (("train", split.train), ("val", split.val)):
        for sample in samples:
            stat = sample.path.stat()
            digest.update(f"{part}|{sample.path.relative_to(split.root)}|{sample.label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def current_data_md5(data_dir: Path) -> str:
    """The md5 the data's `.dvc` file records (no pull needed), else the folder's own DVC md5.

    Raises:
        DataError: neither a `.dvc` file nor the folder exists.
    """
    dvc_file = dvc_file_for(data_dir)
    if dvc_file.is_file():
        return recorded_md5(dvc_file)
    if data_dir.is_dir():
        return dir_md5(data_dir)
    raise DataError(
        f"data folder '{data_dir}' does not exist and no {dvc_file.name} names it: "
        "pass --set data.dir=DIR with <class>/<image> folders"
    )


@dataclass(frozen=True)
class RetrainDecision:
    """Whether a scheduled run should train, and why."""

    retrain: bool
    reason: str
    model_name: str
    data_md5: str
    params_sha: str
    champion_version: str | None
    matched_version: str | None
    """The registered version already trained on this data with these parameters, if any."""

    @property
    def action(self) -> str:
        return "retrain" if self.retrain else "nothing to do"


def _same_inputs(version, data_md5: str, params_sha: str) -> bool:  # noqa: ANN001 - MLflow ModelVersion
    tags = version.tags or {}
    return tags.get(DATA_MD5_TAG) == data_md5 and tags.get(PARAMS_SHA_TAG) == params_sha


def _differences(champion, data_md5: str, params_sha: str) -> list[str]:  # noqa: ANN001
    tags = champion.tags or {}
    found = []
    if tags.get(DATA_MD5_TAG) != data_md5:
        found.append(f"data changed: md5 {data_md5} now, {tags.get(DATA_MD5_TAG)} for champion v{champion.version}")
    if PARAMS_SHA_TAG not in tags:
        found.append(f"champion v{champion.version} has no {PARAMS_SHA_TAG} tag (registered before Graft recorded it)")
    elif tags[PARAMS_SHA_TAG] != params_sha:
        found.append(f"parameters changed: params_sha {params_sha} now, {tags[PARAMS_SHA_TAG]} for champion v{champion.version}")
    return found


def decide(params: Params, client=None) -> RetrainDecision:  # noqa: ANN001 - MlflowClient
    """Compare this data version and these parameters with the registered champion and challenger.

    Args:
        params: The parameters the run would train with.
        client: An `MlflowClient`; default one on the configured tracking store.
    """
    from components.deploy import CHALLENGER, current_champion
    from components.tracking import configure

    if client is None:
        from mlflow import MlflowClient

        uri = configure(params)
        client = MlflowClient(uri, uri)
    name = params.deploy.model_name
    data_md5 = current_data_md5(params.data.dir)
    params_sha = params_fingerprint(params)
    champion = current_champion(client, name)
    facts = {"model_name": name, "data_md5": data_md5, "params_sha": params_sha}
    champion_version = str(champion.version) if champion is not None else None
    if champion is None:
        return RetrainDecision(True, f"no champion of '{name}' yet", champion_version=None, matched_version=None, **facts)
    if _same_inputs(champion, data_md5, params_sha):
        reason = f"champion v{champion.version} was trained on data {data_md5} with params {params_sha}"
        return RetrainDecision(False, reason, champion_version=champion_version, matched_version=champion_version, **facts)
    challenger = _version_by_alias(client, name, CHALLENGER)
    if challenger is not None and _same_inputs(challenger, data_md5, params_sha):
        reason = (
            f"challenger v{challenger.version} was already trained on data {data_md5} with params {params_sha} "
            f"and the gate kept champion v{champion.version}; the same inputs would give the same verdict"
        )
        return RetrainDecision(False, reason, champion_version=champion_version, matched_version=str(challenger.version), **facts)
    reason = "; ".join(_differences(champion, data_md5, params_sha))
    return RetrainDecision(True, reason, champion_version=champion_version, matched_version=None, **facts)


def _version_by_alias(client, name: str, alias: str):  # noqa: ANN001, ANN202
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def record_decision(client, decision: RetrainDecision) -> None:  # noqa: ANN001
    """Note the check on the registered model (`graft.last_check`), so MLflow shows when it last looked."""
    from mlflow.exceptions import MlflowException

    log.info("retraining check for %s: %s (%s)", decision.model_name, decision.action, decision.reason)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        client.set_registered_model_tag(decision.model_name, LAST_CHECK_TAG, f"{stamp} {decision.action}: {decision.reason}"[:5000])
    except MlflowException:
        log.info("no registered model '%s' yet to record the check on", decision.model_name)


def decision_markdown(decision: RetrainDecision) -> str:
    """The check as a short Markdown report (a Prefect artifact)."""
    rows = [
        ("decision", f"**{decision.action}**"),
        ("why", decision.reason),
        ("model", decision.model_name),
        ("champion", f"v{decision.champion_version}" if decision.champion_version else "none"),
        ("data md5", f"`{decision.data_md5}`"),
        ("params sha", f"`{decision.params_sha}`"),
    ]
    lines = ["# Graft retraining check", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value.replace('|', '/')} |" for key, value in rows]
    return "\n".join(lines) + "\n"
