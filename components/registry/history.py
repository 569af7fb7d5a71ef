"""The alias history: every move of `champion`, recorded before the alias moves.

The history lives in the registered model's tags (visible in the MLflow UI beside
the model): one entry per move of `champion` with the version, the version it
replaced, who moved it, when and why. Each move is its own tag,
`graft.alias_history.<time in ns>.<version>`, holding one JSON object, so two
flows moving the alias at once both keep their entry (a single tag rewritten by
each would lose one). Histories written before that, as a JSON list in the tag
`graft.alias_history`, are still read, as the oldest entries. A move made in
the MLflow UI is not seen when it happens; it is added to the history, as
`manual`, at the next move Graft makes. The alias moves last: history and tags
are written first and removed again if the move itself fails.
"""

from __future__ import annotations

import getpass
import json
import logging
import socket
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from components.core.errors import RegistryError
from components.core.lineage import CHAMPION, CHAMPION_VERSION_TAG
from components.registry import mlflow_calls
from components.registry.versions import alias_version

log = logging.getLogger(__name__)


HISTORY_TAG = "graft.alias_history"
"""The legacy history (a JSON list); also the prefix of the one-tag-per-move entries."""


MOVE_TAG_PREFIX = f"{HISTORY_TAG}."


MAX_MOVES = 50
"""Moves kept as tags; older ones are deleted at the next move (the MLflow UI lists every tag)."""


MAX_WHY_CHARS = 300


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


def who_am_i() -> str:
    """`user@host` of this process, for the history."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_history(client, name: str) -> list[AliasMove]:  # noqa: ANN001
    """The recorded alias moves of registered model `name`, oldest first."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as exc:
        raise RegistryError(f"registered model '{name}' not found ({exc.message.splitlines()[0]}); check the name in the MLflow UI") from exc
    return [move for _, move in _history_entries(name, tags)]


def unrecorded_champion(client, name: str, moves: list[AliasMove]) -> str | None:  # noqa: ANN001
    """The version `champion` points at, when it was moved outside Graft after the last recorded move; else None."""
    current = alias_version(client, name, CHAMPION)
    recorded = next((m.version for m in reversed(moves) if m.alias == CHAMPION), None)
    return current if current is not None and current != recorded else None


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
    Each MLflow call retries transient failures (`components.registry.mlflow_calls`).

    Raises:
        RegistryError: a call failed for good; the entries written are removed and `alias` stays where it was.
    """
    before_tags = dict(mlflow_calls.call(f"reading registered model '{name}'", lambda: client.get_registered_model(name)).tags)
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
            mlflow_calls.set_model_tag(client, name, key, _encode(entry))
            written.append(key)
        if alias == CHAMPION:
            mlflow_calls.set_model_tag(client, name, CHAMPION_VERSION_TAG, str(version))
            mlflow_calls.set_version_tag(client, name, str(version), "graft.promoted_by", f"{action} by {who}")
        mlflow_calls.set_alias(client, name, alias, str(version))
    except RegistryError as exc:
        _undo(client, name, written, before_tags.get(CHAMPION_VERSION_TAG) if alias == CHAMPION else None)
        raise RegistryError(f"moving '{alias}' of '{name}' to v{version} failed ({exc}); it still points at v{current}") from exc
    _forget_old_moves(client, name, before_tags, len(written))
    log.info("%s of %s: v%s -> v%s (%s by %s)", alias, name, current, version, action, who)
    return move


def _undo(client, name: str, written: list[str], champion_version: str | None) -> None:  # noqa: ANN001
    """Best effort after a failed move: remove its history entries, restore `graft.champion_version`."""
    try:
        for key in written:
            mlflow_calls.delete_model_tag(client, name, key)
        if champion_version is not None:
            mlflow_calls.set_model_tag(client, name, CHAMPION_VERSION_TAG, champion_version)
    except RegistryError as exc:
        log.warning("could not undo the failed move's tags on '%s' (%s); `graft history` may list a move that did not happen", name, exc)


def _forget_old_moves(client, name: str, before_tags: dict[str, str], added: int) -> None:  # noqa: ANN001
    """Delete the oldest per-move tags beyond `MAX_MOVES` (a concurrent move may delete the same: harmless)."""
    keys = sorted(k for k in before_tags if k.startswith(MOVE_TAG_PREFIX))
    for key in keys[: max(0, len(keys) + added - MAX_MOVES)]:
        try:
            mlflow_calls.delete_model_tag(client, name, key)
        except RegistryError as exc:
            log.warning("could not delete old history entry %s of '%s' (%s)", key, name, exc)
            return
