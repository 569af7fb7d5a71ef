"""Stage 4, deploy: export to ONNX, prove parity, register, and gate the champion alias.

Order matters: the model version is created with all its tags in one call,
`challenger` is set next, and `champion` moves last and only when the gate
says so. Any failure before that leaves the previous champion where it was.
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components import registry_calls
from components.bundle import write_bundle
from components.choose import stratified_sample
from components.config import Params
from components.data import Split
from components.errors import GraftError
from components.evaluate import EvalResult
from components.export import ExportResult, export_and_verify
from components.gate import GateRules, Verdict, judge
from components.images import load_batch
from components.retrain import PARAMS_SHA_TAG, params_fingerprint
from components.model_card import CARD_ARTIFACT_DIR, REPORT_ARTIFACT_DIR, CardFacts, write_model_card
from components.promotion import move_alias
from components.serving import OnnxClassifier, choose_providers, copy_variant_files
from components.tracking import Run
from components.train import TrainResult, load_classifier
from components.variants import VariantsReport, build_variants
from components.zoo import get_spec

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class DeployResult:
    """What was exported and registered, and the gate's verdict."""

    export: ExportResult
    model_name: str
    version: str
    aliases: tuple[str, ...]
    verdict: Verdict
    model_uri: str
    seconds: float
    variants: VariantsReport | None = None
    """fp16/int8/optimised variants, their accuracy change vs fp32, and which were published."""
    bundle_dir: Path | None = None
    """The deploy bundle (`run_dir/bundle`): ONNX files, labels, model card, SHA256SUMS."""


def current_champion(client, name: str):  # noqa: ANN001, ANN201 - MLflow types
    """The version holding `champion`, or None when there is none (or no such model yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _champion_probs(client, name: str, classes: tuple[str, ...], images_of) -> tuple[str | None, np.ndarray | None, str | None]:  # noqa: ANN001
    """(champion version, its validation probabilities, why it cannot be compared)."""
    champion = current_champion(client, name)
    if champion is None:
        return None, None, None
    champion_version = str(champion.version)
    try:
        model = OnnxClassifier.load(f"models:/{name}/{champion.version}")
    except GraftError as exc:
        return champion_version, None, f"it cannot be loaded ({exc})"
    if model.classes != classes:
        return champion_version, None, f"its classes {list(model.classes)} differ from the challenger's {list(classes)}"
    return champion_version, model.predict_proba(images_of(model.image_size)), None


def _record_manual_promotion(client, name: str) -> None:  # noqa: ANN001
    """Note on the registered model when `champion` was moved by hand since Graft last set it."""
    from mlflow.exceptions import MlflowException

    champion = current_champion(client, name)
    if champion is None:
        return
    try:
        recorded = client.get_registered_model(name).tags.get("graft.champion_version")
    except MlflowException:
        return
    if recorded and recorded != str(champion.version):
        log.warning("champion of %s was moved by hand from v%s to v%s", name, recorded, champion.version)
        registry_calls.set_model_tag(client, name, "graft.manual_promotion", f"v{recorded} -> v{champion.version}")
        registry_calls.set_version_tag(client, name, champion.version, "graft.promoted_by", "manual (MLflow UI or API)")


def version_tags(params: Params, trained: TrainResult, evaluation: EvalResult, exported: ExportResult, verdict: Verdict, data_md5: str, commit: str) -> dict[str, str]:
    """Tags every registered version carries, so the MLflow UI tells its whole story."""
    import onnxruntime
    import torch

    tags = {
        "data_md5": data_md5,
        PARAMS_SHA_TAG: params_fingerprint(params),  # with data_md5, what a scheduled run compares (components/retrain.py)
        "git_commit": commit,
        "backbone": trained.backbone,
        "strategy": trained.strategy,
        "image_size": str(trained.image_size),
        "classes": json.dumps(list(trained.classes)),
        "onnx.sha256": exported.sha256,
        "onnx.opset": str(exported.opset),
        "parity.max_abs_diff": f"{exported.max_abs_diff:.3e}",
        "parity.top1_agreement": f"{exported.top1_agreement:.4f}",
        "runtime.onnxruntime": onnxruntime.__version__,
        "runtime.torch": torch.__version__,
        "runtime.python": platform.python_version(),
        **verdict.tags(),
    }
    tags.update({f"val.{k}": f"{v:.4f}" for k, v in evaluation.metrics.items()})
    return tags


def _log_onnx_model(run: Run, onnx_path: Path, image_size: int, num_classes: int, variants: tuple[str, ...] = ()) -> str:
    """Save with MLflow's ONNX flavour (signature + input example) and log it to the run.

    Published variant files (`model.int8.onnx`, ...) go into the same folder, so the
    registered version holds them beside `model.onnx` and one copy of it carries all.
    """
    import mlflow.onnx
    import onnx
    from mlflow.models import infer_signature

    example = np.zeros((1, image_size, image_size, 3), dtype=np.uint8)
    model = onnx.load(str(onnx_path))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model"
        signature = infer_signature(example, np.zeros((1, num_classes), dtype=np.float32))
        mlflow.onnx.save_model(
            model,
            str(local),
            signature=signature,
            input_example=example,
            onnx_execution_providers=choose_providers(),
            save_as_external_data=False,
        )
        copy_variant_files(onnx_path, [v for v in variants if v != "fp32"], local)
        registry_calls.log_artifacts(run.client, run.run_id, str(local), "model")
    return f"{run.artifact_uri()}/model"


def register_version(run: Run, name: str, source: str, tags: dict[str, str], description: str) -> str:
    """Create the model version with every tag in one call; returns its version number.

    Each MLflow call retries transient failures, and a retried create reuses the version a lost
    response had already made (`components.registry_calls`).

    Raises:
        RegistryError: MLflow refused, or kept failing; nothing was registered after it.
    """
    client = run.client
    registry_calls.ensure_registered_model(client, name, "Image classifier trained by Graft")
    version = registry_calls.create_version(client, name, source, run.run_id, tags, description)
    return str(version.version)


def deploy(params: Params, split: Split, trained: TrainResult, evaluation: EvalResult, run: Run, run_dir: Path, data_md5: str, commit: str) -> DeployResult:
    """Export, verify, register and (if the gate agrees) promote the challenger."""
    started = time.perf_counter()
    cfg = params.deploy
    model, _ = load_classifier(trained.checkpoint_path)
    model.temperature.fill_(evaluation.temperature)  # the calibrated softmax ships inside the ONNX graph
    spec = get_spec(trained.backbone)
    metadata = {
        "classes": list(trained.classes),
        "image_size": trained.image_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "backbone": trained.backbone,
        "data_md5": data_md5,
        "temperature": evaluation.temperature,
        "input": "uint8 RGB, N x H x W x 3",
        "output": "class probabilities",
    }
    val_paths = [s.path for s in split.val]
    exported = export_and_verify(
        model, run_dir / "model.onnx", trained.image_size, cfg.opset, metadata, val_paths[: cfg.parity_images], cfg.parity_atol
    )
    client = run.client
    _record_manual_promotion(client, cfg.model_name)
    labels = np.array([s.label for s in split.val])
    cache: dict[int, np.ndarray] = {}

    def images_of(size: int) -> np.ndarray:
        if size not in cache:
            cache[size] = load_batch(val_paths, size)
        return cache[size]

    challenger_probs = OnnxClassifier(exported.onnx_path).predict_proba(images_of(trained.image_size))
    champion_version, champion_probs, problem = _champion_probs(client, cfg.model_name, trained.classes, images_of)
    verdict = judge(
        challenger_probs, labels, GateRules.from_params(params), champion_probs, champion_version, problem, trained.classes
    )
    log.info("gate: %s", verdict.text())
    run.set_tags(verdict.tags())
    run.log_dict(verdict.to_dict(), f"{REPORT_ARTIFACT_DIR}/gate.json")
    card = write_model_card(CardFacts(params, split, trained, evaluation, exported, verdict, data_md5, commit, run.run_id), run_dir)
    run.log_artifact(card.path, CARD_ARTIFACT_DIR)
    calibration = load_batch([s.path for s in stratified_sample(split.train, cfg.calibration_images, params.data.seed)], trained.image_size)
    variants = build_variants(exported.onnx_path, cfg.variants, images_of(trained.image_size), labels, calibration, cfg.max_variant_drop)
    run.log_dict(variants.to_dict(), "deploy/variants.json")
    source = _log_onnx_model(run, exported.onnx_path, trained.image_size, len(trained.classes), variants.published)
    tags = version_tags(params, trained, evaluation, exported, verdict, data_md5, commit)
    tags["model_card"] = card.uri
    tags.update(variants.tags())
    version = register_version(run, cfg.model_name, source, tags, card.summary)
    bundle = write_bundle(
        exported.onnx_path, run_dir / "bundle",
        {"name": cfg.model_name, "version": version, "source": f"models:/{cfg.model_name}/{version}", "run_id": run.run_id, "git_commit": commit},
        variants.listing(), card.path,
    )
    registry_calls.set_alias(client, cfg.model_name, CHALLENGER, version)
    aliases = [CHALLENGER]
    if verdict.promote:
        move_alias(client, cfg.model_name, version, "gate", f"graft run {run.run_id}", verdict.text())
        aliases.append(CHAMPION)
    log.info("registered %s v%s with aliases %s", cfg.model_name, version, ", ".join(aliases))
    return DeployResult(
        export=exported,
        model_name=cfg.model_name,
        version=version,
        aliases=tuple(aliases),
        verdict=verdict,
        model_uri=f"models:/{cfg.model_name}/{version}",
        seconds=time.perf_counter() - started,
        variants=variants,
        bundle_dir=bundle.dir,
    )
