"""What a consumer checks before onnxruntime opens a model file: that it is the file registration recorded.

Every way of loading a model comes through here, before a session is made:

- a registered version (`models:/NAME@ALIAS`, `models:/NAME/V`): its source must lie inside its own run's
  artifact folder (`registry.versions.trusted_download_uri`), and each file loaded must have the sha256 that
  registration recorded in the version's `sha256.<file>` tag. The tags live in the registry database, which
  someone able to write to the artifact store cannot change;
- a bundle folder: every file against its `SHA256SUMS` (`runtime.bundle`);
- a plain `.onnx` file: against its sidecar `<file>.sha256` (one `sha256sum` line) when it has one, which the
  deploy stage writes beside each file it hands out; without one it loads with a warning, since nothing
  recorded says what it should be.

With `GRAFT_VERIFY_KEY` set (`runtime.signing`), the folder's signature is verified too, and an unsigned
model is refused: a registered version's whole folder is downloaded for that, a bundle carries its own
signature, and a plain file must sit in a signed folder.

A mismatch is refused with one line naming the model, the file and both digests.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from components.core.errors import IntegrityError
from components.core.files import atomic_write, sha256
from components.core.lineage import CHAMPION, ONNX_SHA256_TAG, sha256_tag
from components.registry.history import latest_move
from components.registry.versions import download_artifact, recorded_concerns, trusted_download_uri
from components.runtime.signing import verify_folder, verify_keys
from components.runtime.variant_files import FP32_FILE, VARIANTS_TAG

log = logging.getLogger(__name__)


SIDECAR_SUFFIX = ".sha256"


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Checked:
    """Files that passed the checks, and what vouched for them."""

    paths: dict[str, Path]
    """File name -> the local copy that was checked (load it from there, not from the store)."""
    sha256: dict[str, str]
    signed_by: str | None = None
    """Fingerprint of the key whose signature verified, when verification is on."""


def expected_sha256(tags: Mapping[str, str], filename: str) -> str | None:
    """The sha256 registration recorded for `filename` in a version's tags, or None when it recorded none.

    `sha256.<file>` first; versions registered before those tags recorded the fp32 file in `onnx.sha256`
    and each variant in the `onnx.variants` listing, which are read instead.
    """
    recorded = tags.get(sha256_tag(filename))
    if recorded is None and filename == FP32_FILE:
        recorded = tags.get(ONNX_SHA256_TAG)
    if recorded is None:
        try:
            listing = json.loads(tags.get(VARIANTS_TAG) or "{}")
            recorded = next((v.get("sha256") for v in listing.values() if isinstance(v, dict) and v.get("file") == filename), None)
        except (ValueError, AttributeError):
            recorded = None
    return recorded if isinstance(recorded, str) and _SHA256.match(recorded) else None


def check_sha256(path: Path, expected: str, what: str, recorded_by: str) -> str:
    """The file's sha256, once it is `expected`.

    Args:
        path: The local file about to be loaded.
        expected: The digest recorded for it.
        what: The model, for the message (`NAME vV`, the bundle, the file).
        recorded_by: Who recorded `expected`, for the message (`registration recorded`, `its sidecar says`).

    Raises:
        IntegrityError: one line naming the model, the file and both digests.
    """
    actual = sha256(path)
    if actual != expected:
        raise IntegrityError(
            f"{what}: {path.name} has sha256 {actual} but {recorded_by} {expected}; refusing to load it "
            "(the file was altered or damaged since; restore it, or register the model again with `graft run`)"
        )
    return actual


def fetch_registered(client, found, filenames: Sequence[str], dst: Path) -> Checked:  # noqa: ANN001 - MlflowClient, ModelVersion
    """Download files of registered version `found` into `dst`, checked against what registration recorded.

    The version's source must lie inside its run's artifact folder; each file must have the sha256 in its
    `sha256.<file>` tag; with verification on, the whole folder is downloaded and its signature verified.

    Raises:
        UntrustedSourceError: the source lies outside the run's artifact folder.
        IntegrityError: a digest differs or none was recorded.
        SignatureError: verification is on and the folder is unsigned or wrongly signed.
    """
    what = f"{found.name} v{found.version}"
    expected = {name: expected_sha256(found.tags, name) for name in filenames}
    unrecorded = [name for name, digest in expected.items() if digest is None]
    if unrecorded:
        raise IntegrityError(
            f"{what} records no sha256 for {', '.join(unrecorded)} (version tag {sha256_tag(unrecorded[0])}), so what it would "
            "load cannot be checked; it was not registered by Graft's deploy stage: register it with `graft run`"
        )
    root = trusted_download_uri(client, found).rstrip("/")
    keys = verify_keys()
    signed_by = None
    dst.mkdir(parents=True, exist_ok=True)
    if keys:
        folder = download_artifact(root, dst)
        signed_by = verify_folder(folder, keys, what)
        paths = {name: folder / name for name in filenames}
    else:
        paths = {name: download_artifact(f"{root}/{name}", dst) for name in filenames}
    digests = {name: check_sha256(path, expected[name], what, "registration recorded") for name, path in paths.items()}
    return Checked(paths, digests, signed_by)


def sidecar_path(path: Path) -> Path:
    """`model.onnx` -> `model.onnx.sha256`."""
    return path.with_name(f"{path.name}{SIDECAR_SUFFIX}")


def write_sidecar(path: Path, digest: str | None = None) -> Path:
    """Write `<file>.sha256` beside `path` in `sha256sum` format (so `sha256sum -c` checks it too)."""
    sidecar = sidecar_path(path)
    line = f"{digest or sha256(path)}  {path.name}\n"
    with atomic_write(sidecar) as tmp:
        tmp.write_text(line)
    return sidecar


def read_sidecar(path: Path) -> str | None:
    """The sha256 the sidecar of `path` records, or None when there is no sidecar.

    Raises:
        IntegrityError: the sidecar is not one `<sha256>  <file>` line for this file.
    """
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    line = next(iter(sidecar.read_text().splitlines()), "")
    digest, _, name = line.partition(" ")
    if not _SHA256.match(digest) or name.lstrip(" *") != path.name:
        raise IntegrityError(
            f"{sidecar} is not '<sha256>  {path.name}': {line[:120]!r}; write it again with "
            f"`sha256sum {path.name} > {sidecar.name}` from the file you trust"
        )
    return digest


def check_local_file(path: Path) -> Checked:
    """Check a plain model file: its folder's signature when verification is on, then its sidecar.

    A file without a sidecar (and without a verified signature) loads with a warning.

    Raises:
        IntegrityError: the file differs from its sidecar.
        SignatureError: verification is on and the file's folder is unsigned or wrongly signed.
    """
    keys = verify_keys()
    signed_by = verify_folder(path.parent, keys, str(path)) if keys else None
    expected = read_sidecar(path)
    if expected is None:
        if signed_by is None:
            log.warning(
                "%s has no sidecar %s, so its sha256 is not checked against what was registered; load the registered "
                "version (models:/NAME@champion) or its bundle, or keep the sidecar the deploy stage wrote beside it",
                path, sidecar_path(path).name,
            )
        return Checked({path.name: path}, {}, signed_by)
    digest = check_sha256(path, expected, str(path.parent), f"its sidecar {sidecar_path(path).name} says")
    return Checked({path.name: path}, {path.name: digest}, signed_by)


def champion_warning(name: str, version: str, alias: str | None, tags: Mapping[str, str]) -> str | None:
    """A warning when `champion` points at a version whose record says the gate or the parity check failed it.

    The alias is the user's call (a move in the MLflow UI, or `graft promote`), so it is followed; this says so.
    """
    concerns = recorded_concerns(tags)
    if alias != CHAMPION or not concerns:
        return None
    how = latest_move(tags)
    moved = f"made champion by {how}" if how else "moved there outside Graft, in the MLflow UI or API"
    return f"{CHAMPION} of {name} is v{version} although {'; and '.join(concerns)}; it is served as the alias says ({moved})"
