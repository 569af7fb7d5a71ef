"""The alias history: every move of `champion`, recorded before the alias moves, and what the model page says.

Each move is recorded on the version it moved to, as the version tag `graft.moved.<time in ns>` holding one
JSON object (alias, the version it replaced, who moved it, when and why). Every key is new, so two flows moving
the alias at once both keep their entry, and the history is complete for as long as its versions exist
(deleting a version deletes the record of the moves onto it). The registered model's own page stays free of
history: its description says what the model classifies, which version is champion and why, and which is
the challenger; `graft history` reads the whole record.

Older Graft kept the history in the registered model's tags, first as a JSON list in `graft.alias_history`,
then one tag per move (`graft.alias_history.<time>.<version>`). Both are still read, as the oldest part of the
history, and the next move copies them onto their versions and removes them from the model page.

A move made in the MLflow UI is not seen when it happens; it is added to the history, as `manual`, when Graft
next notices it: `graft serve` polling the alias (within `deploy.serve_poll_seconds`), the next move Graft makes,
or the next registration. Removing the alias counts too (a `manual` entry with no version, kept on the version that
lost it). Noticing rewrites the model page as well. The alias moves last: the record is written first and removed
again if the move itself fails.

What `challenger` means: the newest version registered after the champion and not made champion. After each
move of `champion` and each registration, `challenger` is set to that version, or removed when the champion
is the newest version, so the two never name the same version.
"""

from __future__ import annotations

import getpass
import json
import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from components.core.errors import RegistryError
from components.core.lineage import (
    BACKBONE_TAG,
    CHALLENGER,
    CHAMPION,
    CHAMPION_VERSION_TAG,
    GATE_REASONS_TAG,
    GATE_VERDICT_TAG,
    HOLD_TAG,
    MOVE_TAG_PREFIX,
    PROMOTED_BY_TAG,
)
from components.registry import mlflow_calls
from components.registry.versions import alias_version, other_names

log = logging.getLogger(__name__)


HISTORY_TAG = "graft.alias_history"
"""Registered-model tag of older Graft: the whole history as a JSON list; also the prefix of its one-tag-per-move entries."""


LEGACY_MOVE_PREFIX = f"{HISTORY_TAG}."


MANUAL_PROMOTION_TAG = "graft.manual_promotion"
"""Registered-model tag of older Graft: the last move by hand it noticed (now a `manual` entry of the history)."""


MAX_WHY_CHARS = 300


@dataclass(frozen=True)
class AliasMove:
    """One move of an alias: onto `version`, from `previous`."""

    alias: str
    version: str
    """The version the alias moved to; "" when the alias was removed (outside Graft)."""
    previous: str | None
    action: str
    """gate (the flow's automatic promotion), promote, rollback, or manual (seen afterwards)."""
    who: str
    when: str
    """When it moved; for a `manual` move, when Graft noticed it (its `why` says by what)."""
    why: str

    @property
    def removed(self) -> bool:
        return not self.version

    @property
    def to_words(self) -> str:
        """`v3`, or `(removed)`."""
        return "(removed)" if self.removed else f"v{self.version}"


def who_am_i() -> str:
    """`user@host` of this process, for the history."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions(client, name: str) -> list:  # noqa: ANN001, ANN202 - MlflowClient, [ModelVersion]
    quoted = name.replace("'", "\\'")
    return list(mlflow_calls.call(f"listing the versions of '{name}'", lambda: client.search_model_versions(f"name = '{quoted}'"),
                                  uri=mlflow_calls.server_uri(client)))


def _model_tags(client, name: str) -> dict[str, str]:  # noqa: ANN001
    from mlflow.exceptions import MlflowException

    def read() -> dict[str, str]:
        try:
            return dict(client.get_registered_model(name).tags)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise RegistryError(f"registered model '{name}' not found ({other_names(client, name)}); check the name in the MLflow UI") from exc
            raise

    return mlflow_calls.call(f"reading registered model '{name}'", read, uri=mlflow_calls.server_uri(client))


def _decode(name: str, key: str, value: str) -> AliasMove:
    try:
        return AliasMove(**json.loads(value))
    except (ValueError, TypeError) as exc:
        raise RegistryError(f"tag {key} of '{name}' is not a Graft alias history entry ({exc}); delete the tag in the MLflow UI") from exc


def _legacy_entries(name: str, tags: Mapping[str, str]) -> list[tuple[str | None, AliasMove]]:
    """(model tag key, move) of the histories older Graft kept on the registered model, oldest first."""
    entries: list[tuple[str | None, AliasMove]] = []
    if tags.get(HISTORY_TAG):
        try:
            entries += [(None, AliasMove(**entry)) for entry in json.loads(tags[HISTORY_TAG])]
        except (ValueError, TypeError) as exc:
            raise RegistryError(f"tag {HISTORY_TAG} of '{name}' is not a Graft alias history ({exc}); delete the tag in the MLflow UI") from exc
    entries += [(key, _decode(name, key, tags[key])) for key in sorted(k for k in tags if k.startswith(LEGACY_MOVE_PREFIX))]
    return entries


def version_moves(name: str, tags: Mapping[str, str]) -> list[tuple[str, AliasMove]]:
    """(tag key, move) of the moves one version's tags record, oldest first."""
    return [(key, _decode(name, key, tags[key])) for key in sorted(k for k in tags if k.startswith(MOVE_TAG_PREFIX))]


def _time_ns(key: str | None) -> int:
    """The time a history key was written at (legacy list entries: 0, the oldest)."""
    if key is None:
        return 0
    digits = key.removeprefix(MOVE_TAG_PREFIX).removeprefix(LEGACY_MOVE_PREFIX).split(".", 1)[0]
    return int(digits) if digits.isdigit() else 0


def read_history(client, name: str, versions: list | None = None) -> list[AliasMove]:  # noqa: ANN001
    """The recorded alias moves of registered model `name`, oldest first (from its versions, and older Graft's model tags).

    Raises:
        RegistryError: the model does not exist, an entry is not Graft's, or the registry kept failing.
    """
    entries = [(_time_ns(key), move) for key, move in _legacy_entries(name, _model_tags(client, name))]
    for version in versions if versions is not None else _versions(client, name):
        entries += [(_time_ns(key), move) for key, move in version_moves(name, version.tags)]
    unique: dict[AliasMove, int] = {}
    for t, move in entries:
        unique.setdefault(move, t)  # an entry being copied from the model's tags to its version is read once
    history, last = [], {}
    for move, _ in sorted(unique.items(), key=lambda item: item[1]):
        if move.action == "manual" and last.get(move.alias) == move.version:
            continue  # two processes noticed the same move outside Graft at once (two `graft serve` replicas): kept once
        last[move.alias] = move.version
        history.append(move)
    return history


def _recorded(moves: list[AliasMove], alias: str = CHAMPION) -> str | None:
    """Where the history last put `alias`: a version, "" when it was removed, None when it was never moved."""
    return next((m.version for m in reversed(moves) if m.alias == alias), None)


def unrecorded_champion(client, name: str, moves: list[AliasMove]) -> str | None:  # noqa: ANN001
    """Where `champion` points when it was moved outside Graft after the last recorded move ("" when it was removed);
    else None."""
    current = alias_version(client, name, CHAMPION) or ""
    recorded = _recorded(moves)
    if recorded is None:
        return current or None
    return current if current != recorded else None


def champion_stack(moves: list[AliasMove]) -> list[str]:
    """The champions in order, as promotions push and rollbacks pop them (a removal of the alias pushes nothing)."""
    stack: list[str] = []
    for move in moves:
        if move.alias != CHAMPION or move.removed:
            continue
        if move.action == "rollback" and stack:
            stack.pop()
        if not stack or stack[-1] != move.version:
            stack.append(move.version)
    return stack


def _move_key(offset: int = 0) -> str:
    """A version tag key that sorts in time order and that no other move, even a simultaneous one, writes."""
    return f"{MOVE_TAG_PREFIX}{time.time_ns() + offset:019d}"


def _encode(move: AliasMove) -> str:
    return json.dumps(asdict(move), separators=(",", ":"))


def describe_move(move: AliasMove) -> str:
    """Who moved an alias and when, in words: `the gate of graft run 60c2... on 2026-11-28 04:07 UTC`."""
    who = {
        "gate": f"the gate of {move.who}",
        "promote": f"`graft promote` by {move.who}",
        "rollback": f"`graft rollback` by {move.who}",
        "manual": "a move outside Graft (MLflow UI or API)",
    }.get(move.action, f"{move.action} by {move.who}")
    try:
        when = datetime.fromisoformat(move.when).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        when = move.when
    return f"{who} on {when}"


def latest_move(tags: Mapping[str, str], alias: str = CHAMPION) -> str | None:
    """How a version last became `alias`, in words (`describe_move`), from its own tags (older Graft: `graft.promoted_by`)."""
    moves = [move for _, move in version_moves("", tags) if move.alias == alias and not move.removed]
    return describe_move(moves[-1]) if moves else tags.get(PROMOTED_BY_TAG)


def record_manual_move(client, name: str, alias: str = CHAMPION, noticed_by: str = "the next move",
                       last_seen: str | None = None) -> AliasMove | None:  # noqa: ANN001
    """Record a move of `alias` made outside Graft (MLflow UI or API) since the last recorded one, or its removal;
    None when there was neither. A removal is kept on the version that lost the alias; none is recorded when that
    version was deleted (deleting the version that holds an alias removes the alias, and the version's own history
    with it). `last_seen`: the version the caller last saw holding the alias (what `graft serve` was serving), which
    tells which version lost it when the history is behind."""
    current = alias_version(client, name, alias) or ""
    versions = _versions(client, name)
    existing = {str(v.version) for v in versions}
    if not current and not existing:
        return None  # no such model yet, or no versions left
    recorded = _recorded(read_history(client, name, versions), alias)
    if not current and last_seen and recorded and last_seen != recorded:
        recorded = last_seen  # it reached `last_seen` unrecorded (or that version's record went with it)
    if current == (recorded or ""):
        return None  # where the history left it (or never moved, and not set now)
    if not current and recorded not in existing:
        log.info("%s of %s is gone with v%s, deleted outside Graft; nothing to record it on", alias, name, recorded)
        return None
    what = "moved outside Graft" if current else "removed outside Graft"
    move = AliasMove(alias, current, recorded or None, "manual", "unknown (MLflow UI or API)", _now(), f"{what}; noticed by {noticed_by}")
    mlflow_calls.set_version_tag(client, name, current or str(recorded), _move_key(), _encode(move))
    log.warning("%s of %s was %s: %s -> %s; recorded in the history", alias, name, what, f"v{recorded}" if recorded else "(none)", move.to_words)
    return move


def notice_outside_moves(client, name: str, noticed_by: str, last_seen: str | None = None) -> AliasMove | None:  # noqa: ANN001
    """Record a move (or removal) of `champion` made outside Graft, and rewrite the model page and `challenger` after
    it (also when nothing could be recorded: the champion's version deleted); returns the move recorded, or None."""
    move = record_manual_move(client, name, CHAMPION, noticed_by, last_seen)
    _after_the_move(client, name)
    return move


def last_champion(client, name: str, alias_read: bool = False, versions: list | None = None) -> str | None:  # noqa: ANN001
    """The version that was champion last, by the history, while no `champion` alias is set (removed outside Graft): the
    model a running `graft serve` goes on serving. None when `champion` is set, or never was, or its versions are gone.
    `alias_read`: the caller has just read the alias and found none; `versions`: the model's versions, when just listed."""
    if not alias_read and alias_version(client, name, CHAMPION) is not None:
        return None
    versions = versions if versions is not None else _versions(client, name)
    existing = {str(v.version) for v in versions}
    if not existing:  # no such model yet, or no versions left
        return None
    return next((v for v in reversed(champion_stack(read_history(client, name, versions))) if v in existing), None)


def move_alias(client, name: str, version: str, action: str, who: str, why: str, alias: str = CHAMPION) -> AliasMove:  # noqa: ANN001
    """Record the move on `version`, then point `alias` at it; the alias moves last.

    A move made outside Graft since the last recorded one is added first, as `manual`. Afterwards `challenger`
    is brought in line with the new champion and the registered model's description is rewritten
    (`refresh_model_page`). Each MLflow call retries transient failures (`components.registry.mlflow_calls`).

    Raises:
        RegistryError: a call failed for good; the entry written is removed and `alias` stays where it was.
    """
    manual = record_manual_move(client, name, alias)
    current = alias_version(client, name, alias)
    move = AliasMove(alias, str(version), current, action, who, _now(), why[:MAX_WHY_CHARS])
    key = _move_key(offset=1 if manual else 0)
    written = False
    try:
        mlflow_calls.set_version_tag(client, name, str(version), key, _encode(move))
        written = True
        mlflow_calls.set_alias(client, name, alias, str(version))
    except RegistryError as exc:
        if written:
            _undo(client, name, str(version), key)
        raise RegistryError(f"moving '{alias}' of '{name}' to v{version} failed ({exc}); it still points at v{current}") from exc
    log.info("%s of %s: %s -> v%s (%s by %s)", alias, name, f"v{current}" if current else "(none)", version, action, who)
    if alias == CHAMPION:
        _after_the_move(client, name)
    return move


def _undo(client, name: str, version: str, key: str) -> None:  # noqa: ANN001
    """Best effort after a failed move: remove its history entry."""
    try:
        mlflow_calls.delete_version_tag(client, name, version, key)
    except RegistryError as exc:
        log.warning("could not remove the failed move's entry %s of '%s' v%s (%s); `graft history` may list a move that did not happen",
                    key, name, version, exc)


def _after_the_move(client, name: str) -> None:  # noqa: ANN001
    """What follows a move of `champion`, none of which may undo it: `challenger`, the model page, older histories."""
    try:
        refresh_model_page(client, name)
        migrate_legacy_history(client, name)
    except RegistryError as exc:
        log.warning("champion of '%s' moved, but updating the challenger alias or the model page failed (%s); "
                    "the next move or registration does it", name, exc)


SYNC_ATTEMPTS = 5
"""How often `sync_challenger` reads and writes again when the champion or the versions changed under it."""


def _challenger_target(client, name: str, versions: list) -> str | None:  # noqa: ANN001
    champion = alias_version(client, name, CHAMPION) or last_champion(client, name, alias_read=True, versions=versions)
    newest = max((int(v.version) for v in versions), default=None)
    return str(newest) if newest is not None and (champion is None or newest > int(champion)) else None


def sync_challenger(client, name: str, versions: list | None = None) -> str | None:  # noqa: ANN001
    """Point `challenger` at the newest version registered after the champion, or remove it; returns it (None: removed).

    With no champion alias, the last champion the history records counts (`last_champion`); with none ever, every
    version is newer than it, so `challenger` is the newest version. Two runs
    registering at once (a team's shared registry) can move `champion` between this one's reading and writing:
    after writing, it reads the champion and the versions again, and writes again until what it wrote still holds.
    """
    versions = versions if versions is not None else _versions(client, name)
    target = _challenger_target(client, name, versions)
    for _ in range(SYNC_ATTEMPTS):
        if target != alias_version(client, name, CHALLENGER):
            if target is None:
                mlflow_calls.delete_alias(client, name, CHALLENGER)
            else:
                mlflow_calls.set_alias(client, name, CHALLENGER, target)
        versions = _versions(client, name)
        now = _challenger_target(client, name, versions)
        if now == target:
            return target
        target = now
    log.warning("challenger of '%s': the champion kept moving while it was set; the next move or registration sets it", name)
    return target


def refresh_model_page(client, name: str) -> None:  # noqa: ANN001
    """Bring `challenger` in line with `champion`, and rewrite the registered model's description from both."""
    versions = _versions(client, name)
    challenger = sync_challenger(client, name, versions)
    champion = alias_version(client, name, CHAMPION)
    by_number = {str(v.version): v for v in versions}
    last = None if champion else by_number.get(last_champion(client, name, alias_read=True, versions=versions) or "")
    text = describe_model(name, by_number.get(champion or ""), by_number.get(challenger or ""), last)
    shown = mlflow_calls.call(f"reading registered model '{name}'", lambda: client.get_registered_model(name).description,
                              uri=mlflow_calls.server_uri(client))
    if shown != text:  # written only when it changes: a `graft serve` that may only read the registry never writes
        mlflow_calls.update_model_description(client, name, text)


def what_it_classifies(description: str | None) -> str:
    """The paragraph of a version's description that says what the model classifies (after the verdict; older
    versions put it first)."""
    paragraphs = [p.strip() for p in (description or "").strip().split("\n\n")]
    return next((p for p in paragraphs if p.startswith("Classifies")), paragraphs[0] if paragraphs else "")


def _one_line(text: str, limit: int = 400, rest: str = "") -> str:
    """`text` on one line, at most about `limit` characters: a longer one ends after its last whole sentence (or
    word) that fits, then " ..." and `rest` (where the whole text is), never in the middle of a word or a number."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit]
    sentence = max(cut.rfind(". "), cut.rfind("; "))
    kept = cut[: sentence + 1] if sentence > limit // 2 else cut.rsplit(" ", 1)[0].rstrip(",;:")
    return f"{kept} ...{f' ({rest})' if rest else ''}"


def describe_model(name: str, champion, challenger, last=None) -> str:  # noqa: ANN001 - mlflow ModelVersions or None
    """The registered model's description: what it classifies, the champion and why, the challenger, how to load it.

    What it classifies comes from the champion's own description (the challenger's while there is no champion),
    which registration writes. `last`: the version that was champion last, while the alias is removed.
    """
    reference = next((v for v in (champion, challenger, last) if v is not None and v.description), None)
    what = what_it_classifies(reference.description) if reference is not None else ""
    lines = [what or "Image classifier trained and registered by Graft.", ""]
    if champion is None and last is not None:
        lines.append(f"**No champion**: no version holds the `champion` alias (it was removed, or its version deleted, outside "
                     f"Graft). The last champion the history records that still exists is v{last.version} "
                     f"({last.tags.get(BACKBONE_TAG, '-')}, test accuracy {last.tags.get('test.accuracy', '-')}): the gate compares new "
                     f"versions with it, and `graft rollback --name {name}` puts the alias back on it. A running `graft serve` goes on "
                     f"serving the model it had loaded; one starting now finds nothing to serve.")
    elif champion is not None:
        tags = champion.tags
        how = latest_move(tags) or "moved outside Graft"
        lines.append(f"**Champion: v{champion.version}** ({tags.get(BACKBONE_TAG, 'backbone not recorded')}, test accuracy "
                     f"{tags.get('test.accuracy', '-')}, macro-F1 {tags.get('test.macro_f1', '-')}), made champion by {how}. "
                     f"Gate: {_one_line(tags.get(GATE_REASONS_TAG) or tags.get(GATE_VERDICT_TAG) or 'no verdict recorded', rest=f'all of it on v{champion.version}')}")
    else:
        lines.append("**No champion yet**: promote a version with `graft promote --name NAME --version V` (or the alias in the MLflow UI).")
    lines.append("")
    if challenger is not None:
        tags = challenger.tags
        held = f" **Held**: {_one_line(tags[HOLD_TAG], 200)}." if tags.get(HOLD_TAG) else ""
        lines.append(f"**Challenger: v{challenger.version}** ({tags.get(BACKBONE_TAG, '-')}, test accuracy {tags.get('test.accuracy', '-')}): "
                     f"the newest version, not champion.{held} Gate: "
                     f"{_one_line(tags.get(GATE_REASONS_TAG) or tags.get(GATE_VERDICT_TAG) or '-', rest=f'all of it on v{challenger.version}')}")
    else:
        lines.append("**No challenger**: " + ("the champion is the newest version." if champion is not None
                                              else "no version is newer than the last champion." if last is not None else "no versions."))
    lines += [
        "",
        f"Load the champion: `OnnxClassifier.load(\"models:/{name}@champion\")` (onnxruntime only), "
        f"`mlflow.pyfunc.load_model(\"models:/{name}@champion\")`, or `graft serve --model models:/{name}@champion`. "
        f"Who moved `champion`, when and why: `graft history --name {name}`. Graft rewrites this page at each move it "
        "makes or notices (a move in the UI: at its next run, or at once where `graft serve` runs); the Aliases column "
        "is always current.",
    ]
    return "\n".join(lines)[:4900]


def migrate_legacy_history(client, name: str) -> int:  # noqa: ANN001
    """Copy the history older Graft kept in the registered model's tags onto its versions and remove those tags; returns
    how many entries moved. Entries whose version no longer exists stay where they are. Idempotent, so two
    processes doing it at once write the same keys."""
    tags = _model_tags(client, name)
    for stale in (CHAMPION_VERSION_TAG, MANUAL_PROMOTION_TAG):  # older Graft's bookkeeping, now read from the history
        if stale in tags:
            mlflow_calls.delete_model_tag(client, name, stale)
    entries = _legacy_entries(name, tags)
    if not entries:
        return 0
    existing = {str(v.version) for v in _versions(client, name)}
    kept_in_list = []
    for index, (key, move) in enumerate(entries):
        if move.version not in existing:
            if key is None:
                kept_in_list.append(move)
            continue
        new_key = f"{MOVE_TAG_PREFIX}{_time_ns(key) or index:019d}"
        mlflow_calls.set_version_tag(client, name, move.version, new_key, _encode(move))
        if key is not None:
            mlflow_calls.delete_model_tag(client, name, key)
    if any(key is None for key, _ in entries):
        if kept_in_list:
            mlflow_calls.set_model_tag(client, name, HISTORY_TAG, json.dumps([asdict(m) for m in kept_in_list]))
        else:
            mlflow_calls.delete_model_tag(client, name, HISTORY_TAG)
    log.info("moved %d alias history entries of '%s' from its model tags onto its versions", len(entries), name)
    return len(entries)
