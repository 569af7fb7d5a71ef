"""Registering a version: the ONNX model as an MLflow 3 LoggedModel of the run, the version created from it
with its tags and description in one call.

What a promoter reads on the model page is kept to about a dozen decision tags (`decision_tags`: the gate's
verdict and reasons, test and validation headline metrics, data version, parity, backbone, commit, a one-line
variants summary) and a description in words with links to the model card, the run and the full record.
Everything else registration knows (runtimes, the variant table, weights provenance, registration ids, ...)
is in `registration.json` beside `model.onnx`, which MLflow's UI shows on the logged model's Artifacts tab.

Registration also records what every consumer later checks (`components.runtime.trust`): the sha256 of each
ONNX file it uploads, in the version's `sha256.<file>` tags (the registry database, which someone who can
only write to the artifact store cannot change), and, when GRAFT_SIGNING_KEY is set, a model-signing signature
over the whole folder (`model.sig`) with the key's fingerprint in `signature.key`. A version is only ever
created from a model its own run logged.
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from components.backbones.zoo import get_spec
from components.core.config import changed_settings
from components.core.errors import UntrustedSourceError
from components.core.files import sha256
from components.core.lineage import (
    BACKBONE_TAG,
    COMMIT_TAG,
    DATA_MD5_TAG,
    DECISION_METRICS,
    GATE_CHAMPION_TAG,
    GATE_REASONS_TAG,
    GATE_VERDICT_TAG,
    HOLD_TAG,
    MANIFEST_SHA_TAG,
    PARAMS_SHA_TAG,
    PARITY_AGREEMENT_TAG,
    PARITY_DIFF_TAG,
    SIGNATURE_KEY_TAG,
    VARIANTS_SUMMARY_TAG,
    params_fingerprint,
    sha256_tag,
)
from components.data.split import MANIFEST_FILE, SplitManifest
from components.deploy.facts import DeployFacts
from components.deploy.model_card import CARD_ARTIFACT_DIR, CARD_HTML_NAME, CARD_NAME, MAX_DESCRIPTION, changed_in_words
from components.deploy.variants import VariantsReport
from components.evaluate.gate import signed_points
from components.registry import mlflow_calls, ui_links
from components.registry.history import record_manual_move
from components.registry.tracking import Run, requirements_pinned_here
from components.registry.versions import LOGGED_MODEL_URI, uri_inside
from components.runtime.signing import sign_folder, signing_key
from components.runtime.trust import write_sidecar
from components.runtime.variant_files import FP32_FILE, copy_variant_files

log = logging.getLogger(__name__)


DETAILS_FILE = "registration.json"
"""Beside `model.onnx` in every registered version: everything registration knows that is not a decision tag."""


MODEL_VERSIONS_TAG = "mlflow.modelVersions"
"""MLflow's LoggedModel tag listing the registered versions made from it (how the UI links the two)."""


MLFLOW_METADATA = ("classes", "image_size", "input", "preprocessing", "backbone", "data_md5")
"""The ONNX file's metadata copied into the MLflow model's (`get_model_info(...).metadata`): what a caller of
`mlflow.pyfunc` needs to label the output and prepare the input."""


def record_manual_promotion(client, name: str) -> None:  # noqa: ANN001
    """Record in the alias history when `champion` was moved by hand since Graft last moved it."""
    record_manual_move(client, name)


def variants_summary(variants: VariantsReport | None) -> str:
    """One line: each variant's accuracy change against fp32 (and speed-up where timed), and which were not published."""
    if variants is None or not variants.variants:
        return "fp32 only"
    parts = [f"{v.name} {signed_points(v.accuracy_change)} pts" + (f" {v.speed.speedup_batch1:.1f}x" if v.speed else "")
             + ("" if v.published else " (not published)") for v in variants.variants]
    return ", ".join(parts) + " vs fp32"


def decision_tags(facts: DeployFacts) -> dict[str, str]:
    """The tags a promoter reads at a glance on the model page (and can search: `tags.gate.verdict = 'promote'`)."""
    evaluation, exported, verdict = facts.evaluation, facts.exported, facts.verdict
    tags = {
        GATE_VERDICT_TAG: verdict.tags()[GATE_VERDICT_TAG],
        GATE_REASONS_TAG: verdict.text()[:5000],
        DATA_MD5_TAG: facts.data_md5,
        BACKBONE_TAG: facts.trained.backbone,
        COMMIT_TAG: facts.commit,
        PARITY_DIFF_TAG: f"{exported.max_abs_diff:.3e}",
        PARITY_AGREEMENT_TAG: f"{exported.top1_agreement:.4f}",
        VARIANTS_SUMMARY_TAG: variants_summary(facts.variants),
    }
    for split, metrics in (("test", evaluation.test), ("val", evaluation.val)):
        tags.update({f"{split}.{k}": f"{metrics[k]:.4f}" for k in DECISION_METRICS if k in metrics})
    return tags


def record_tags(facts: DeployFacts, manifest: SplitManifest) -> dict[str, str]:
    """Tags Graft itself reads back: what the retraining check compares, the split manifest's digest, the champion the
    gate compared with, a hold."""
    tags = {PARAMS_SHA_TAG: params_fingerprint(facts.params), MANIFEST_SHA_TAG: manifest.sha256()}
    if facts.verdict.champion_version is not None:  # whom the gate judged against: the retraining check says it
        tags[GATE_CHAMPION_TAG] = facts.verdict.champion_version
    if facts.hold:
        tags[HOLD_TAG] = f"{facts.hold}: challenger only, champion not moved by this run"
    return tags


def registration_details(facts: DeployFacts, manifest: SplitManifest) -> dict:
    """Everything else about the version, for `registration.json` (shown on the logged model's Artifacts tab)."""
    import onnxruntime
    import torch

    import mlflow

    trained, evaluation, exported = facts.trained, facts.evaluation, facts.exported
    variants = facts.variants
    return {
        "registered_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": facts.commit,
        "data": {
            "dir": str(facts.split.root),
            "dvc_md5": facts.data_md5,
            "classes": list(trained.classes),
            "split": {"source": facts.split.source, "settings": manifest.settings.describe(), "counts": facts.split.counts(),
                      "manifest_sha256": manifest.sha256(), "test_is_val": evaluation.test_is_val},
        },
        "model": {
            "backbone": trained.backbone,
            "strategy": trained.strategy,
            "image_size": trained.image_size,
            "temperature": evaluation.temperature,
            "epochs_run": trained.epochs_run,
            "best_epoch": trained.best_epoch,
            "best_val_loss": trained.best_val_loss,
            **get_spec(trained.backbone).provenance(),
            "params_sha": params_fingerprint(facts.params),
        },
        "metrics": {"val": evaluation.val, "test": evaluation.test, "per_class": evaluation.per_class},
        "gate": facts.verdict.to_dict(),
        "onnx": {"opset": exported.opset, "sha256": exported.sha256, "graph": exported.made, "parity": {
            "max_abs_diff": exported.max_abs_diff, "top1_agreement": exported.top1_agreement, "images": exported.parity_images}},
        "variants": None if variants is None else {
            "fp32_accuracy": variants.fp32_accuracy,
            "table": [{k: v for k, v in variant.to_dict().items() if k != "path"} for variant in variants.variants],
            "published": variants.listing(),
        },
        "runtime": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "mlflow": mlflow.__version__,
                    "python": platform.python_version()},
        "hold": facts.hold,
    }


MLMODEL_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
"""The execution providers the registered MLmodel asks for. They are read where the model is loaded, not where it was
registered: MLflow's ONNX loader keeps those the consumer's onnxruntime has, so a GPU consumer runs on CUDA and a CPU one
on the CPU (with one warning from MLflow). Naming only this machine's (the CPU here) would keep every GPU consumer of
`mlflow.pyfunc` on the CPU. Graft's own loaders choose from the machine (`components.runtime.providers`)."""


@dataclass(frozen=True)
class LoggedModel:
    """A model folder logged to a run (an MLflow 3 LoggedModel), with what registration records about it."""

    source: str
    """What the version is created from: `models:/<model id>` (or, for older callers, a folder in the run's artifacts)."""
    run_id: str
    sha256: dict[str, str]
    """Each ONNX file uploaded -> its sha256."""
    signed_by: str | None = None
    """Fingerprint of the key that signed the folder (None: GRAFT_SIGNING_KEY not set)."""
    model_id: str | None = None
    experiment_id: str | None = None

    def tags(self) -> dict[str, str]:
        """The version tags consumers check the files against."""
        tags = {sha256_tag(name): digest for name, digest in self.sha256.items()}
        if self.signed_by:
            tags[SIGNATURE_KEY_TAG] = self.signed_by
        return tags


def _create_logged_model(run: Run, experiment_id: str, name: str, tags: dict[str, str]):  # noqa: ANN202 - mlflow LoggedModel
    """The run's LoggedModel, created once: a retry after a lost response finds the one it made."""
    token = uuid.uuid4().hex
    client = run.client

    def find_done():  # noqa: ANN202
        made = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run.run_id}'")
        return next((m for m in made if m.tags.get(mlflow_calls.REGISTRATION_TAG) == token), None)

    model = mlflow_calls.call(
        f"creating the logged model of run {run.run_id}",
        lambda: client.create_logged_model(experiment_id, name=name, source_run_id=run.run_id,
                                           tags={**tags, mlflow_calls.REGISTRATION_TAG: token}, model_type="onnx image classifier"),
        find_done, uri=run.uri,
    )
    run.log_model_output(model.model_id)
    return model


def log_onnx_model(run: Run, onnx_path: Path, image_size: int, num_classes: int, variants: tuple[str, ...] = (),
                   manifest: SplitManifest | None = None, details: dict | None = None, name: str = "model",
                   tags: dict[str, str] | None = None) -> LoggedModel:
    """Save with MLflow's ONNX flavour (signature + input example) as a LoggedModel of the run.

    Published variant files (`model.int8.onnx`, ...), the split manifest and `registration.json` go into the
    same folder, so the registered version holds them beside `model.onnx` and one copy of it carries all.
    Each file's sha256 is taken from the bytes uploaded, and written beside the file handed out in the run
    folder as its sidecar (`model.onnx.sha256`); the folder is signed when GRAFT_SIGNING_KEY is set.

    Raises:
        SignatureError: GRAFT_SIGNING_KEY is set but unusable (nothing is uploaded then).
    """
    import mlflow.onnx
    import onnx
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model, infer_signature

    key = signing_key()
    example = np.zeros((1, image_size, image_size, 3), dtype=np.uint8)
    model = onnx.load(str(onnx_path))
    metadata = {p.key: p.value for p in model.metadata_props if p.key in MLFLOW_METADATA}
    experiment_id = run.experiment_id()
    logged = _create_logged_model(run, experiment_id, name, tags or {})
    client = run.client
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model"
        with requirements_pinned_here():
            mlflow.onnx.save_model(
                model,
                str(local),
                mlflow_model=Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run.run_id,
                                   model_id=logged.model_id, metadata={k: _maybe_json(v) for k, v in metadata.items()}),
                signature=infer_signature(example, np.zeros((1, num_classes), dtype=np.float32)),
                input_example=example,
                onnx_execution_providers=list(MLMODEL_PROVIDERS),
                save_as_external_data=False,
                pip_requirements=mlflow.onnx.get_default_pip_requirements(),  # not inferred: that loads the model in a subprocess
            )
        # the fp32 file too: the registered bytes are the exported ones the gate judged, not MLflow's re-save
        copied = copy_variant_files(onnx_path, [v for v in variants if v != "fp32"], local)
        digests = {path.name: sha256(path) for path in copied}
        if manifest is not None:
            (local / MANIFEST_FILE).write_text(manifest.to_json())
        if details is not None:
            (local / DETAILS_FILE).write_text(json.dumps({"logged_model_id": logged.model_id, "run_id": run.run_id, **details},
                                                         indent=2, default=str) + "\n")
        signed_by = sign_folder(local, key) if key is not None else None  # the manifest and details are signed with the models
        mlflow_calls.call(f"uploading the files of logged model {logged.model_id}",
                          lambda: client.log_model_artifacts(logged.model_id, str(local)), uri=run.uri)
    mlflow_calls.call(f"finalising logged model {logged.model_id}",
                      lambda: client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY), uri=run.uri)
    for file, digest in digests.items():
        write_sidecar(onnx_path.with_name(file), digest)
    return LoggedModel(f"models:/{logged.model_id}", run.run_id, digests, signed_by, logged.model_id, experiment_id)


def _maybe_json(value: str) -> object:
    try:
        return json.loads(value)
    except ValueError:
        return value


def _check_source(run: Run, name: str, logged: LoggedModel) -> None:
    """Graft registers only what its own run logged: a LoggedModel of this run (or a folder in its artifacts)."""
    fix = "log the model with log_onnx_model(run, ...) first"
    match = LOGGED_MODEL_URI.match(logged.source)
    if logged.run_id == run.run_id and match:
        model = mlflow_calls.call(f"reading logged model {match['model_id']}", lambda: run.client.get_logged_model(match["model_id"]),
                                  uri=run.uri)
        if model.source_run_id == run.run_id:
            return
    elif logged.run_id == run.run_id and uri_inside(logged.source, run.artifact_uri()):
        return
    raise UntrustedSourceError(
        f"refusing to register '{name}' from {logged.source!r}: Graft registers only models logged by the run itself "
        f"(run {run.run_id}); {fix}"
    )


def register_version(run: Run, name: str, logged: LoggedModel, tags: dict[str, str], description: str,
                     model_description: str = "Image classifier trained by Graft") -> str:
    """Create the model version with every tag in one call; returns its version number.

    The version's source is a model the run itself logged, never anything else, and its `sha256.<file>`
    (and `signature.key`) tags come from `logged`, overriding any given. Each MLflow call retries transient
    failures, and a retried create reuses the version a lost response had already made
    (`components.registry.mlflow_calls`). The LoggedModel then lists the version (MLflow's `mlflow.modelVersions`).

    Raises:
        UntrustedSourceError: `logged` is not a model logged by this run.
        RegistryError: MLflow refused, or kept failing; nothing was registered after it.
    """
    _check_source(run, name, logged)
    client = run.client
    mlflow_calls.ensure_registered_model(client, name, model_description)
    version = str(mlflow_calls.create_version(client, name, logged.source, run.run_id, {**tags, **logged.tags()}, description,
                                              model_id=logged.model_id).version)
    if logged.model_id:
        listed = json.dumps([{"name": name, "version": version}])
        mlflow_calls.call(f"linking logged model {logged.model_id} to '{name}' v{version}",
                          lambda: client.set_logged_model_tags(logged.model_id, {MODEL_VERSIONS_TAG: listed}), uri=run.uri)
    return version


SAME_MODEL_TAG = "graft.same_model_as"
"""The earlier versions whose ONNX file is byte for byte this version's ("1, 3"): a rerun of the same data, settings
and code, shown as such rather than as a new model."""


def identical_versions(client, name: str, digest: str) -> list[str]:  # noqa: ANN001 - MlflowClient
    """The versions of `name` whose `model.onnx` has the sha256 `digest`, oldest first (none before the model exists)."""
    tag = sha256_tag(FP32_FILE)
    found = mlflow_calls.call(f"reading the versions of '{name}'",
                              lambda: client.search_model_versions(f"name = '{name}'"), uri=mlflow_calls.server_uri(client))
    return sorted((str(v.version) for v in found if (v.tags or {}).get(tag) == digest), key=int)


def version_description(facts: DeployFacts, run: Run, logged: LoggedModel, same_as: list[str] | None = None) -> str:
    """The version's description (Markdown on its MLflow page): the decision in words, then links to the card and the record.

    Its first paragraph is the gate's verdict (the versions table shows the description's start); the second says what
    the model classifies, which the registered model's description repeats.
    """
    trained, evaluation, exported, verdict = facts.trained, facts.evaluation, facts.exported, facts.verdict
    split = facts.split
    experiment = logged.experiment_id or run.experiment_id()
    classes = ", ".join(f"`{c}`" for c in trained.classes[:20]) + (f" and {len(trained.classes) - 20} more" if len(trained.classes) > 20 else "")
    gate = verdict.text()
    if len(gate) > MAX_DESCRIPTION // 2:
        gate = gate[: MAX_DESCRIPTION // 2] + " ... (all reasons in the model card)"
    card = f"{CARD_ARTIFACT_DIR}/{CARD_HTML_NAME}"
    test, val = evaluation.test, evaluation.val
    lines = [
        f"Gate{' (held)' if facts.hold else ''}: {gate}",  # plain: the versions table shows this line's start, unrendered
        "",
        *([f"**The same model as {', '.join(f'v{v}' for v in same_as)}**: its ONNX file is byte for byte the same "
           f"(sha256 `{logged.sha256.get(FP32_FILE, '')[:16]}`...), a rerun of the same data, settings and code; it "
           "predicts exactly as that version does.", ""]
          if same_as else []),
        f"Classifies RGB images into {len(trained.classes)} classes ({classes}), resized to {trained.image_size} px; "
        f"trained on `{split.root.name}` (DVC md5 `{facts.data_md5}`).",
        "",
        f"- **{evaluation.test_label.capitalize()}** ({len(split.evaluation)} images): accuracy {test['accuracy']:.4f}, "
        f"macro-F1 {test['macro_f1']:.4f}; **validation** ({len(split.val)} images, chose the epoch): accuracy {val['accuracy']:.4f}",
        f"- **Model**: {trained.backbone} ({trained.strategy}), ONNX parity max |diff| {exported.max_abs_diff:.1e}, "
        f"top-1 agreement {exported.top1_agreement:.0%}; variants: {variants_summary(facts.variants)}",
        f"- **Code**: commit `{facts.commit}`, run [{run.run_id[:8]}]({ui_links.run_page(experiment, run.run_id)})",
        *([f"- **Held**: {facts.hold}: registered as challenger only"] if facts.hold else []),
        *([f"- **Not as in params.yaml**: {changed_in_words(changed)}"] if (changed := changed_settings(facts.params)) else []),
        "",
        f"[Model card]({ui_links.run_artifact(experiment, run.run_id, card)}) (pictures, per-class metrics, variants, how to "
        f"reproduce; also [as Markdown]({ui_links.run_artifact(experiment, run.run_id, f'{CARD_ARTIFACT_DIR}/{CARD_NAME}')})) · "
        f"[everything else registration recorded]({ui_links.logged_model_page(experiment, logged.model_id or '', 'artifacts')}) "
        f"(`{DETAILS_FILE}`)",
    ]
    return "\n".join(lines)[:MAX_DESCRIPTION]


def register_model(run: Run, name: str, facts: DeployFacts) -> tuple[str, LoggedModel]:
    """Log the exported model (with its published variants) as the run's LoggedModel and register it; returns
    (version, the logged model)."""
    manifest = facts.split.manifest()
    trained, variants = facts.trained, facts.variants
    logged = log_onnx_model(run, facts.exported.onnx_path, trained.image_size, len(trained.classes),
                            variants.published if variants else (), manifest, registration_details(facts, manifest), name,
                            tags={BACKBONE_TAG: trained.backbone, "strategy": trained.strategy, DATA_MD5_TAG: facts.data_md5})
    same_as = identical_versions(run.client, name, logged.sha256.get(FP32_FILE, "")) if logged.sha256.get(FP32_FILE) else []
    tags = {**decision_tags(facts), **record_tags(facts, manifest), **({SAME_MODEL_TAG: ", ".join(same_as)} if same_as else {})}
    version = register_version(run, name, logged, tags, version_description(facts, run, logged, same_as))
    if same_as:
        log.info("%s v%s is the same model as v%s: its ONNX file is byte for byte the same", name, version, ", v".join(same_as))
    return version, logged
