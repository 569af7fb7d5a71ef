"""`graft promote` and `graft rollback`: moving `champion` by hand, with the gate's checks.

`promote` re-runs the gate's checks that a model version carries with it
(parity recorded at export, the metric floors, the ONNX file's checksum) and
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
from components.core.errors import PromotionError
from components.core.files import sha256
from components.evaluate.gate import Check, GateRules
from components.registry.history import AliasMove, champion_stack, move_alias, read_history, who_am_i
from components.registry.versions import alias_version

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


def _file_sha256(client, name: str, version: str) -> str:  # noqa: ANN001
    import mlflow
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
        value = _tag_float(tags, f"test.{metric}")
        if value is None:
            checks.append(Check(f"floor.{metric}", False, f"no test.{metric} tag to compare with the floor {floor:.3f} (evaluate.min_{metric})"))
        else:
            relation = "meets" if value >= floor else "is below"
            checks.append(Check(f"floor.{metric}", value >= floor, f"test {metric} {value:.3f} {relation} the floor {floor:.3f} (evaluate.min_{metric})"))
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
