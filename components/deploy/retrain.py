"""Is there anything to retrain? The data version and the training parameters against the registry's.

A scheduled run asks this before it pulls data or loads a model: it reads the
md5 that `data.dvc` records (or hashes the folder when no `.dvc` file names
it), fingerprints the parameters that change what training produces, and
compares both with the tags of the `champion` version and of the latest
`challenger` (a model trained on the same data and parameters but kept out by
the gate would only be trained again to the same verdict).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from components.core.config import Params
from components.core.errors import DataError
from components.core.lineage import (
    CHALLENGER,
    CHAMPION,
    DATA_MD5_TAG,
    GATE_CHAMPION_TAG,
    GATE_VERDICT_TAG,
    HOLD_TAG,
    MANIFEST_SHA_TAG,
    PARAMS_SHA_TAG,
    params_fingerprint,
    training_settings,
)
from components.data.folders import scan
from components.data.split import SplitSettings
from components.data.versions import current_data_md5, dir_md5, dvc_file_for
from components.registry.history import last_champion
from components.registry.tracking import open_tracking_store
from components.registry.versions import version_by_alias

log = logging.getLogger(__name__)


LAST_CHECK_TAG = "graft.last_check"


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
    forced: bool = False
    """`--force`: trains although the check found nothing to do (`reason` still says what it found)."""

    @property
    def action(self) -> str:
        return "retrain (forced)" if self.forced else "retrain" if self.retrain else "nothing to do"

    def force(self) -> RetrainDecision:
        """This decision under `--force`: it trains; the check's finding stays in `reason`."""
        return self if self.retrain else replace(self, retrain=True, forced=True)


def _same_inputs(version, data_md5: str, params_sha: str) -> bool:  # noqa: ANN001 - MLflow ModelVersion
    tags = version.tags or {}
    return tags.get(DATA_MD5_TAG) == data_md5 and tags.get(PARAMS_SHA_TAG) == params_sha


def _differences(client, champion, params: Params, data_md5: str, params_sha: str) -> list[str]:  # noqa: ANN001
    tags = champion.tags or {}
    found = []
    if tags.get(DATA_MD5_TAG) != data_md5:
        found.append(f"data changed: md5 {data_md5} now, {tags.get(DATA_MD5_TAG)} for champion v{champion.version}")
    if PARAMS_SHA_TAG not in tags:
        found.append(f"champion v{champion.version} has no {PARAMS_SHA_TAG} tag (registered before Graft recorded it)")
    elif tags[PARAMS_SHA_TAG] != params_sha:
        changed = _changed_settings(client, champion, params)
        found.append(f"parameters changed{f' ({changed})' if changed else ''}: params_sha {params_sha} now, "
                     f"{tags[PARAMS_SHA_TAG]} for champion v{champion.version}")
    return found


def _changed_settings(client, champion, params: Params, shown: int = 5) -> str:  # noqa: ANN001 - MlflowClient, ModelVersion
    """The training settings that differ from those the champion's run logged, in words (`train.lr 0.001 -> 0.01`);
    '' when its run cannot be read (the hashes still say that something changed)."""
    try:
        logged = client.get_run(champion.run_id).data.params
    except Exception:  # noqa: BLE001 - a deleted run or an unreachable server: only the words are lost
        return ""
    now = {key: str(value)[:6000] for key, value in training_settings(params).items()}  # as `Run.log_params` wrote them
    changed = [f"{key} {logged.get(key, '(not set)')} -> {value}" for key, value in sorted(now.items()) if logged.get(key) != value]
    return ", ".join(changed[:shown]) + (f" and {len(changed) - shown} more" if len(changed) > shown else "")


def decide(params: Params, client=None) -> RetrainDecision:  # noqa: ANN001 - MlflowClient
    """Compare this data version and these parameters with the registered champion and challenger.

    Args:
        params: The parameters the run would train with.
        client: An `MlflowClient`; default one on the configured tracking store.
    """
    if client is None:
        from mlflow import MlflowClient

        uri = open_tracking_store(params)
        client = MlflowClient(uri, uri)
    name = params.deploy.model_name
    data_md5 = current_data_md5(params.data.dir)
    params_sha = params_fingerprint(params)
    champion = version_by_alias(client, name, CHAMPION)
    facts = {"model_name": name, "data_md5": data_md5, "params_sha": params_sha}
    removed = champion is None and (last := last_champion(client, name, alias_read=True)) is not None
    if removed:  # the alias was removed outside Graft: the version that held it last is still the one to beat
        champion = client.get_model_version(name, last)
    champion_version = str(champion.version) if champion is not None else None
    if champion is None:
        return RetrainDecision(True, f"no champion of '{name}' yet", champion_version=None, matched_version=None, **facts)
    label = f"v{champion.version} (champion last; the alias was removed outside Graft)" if removed else f"champion v{champion.version}"
    if _same_inputs(champion, data_md5, params_sha):
        reason = f"{label} was trained on data {data_md5} with params {params_sha}"
        return RetrainDecision(False, reason, champion_version=champion_version, matched_version=champion_version, **facts)
    challenger = version_by_alias(client, name, CHALLENGER)
    if challenger is not None and _same_inputs(challenger, data_md5, params_sha):
        now = (f"no version holds `champion` now (removed outside Graft; v{champion.version} held it last)" if removed
               else f"champion is v{champion.version} now")
        reason = f"challenger v{challenger.version} was already trained on data {data_md5} with params {params_sha}; " \
                 + _challenger_verdict(challenger, str(champion.version), label, now)
        return RetrainDecision(False, reason, champion_version=champion_version, matched_version=str(challenger.version), **facts)
    same = _same_images(params, data_md5, params_sha, (champion, challenger))
    if same is not None:
        reason = (
            f"the data folder's md5 changed ({data_md5} now, {same.tags.get(DATA_MD5_TAG)} for v{same.version}) but not its images: "
            f"v{same.version} was trained on this very split (split manifest {same.tags[MANIFEST_SHA_TAG][:12]}...) with params "
            f"{params_sha}; only files that are not images were added, removed or changed"
        )
        return RetrainDecision(False, reason, champion_version=champion_version, matched_version=str(same.version), **facts)
    reason = "; ".join(_differences(client, champion, params, data_md5, params_sha))
    return RetrainDecision(True, reason, champion_version=champion_version, matched_version=None, **facts)


def _challenger_verdict(challenger, champion: str, label: str, now: str) -> str:  # noqa: ANN001 - MLflow ModelVersion
    """What the challenger's own gate said, and against which champion: it may have been judged against another one (the
    champion moved by hand since), or promoted and then replaced by hand; the same inputs would train it again all the same."""
    tags = challenger.tags or {}
    judged, promoted = tags.get(GATE_CHAMPION_TAG), tags.get(GATE_VERDICT_TAG) == "promote"
    if judged == champion and not promoted:
        return f"the gate kept {label}; the same inputs would give the same verdict"
    said = ("would have promoted it (held)" if tags.get(HOLD_TAG) else "promoted it") if promoted else "kept the champion"
    against = f"against v{judged}" if judged else "with no champion to compare"
    return (f"its gate {said} {against}, and {now}; training again would make the same model, so nothing to do "
            f"(to serve v{challenger.version}: graft promote --name {challenger.name} --version {challenger.version})")


def _same_images(params: Params, data_md5: str, params_sha: str, versions):  # noqa: ANN001, ANN202 - MLflow ModelVersions
    """The version (champion, else challenger) trained with these parameters on exactly the images the data folder holds
    now, though the folder's md5 moved: a notes file, a `.DS_Store` or a thumbnail cache changes the md5 and not one
    training image. Only for a folder that is here and current (a DVC-tracked one as its `.dvc` file records it);
    None otherwise, or when the folder cannot be read (the run itself says what is wrong)."""
    candidates = [v for v in versions if v is not None and (v.tags or {}).get(PARAMS_SHA_TAG) == params_sha and MANIFEST_SHA_TAG in v.tags]
    folder = params.data.dir
    if not candidates or not folder.is_dir() or (dvc_file_for(folder).is_file() and dir_md5(folder) != data_md5):
        return None
    try:
        manifest = scan(folder, SplitSettings.from_config(params.data)).manifest().sha256()
    except DataError:
        return None
    return next((v for v in candidates if v.tags[MANIFEST_SHA_TAG] == manifest), None)


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
