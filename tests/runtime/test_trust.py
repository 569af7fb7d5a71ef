"""The trust chain from registration to every consumer: digests checked on every load, sources only from a
run's own folder, and what a consumer does with a champion the gate failed. Real MLflow on SQLite, real
onnxruntime, real files; the attacker writes to the artifact store, never to the registry database."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from components.core.errors import GraftError, IntegrityError, UntrustedSourceError
from components.core.files import sha256
from components.registry.versions import uri_inside
from components.runtime.model import OnnxClassifier
from components.runtime.trust import read_sidecar, sidecar_path, write_sidecar
from flows.cli import main
from tests.runtime.fixtures import NAME, image, store  # noqa: F401


def _swap_in(folder, target: str, replacement: str) -> tuple[str, str]:
    """Replace `target` in a version's artifact folder by another valid ONNX file; (recorded, new) digests."""
    before = sha256(folder / target)
    shutil.copyfile(folder / replacement, folder / target)
    return before, sha256(folder / target)


def test_registration_records_each_files_digest_in_the_registry_and_sidecars_beside_the_files(store):  # noqa: F811
    version = store.register("v1")
    tags = store.client.get_model_version(NAME, version).tags
    files = store.work / "v1"
    for name in ("model.onnx", "model.int8.onnx"):
        assert tags[f"sha256.{name}"] == sha256(files / name) == sha256(store.folder(version) / name)
        assert read_sidecar(files / name) == sha256(files / name)  # the files the deploy stage hands out
    assert sidecar_path(files / "model.onnx").read_text() == f"{sha256(files / 'model.onnx')}  model.onnx\n"  # sha256sum -c reads it
    assert "signature.key" not in tags  # signing is off


def test_a_tampered_fp32_file_is_refused_by_load_and_by_graft_predict_with_one_line(store, image, capsys):  # noqa: F811
    version = store.register("v1")
    store.client.set_registered_model_alias(NAME, "champion", version)
    assert OnnxClassifier.load(f"models:/{NAME}@champion").source.sha256 == sha256(store.work / "v1" / "model.onnx")
    recorded, now = _swap_in(store.folder(version), "model.onnx", "model.int8.onnx")  # the attack

    with pytest.raises(IntegrityError) as refused:
        OnnxClassifier.load(f"models:/{NAME}@champion")
    message = str(refused.value)
    assert f"{NAME} v{version}" in message and "model.onnx" in message and recorded in message and now in message
    assert "\n" not in message
    assert OnnxClassifier.load(f"models:/{NAME}@champion", variant="int8").source.variant == "int8"  # untouched file

    params = str(store.params_file())
    assert main(["predict", "--params", params, "--model", f"models:/{NAME}@champion", "--variant", "fp32", str(image)]) == 2
    out, err = capsys.readouterr()
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]  # MLflow's download bars aside
    assert out == "" and recorded in line and now in line
    assert main(["bundle", "--params", params, "--model", f"models:/{NAME}@champion", "--out", str(store.work / "bundle")]) == 2
    assert not (store.work / "bundle").exists()  # no bundle is written from an altered version


def test_a_tampered_variant_is_refused_and_the_untouched_fp32_still_loads(store, image, capsys):  # noqa: F811
    version = store.register("v1")
    recorded, now = _swap_in(store.folder(version), "model.int8.onnx", "model.onnx")
    with pytest.raises(IntegrityError, match=rf"{NAME} v{version}: model.int8.onnx has sha256 {now} but registration recorded {recorded}"):
        OnnxClassifier.load(f"models:/{NAME}/{version}", variant="int8")
    assert OnnxClassifier.load(f"models:/{NAME}/{version}").source.variant == "fp32"
    params = str(store.params_file())
    assert main(["predict", "--params", params, "--model", f"models:/{NAME}/{version}", "--variant", "int8", str(image)]) == 2
    assert "model.int8.onnx has sha256" in capsys.readouterr().err


def test_a_version_with_no_recorded_digest_is_refused(store):  # noqa: F811
    good = store.client.get_model_version(NAME, store.register("v1"))
    bare = store.client.create_model_version(NAME, good.source, run_id=good.run_id)  # registered outside Graft
    with pytest.raises(IntegrityError, match=r"records no sha256 for model.onnx .*sha256.model.onnx.*graft run"):
        OnnxClassifier.load(f"models:/{NAME}/{bare.version}")


def test_a_version_registered_before_digest_tags_is_checked_against_its_older_tags(store):  # noqa: F811
    good = store.client.get_model_version(NAME, store.register("v1"))
    listing = json.dumps({"int8": {"file": "model.int8.onnx", "sha256": good.tags["sha256.model.int8.onnx"]}})
    old = store.client.create_model_version(NAME, good.source, run_id=good.run_id,
                                            tags={"onnx.sha256": good.tags["sha256.model.onnx"], "onnx.variants": listing})
    assert OnnxClassifier.load(f"models:/{NAME}/{old.version}").source.sha256 == good.tags["sha256.model.onnx"]
    assert OnnxClassifier.load(f"models:/{NAME}/{old.version}", variant="int8").source.sha256 == good.tags["sha256.model.int8.onnx"]


def test_a_plain_file_is_checked_against_its_sidecar_and_loads_with_a_warning_without_one(store, caplog):  # noqa: F811
    fp32 = store.model_files("plain")
    write_sidecar(fp32)
    assert OnnxClassifier.load(fp32).source.sha256 == sha256(fp32)
    with caplog.at_level(logging.WARNING, logger="components.runtime.trust"):
        loaded = OnnxClassifier.load(fp32, variant="int8")  # no sidecar for the variant
    assert loaded.source.sha256 is None
    assert "model.int8.onnx has no sidecar model.int8.onnx.sha256" in caplog.text

    recorded = sha256(fp32)
    shutil.copyfile(fp32.with_name("model.int8.onnx"), fp32)
    with pytest.raises(IntegrityError, match=rf"model.onnx has sha256 {sha256(fp32)} but its sidecar model.onnx.sha256 says {recorded}"):
        OnnxClassifier.load(fp32)
    sidecar_path(fp32).write_text("not a digest\n")
    with pytest.raises(IntegrityError, match="is not '<sha256>  model.onnx'"):
        OnnxClassifier.load(fp32)


def test_a_variant_file_named_directly_is_that_variant_and_another_is_found_beside_it(store):  # noqa: F811
    fp32 = store.model_files("plain")
    int8 = fp32.with_name("model.int8.onnx")
    for variant in ("fp32", "int8", "auto"):  # the default (fp32) means the file named; auto on this CPU: int8
        loaded = OnnxClassifier.load(int8, variant=variant)
        assert (loaded.path, loaded.source.variant) == (int8, "int8")
    assert OnnxClassifier.load(fp32).source.variant == "fp32"
    with pytest.raises(GraftError, match=r"variant 'fp16' was not published for this model \(available: fp32, int8\)"):
        OnnxClassifier.load(int8, variant="fp16")


def test_a_tampered_bundle_file_is_refused(store):  # noqa: F811
    from components.core.errors import BundleError
    from components.runtime.bundle import bundle_from_registry

    version = store.register("v1")
    bundle = bundle_from_registry(f"models:/{NAME}/{version}", store.work / "bundle")
    assert OnnxClassifier.load(bundle.dir, variant="int8").source.sha256 == sha256(store.work / "v1" / "model.int8.onnx")
    shutil.copyfile(bundle.dir / "model.onnx", bundle.dir / "model.int8.onnx")
    with pytest.raises(BundleError, match="model.int8.onnx does not match its checksum"):
        OnnxClassifier.load(bundle.dir, variant="int8")


@pytest.mark.parametrize("where", ["etc", "climbs out", "encoded climb", "another run", "another run's model", "no run"])
def test_a_version_whose_source_lies_outside_its_runs_artifact_folder_is_refused(store, where):  # noqa: F811
    """CVE-2023-1177 and its bypasses: a version pointing elsewhere must not be read, whatever its tags say."""
    good = store.client.get_model_version(NAME, store.register("v1"))
    other = store.client.get_model_version(NAME, store.register("v2"))
    assert good.source.startswith("models:/m-")  # registered from the run's MLflow LoggedModel
    root = store.client.get_run(good.run_id).info.artifact_uri
    source, run_id = {
        "etc": ("file:///etc/", good.run_id),
        "climbs out": (f"{root}/../../../../../etc", good.run_id),
        "encoded climb": (f"{root}/%252e%252e/%2e%2e/model", good.run_id),
        "another run": (good.source, other.run_id),
        "another run's model": (other.source, good.run_id),
        "no run": (f"{root}/model", None),
    }[where]
    hostile = store.client.create_model_version(NAME, source, run_id=run_id, tags=dict(good.tags))  # the SQLite store accepts it
    with pytest.raises(UntrustedSourceError, match=rf"{NAME} v{hostile.version}.*refusing to load it"):
        OnnxClassifier.load(f"models:/{NAME}/{hostile.version}")


def test_uri_inside_judges_decoded_clean_paths():
    root = "file:///srv/mlflow/artifacts/1/abc/artifacts"
    assert uri_inside(f"{root}/model", root) and uri_inside(root, root) and uri_inside("/srv/mlflow/artifacts/1/abc/artifacts/model", root)
    for outside in (f"{root}/../x", f"{root}/%2E%2E/x", f"{root}/%252e%252e/x", f"{root}x/model", f"{root}/model?x=1",
                    f"{root}/model#f", "file:///etc", f"s3://bucket{root[7:]}/model", f"{root}/a\\..\\b"):
        assert not uri_inside(outside, root), outside
    assert uri_inside("mlflow-artifacts:/1/abc/artifacts/model", "mlflow-artifacts:/1/abc/artifacts")


def test_graft_registers_only_from_its_own_runs_artifact_folder(store):  # noqa: F811
    from components.deploy.register import LoggedModel, log_onnx_model, register_version

    run, other = store.run(), store.run()
    logged = log_onnx_model(run, store.model_files("v1"), 8, 3, ("int8",))
    for hostile in (LoggedModel("file:///etc/", run.run_id, logged.sha256), LoggedModel(logged.source, other.run_id, logged.sha256),
                    LoggedModel(f"{run.artifact_uri()}/../../{other.run_id}/artifacts/model", run.run_id, logged.sha256)):
        with pytest.raises(UntrustedSourceError, match="Graft registers only models logged by the run itself"):
            register_version(run, NAME, hostile, {}, "hostile")
    assert store.client.search_model_versions(f"name = '{NAME}'") == []


def test_promote_refuses_a_hostile_source_and_an_altered_file_with_every_reason(store):  # noqa: F811
    from components.core.errors import PromotionError
    from components.deploy.promotion import promote

    good = store.client.get_model_version(NAME, store.register("v1"))
    hostile = store.client.create_model_version(NAME, "file:///etc/", run_id=good.run_id, tags=dict(good.tags))
    with pytest.raises(PromotionError, match=r"lies outside the artifact folder.*no champion was set"):
        promote(store.client, store.params, NAME, hostile.version, "should fail")
    recorded, now = _swap_in(store.folder(good.version), "model.onnx", "model.int8.onnx")
    with pytest.raises(PromotionError, match=rf"model.onnx has sha256 {now}, registration recorded {recorded}"):
        promote(store.client, store.params, NAME, good.version, "should fail")


def test_a_champion_the_gate_failed_is_followed_with_a_warning_and_graft_history_shows_it(store, caplog, capsys):  # noqa: F811
    from components.registry.history import move_alias

    first = store.register("v1")
    move_alias(store.client, NAME, first, "gate", "graft run test", "first model")
    failed = store.register("v2", tags={"gate.verdict": "keep champion", "gate.reasons": "KEEP CHAMPION: accuracy 0.610 is below the floor 0.800"})
    store.client.set_registered_model_alias(NAME, "champion", failed)  # by hand, in the MLflow UI

    with caplog.at_level(logging.WARNING, logger="components.runtime.model"):
        model = OnnxClassifier.load(f"models:/{NAME}@champion")
    assert model.source.version == failed  # the user's call is followed
    assert f"champion of {NAME} is v{failed} although the gate did not promote it (KEEP CHAMPION: accuracy 0.610" in model.source.warning
    assert "moved there outside Graft" in model.source.warning and model.source.warning in caplog.text
    assert OnnxClassifier.load(f"models:/{NAME}/{failed}").source.warning is None  # asked for by number: no alias to question

    assert main(["history", "--params", str(store.params_file()), "--name", NAME]) == 0
    out = capsys.readouterr().out
    assert f"champion -> v{failed}  moved outside Graft" in out
    assert f"! v{failed}: the gate did not promote it (KEEP CHAMPION: accuracy 0.610" in out
    move_alias(store.client, NAME, first, "rollback", "test", "back")  # the hand move is recorded at the next move
    assert main(["history", "--params", str(store.params_file()), "--name", NAME]) == 0
    out = capsys.readouterr().out
    assert f"-> v{failed}  manual by" in out and f"! v{failed}: the gate did not promote it" in out and "not yet in the history" not in out


def test_auto_loads_the_registered_fp32_file_instead_of_an_int8_file_this_cpu_would_run_saturated(store, monkeypatch, caplog):  # noqa: F811
    import components.runtime.cpu as cpu

    version = store.register("v1", variant_metadata={"graft.int8_weight_bits": "8", "graft.int8_built_on": "a build machine with VNNI"})
    store.client.set_registered_model_alias(NAME, "champion", version)
    real = cpu.cpu_facts()
    monkeypatch.setattr(cpu, "cpu_facts", lambda: cpu.CpuFacts(real.model, real.cores, ("avx2", "fma")))
    with caplog.at_level(logging.WARNING):
        model = OnnxClassifier.load(f"models:/{NAME}@champion", variant="auto")
    assert model.source.variant == "fp32" and model.source.version == version
    assert model.source.sha256 == store.client.get_model_version(NAME, version).tags["sha256.model.onnx"]  # checked like any load
    assert "a build machine with VNNI" in model.source.note and "deploy.int8_weight_bits: 7" in caplog.text
    monkeypatch.setattr(cpu, "cpu_facts", lambda: cpu.CpuFacts(real.model, real.cores, ("avx2", "avx512_vnni")))
    assert OnnxClassifier.load(f"models:/{NAME}@champion", variant="auto").source.variant == "int8"


@pytest.mark.parametrize("uri", ["models:/graft-digits/latest", "models:/graft-digits/8/model.onnx", "models:/m-0123456789abcdef0123456789abcdef"])
def test_registry_addresses_graft_cannot_check_are_refused_naming_the_ones_it_can(uri):
    """Only a version or an alias is checked against the registry's sha256 tags; another form would load unchecked files."""
    from components.core.errors import GraftError
    from components.runtime.model import OnnxClassifier

    with pytest.raises(GraftError, match=r"names no registered version Graft can check .*models:/NAME/3\) or an alias \(models:/NAME@champion\)"):
        OnnxClassifier.load(uri)
