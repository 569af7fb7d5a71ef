"""Signing with OpenSSF Model Signing when a team turns it on: registration signs the version's folder,
consumers holding the public key refuse unsigned or wrongly signed models. Real keys, real signatures."""

from __future__ import annotations

import os
import shutil

import pytest

from components.core.errors import IntegrityError, SignatureError
from components.runtime.model import OnnxClassifier
from components.runtime.signing import SIGNATURE_FILE, SIGNING_KEY_ENV, VERIFY_KEY_ENV, key_fingerprint, sign_folder
from tests.runtime.fixtures import NAME, key_pair, store  # noqa: F401


@pytest.fixture
def keys(tmp_path):
    """The team's key pair and an attacker's."""
    return key_pair(tmp_path / "keys", "team"), key_pair(tmp_path / "keys", "attacker")


def test_a_signed_version_verifies_and_names_its_key(store, keys, monkeypatch):  # noqa: F811
    (private, public), _ = keys
    monkeypatch.setenv(SIGNING_KEY_ENV, str(private))
    version = store.register("v1")
    fingerprint = key_fingerprint(public)
    assert store.client.get_model_version(NAME, version).tags["signature.key"] == fingerprint
    assert (store.folder(version) / SIGNATURE_FILE).is_file()  # stored with the version's files

    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    for variant in ("fp32", "int8"):
        model = OnnxClassifier.load(f"models:/{NAME}/{version}", variant=variant)
        assert model.source.signed_by == fingerprint and model.source.sha256


def test_an_unsigned_version_is_refused_when_verification_is_on_and_loads_when_it_is_off(store, keys, monkeypatch):  # noqa: F811
    _, (_, public) = keys
    version = store.register("v1")  # GRAFT_SIGNING_KEY not set
    assert OnnxClassifier.load(f"models:/{NAME}/{version}").source.signed_by is None
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    with pytest.raises(SignatureError, match=rf"{NAME} v{version} is not signed \(no model.sig\) and GRAFT_VERIFY_KEY is set"):
        OnnxClassifier.load(f"models:/{NAME}/{version}")


def test_a_version_re_signed_with_another_key_or_altered_after_signing_is_refused(store, keys, monkeypatch):  # noqa: F811
    (private, public), (attacker_private, _) = keys
    monkeypatch.setenv(SIGNING_KEY_ENV, str(private))
    version = store.register("v1")
    folder = store.folder(version)
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))

    shutil.copyfile(folder / "model.int8.onnx", folder / "model.onnx")
    with pytest.raises(SignatureError, match=r"team.pub: changed since signing: model.onnx"):
        OnnxClassifier.load(f"models:/{NAME}/{version}", variant="int8")
    (folder / "extra.onnx").write_bytes(b"x")
    with pytest.raises(SignatureError, match=r"not in the signature: extra.onnx"):
        OnnxClassifier.load(f"models:/{NAME}/{version}", variant="int8")
    (folder / "extra.onnx").unlink()
    sign_folder(folder, attacker_private)  # the attacker re-signs the altered folder with a key of their own
    with pytest.raises(SignatureError, match=rf"{NAME} v{version}: the signature does not verify with GRAFT_VERIFY_KEY .*refusing to load it"):
        OnnxClassifier.load(f"models:/{NAME}/{version}", variant="int8")  # even the untouched file: the folder is not the signed one

    sign_folder(folder, private)  # or the attacker stole the key: the registry's digests still refuse the altered file
    with pytest.raises(IntegrityError, match=r"model.onnx has sha256 .* but registration recorded"):
        OnnxClassifier.load(f"models:/{NAME}/{version}")


def test_a_version_downloaded_the_standard_way_verifies_with_graft_and_with_model_signings_own_command(store, keys, monkeypatch):  # noqa: F811
    """`mlflow artifacts download -u models:/NAME/V` adds MLflow's `registered_model_meta` to the folder; the signature
    leaves that file out, and says so, so the README's `model_signing verify` passes on the download, and so does a load."""
    import subprocess
    import sys
    from pathlib import Path

    import mlflow

    (private, public), _ = keys
    monkeypatch.setenv(SIGNING_KEY_ENV, str(private))
    version = store.register("v1")
    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}/{version}", dst_path=str(store.work / "dl"),
                                                          tracking_uri=store.uri))
    assert (downloaded / "registered_model_meta").is_file() and (downloaded / SIGNATURE_FILE).is_file()

    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    assert OnnxClassifier.load(downloaded / "model.onnx", variant="int8").source.signed_by == key_fingerprint(public)
    command = [str(Path(sys.executable).parent / "model_signing"), "verify", "key", str(downloaded),
               "--signature", str(downloaded / SIGNATURE_FILE), "--public_key", str(public)]
    checked = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0 and "Verification succeeded" in checked.stdout + checked.stderr, checked.stdout + checked.stderr
    (downloaded / "extra.onnx").write_bytes(b"x")  # any other file still fails it
    with pytest.raises(SignatureError, match=r"not in the signature: extra.onnx"):
        OnnxClassifier.load(downloaded / "model.onnx")


def test_key_rotation_trusts_every_listed_key(store, keys, monkeypatch):  # noqa: F811
    (old_private, old_public), (new_private, new_public) = keys
    monkeypatch.setenv(SIGNING_KEY_ENV, str(old_private))
    old = store.register("old")
    monkeypatch.setenv(SIGNING_KEY_ENV, str(new_private))
    new = store.register("new")
    monkeypatch.setenv(VERIFY_KEY_ENV, os.pathsep.join((str(old_public), str(new_public))))
    assert OnnxClassifier.load(f"models:/{NAME}/{old}").source.signed_by == key_fingerprint(old_public)
    assert OnnxClassifier.load(f"models:/{NAME}/{new}").source.signed_by == key_fingerprint(new_public)
    monkeypatch.setenv(VERIFY_KEY_ENV, str(new_public))  # the old key retired
    with pytest.raises(SignatureError, match="does not verify"):
        OnnxClassifier.load(f"models:/{NAME}/{old}")


def test_bundles_are_signed_by_their_writer_and_plain_files_need_a_signed_folder(store, keys, monkeypatch):  # noqa: F811
    from components.runtime.bundle import bundle_from_registry

    (private, public), (attacker_private, _) = keys
    monkeypatch.setenv(SIGNING_KEY_ENV, str(private))
    version = store.register("v1")
    bundle = bundle_from_registry(f"models:/{NAME}/{version}", store.work / "signed")
    monkeypatch.delenv(SIGNING_KEY_ENV)
    unsigned = bundle_from_registry(f"models:/{NAME}/{version}", store.work / "unsigned")
    assert (bundle.dir / SIGNATURE_FILE).is_file() and not (unsigned.dir / SIGNATURE_FILE).exists()

    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    assert OnnxClassifier.load(bundle.dir, variant="int8").source.signed_by == key_fingerprint(public)
    with pytest.raises(SignatureError, match=r"bundle .*unsigned.* is not signed"):
        OnnxClassifier.load(unsigned.dir)
    sign_folder(unsigned.dir, attacker_private)
    with pytest.raises(SignatureError, match="does not verify"):
        OnnxClassifier.load(unsigned.dir)
    with pytest.raises(SignatureError, match="is not signed"):
        OnnxClassifier.load(store.work / "v1" / "model.onnx")  # the run folder's plain file: no signature beside it
    assert OnnxClassifier.load(bundle.dir / "model.onnx").source.signed_by == key_fingerprint(public)  # a file in a signed folder

    with pytest.raises(SignatureError, match=r"would be unsigned, and with GRAFT_VERIFY_KEY set .*set GRAFT_SIGNING_KEY .*nothing was written"):
        bundle_from_registry(f"models:/{NAME}/{version}", store.work / "consumer")  # a consumer holding the public key only
    assert not (store.work / "consumer").exists()


def test_unusable_keys_are_named_with_the_fix(store, keys, monkeypatch, tmp_path):  # noqa: F811
    (private, public), _ = keys
    monkeypatch.setenv(SIGNING_KEY_ENV, str(tmp_path / "missing.pem"))
    with pytest.raises(SignatureError, match=r"GRAFT_SIGNING_KEY=.*missing.pem names no file"):
        store.register("v1")
    assert store.client.search_model_versions(f"name = '{NAME}'") == []  # nothing registered unsigned instead
    monkeypatch.setenv(SIGNING_KEY_ENV, str(public))
    with pytest.raises(SignatureError, match="cannot sign with GRAFT_SIGNING_KEY"):
        store.register("v2")
    monkeypatch.delenv(SIGNING_KEY_ENV)
    version = store.register("v3")
    monkeypatch.setenv(VERIFY_KEY_ENV, str(private))
    with pytest.raises(SignatureError, match="is not a PEM public key"):
        OnnxClassifier.load(f"models:/{NAME}/{version}")
