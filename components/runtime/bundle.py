"""Deploy bundles: a folder a consumer outside MLflow can copy, verify and load.

    bundle/
      model.onnx            fp32, parity-checked against PyTorch
      model.<variant>.onnx  published variants (optimized, fp16, int8)
      labels.txt            one class name per line, in output order
      metadata.json         classes, input size, mean/std, backbone, data md5, variants' accuracy changes, source
      model_card.md         when the run wrote one (and model_card.html, the same card with its pictures)
      SHA256SUMS            sha256 of every other file; `sha256sum -c SHA256SUMS` checks it too
      model.sig             when GRAFT_SIGNING_KEY was set: model-signing's signature over all of the above

`open_bundle` verifies every checksum, and the signature when GRAFT_VERIFY_KEY is set, before anything
is loaded. A bundle of a registered version is written only from files that match the digests
registration recorded. Imports no torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from components.core.errors import BundleError, SignatureError
from components.core.files import sha256
from components.registry.mlflow_calls import first_line as mlflow_first_line
from components.registry.versions import parse_registry_uri, registry_version
from components.runtime.signing import (
    SIGNATURE_FILE,
    SIGNING_KEY_ENV,
    VERIFY_KEY_ENV,
    sign_folder,
    signing_key,
    verify_folder,
    verify_keys,
)
from components.runtime.trust import fetch_registered
from components.runtime.variant_files import (
    FP32_FILE,
    VARIANT_SUFFIXES,
    VARIANTS_TAG,
    published_variants,
    variant_filename,
    variant_path,
)

log = logging.getLogger(__name__)


CHECKSUMS = "SHA256SUMS"


LABELS = "labels.txt"


METADATA = "metadata.json"


MODEL_CARD = "model_card.md"


MODEL_CARD_HTML = "model_card.html"


MODEL_CARD_DIR = "model_card"
"""Where a registered version's run keeps its model cards (`runs:/<run>/model_card/model_card.md`)."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle folder."""

    dir: Path
    name: str | None
    version: str | None
    variants: tuple[str, ...]
    classes: tuple[str, ...]
    metadata: dict
    sha256: dict[str, str]
    """File name -> its verified sha256 (from `SHA256SUMS`)."""
    signed_by: str | None = None
    """Fingerprint of the key whose signature verified, when GRAFT_VERIFY_KEY is set."""

    def file(self, variant: str = "fp32") -> Path:
        if variant not in self.variants:
            raise BundleError(f"bundle {self.dir} has no '{variant}' model (it has {', '.join(self.variants)})")
        return variant_path(self.dir / FP32_FILE, variant)

def _staging(out_dir: Path) -> Path:
    """An empty folder beside `out_dir`, renamed onto it once complete, made by `mkdir`, so with the permissions the
    user's umask gives (`mkdtemp` makes 0700: a server running as another user, Triton's for one, could not read it)."""
    staging = out_dir.parent / f".{out_dir.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    return staging


def write_bundle(
    fp32_path: Path,
    out_dir: Path,
    metadata: dict,
    variants: dict[str, dict] | None = None,
    model_card: Path | None = None,
    model_card_html: Path | None = None,
) -> Bundle:
    """Write a bundle for the model at `fp32_path` (and its `variants` beside it) into `out_dir`.

    Args:
        fp32_path: The fp32 `.onnx` file; variant files are looked up beside it.
        out_dir: A new or empty folder.
        metadata: Facts for `metadata.json` (name, version, source, ...); classes etc. are read from the model.
        variants: Published variant name -> its facts (accuracy change, sha256, ...).
        model_card: A markdown model card to include, when there is one.
        model_card_html: The same card as HTML, when there is one.

    Raises:
        BundleError: `out_dir` is not empty, or a variant file is missing.
        SignatureError: GRAFT_SIGNING_KEY is set but unusable, or unset while GRAFT_VERIFY_KEY is set (the bundle's
            own loads would refuse it unsigned).
    """
    import onnx

    key = signing_key()
    if key is None and verify_keys():
        raise SignatureError(
            f"bundle {out_dir} would be unsigned, and with {VERIFY_KEY_ENV} set its loads refuse unsigned bundles: set "
            f"{SIGNING_KEY_ENV} to the private key that signs bundles, or unset {VERIFY_KEY_ENV} to write an unsigned one "
            f"(its {CHECKSUMS} still lists every file's sha256); nothing was written"
        )
    variants = {k: v for k, v in (variants or {}).items() if k != "fp32"}
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BundleError(f"bundle folder '{out_dir}' exists and is not empty; pass a new folder with --out or delete it")
    model_meta = {p.key: p.value for p in onnx.load(str(fp32_path), load_external_data=False).metadata_props}
    try:
        classes = json.loads(model_meta["classes"])
    except (KeyError, ValueError) as exc:
        raise BundleError(f"{fp32_path} lacks Graft metadata (classes); export it with Graft") from exc
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(out_dir)
    try:
        for name in ("fp32", *variants):
            source = variant_path(fp32_path, name)
            if not source.is_file():
                raise BundleError(f"variant '{name}' is listed but {source} does not exist; re-run the deploy stage")
            shutil.copyfile(source, staging / variant_path(Path(FP32_FILE), name).name)
        (staging / LABELS).write_text("".join(f"{label}\n" for label in classes))
        for card, card_name in ((model_card, MODEL_CARD), (model_card_html, MODEL_CARD_HTML)):
            if card is not None and card.is_file():
                shutil.copyfile(card, staging / card_name)
        facts = {
            **{k: _maybe_json(v) for k, v in model_meta.items() if not k.startswith("onnx.")},
            **metadata,
            "variants": {"fp32": {"file": FP32_FILE}, **{k: {**v, "file": variant_path(Path(FP32_FILE), k).name} for k, v in variants.items()}},
        }
        (staging / METADATA).write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
        lines = [f"{sha256(path)}  {path.name}\n" for path in sorted(staging.iterdir()) if path.is_file()]
        (staging / CHECKSUMS).write_text("".join(lines))
        if key is not None:
            sign_folder(staging, key)
        if out_dir.exists():
            out_dir.rmdir()
        staging.replace(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("deploy bundle written to %s", out_dir)
    return open_bundle(out_dir)


def _maybe_json(value: str) -> object:
    try:
        return json.loads(value)
    except ValueError:
        return value


def verify_bundle(bundle_dir: Path) -> dict[str, str]:
    """Check every file against `SHA256SUMS`; returns {file: sha256}.

    Raises:
        BundleError: naming every missing, altered or unlisted file at once.
    """
    listing = bundle_dir / CHECKSUMS
    if (bundle_dir / TRITON_CONFIG).is_file():  # `graft bundle --format triton` writes SHA256SUMS too, of its own layout
        models = sorted(str(p.relative_to(bundle_dir)) for p in bundle_dir.glob("*/*.onnx"))
        raise BundleError(f"'{bundle_dir}' is a Triton model repository's model ({TRITON_CONFIG}), not a Graft bundle: serve "
                          f"it with Triton, or pass its ONNX file ({', '.join(models) or 'VERSION/model.onnx'} in it) with "
                          "--model; `sha256sum -c SHA256SUMS` in it checks its files")
    if not listing.is_file():
        raise BundleError(f"'{bundle_dir}' is not a Graft bundle: it has no {CHECKSUMS}; write one with `graft bundle`")
    expected: dict[str, str] = {}
    for number, line in enumerate(listing.read_text().splitlines(), start=1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or "/" in name or name in ("", ".", ".."):
            raise BundleError(f"{listing} line {number} is not '<sha256>  <file>': {line!r}; rewrite the bundle")
        expected[name] = digest
    problems = []
    for name, digest in expected.items():
        path = bundle_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256(path) != digest:
            problems.append(f"{name} does not match its checksum (altered or truncated)")
    problems += [
        f"{path.name} is not listed in {CHECKSUMS}"
        for path in sorted(bundle_dir.iterdir())
        if path.is_file() and path.name not in (CHECKSUMS, SIGNATURE_FILE) and path.name not in expected
    ]
    if problems:
        raise BundleError(f"bundle {bundle_dir} failed verification: {'; '.join(problems)}; copy the bundle again")
    return expected


def open_bundle(bundle_dir: Path) -> Bundle:
    """Verify a bundle's checksums (and its signature when GRAFT_VERIFY_KEY is set), then read its metadata.

    Raises:
        BundleError: a file is missing, altered or unlisted.
        SignatureError: verification is on and the bundle is unsigned or wrongly signed.
    """
    files = verify_bundle(bundle_dir)
    for required in (FP32_FILE, LABELS, METADATA):
        if required not in files:
            raise BundleError(f"bundle {bundle_dir} has no {required}; rewrite it with `graft bundle`")
    keys = verify_keys()
    signed_by = verify_folder(bundle_dir, keys, f"bundle {bundle_dir}") if keys else None
    metadata = json.loads((bundle_dir / METADATA).read_text())
    variants = tuple(name for name in VARIANT_SUFFIXES if variant_path(Path(FP32_FILE), name).name in files)
    classes = tuple((bundle_dir / LABELS).read_text().splitlines())
    version = metadata.get("version")
    return Bundle(bundle_dir, metadata.get("name"), None if version is None else str(version), variants, classes, metadata, files, signed_by)


def bundle_from_registry(model_uri: str, out_dir: Path) -> Bundle:
    """Write the bundle of a registered version (`models:/NAME@ALIAS` or `models:/NAME/V`) to `out_dir`.

    Its files are checked against the digests registration recorded (and the version's signature when
    GRAFT_VERIFY_KEY is set) before anything is written; the bundle is signed when GRAFT_SIGNING_KEY is set.
    """
    from mlflow import MlflowClient

    parsed = parse_registry_uri(model_uri)
    if parsed is None:
        raise BundleError(f"'{model_uri}' is not a registry URI; pass models:/NAME@champion or models:/NAME/VERSION")
    name, alias, version = parsed
    found = registry_version(name, alias, version)
    names = published_variants(found.tags)
    listed = json.loads(found.tags.get(VARIANTS_TAG, "{}") or "{}")
    with tempfile.TemporaryDirectory(prefix="graft-bundle-") as tmp:
        local = Path(tmp)
        checked = fetch_registered(MlflowClient(), found, [variant_filename(v) for v in names], local / "files")
        cards = {name: _download_card(found, name, local / "card") for name in (MODEL_CARD, MODEL_CARD_HTML)}
        facts = {
            "name": name,
            "version": str(found.version),
            "source": f"models:/{name}/{found.version}",
            "run_id": found.run_id,
            **{k: found.tags[k] for k in ("git_commit", "parity.max_abs_diff", "parity.top1_agreement") if k in found.tags},
        }
        fp32 = checked.paths[FP32_FILE]
        listing = {k: {"sha256": v} for k, v in checked.sha256.items()}
        variants = {n: {**listed.get(n, {}), **listing.get(variant_filename(n), {})} for n in names}
        return write_bundle(fp32, out_dir, facts, variants, cards[MODEL_CARD], cards[MODEL_CARD_HTML])


def _download_card(found, name: str, dst: Path) -> Path | None:  # noqa: ANN001 - mlflow ModelVersion
    """A version's model card from its run's `model_card/` artifacts (older versions named it in a `model_card` tag);
    None when there is none: a missing card does not stop a bundle."""
    import mlflow

    uri = f"runs:/{found.run_id}/{MODEL_CARD_DIR}/{name}"
    if name == MODEL_CARD and found.tags.get("model_card"):
        uri = found.tags["model_card"]
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a missing artifact
        log.info("model card %s not found (%s); bundle written without it", uri, mlflow_first_line(exc))
        return None


# ---------------------------------------------------------------- a Triton model repository

TRITON_CONFIG = "config.pbtxt"


TRITON_QUEUE_DELAY_US = 2000
"""How long Triton's dynamic batcher may hold a request to batch it with others (2 ms)."""


@dataclass(frozen=True)
class TritonRepository:
    """A Triton model repository written from a registered version: `root/<name>/config.pbtxt`, `root/<name>/<version>/model.onnx`."""

    root: Path
    name: str
    version: str
    variant: str
    config: Path


def triton_config(name: str, version: str, input_name: str, output_name: str, image_size: int, classes: int, max_batch: int,
                  source: str, queue_delay_us: int = TRITON_QUEUE_DELAY_US) -> str:
    """`config.pbtxt` for Triton's onnxruntime backend: the model's tensors, dynamic batching, the one version, its labels."""
    return f"""# Written by `graft bundle --format triton` from {source}
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch}
version_policy: {{ specific: {{ versions: [ {version} ] }} }}
input [
  {{
    name: "{input_name}"
    data_type: TYPE_UINT8
    dims: [ {image_size}, {image_size}, 3 ]
  }}
]
output [
  {{
    name: "{output_name}"
    data_type: TYPE_FP32
    dims: [ {classes} ]
    label_filename: "{LABELS}"
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {queue_delay_us}
}}
parameters {{ key: "graft.source" value: {{ string_value: "{source}" }} }}
"""


def triton_from_registry(model_uri: str, out_dir: Path, variant: str = "fp32", max_batch: int = 32) -> TritonRepository:
    """Write a Triton model repository for a registered version (`models:/NAME@ALIAS` or `models:/NAME/V`) into `out_dir`.

    The model file is checked against the digest registration recorded (and the version's signature when
    GRAFT_VERIFY_KEY is set) before it is written; Triton then serves it with dynamic batching, and a caller
    of `graft serve`'s `/v2` endpoints calls Triton the same way. `SHA256SUMS` beside `config.pbtxt` lists
    what was written (`sha256sum -c`).

    Raises:
        BundleError: not a registry URI, the variant was not published, or `out_dir` is not empty.
    """
    import onnxruntime as ort

    from mlflow import MlflowClient

    parsed = parse_registry_uri(model_uri)
    if parsed is None:
        raise BundleError(f"'{model_uri}' is not a registry URI; pass models:/NAME@champion or models:/NAME/VERSION")
    name, alias, version = parsed
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BundleError(f"folder '{out_dir}' exists and is not empty; pass a new folder with --out or delete it")
    found = registry_version(name, alias, version)
    if variant not in published_variants(found.tags):
        raise BundleError(f"variant '{variant}' was not published for {name} v{found.version} (published: {', '.join(published_variants(found.tags))})")
    filename = variant_filename(variant)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(out_dir)
    try:
        checked = fetch_registered(MlflowClient(), found, [filename], staging / ".download")
        model_dir = staging / name
        (model_dir / str(found.version)).mkdir(parents=True)
        target = model_dir / str(found.version) / FP32_FILE  # Triton's onnxruntime backend looks for model.onnx
        shutil.copyfile(checked.paths[filename], target)
        shutil.rmtree(staging / ".download")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        classes = json.loads(meta["classes"])
        (model_dir / LABELS).write_text("".join(f"{label}\n" for label in classes))
        source = f"models:/{name}/{found.version} ({variant})"
        (model_dir / TRITON_CONFIG).write_text(triton_config(
            name, str(found.version), session.get_inputs()[0].name, session.get_outputs()[0].name, int(meta["image_size"]),
            len(classes), max_batch, source))
        files = sorted(p for p in model_dir.rglob("*") if p.is_file())
        (model_dir / CHECKSUMS).write_text("".join(f"{sha256(p)}  {p.relative_to(model_dir).as_posix()}\n" for p in files))
        if out_dir.exists():
            out_dir.rmdir()
        staging.replace(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("Triton model repository for %s v%s (%s) written to %s", name, found.version, variant, out_dir)
    return TritonRepository(out_dir, name, str(found.version), variant, out_dir / name / TRITON_CONFIG)
