"""`graft promote` and `graft rollback`: moving `champion` by hand, with the gate's checks.

`promote` re-runs the gate's checks that a model version carries with it
(parity recorded at export, the metric floors, the ONNX file's checksum against
the digest registration recorded, its source inside its run's folder) and
then moves the alias; `rollback` moves it back to the champion before the
current one. Both record the move in the alias history
(`components.registry.history`), and the alias moves last, so a failure leaves
the previous champion in place.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from components.core.config import Params
from components.core.errors import PromotionError, UntrustedSourceError
from components.core.files import sha256
from components.evaluate.gate import Check, GateRules
from components.registry.history import AliasMove, champion_stack, last_champion, move_alias, read_history, who_am_i
from components.registry.versions import alias_version, download_artifact, trusted_download_uri
from components.runtime.trust import expected_sha256
from components.runtime.variant_files import FP32_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromotionResult:
    """What a promote or rollback did."""

    name: str
    version: str
    previous: str | None
    moved: bool
    checks: tuple[Check, ...]
    move: AliasMove | None


def _tag_float(tags: dict[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def _file_sha256(client, found) -> tuple[str | None, Check]:  # noqa: ANN001 - MlflowClient, ModelVersion
    """The sha256 of the registered model.onnx (None when its source is not to be trusted), and the source check."""
    try:
        root = trusted_download_uri(client, found).rstrip("/")
    except UntrustedSourceError as exc:
        return None, Check("source", False, str(exc))
    with tempfile.TemporaryDirectory(prefix="graft-promote-") as tmp:
        digest = sha256(download_artifact(f"{root}/{FP32_FILE}", Path(tmp)))
    return digest, Check("source", True, f"its files lie inside the artifact folder of its run {found.run_id}")


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
        value = _tag_float(tags, f"test.{metric}")
        if value is None:
            checks.append(Check(f"floor.{metric}", False, f"no test.{metric} tag to compare with the floor {floor:.3f} (evaluate.min_{metric})"))
        else:
            relation = "meets" if value >= floor else "is below"
            checks.append(Check(f"floor.{metric}", value >= floor, f"test {metric} {value:.3f} {relation} the floor {floor:.3f} (evaluate.min_{metric})"))
    expected = expected_sha256(tags, FP32_FILE)
    if expected is None:
        checks.append(Check("checksum", False, f"no sha256 recorded for {FP32_FILE} to verify the registered file against"))
    elif file_sha256 is None:
        checks.append(Check("checksum", False, f"the registered {FP32_FILE} was not read (see the source check)"))
    else:
        same = expected == file_sha256
        checks.append(Check("checksum", same, f"the registered {FP32_FILE} has the sha256 registration recorded" if same else f"{FP32_FILE} has sha256 {file_sha256}, registration recorded {expected} (file altered)"))
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
    file_sha256, source_check = _file_sha256(client, found)
    checks = (*version_checks(params, found.tags, file_sha256), source_check)
    failures = [c for c in checks if not c.passed]
    if failures:
        kept = f"champion stays on v{current}" if current else "no champion was set"
        raise PromotionError(f"{name} v{version} cannot be promoted: {'; '.join(c.reason for c in failures)}; {kept}")
    move = move_alias(client, name, str(found.version), "promote", who or who_am_i(), why)
    return PromotionResult(name, str(found.version), current, True, checks, move)


def rollback(client, name: str, why: str, who: str | None = None) -> PromotionResult:  # noqa: ANN001
    """Move `champion` back to the version that held it before the current one (with no `champion` alias, removed
    outside Graft: onto the version that held it last).

    Raises:
        PromotionError: no earlier champion is recorded, or it has been deleted.
    """
    from mlflow.exceptions import MlflowException

    current = alias_version(client, name)
    if current is None:
        last = last_champion(client, name, alias_read=True)
        if last is None:
            raise PromotionError(f"'{name}' has no champion to roll back; promote one with `graft promote --name {name} --version V`")
        # the alias was removed outside Graft: back onto the version that held it last (what `graft serve` still serves)
        move = move_alias(client, name, last, "rollback", who or who_am_i(), why or f"champion alias was removed; back to v{last}, the last champion")
        return PromotionResult(name, last, None, True, (), move)
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
