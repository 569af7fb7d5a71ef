"""What a model came from: the parameter and code fingerprints, the commit, and the names of
the tags and aliases that record them in the registry.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from components.core.config import REPO_ROOT, Params, flatten
from components.core.files import cached_sha256

CHAMPION = "champion"
"""The alias production loads: the version now serving."""
CHALLENGER = "challenger"
"""The alias of the newest version registered after the champion and not (yet) made champion: what a promoter
would weigh against it. Absent when the champion is the newest version (a promotion removes it)."""

PARAMS_SHA_TAG = "params_sha"
"""Version tag: `params_fingerprint` of the parameters it was trained with."""
DATA_MD5_TAG = "data_md5"
"""Version tag: the DVC md5 of the data it was trained on."""
MANIFEST_SHA_TAG = "split.manifest_sha256"
"""Version tag: sha256 of the version's split manifest (which images it trained, early-stopped and was tested on)."""
SPLIT_SETTINGS_TAG = "split.settings"
"""Version tag: the split settings it was trained with, in words."""
HOLD_TAG = "graft.hold"
"""Version tag: why the run that registered it could not move `champion` (a DVC experiment, `--no-promote`)."""
CHAMPION_VERSION_TAG = "graft.champion_version"
"""Registered-model tag an older Graft kept: the version it last made champion (now read from the alias history)."""
PROMOTED_BY_TAG = "graft.promoted_by"
"""Version tag an older Graft wrote: how it last became champion (now the version's latest move record says)."""
MOVE_TAG_PREFIX = "graft.moved."
"""Version tag prefix: `graft.moved.<time in ns>` records one move of an alias onto this version (JSON: alias,
previous version, action, who, when, why); the alias history is all of them (`components.registry.history`)."""

# What a promoter reads on the model page: about a dozen decision tags per version. Everything else a
# registration knows (runtimes, the variant table, weights provenance, ...) is in the version's `registration.json`.
DECISION_METRICS = ("accuracy", "macro_f1")
"""The headline metrics tagged for the test and the validation split (`test.accuracy`, `val.macro_f1`, ...)."""
BACKBONE_TAG = "backbone"
COMMIT_TAG = "git_commit"
PARITY_DIFF_TAG = "parity.max_abs_diff"
"""Version tag: largest |p_onnx - p_torch| on the parity images."""
VARIANTS_SUMMARY_TAG = "variants"
"""Version tag: one line, each variant's accuracy change against fp32 and whether it was published."""

# The trust chain. These live in the registry database, which someone who can write to the artifact
# store cannot change, so a consumer can check the files it downloads against them.
SHA256_TAG_PREFIX = "sha256."
"""Version tag prefix: `sha256.<file>` is the sha256 of each ONNX file registration uploaded
(`sha256.model.onnx`, `sha256.model.int8.onnx`, ...); every consumer checks the file it loads against it."""
ONNX_SHA256_TAG = "onnx.sha256"
"""Version tag older versions carry: the sha256 of the exported `model.onnx`; read for versions registered
before `sha256.<file>` (no longer written)."""
SIGNATURE_KEY_TAG = "signature.key"
"""Version tag: the fingerprint (model-signing's key hint: sha256 of the PEM public key) of the key that signed
the version's folder; absent when it was registered unsigned."""
GATE_VERDICT_TAG = "gate.verdict"
"""Version tag written by `evaluate.gate.Verdict.tags`: `promote` or `keep champion`."""
GATE_REASONS_TAG = "gate.reasons"
"""Version tag written by `evaluate.gate.Verdict.tags`: the verdict and every reason, in words."""
GATE_CHAMPION_TAG = "gate.champion_version"
"""Version tag written by `evaluate.gate.Verdict.tags`: the champion the gate compared with (absent: none)."""
PARITY_AGREEMENT_TAG = "parity.top1_agreement"
"""Version tag: share of parity images where ONNX and PyTorch gave the same top-1 class."""


def sha256_tag(filename: str) -> str:
    """The version tag holding the sha256 registration recorded for `filename`."""
    return f"{SHA256_TAG_PREFIX}{filename}"


# Where things are and what the result is called: they change no weight of the model.
# Any other key, including keys added later, counts as training-relevant.
NOT_TRAINING_RELEVANT = ("data.dir", "data.cache_dir", "choose.shared_exports", "deploy.output_dir", "deploy.graph_template_dir",
                         "deploy.model_name", "deploy.serve_*", "tracking")


def _matches(key: str, patterns: Sequence[str]) -> bool:
    """`data.seed` matches `data.seed` and `data`; a pattern ending in `*` matches by prefix."""
    return any(key.startswith(p[:-1]) if p.endswith("*") else (key == p or key.startswith(f"{p}.")) for p in patterns)


def params_fingerprint(params: Params, keys: Sequence[str] | None = None) -> str:
    """A short sha256 of the parameters that change what training produces (with every key: and the content of the
    weights and factory files they name, `_named_files`).

    Args:
        params: The run's parameters.
        keys: Only these dotted keys or sections (e.g. `("choose", "data.seed")`); default every
            training-relevant key, i.e. all but the paths and names in `NOT_TRAINING_RELEVANT`.
    """
    if keys is None:
        chosen = {**training_settings(params), **_named_files(params)}
    else:
        chosen = {k: v for k, v in flatten(params.model_dump(mode="json")).items() if _matches(k, keys)}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _named_files(params: Params) -> dict[str, str]:
    """The content (sha256) of the files the settings name, which train another model under the same path: the
    weights in `choose.weights`, a `choose.custom` backbone's weights and factory file. Nothing when none is named, so
    the fingerprint of a run without them is what it always was."""
    files = {f"choose.weights.{name}": path for name, path in params.choose.weights.items()}
    for name, custom in params.choose.custom.items():
        if custom.weights is not None:
            files[f"choose.custom.{name}.weights"] = custom.weights
        target = custom.factory.rpartition(":")[0]
        if target.endswith(".py"):
            files[f"choose.custom.{name}.factory"] = Path(target)
    return {f"{key} sha256": cached_sha256(Path(path)) if Path(path).is_file() else "missing" for key, path in files.items()}


def training_settings(params: Params) -> dict[str, object]:
    """Every training-relevant setting by its dotted key (all but `NOT_TRAINING_RELEVANT`): what `params_sha` hashes."""
    return {k: v for k, v in flatten(params.model_dump(mode="json")).items() if not _matches(k, NOT_TRAINING_RELEVANT)}


COMPONENTS_DIR = REPO_ROOT / "components"


def code_fingerprint(*modules: str) -> str:
    """A short sha256 of the source of `components` modules: the named ones (dotted, e.g. `choose.stage`),
    or every module of every package by default."""
    if modules:
        files = [COMPONENTS_DIR.joinpath(*m.split(".")).with_suffix(".py") for m in modules]
    else:
        files = sorted(COMPONENTS_DIR.rglob("*.py"), key=lambda p: p.relative_to(COMPONENTS_DIR).as_posix())
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(COMPONENTS_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def split_fingerprint(split) -> str:  # noqa: ANN001 - components.data.split.Split
    """A short sha256 of a split's classes and images (path, label, size, modification time).

    Cheap (one `stat` per image, no reading), and it changes whenever an image is added, removed,
    relabelled or rewritten: a cache keyed on it is never stale, at worst recomputed after a checkout.
    """
    digest = hashlib.sha256(json.dumps(list(split.classes)).encode())
    for part, samples in (("train", split.train), ("val", split.val), ("test", split.test)):
        for sample in samples:
            stat = sample.path.stat()
            digest.update(f"{part}|{sample.path.relative_to(split.root)}|{sample.label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


COMMIT_ENV = "GRAFT_GIT_COMMIT"
"""The commit of a copy of the code made without its git history (a container image: `docker build --build-arg
GRAFT_GIT_COMMIT=$(git rev-parse HEAD)`), recorded where git cannot tell."""


def git_commit(root: Path | None = None) -> str:
    """The checked-out commit (with '-dirty' for local changes); outside git, `GRAFT_GIT_COMMIT` or 'unknown'."""
    cwd = root or REPO_ROOT
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return f"{commit}-dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        return os.environ.get(COMMIT_ENV, "").strip() or "unknown"
