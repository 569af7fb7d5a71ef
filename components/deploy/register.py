"""Registering a version: the ONNX model logged with MLflow's flavour, every tag in one call.
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
from pathlib import Path

import numpy as np

from components.backbones.zoo import get_spec
from components.core.config import Params
from components.core.lineage import CHAMPION, PARAMS_SHA_TAG, params_fingerprint
from components.deploy.export import ExportResult
from components.evaluate.gate import Verdict
from components.evaluate.stage import EvalResult
from components.registry import mlflow_calls
from components.registry.tracking import Run
from components.registry.versions import version_by_alias
from components.runtime.providers import choose_providers
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
        recorded = client.get_registered_model(name).tags.get("graft.champion_version")
    except MlflowException:
        return
    if recorded and recorded != str(champion.version):
        log.warning("champion of %s was moved by hand from v%s to v%s", name, recorded, champion.version)
        mlflow_calls.set_model_tag(client, name, "graft.manual_promotion", f"v{recorded} -> v{champion.version}")
        mlflow_calls.set_version_tag(client, name, champion.version, "graft.promoted_by", "manual (MLflow UI or API)")


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
        **get_spec(trained.backbone).provenance(),  # weights.source, .revision, .url, .sha256
    }
    tags.update({f"val.{k}": f"{v:.4f}" for k, v in evaluation.metrics.items()})
    return tags


def log_onnx_model(run: Run, onnx_path: Path, image_size: int, num_classes: int, variants: tuple[str, ...] = ()) -> str:
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
        mlflow_calls.log_artifacts(run.client, run.run_id, str(local), "model")
    return f"{run.artifact_uri()}/model"


def register_version(run: Run, name: str, source: str, tags: dict[str, str], description: str) -> str:
    """Create the model version with every tag in one call; returns its version number.

    Each MLflow call retries transient failures, and a retried create reuses the version a lost
    response had already made (`components.registry.mlflow_calls`).

    Raises:
        RegistryError: MLflow refused, or kept failing; nothing was registered after it.
    """
    client = run.client
    mlflow_calls.ensure_registered_model(client, name, "Image classifier trained by Graft")
    version = mlflow_calls.create_version(client, name, source, run.run_id, tags, description)
    return str(version.version)
