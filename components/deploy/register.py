"""Registering a version: the ONNX model logged with MLflow's flavour, every tag in one call.

Registration records what every consumer later checks (`components.runtime.trust`): the sha256 of each
ONNX file it uploads, in the version's `sha256.<file>` tags, and, when GRAFT_SIGNING_KEY is set, a
model-signing signature over the whole folder (`model.sig`, beside the files) with the key's fingerprint
in `signature.key`. A version is only ever created from its own run's artifact folder.
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.backbones.zoo import get_spec
from components.core.config import Params
from components.core.errors import UntrustedSourceError
from components.core.files import sha256
from components.core.lineage import (
    CHAMPION,
    CHAMPION_VERSION_TAG,
    MANIFEST_SHA_TAG,
    PARAMS_SHA_TAG,
    PROMOTED_BY_TAG,
    SIGNATURE_KEY_TAG,
    SPLIT_SETTINGS_TAG,
    params_fingerprint,
    sha256_tag,
)
from components.data.split import MANIFEST_FILE, SplitManifest
from components.deploy.export import ExportResult
from components.evaluate.gate import Verdict
from components.evaluate.stage import EvalResult
from components.registry import mlflow_calls
from components.registry.tracking import Run
from components.registry.versions import uri_inside, version_by_alias
from components.runtime.providers import choose_providers
from components.runtime.signing import sign_folder, signing_key
from components.runtime.trust import write_sidecar
from components.runtime.variant_files import copy_variant_files
from components.train.stage import TrainResult

log = logging.getLogger(__name__)


def record_manual_promotion(client, name: str) -> None:  # noqa: ANN001
    """Note on the registered model when `champion` was moved by hand since Graft last set it."""
    from mlflow.exceptions import MlflowException

    champion = version_by_alias(client, name, CHAMPION)
    if champion is None:
        return
    try:
        recorded = client.get_registered_model(name).tags.get(CHAMPION_VERSION_TAG)
    except MlflowException:
        return
    if recorded and recorded != str(champion.version):
        log.warning("champion of %s was moved by hand from v%s to v%s", name, recorded, champion.version)
        mlflow_calls.set_model_tag(client, name, "graft.manual_promotion", f"v{recorded} -> v{champion.version}")
        mlflow_calls.set_version_tag(client, name, champion.version, PROMOTED_BY_TAG, "manual (MLflow UI or API)")


def version_tags(params: Params, trained: TrainResult, evaluation: EvalResult, exported: ExportResult, verdict: Verdict, data_md5: str,
                 commit: str, manifest: SplitManifest) -> dict[str, str]:
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
        **get_spec(trained.backbone).provenance(),  # weights.source, .revision, .url, .sha256
    }
    tags.update({f"val.{k}": f"{v:.4f}" for k, v in evaluation.val.items()})
    tags.update({f"test.{k}": f"{v:.4f}" for k, v in evaluation.test.items()})
    tags[SPLIT_SETTINGS_TAG] = manifest.settings.describe() + (" (no test split: test = val)" if evaluation.test_is_val else "")
    tags[MANIFEST_SHA_TAG] = manifest.sha256()
    return tags


@dataclass(frozen=True)
class LoggedModel:
    """A model folder logged to a run, with what registration records about it."""

    source: str
    """The folder's artifact URI, inside the run's artifact folder."""
    run_id: str
    sha256: dict[str, str]
    """Each ONNX file uploaded -> its sha256."""
    signed_by: str | None = None
    """Fingerprint of the key that signed the folder (None: GRAFT_SIGNING_KEY not set)."""

    def tags(self) -> dict[str, str]:
        """The version tags consumers check the files against."""
        tags = {sha256_tag(name): digest for name, digest in self.sha256.items()}
        if self.signed_by:
            tags[SIGNATURE_KEY_TAG] = self.signed_by
        return tags


def log_onnx_model(run: Run, onnx_path: Path, image_size: int, num_classes: int, variants: tuple[str, ...] = (),
                   manifest: SplitManifest | None = None) -> LoggedModel:
    """Save with MLflow's ONNX flavour (signature + input example) and log it to the run.

    Published variant files (`model.int8.onnx`, ...) and the split manifest go into the same
    folder, so the registered version holds them beside `model.onnx` and one copy of it carries all.
    Each file's sha256 is taken from the bytes uploaded, and written beside the file
    handed out in the run folder as its sidecar (`model.onnx.sha256`); the folder is
    signed when GRAFT_SIGNING_KEY is set.

    Raises:
        SignatureError: GRAFT_SIGNING_KEY is set but unusable (nothing is uploaded then).
    """
    import mlflow.onnx
    import onnx
    from mlflow.models import infer_signature

    key = signing_key()
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
        # the fp32 file too: the registered bytes are the exported ones the gate judged, not MLflow's re-save
        copied = copy_variant_files(onnx_path, [v for v in variants if v != "fp32"], local)
        digests = {path.name: sha256(path) for path in copied}
        if manifest is not None:
            (local / MANIFEST_FILE).write_text(manifest.to_json())
        signed_by = sign_folder(local, key) if key is not None else None  # the manifest is signed with the models
        mlflow_calls.log_artifacts(run.client, run.run_id, str(local), "model")
    for name, digest in digests.items():
        write_sidecar(onnx_path.with_name(name), digest)
    return LoggedModel(f"{run.artifact_uri()}/model", run.run_id, digests, signed_by)


def register_version(run: Run, name: str, logged: LoggedModel, tags: dict[str, str], description: str) -> str:
    """Create the model version with every tag in one call; returns its version number.

    The version's source is the run's own logged folder, never anything else, and its
    `sha256.<file>` (and `signature.key`) tags come from `logged`, overriding any given.
    Each MLflow call retries transient failures, and a retried create reuses the version a
    lost response had already made (`components.registry.mlflow_calls`).

    Raises:
        UntrustedSourceError: `logged` is not a folder logged to this run.
        RegistryError: MLflow refused, or kept failing; nothing was registered after it.
    """
    root = run.artifact_uri()
    if logged.run_id != run.run_id or not uri_inside(logged.source, root):
        raise UntrustedSourceError(
            f"refusing to register '{name}' from {logged.source!r}: Graft registers only folders logged to the "
            f"run's own artifact folder ({root}); log the model with log_onnx_model(run, ...) first"
        )
    client = run.client
    mlflow_calls.ensure_registered_model(client, name, "Image classifier trained by Graft")
    version = mlflow_calls.create_version(client, name, logged.source, run.run_id, {**tags, **logged.tags()}, description)
    return str(version.version)
