"""What fine-tuning leaves in MLflow besides its per-epoch metrics: the PyTorch model itself.

The model is saved with MLflow's PyTorch flavour and a signature (uint8 images
N x S x S x 3 in, class probabilities out) in the `pt2` format: a
`torch.export` graph with a dynamic batch axis, which loads without pickle
(no code runs on load) and without Graft's code. It is logged to the run by
explicit run id, like every other artifact, not through MLflow's fluent
active run.

The export takes seconds (torch.export), and a rerun on unchanged data trains
the same weights, whose export is the same `model.pt2` byte for byte. So the
saved model is kept in a `BuildCache` (`data.cache_dir/pt2/`) under a key of
the model's weights and structure, its signature and the library versions; an
identical model is logged from that copy, with a new `model_uuid` and creation
time in its `MLmodel` file, as a new save would have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
import uuid
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from components.backbones.zoo import get_spec
from components.core.build_cache import BuildCache, build_key
from components.registry.tracking import Run, requirements_pinned_here
from components.train.stage import TrainResult, load_classifier

log = logging.getLogger(__name__)


ARTIFACT_PATH = "pytorch_model"


PT2_CACHE_KEEP = 3
"""Saved models kept in `data.cache_dir/pt2/` (about 16 MB each for EfficientNet-Lite0)."""

PT2_TEMPLATES_KEEP = 3
"""Saved models kept as templates in `tracking.pt2_template_dir` (one per structure, about 16 MB each)."""

PT2_FILE = Path("data") / "model.pt2"
"""Where MLflow's PyTorch flavour puts the torch.export archive in a saved model's folder."""

_WRITER_RECORDS = {".data/version", ".data/serialization_id", "byteorder"}
"""The records torch's archive writer adds itself when it closes the archive."""


def _installed(*names: str) -> dict[str, str | None]:
    """Each distribution's installed version; None where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _requirements() -> list[str]:
    return [f"{name}=={found}" if found else name
            for name, found in _installed("torch", "torchvision", "efficientnet-lite-pytorch", "numpy", "pillow").items()]


def _raw_bytes(tensor) -> bytes:  # noqa: ANN001 - torch.Tensor
    """A tensor's values as bytes in memory order, whatever the dtype (numpy has no bfloat16)."""
    import torch

    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _model_digest(model) -> str:  # noqa: ANN001 - torch.nn.Module
    """sha256 of the module's structure and every tensor in its state (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256(repr(model).encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(_raw_bytes(tensor))
    return digest.hexdigest()


def _structure_digest(model) -> str:  # noqa: ANN001 - torch.nn.Module
    """sha256 of what torch.export's graph of `model` is made from, short of the weights' values: the modules and
    their plain settings (the training flag, the layers' hyperparameters), and every tensor's name, shape, dtype,
    strides and whether it is a parameter needing a gradient."""
    import torch

    digest = hashlib.sha256(repr(model).encode())
    for name, module in model.named_modules():
        plain = {k: v for k, v in vars(module).items() if isinstance(v, (bool, int, float, str, tuple, type(None)))}
        digest.update(f"{name}|{type(module).__module__}.{type(module).__qualname__}|{sorted(plain.items())}".encode())
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.stride()}|{tensor.dtype}|{tensor.requires_grad}|"
                      f"{isinstance(tensor, torch.nn.Parameter)}".encode())
    return digest.hexdigest()


class TemplateMismatch(Exception):
    """The template's archive does not hold the model's weights one for one: the model is exported instead."""


def fill_template(template: Path, model, target: Path) -> None:  # noqa: ANN001 - torch.nn.Module
    """Write the torch.export archive `target` as `template`'s records, each weight's bytes taken from `model`.

    torch.export keeps each weight's raw bytes in a record of its own (`data/weights/...`, named in the
    archive's weights config); the graph, the tensors' metadata and the sample inputs do not depend on the
    weights' values. torch's own archive writer writes the records in the template's order and adds its
    closing records (the version and an id computed from the records' checksums), so the result is the
    archive `torch.export.save` writes for `model`. Raises `TemplateMismatch` where the template does not hold
    exactly the model's weights, each raw, whole and of the model's size.
    """
    import torch

    state = model.state_dict(keep_vars=True)  # the names torch.export's state dict has: parameters and kept buffers
    with zipfile.ZipFile(template) as archive:
        prefix = archive.namelist()[0].split("/", 1)[0]
        if prefix != target.stem:  # the writer names the archive's folder after the file
            raise TemplateMismatch(f"the template's archive is named {prefix!r}, not {target.stem!r}")
        weights = json.loads(archive.read(f"{prefix}/data/weights/model_weights_config.json"))["config"]
        constants = json.loads(archive.read(f"{prefix}/data/constants/model_constants_config.json"))["config"]
        if constants or set(weights) != set(state):
            raise TemplateMismatch("the template's weights are not the model's")
        replaced: dict[str, bytes] = {}
        for name, payload in weights.items():
            tensor = state[name].detach().cpu()
            whole = tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
            record = f"data/weights/{payload['path_name']}"
            if payload["use_pickle"] or not whole or not tensor.is_contiguous() or record in replaced:
                raise TemplateMismatch(f"{name} is not one whole raw tensor in the template")
            data = _raw_bytes(tensor)
            if archive.getinfo(f"{prefix}/{record}").file_size != len(data):
                raise TemplateMismatch(f"{name} has another size in the template")
            replaced[record] = data
        target.parent.mkdir(parents=True, exist_ok=True)
        writer = torch._C.PyTorchFileWriter(str(target))
        writer.set_min_version(6)  # as torch.export's archive writer sets it
        for info in archive.infolist():
            name = info.filename[len(prefix) + 1:]
            if name not in _WRITER_RECORDS:
                data = replaced.get(name)
                if data is None:
                    data = archive.read(info)
                writer.write_record(name, data, len(data))
        writer.write_end_of_file()


def _restamp(local: Path, metadata: dict | None = None) -> None:
    """Give a model copied from the cache the identity a new save gives it: a new uuid and creation time (and,
    for a model filled into a template, its own metadata)."""
    from mlflow.models import Model

    saved = Model.load(str(local / "MLmodel"))
    saved.model_uuid = uuid.uuid4().hex
    saved.utc_time_created = str(datetime.now(timezone.utc).replace(tzinfo=None))
    if metadata is not None:
        saved.metadata = metadata
    saved.save(str(local / "MLmodel"))


def _from_template(templates: BuildCache, key: str, model, local: Path, metadata: dict) -> bool:  # noqa: ANN001
    """Save `model` into `local` from the template `key`, when there is one that fits; False otherwise."""
    template = local.with_name("template")
    if not templates.fetch(key, template):
        return False
    try:
        fill_template(template / PT2_FILE, model, local / PT2_FILE)
    except (TemplateMismatch, KeyError, ValueError, zipfile.BadZipFile) as exc:
        log.warning("PyTorch model: the template in %s does not fit this model (%s); deleted, exporting the model",
                    templates.root, exc)
        templates.discard(key)
        shutil.rmtree(local, ignore_errors=True)
        return False
    for path in template.rglob("*"):
        if path.is_file() and path.relative_to(template) != PT2_FILE:
            (local / path.relative_to(template)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, local / path.relative_to(template))
    _restamp(local, metadata)
    return True


def log_trained_model(run: Run, trained: TrainResult, cache_dir: Path | None = None,
                      template_dir: Path | None = None) -> str:
    """Log the trained classifier (MLflow PyTorch flavour, with signature) and return its artifact URI.

    With `cache_dir`, a model identical to one saved before (the same weights and structure, signature,
    metadata and library versions) is logged from the saved copy instead of being exported again. With
    `template_dir`, a zoo backbone's model built like one exported before is written into that export's
    archive (`fill_template`), and a first export of its kind is kept there.
    """
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    model, _ = load_classifier(trained.checkpoint_path)
    # two images: torch.export would fix a batch axis of size 1 as a constant
    example = np.zeros((2, trained.image_size, trained.image_size, 3), dtype=np.uint8)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    metadata = {"backbone": trained.backbone, "strategy": trained.strategy, "classes": list(trained.classes)}
    requirements = _requirements()
    cache = BuildCache(cache_dir, PT2_CACHE_KEEP) if cache_dir is not None else None
    key = build_key("pt2", _model_digest(model), example.shape, signature.to_dict(), metadata, requirements,
                    f"torch {torch.__version__}", f"mlflow {mlflow.__version__}")
    # only the zoo's backbones (known parameter count): a user's backbone is its factory's code, which no key names
    templates = (BuildCache(template_dir, PT2_TEMPLATES_KEEP)
                 if template_dir is not None and get_spec(trained.backbone).params_m is not None else None)
    # the requirements name the libraries that make a zoo backbone's graph but timm's, and not the archive's writer
    template_key = build_key("pt2-template", _structure_digest(model), example.shape, signature.to_dict(),
                             requirements, _installed("timm", "mlflow")) if templates is not None else ""
    with tempfile.TemporaryDirectory() as tmp:
        local, started = Path(tmp) / "model", time.perf_counter()
        if cache is not None and cache.fetch(key, local):
            _restamp(local)
            log.info("PyTorch model: the same weights as a model saved before; logged from its copy in %s", cache_dir)
        elif templates is not None and _from_template(templates, template_key, model, local, metadata):
            log.info("PyTorch model: its weights put into the export of a model built like it (%s, %.2fs)",
                     templates.root, time.perf_counter() - started)
            if cache is not None:
                cache.keep(key, local)
        else:
            # traced without autograd: the same graph (the same code, signature and ranges), 15-20% sooner
            # (EfficientNet-Lite0 at 112 px on 2 cores: 1.6-2.1 s against 2.1-2.5)
            with requirements_pinned_here(), torch.no_grad():
                mlflow.pytorch.save_model(
                    model,
                    str(local),
                    signature=signature,
                    input_example=example,
                    serialization_format="pt2",
                    pip_requirements=requirements,
                    metadata=metadata,
                )
            if cache is not None:
                cache.keep(key, local)
            if templates is not None:
                templates.keep(template_key, local)
        run.client.log_artifacts(run.run_id, str(local), ARTIFACT_PATH)
    uri = f"runs:/{run.run_id}/{ARTIFACT_PATH}"
    log.info("PyTorch model logged to MLflow: %s", uri)
    return uri
