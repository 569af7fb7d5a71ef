"""Moving `champion` by hand or by the flow, with a recorded history to roll back along.

The history is a JSON list in the registered model's `graft.alias_history` tag
(visible in the MLflow UI beside the model): one entry per move of `champion`
with the version, the version it replaced, who moved it, when and why. A move
made in the MLflow UI is not seen when it happens; it is added to the history,
as `manual`, at the next move Graft makes.

`promote` re-runs the gate's checks that a model version carries with it
(parity recorded at export, the metric floors, the ONNX file's checksum) and
then moves the alias; `rollback` moves it back to the champion before the
current one. In both, the alias moves last: history and tags are written
first and restored if the move itself fails, so a failure leaves the previous
champion in place.
"""

from __future__ import annotations

import getpass
import json
import logging
import socket
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from components.config import Params
from components.errors import RegistryError
from components.gate import Check, GateRules

log = logging.getLogger(__name__)

CHAMPION = "champion"
HISTORY_TAG = "graft.alias_history"
# MLflow's SQL stores have kept registry tag values in 5000-character columns; keep the newest moves that fit.
MAX_HISTORY_CHARS = 5000
MAX_WHY_CHARS = 300


class PromotionError(RegistryError):
    """A version may not become champion, or there is nothing to roll back to."""


@dataclass(frozen=True)
class AliasMove:
    """One move of an alias: onto `version`, from `previous`."""

    alias: str
    version: str
    previous: str | None
    action: str
    """gate (the flow's automatic promotion), promote, rollback, or manual (seen afterwards)."""
    who: str
    when: str
    why: str


@dataclass(frozen=True)
class PromotionResult:
    """What a promote or rollback did."""

    name: str
    version: str
    previous: str | None
    moved: bool
    checks: tuple[Check, ...]
    move: AliasMove | None


def who_am_i() -> str:
    """`user@host` of this process, for the history."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def alias_version(client, name: str, alias: str = CHAMPION) -> str | None:  # noqa: ANN001 - MlflowClient
    """The version `alias` points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def read_history(client, name: str) -> list[AliasMove]:  # noqa: ANN001
    """The recorded alias moves of registered model `name`, oldest first."""
    from mlflow.exceptions import MlflowException

    try:
        raw = client.get_registered_model(name).tags.get(HISTORY_TAG)
    except MlflowException as exc:
        raise RegistryError(f"registered model '{name}' not found ({exc.message.splitlines()[0]}); check the name in the MLflow UI") from exc
    if not raw:
        return []
    try:
        return [AliasMove(**entry) for entry in json.loads(raw)]
    except (ValueError, TypeError) as exc:
        raise RegistryError(
            f"tag {HISTORY_TAG} of '{name}' is not a Graft alias history ({exc}); delete the tag in the MLflow UI to start a new one"
        ) from exc


def _encode(moves: list[AliasMove]) -> str:
    entries = [asdict(move) for move in moves]
    text = json.dumps(entries, separators=(",", ":"))
    while len(text) > MAX_HISTORY_CHARS and len(entries) > 1:
        entries.pop(0)
        text = json.dumps(entries, separators=(",", ":"))
    return text


def champion_stack(moves: list[AliasMove]) -> list[str]:
    """The champions in order, as promotions push and rollbacks pop them."""
    stack: list[str] = []
    for move in moves:
        if move.alias != CHAMPION:
            continue
        if move.action == "rollback" and stack:
            stack.pop()
        if not stack or stack[-1] != move.version:
            stack.append(move.version)
    return stack


def move_alias(client, name: str, version: str, action: str, who: str, why: str, alias: str = CHAMPION) -> AliasMove:  # noqa: ANN001
    """Record the move, then point `alias` at `version`; the alias moves last.

    A move made outside Graft since the last recorded one is added first, as `manual`.
    """
    from mlflow.exceptions import MlflowException

    model = client.get_registered_model(name)
    before_tags = dict(model.tags)
    history = read_history(client, name)
    current = alias_version(client, name, alias)
    recorded = next((m.version for m in reversed(history) if m.alias == alias), None)
    if current is not None and current != recorded:
        history.append(AliasMove(alias, current, recorded, "manual", "unknown (MLflow UI or API)", _now(), "moved outside Graft; noticed at the next move"))
    move = AliasMove(alias, str(version), current, action, who, _now(), why[:MAX_WHY_CHARS])
    history.append(move)
    try:
        client.set_registered_model_tag(name, HISTORY_TAG, _encode(history))
        if alias == CHAMPION:
            client.set_registered_model_tag(name, "graft.champion_version", str(version))
            client.set_model_version_tag(name, str(version), "graft.promoted_by", f"{action} by {who}")
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as exc:
        for key in (HISTORY_TAG, "graft.champion_version"):
            if key in before_tags:
                client.set_registered_model_tag(name, key, before_tags[key])
            else:
                client.delete_registered_model_tag(name, key)
        raise RegistryError(f"moving '{alias}' of '{name}' to v{version} failed ({exc.message.splitlines()[0]}); it still points at v{current}") from exc
    log.info("%s of %s: v%s -> v%s (%s by %s)", alias, name, current, version, action, who)
    return move


def _tag_float(tags: dict[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def _file_sha256(client, name: str, version: str) -> str:  # noqa: ANN001
    import mlflow

    from components.bundle import sha256

    root = client.get_model_version_download_uri(name, version).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="graft-promote-") as tmp:
        return sha256(Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/model.onnx", dst_path=tmp)))


def version_checks(params: Params, tags: dict[str, str], file_sha256: str | None) -> list[Check]:
    """The gate's checks a registered version carries with it: parity, metric floors, file checksum."""
    checks = []
    atol = params.deploy.parity_atol
    diff, agreement = _tag_float(tags, "parity.max_abs_diff"), _tag_float(tags, "parity.top1_agreement")
    if diff is None or agreement is None:
        checks.append(Check("parity", False, "no parity.max_abs_diff/parity.top1_agreement tags: not exported by Graft's deploy stage"))
    else:
        passed = diff <= atol and agreement >= 1.0
        checks.append(Check("parity", passed, f"ONNX vs PyTorch max |diff| {diff:.2e} (limit deploy.parity_atol={atol:g}), top-1 agreement {agreement:.2%}"))
    rules = GateRules.from_params(params)
    for metric, floor in (("accuracy", rules.min_accuracy), ("macro_f1", rules.min_macro_f1)):
        if floor is None:
            continue
        value = _tag_float(tags, f"val.{metric}")
        if value is None:
            checks.append(Check(f"floor.{metric}", False, f"no val.{metric} tag to compare with the floor {floor:.3f} (evaluate.min_{metric})"))
        else:
            relation = "meets" if value >= floor else "is below"
            checks.append(Check(f"floor.{metric}", value >= floor, f"{metric} {value:.3f} {relation} the floor {floor:.3f} (evaluate.min_{metric})"))
    expected = tags.get("onnx.sha256")
    if expected is None or file_sha256 is None:
        checks.append(Check("checksum", False, "no onnx.sha256 tag to verify the registered file against"))
    else:
        same = expected == file_sha256
        checks.append(Check("checksum", same, "the registered model.onnx matches onnx.sha256" if same else f"model.onnx has sha256 {file_sha256[:12]}..., the tag says {expected[:12]}... (file altered)"))
    return checks


def promote(client, params: Params, name: str, version: str, why: str, who: str | None = None) -> PromotionResult:  # noqa: ANN001
    """Run the version's gate checks and, if all pass, move `champion` onto it.

    Raises:
        PromotionError: listing every failed check; `champion` stays where it was.
    """
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise PromotionError(f"'{name}' has no version {version} ({exc.message.splitlines()[0]}); list versions in the MLflow UI") from exc
    current = alias_version(client, name)
    if current == str(found.version):
        log.info("%s v%s is already champion", name, version)
        return PromotionResult(name, str(version), current, False, (), None)
    checks = tuple(version_checks(params, found.tags, _file_sha256(client, name, str(found.version))))
    failures = [c for c in checks if not c.passed]
    if failures:
        kept = f"champion stays on v{current}" if current else "no champion was set"
        raise PromotionError(f"{name} v{version} cannot be promoted: {'; '.join(c.reason for c in failures)}; {kept}")
    move = move_alias(client, name, str(found.version), "promote", who or who_am_i(), why)
    return PromotionResult(name, str(found.version), current, True, checks, move)


def rollback(client, name: str, why: str, who: str | None = None) -> PromotionResult:  # noqa: ANN001
    """Move `champion` back to the version that held it before the current one.

    Raises:
        PromotionError: no earlier champion is recorded, or it has been deleted.
    """
    from mlflow.exceptions import MlflowException

    current = alias_version(client, name)
    if current is None:
        raise PromotionError(f"'{name}' has no champion to roll back; promote one with `graft promote --name {name} --version V`")
    stack = champion_stack(read_history(client, name))
    if not stack or stack[-1] != current:
        stack.append(current)  # moved by hand since the last recorded move
    if len(stack) < 2:
        raise PromotionError(
            f"no champion before v{current} is recorded for '{name}'; pick one with `graft promote --name {name} --version V`"
        )
    target = stack[-2]
    try:
        client.get_model_version(name, target)
    except MlflowException as exc:
        raise PromotionError(f"the previous champion, {name} v{target}, no longer exists; pick another with `graft promote`") from exc
    move = move_alias(client, name, target, "rollback", who or who_am_i(), why or f"rollback from v{current}")
    return PromotionResult(name, target, current, True, (), move)
