"""Moving `champion` by hand or by the flow, with a recorded history to roll back along.

The history lives in the registered model's tags (visible in the MLflow UI beside
the model): one entry per move of `champion` with the version, the version it
replaced, who moved it, when and why. Each move is its own tag,
`graft.alias_history.<time in ns>.<version>`, holding one JSON object, so two
flows moving the alias at once both keep their entry (a single tag rewritten by
each would lose one). Histories written before that, as a JSON list in the tag
`graft.alias_history`, are still read, as the oldest entries. A move made in
the MLflow UI is not seen when it happens; it is added to the history, as
`manual`, at the next move Graft makes.

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
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from components import registry_calls
from components.config import Params
from components.errors import RegistryError
from components.gate import Check, GateRules

log = logging.getLogger(__name__)

CHAMPION = "champion"
HISTORY_TAG = "graft.alias_history"
"""The legacy history (a JSON list); also the prefix of the one-tag-per-move entries."""
MOVE_TAG_PREFIX = f"{HISTORY_TAG}."
MAX_MOVES = 50
"""Moves kept as tags; older ones are deleted at the next move (the MLflow UI lists every tag)."""
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
    """The version `alias` points at, or None when model `name` or its alias does not exist.

    Raises:
        RegistryError: the registry kept failing (transient errors are retried) or refused the call;
            an outage must not read as "no champion".
    """
    from mlflow.exceptions import MlflowException

    def read() -> str | None:
        try:
            return str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            # MLflow reports a missing model as RESOURCE_DOES_NOT_EXIST and a missing alias as
            # INVALID_PARAMETER_VALUE "Registered model alias ... not found."
            missing_alias = exc.error_code == "INVALID_PARAMETER_VALUE" and "not found" in exc.message
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or missing_alias:
                return None
            raise

    return registry_calls.call(f"reading alias '{alias}' of '{name}'", read, uri=registry_calls.server_uri(client))


def read_history(client, name: str) -> list[AliasMove]:  # noqa: ANN001
    """The recorded alias moves of registered model `name`, oldest first."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as exc:
        raise RegistryError(f"registered model '{name}' not found ({exc.message.splitlines()[0]}); check the name in the MLflow UI") from exc
    return [move for _, move in _history_entries(name, tags)]


def _history_entries(name: str, tags: dict[str, str]) -> list[tuple[str | None, AliasMove]]:
    """(tag key, move), oldest first: the legacy list (key None) first, then one tag per move in time order."""
    entries: list[tuple[str | None, AliasMove]] = []
    key = HISTORY_TAG
    try:
        if tags.get(HISTORY_TAG):
            entries += [(None, AliasMove(**entry)) for entry in json.loads(tags[HISTORY_TAG])]
        for key in sorted(k for k in tags if k.startswith(MOVE_TAG_PREFIX)):
            entries.append((key, AliasMove(**json.loads(tags[key]))))
    except (ValueError, TypeError) as exc:
        raise RegistryError(
            f"tag {key} of '{name}' is not a Graft alias history entry ({exc}); delete the tag in the MLflow UI"
        ) from exc
    return entries


def _move_key(version: str) -> str:
    """A tag key that sorts in time order and that no other move, even a simultaneous one, writes."""
    return f"{MOVE_TAG_PREFIX}{time.time_ns():019d}.{version}"


def _encode(move: AliasMove) -> str:
    return json.dumps(asdict(move), separators=(",", ":"))


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
    Each MLflow call retries transient failures (`components.registry_calls`).

    Raises:
        RegistryError: a call failed for good; the entries written are removed and `alias` stays where it was.
    """
    before_tags = dict(registry_calls.call(f"reading registered model '{name}'", lambda: client.get_registered_model(name)).tags)
    history = [move for _, move in _history_entries(name, before_tags)]
    current = alias_version(client, name, alias)
    recorded = next((m.version for m in reversed(history) if m.alias == alias), None)
    entries = []
    if current is not None and current != recorded:
        entries.append(AliasMove(alias, current, recorded, "manual", "unknown (MLflow UI or API)", _now(), "moved outside Graft; noticed at the next move"))
    move = AliasMove(alias, str(version), current, action, who, _now(), why[:MAX_WHY_CHARS])
    entries.append(move)
    written: list[str] = []
    try:
        for entry in entries:
            key = _move_key(entry.version)
            registry_calls.set_model_tag(client, name, key, _encode(entry))
            written.append(key)
        if alias == CHAMPION:
            registry_calls.set_model_tag(client, name, "graft.champion_version", str(version))
            registry_calls.set_version_tag(client, name, str(version), "graft.promoted_by", f"{action} by {who}")
        registry_calls.set_alias(client, name, alias, str(version))
    except RegistryError as exc:
        _undo(client, name, written, before_tags.get("graft.champion_version") if alias == CHAMPION else None)
        raise RegistryError(f"moving '{alias}' of '{name}' to v{version} failed ({exc}); it still points at v{current}") from exc
    _forget_old_moves(client, name, before_tags, len(written))
    log.info("%s of %s: v%s -> v%s (%s by %s)", alias, name, current, version, action, who)
    return move


def _undo(client, name: str, written: list[str], champion_version: str | None) -> None:  # noqa: ANN001
    """Best effort after a failed move: remove its history entries, restore `graft.champion_version`."""
    try:
        for key in written:
            registry_calls.delete_model_tag(client, name, key)
        if champion_version is not None:
            registry_calls.set_model_tag(client, name, "graft.champion_version", champion_version)
    except RegistryError as exc:
        log.warning("could not undo the failed move's tags on '%s' (%s); `graft history` may list a move that did not happen", name, exc)


def _forget_old_moves(client, name: str, before_tags: dict[str, str], added: int) -> None:  # noqa: ANN001
    """Delete the oldest per-move tags beyond `MAX_MOVES` (a concurrent move may delete the same: harmless)."""
    keys = sorted(k for k in before_tags if k.startswith(MOVE_TAG_PREFIX))
    for key in keys[: max(0, len(keys) + added - MAX_MOVES)]:
        try:
            registry_calls.delete_model_tag(client, name, key)
        except RegistryError as exc:
            log.warning("could not delete old history entry %s of '%s' (%s)", key, name, exc)
            return


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
