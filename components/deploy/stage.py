"""Stage 4, deploy: export to ONNX, prove parity, register, and gate the champion alias.

Order matters: the model version is created with all its tags in one call,
its model card is written next, and `champion` moves last and only when the
gate says so. Any failure before that leaves the previous champion where it
was. `challenger` then names the newest version not made champion, if any
(`components.registry.history.sync_challenger`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.backbones.export import cached_backbone_onnx
from components.backbones.zoo import get_spec
from components.core import progress
from components.core.config import Params
from components.core.errors import ExportError
from components.core.lineage import CHALLENGER, CHAMPION, HOLD_TAG
from components.data.images import MODEL_INPUT, PREPROCESSING, load_batch
from components.data.split import Split, stratified_sample
from components.deploy.export import ExportResult, export_and_verify
from components.deploy.facts import DeployFacts
from components.deploy.int8 import weight_bits
from components.deploy.judge import TestImages, judge_challenger
from components.deploy.model_card import CARD_ARTIFACT_DIR, REPORT_ARTIFACT_DIR, CardFacts, ModelCard, write_model_card
from components.deploy.register import LoggedModel, record_manual_promotion, register_model
from components.deploy.variants import VariantsReport, build_variants
from components.evaluate.gate import GateRules, Verdict
from components.evaluate.stage import EvalResult
from components.registry import mlflow_calls
from components.registry.history import last_champion, move_alias, refresh_model_page
from components.registry.tracking import Run
from components.registry.versions import alias_version
from components.runtime.bundle import write_bundle
from components.runtime.model import OnnxClassifier
from components.train.stage import TrainResult, load_classifier

log = logging.getLogger(__name__)


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
    held: str | None = None
    """Why `champion` was not moved although the gate would have promoted (see `DeployContext.hold`)."""


@dataclass(frozen=True)
class DeployContext:
    """The pipeline run a deploy belongs to: its parameters and data, its MLflow run and output folder."""

    params: Params
    split: Split
    run: Run
    run_dir: Path
    data_md5: str
    commit: str
    hold: str | None = None
    """Why `champion` must not move in this run whatever the gate says (a `dvc exp run`, `--no-promote`); None to let the gate decide."""


def check_settings(params: Params) -> None:
    """Refuse, before a run trains anything, deploy settings this machine could not carry out
    (`deploy.int8_weight_bits: 8` on a CPU without VNNI: `components.deploy.int8.weight_bits`).

    Raises:
        VariantError: the setting, with the fix.
    """
    if "int8" in params.deploy.variants:
        weight_bits(params.deploy.int8_weight_bits)


def export(ctx: DeployContext, trained: TrainResult, evaluation: EvalResult) -> ExportResult:
    """The trained model as ONNX, with its calibrated softmax and metadata, checked and parity-proven."""
    cfg = ctx.params.deploy
    model, ckpt = load_classifier(trained.checkpoint_path)
    model.temperature.fill_(evaluation.temperature)  # the calibrated softmax ships inside the ONNX graph
    spec = get_spec(trained.backbone)
    metadata = {
        "classes": list(trained.classes),
        "image_size": trained.image_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "backbone": trained.backbone,
        "data_md5": ctx.data_md5,
        "temperature": evaluation.temperature,
        "input": MODEL_INPUT,
        "preprocessing": PREPROCESSING,
        "output": "class probabilities",
        "graft.variant": "fp32",
    }
    parity_paths = [s.path for s in ctx.split.val[: cfg.parity_images]]
    # an untrained backbone is the very graph the choose stage exported: the model is that graph and the head
    untrained = None if trained.backbone_trained else cached_backbone_onnx(ctx.params.data.cache_dir, spec, trained.image_size, ckpt["seed"], cfg.opset)
    return export_and_verify(model, ctx.run_dir / "model.onnx", trained.image_size, cfg.opset, metadata, parity_paths, cfg.parity_atol,
                             template_dir=cfg.template_dir, backbone_onnx=untrained, exporter=cfg.exporter)


def test_probabilities(trained: TrainResult, exported: ExportResult, images: TestImages) -> np.ndarray:
    """The exported model's probabilities on the test images, on onnxruntime's CPU provider: what the gate judges
    and what each variant is compared with (computed once for both)."""
    return OnnxClassifier(exported.onnx_path, ["CPUExecutionProvider"]).predict_proba(images.at(trained.image_size))


def check_same_model(params: Params, evaluation: EvalResult, probabilities: np.ndarray, labels: np.ndarray) -> None:
    """The exported model's test accuracy is the one the evaluate stage measured with the trained model on the same
    images (to an image or a point: near-ties may fall the other way). Parity compares the two models on validation
    images through the same features; this catches features and a graph that do not belong together.

    Raises:
        ExportError: the two accuracies differ by more; nothing is registered.
    """
    exported = float((probabilities.argmax(axis=1) == labels).mean())
    evaluated = float(evaluation.test["accuracy"])
    if abs(exported - evaluated) > max(0.01, 1.5 / len(labels)):
        cache = params.data.cache_dir
        raise ExportError(
            f"the exported model's test accuracy is {exported:.4f}, but the evaluate stage measured {evaluated:.4f} on the "
            f"same {len(labels)} images: they are not the same model, and nothing was registered. Stale cached features "
            f"or a stale cached backbone graph would do this: delete {cache / 'features'} and {cache / 'onnx'}, and rerun"
        )


def gate(ctx: DeployContext, trained: TrainResult, exported: ExportResult, images: TestImages, probabilities: np.ndarray) -> Verdict:
    """The gate's verdict on the exported challenger (its `probabilities` on `images`) against the champion
    (`components.deploy.judge`); logged to the run."""
    client, name = ctx.run.client, ctx.params.deploy.model_name
    record_manual_promotion(client, name)
    verdict = judge_challenger(client, name, ctx.split, exported.onnx_path, trained.classes, GateRules.from_params(ctx.params),
                               images, probabilities)
    log.info("gate: %s", verdict.text())
    ctx.run.set_tags(verdict.tags())
    ctx.run.log_dict(verdict.to_dict(), f"{REPORT_ARTIFACT_DIR}/gate.json")
    return verdict


def variants_of(ctx: DeployContext, trained: TrainResult, exported: ExportResult, images: TestImages,
                probabilities: np.ndarray) -> VariantsReport:
    """The optimised, fp16 and INT8 variants beside the fp32 file, each judged on the test images against fp32's
    `probabilities` on them; a build of the same fp32 file and inputs as before is copied from `data.cache_dir/variants/`."""
    cfg = ctx.params.deploy
    calibration_paths = [s.path for s in stratified_sample(ctx.split.train, cfg.calibration_images, ctx.params.data.seed)]
    calibration = load_batch(calibration_paths, trained.image_size)
    variants = build_variants(exported.onnx_path, cfg.variants, images.at(trained.image_size), images.labels, calibration,
                              cfg.max_variant_drop, reference=probabilities, cache_dir=ctx.params.data.cache_dir / "variants",
                              int8_weight_bits=cfg.int8_weight_bits)
    ctx.run.log_dict(variants.to_dict(), "deploy/variants.json")
    return variants


def register(ctx: DeployContext, facts: DeployFacts) -> tuple[str, LoggedModel]:
    """Log the ONNX model (with its published variants) as the run's LoggedModel and create the version with its
    tags and description; returns (its number, the logged model)."""
    return register_model(ctx.run, ctx.params.deploy.model_name, facts)


def card(ctx: DeployContext, facts: DeployFacts, version: str, logged: LoggedModel) -> ModelCard:
    """The registered version's model card, in the run folder and the run's `model_card/` artifacts."""
    written = write_model_card(CardFacts.of(facts, ctx.run.run_id, version, logged.experiment_id, logged.model_id), ctx.run_dir)
    for path in (written.path, written.html_path):
        ctx.run.log_artifact(path, CARD_ARTIFACT_DIR)
    return written


def publish(ctx: DeployContext, version: str, verdict: Verdict) -> tuple[tuple[str, ...], str | None]:
    """`champion` onto the new version when the gate says so, the run may promote, and `champion` is still where the
    gate found it (the alias moves last); either way `challenger` then names the newest version that is not champion,
    and the model's page says so. Returns the version's aliases, and why it was held back when `champion` had moved."""
    client, name = ctx.run.client, ctx.params.deploy.model_name
    if verdict.promote and not ctx.hold:
        moved = champion_moved_since(client, name, verdict, version)
        if moved is None:
            move_alias(client, name, version, "gate", f"graft run {ctx.run.run_id}", verdict.text())  # also brings challenger in line
            return (CHAMPION,), None
        mlflow_calls.set_version_tag(client, name, version, HOLD_TAG, moved)
        refresh_model_page(client, name)
        return (CHALLENGER,), moved
    refresh_model_page(client, name)
    return (CHALLENGER,), None


def champion_moved_since(client, name: str, verdict: Verdict, version: str) -> str | None:  # noqa: ANN001 - MlflowClient
    """Why the gate's verdict no longer holds for `champion` (a person moved it while this run judged against
    another version), or None: a verdict against v2 is no evidence against the v1 a promoter has just chosen."""
    now = alias_version(client, name) or last_champion(client, name, alias_read=True)
    if now == verdict.champion_version:
        return None
    judged = f"v{verdict.champion_version}" if verdict.champion_version else "no champion"
    return (f"champion moved to v{now} while this run's gate compared with {judged}: registered as challenger only; "
            f"judge it again with graft run, or promote it with `graft promote --name {name} --version {version}`")


def deploy(ctx: DeployContext, trained: TrainResult, evaluation: EvalResult) -> DeployResult:
    """Export, judge, register and publish the challenger: `champion` moves only when the gate agrees."""
    started = time.perf_counter()
    name = ctx.params.deploy.model_name
    progress.note("export")
    exported = export(ctx, trained, evaluation)
    progress.note("the gate")
    images = TestImages(ctx.split)
    probabilities = test_probabilities(trained, exported, images)
    check_same_model(ctx.params, evaluation, probabilities, images.labels)
    verdict = gate(ctx, trained, exported, images, probabilities)
    progress.note("the variants")
    variants = variants_of(ctx, trained, exported, images, probabilities)
    progress.note("registration")
    facts = DeployFacts(ctx.params, ctx.split, trained, evaluation, exported, verdict, variants, ctx.data_md5, ctx.commit, ctx.hold)
    version, logged = register(ctx, facts)
    progress.note("the model card")
    written = card(ctx, facts, version, logged)
    bundle = write_bundle(
        exported.onnx_path, ctx.run_dir / "bundle",
        {"name": name, "version": version, "source": f"models:/{name}/{version}", "run_id": ctx.run.run_id, "git_commit": ctx.commit},
        variants.listing(), written.path, written.html_path,
    )
    progress.note("the aliases")
    aliases, moved = publish(ctx, version, verdict)
    held = f"{ctx.hold}: registered as challenger only; promote it with `graft promote --name {name} --version {version}`" if ctx.hold and verdict.promote else moved
    if held:
        log.warning("the gate would promote %s v%s, but %s", name, version, held)
    log.info("registered %s v%s with aliases %s", name, version, ", ".join(aliases))
    return DeployResult(exported, name, version, aliases, verdict, f"models:/{name}/{version}", time.perf_counter() - started,
                        variants, bundle.dir, held)
