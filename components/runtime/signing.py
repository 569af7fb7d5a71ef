"""Signing a model folder with OpenSSF Model Signing (`model-signing`), and verifying it before a load.

Turned on by environment variables naming key files, never by parameters (a key is a secret, and which
keys a machine trusts is that machine's decision):

    GRAFT_SIGNING_KEY=/keys/graft-signing.pem   registration signs the model folder it uploads, and bundles
    GRAFT_SIGNING_KEY_PASSWORD=...              only for an encrypted private key
    GRAFT_VERIFY_KEY=/keys/graft-signing.pub    consumers refuse unsigned or wrongly signed models; several
                                                files separated by ':' while a key is being rotated

Keys are elliptic-curve (P-256, P-384 or P-521) PEM files, as model-signing's key signer takes them; no
network is needed to sign or verify. The signature is `model.sig` inside the signed folder: a Sigstore bundle
whose signed payload lists the sha256 of every other file there, so one extra, missing or altered file fails
it. Anyone can check it without Graft: `model_signing verify key FOLDER --signature FOLDER/model.sig
--public_key graft-signing.pub`.

Imports model-signing only when a key is configured.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from components.core.errors import SignatureError

SIGNING_KEY_ENV = "GRAFT_SIGNING_KEY"


SIGNING_KEY_PASSWORD_ENV = "GRAFT_SIGNING_KEY_PASSWORD"


VERIFY_KEY_ENV = "GRAFT_VERIFY_KEY"


SIGNATURE_FILE = "model.sig"
"""The signature inside a signed folder (model-signing's default name)."""


MLFLOW_DOWNLOAD_FILE = "registered_model_meta"
"""What MLflow adds to every download of `models:/NAME/V` (the name and version, which nothing loads). The signature
leaves it out, and records that it does, so a version downloaded the standard way (`mlflow artifacts download -u
models:/...`) verifies with Graft and with model-signing's own command."""


def signing_key() -> Path | None:
    """The private key file `GRAFT_SIGNING_KEY` names, or None when signing is off.

    Raises:
        SignatureError: the variable names no file.
    """
    value = os.environ.get(SIGNING_KEY_ENV, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise SignatureError(f"{SIGNING_KEY_ENV}={value} names no file; point it at the private key (PEM) or unset it to register unsigned")
    return path


def verify_keys() -> tuple[Path, ...]:
    """The public key files `GRAFT_VERIFY_KEY` names (':'-separated); empty when verification is off.

    Raises:
        SignatureError: a named file does not exist.
    """
    paths = tuple(Path(p).expanduser() for p in os.environ.get(VERIFY_KEY_ENV, "").split(os.pathsep) if p.strip())
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SignatureError(f"{VERIFY_KEY_ENV} names {', '.join(missing)}, which does not exist; point it at the public key (PEM) file(s)")
    return paths


def key_fingerprint(public_key: Path) -> str:
    """The key's fingerprint as model-signing's signatures carry it: sha256 of its PEM SubjectPublicKeyInfo.

    Raises:
        SignatureError: the file is not a PEM public key.
    """
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(public_key.read_bytes())
    except ValueError as exc:
        raise SignatureError(f"{public_key} is not a PEM public key ({exc}); {VERIFY_KEY_ENV} must name the .pub file, not the private key") from exc
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def signer_fingerprint(signature: Path) -> str | None:
    """The fingerprint of the key a signature file says signed it (not yet verified), or None when unreadable."""
    try:
        return json.loads(signature.read_text())["verificationMaterial"]["publicKey"]["hint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _hashing_config():  # noqa: ANN202 - model_signing.hashing.Config
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE, MLFLOW_DOWNLOAD_FILE], ignore_git_paths=True)


def sign_folder(folder: Path, private_key: Path) -> str:
    """Sign every file in `folder` into `folder/model.sig`; returns the signing key's fingerprint.

    Raises:
        SignatureError: the key cannot be read or is not an elliptic-curve key model-signing supports.
    """
    from model_signing import signing

    password = os.environ.get(SIGNING_KEY_PASSWORD_ENV)
    try:
        config = signing.Config().use_elliptic_key_signer(private_key=private_key, password=password)
        config.set_hashing_config(_hashing_config()).sign(folder, folder / SIGNATURE_FILE)
    except (ValueError, TypeError) as exc:
        raise SignatureError(
            f"cannot sign with {SIGNING_KEY_ENV}={private_key} ({exc}); it must be an elliptic-curve (P-256, P-384 or P-521) "
            f"private key in PEM, with {SIGNING_KEY_PASSWORD_ENV} set if it is encrypted (README: Signing)"
        ) from exc
    fingerprint = signer_fingerprint(folder / SIGNATURE_FILE)
    if fingerprint is None:
        raise SignatureError(f"model-signing wrote no readable signature to {folder / SIGNATURE_FILE}")
    return fingerprint


def _reason(exc: Exception) -> str:
    """model-signing's refusal in a few words: which files changed, were added or went missing, else its first line."""
    text = str(exc)
    # the messages arrive inside a list's repr, so their quotes may come escaped
    changed = re.findall(r"Hash mismatch for \\?'([^'\\]+)\\?'", text)
    extra = re.search(r"Extra files found in model \\?'[^']*\\?': ([^'\"\]\\]+)", text)
    missing = re.search(r"Missing files in model \\?'[^']*\\?': ([^'\"\]\\]+)", text)
    parts = [f"changed since signing: {', '.join(changed)}"] if changed else []
    parts += [f"not in the signature: {extra[1]}"] if extra else []
    parts += [f"signed but missing: {missing[1]}"] if missing else []
    if parts:
        return "; ".join(parts)
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else exc.__class__.__name__


def verify_folder(folder: Path, public_keys: Sequence[Path], what: str) -> str:
    """Verify `folder/model.sig` over every file in `folder` with one of `public_keys`; returns that key's fingerprint.

    Args:
        folder: The signed folder (a registered version's files, or a bundle).
        public_keys: The keys `GRAFT_VERIFY_KEY` names; the signature must verify with one of them.
        what: The model, for messages (`NAME vV`, `bundle DIR`).

    Raises:
        SignatureError: the folder is unsigned, or its signature fails with every key (a file was changed,
            added or removed, or another key signed it).
    """
    from model_signing import verifying

    trusted = {key: key_fingerprint(key) for key in public_keys}  # a misconfigured key is named before anything else
    signature = folder / SIGNATURE_FILE
    if not signature.is_file():
        raise SignatureError(
            f"{what} is not signed (no {SIGNATURE_FILE}) and {VERIFY_KEY_ENV} is set, so it is refused; "
            f"register it with {SIGNING_KEY_ENV} set, or unset {VERIFY_KEY_ENV} to load unsigned models"
        )
    claimed = signer_fingerprint(signature)
    problems = []
    for key, fingerprint in trusted.items():
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=key).verify(folder, signature)
            return fingerprint
        # model-signing reports a bad signature as ValueError, cryptography's InvalidSignature or a protobuf
        # ParseError, depending on where it breaks; each is a refusal, reported below with the key it used
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{key.name}: {_reason(exc)}")
    signer = f"signed with key {claimed[:16]}..." if claimed else "its signature is unreadable"
    raise SignatureError(
        f"{what}: the signature does not verify with {VERIFY_KEY_ENV} ({'; '.join(problems)}); {signer}, trusted keys are "
        f"{', '.join(f[:16] + '...' for f in trusted.values())}; refusing to load it (a file was altered, "
        "or another key signed it)"
    )
