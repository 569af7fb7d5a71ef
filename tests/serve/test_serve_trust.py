"""`graft serve` never swaps in a model that fails its checks: it keeps the last good one and says so in
its log and in /health; a champion the gate failed is served, with a warning. A real uvicorn server."""

from __future__ import annotations

import logging
import shutil

import httpx

from components.core.files import sha256
from components.runtime.signing import SIGNING_KEY_ENV, VERIFY_KEY_ENV
from components.serve.server import LiveModel, ServeSettings, running_server
from tests.runtime.fixtures import NAME, image, key_pair, store  # noqa: F401

SETTINGS = ServeSettings(poll_seconds=3600, max_upload_bytes=1 << 20, max_batch=4, timeout_seconds=10)  # refresh() is called by hand


def _predict(http: httpx.Client, image_path) -> dict:  # noqa: F811
    response = http.post("/predict", files={"file": ("digit.png", image_path.read_bytes(), "image/png")})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_tampered_new_champion_is_refused_and_the_last_good_model_keeps_serving(store, image, caplog):  # noqa: F811
    good = store.register("v1")
    store.client.set_registered_model_alias(NAME, "champion", good)
    live = LiveModel(f"models:/{NAME}@champion")
    with running_server(live, SETTINGS) as url, httpx.Client(base_url=url, timeout=10) as http:
        assert http.get("/health").json()["status"] == "ok"
        for variant in ("model.onnx", "model.int8.onnx"):  # the fp32 file, then a variant, of a new version
            served = LiveModel(f"models:/{NAME}@champion", variant="int8" if "int8" in variant else "fp32")
            bad = store.register(f"bad-{variant}")
            folder = store.folder(bad)
            other = "model.int8.onnx" if variant == "model.onnx" else "model.onnx"
            recorded = sha256(folder / variant)
            shutil.copyfile(folder / other, folder / variant)
            store.client.set_registered_model_alias(NAME, "champion", bad)
            assert not served.refresh()
            assert served.model.source.version == good and served.refused_version == bad
            assert recorded in served.last_error and sha256(folder / variant) in served.last_error
            store.client.set_registered_model_alias(NAME, "champion", good)
            assert not served.refresh() and served.last_error is None  # the alias is back on what is served

        bad = store.register("bad-served")
        shutil.copyfile(store.folder(bad) / "model.int8.onnx", store.folder(bad) / "model.onnx")  # the attack
        store.client.set_registered_model_alias(NAME, "champion", bad)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="components.serve.server"):
            assert not live.refresh() and not live.refresh()  # polled twice
        refusals = [r for r in caplog.records if r.getMessage().startswith("refused")]
        assert len(refusals) == 1 and f"still serving the last good model, v{good}" in refusals[0].getMessage()  # logged once
        health = http.get("/health").json()
        assert health["status"] == "degraded" and health["model"]["version"] == good and health["refused_version"] == bad
        assert "model.onnx has sha256" in health["last_reload_error"] and "registration recorded" in health["last_reload_error"]
        assert _predict(http, image)["model"]["version"] == good  # still answering, with the old model


def test_a_refused_version_is_fetched_again_only_when_its_tags_change_or_minutes_pass(store, monkeypatch):  # noqa: F811
    """Each check of a version downloads its files (with signatures on, the whole folder): a refused one the alias keeps
    naming is left alone, not fetched at every poll on every replica, until its tags change or `REFUSED_RECHECK_SECONDS` pass."""
    import components.serve.server as server

    good = store.register("v1")
    store.client.set_registered_model_alias(NAME, "champion", good)
    live = LiveModel(f"models:/{NAME}@champion")
    bad = store.register("bad")
    shutil.copyfile(store.folder(bad) / "model.int8.onnx", store.folder(bad) / "model.onnx")
    store.client.set_registered_model_alias(NAME, "champion", bad)
    fetched = []
    load = server.OnnxClassifier.load.__func__
    monkeypatch.setattr(server.OnnxClassifier, "load", classmethod(lambda cls, *args, **kwargs: (fetched.append(args[0]), load(cls, *args, **kwargs))[1]))

    assert not any(live.refresh() for _ in range(3))
    assert live.refused_version == bad and len(fetched) == 1 and live.last_check is not None  # polled three times, fetched once
    store.client.set_model_version_tag(NAME, bad, "note", "files restored")  # someone did something to that version
    assert not live.refresh() and len(fetched) == 2
    assert not live.refresh() and len(fetched) == 2
    refusal = live.last_error
    store.client.set_registered_model_alias(NAME, "champion", good)  # back on what is served: nothing is refused
    assert not live.refresh() and live.refused_version is None and live.last_error is None
    store.client.set_registered_model_alias(NAME, "champion", bad)  # and onto the refused one again: still refused, not fetched
    assert not live.refresh() and len(fetched) == 2 and (live.refused_version, live.last_error) == (bad, refusal)
    monkeypatch.setattr(server, "REFUSED_RECHECK_SECONDS", 0.0)
    assert not live.refresh() and len(fetched) == 3 and live.model.source.version == good


def test_a_signed_server_refuses_an_unsigned_new_version(store, tmp_path, monkeypatch):  # noqa: F811
    private, public = key_pair(tmp_path / "keys", "team")
    monkeypatch.setenv(SIGNING_KEY_ENV, str(private))
    signed = store.register("signed")
    monkeypatch.delenv(SIGNING_KEY_ENV)
    unsigned = store.register("unsigned")
    monkeypatch.setenv(VERIFY_KEY_ENV, str(public))
    store.client.set_registered_model_alias(NAME, "champion", signed)
    live = LiveModel(f"models:/{NAME}@champion")
    assert live.model.source.signed_by
    store.client.set_registered_model_alias(NAME, "champion", unsigned)
    assert not live.refresh()
    assert live.model.source.version == signed and live.refused_version == unsigned and "is not signed" in live.last_error


def test_a_champion_moved_by_hand_onto_a_version_the_gate_failed_is_served_with_a_warning(store, image, caplog):  # noqa: F811
    good = store.register("v1")
    store.client.set_registered_model_alias(NAME, "champion", good)
    failed = store.register("v2", tags={"gate.verdict": "keep champion", "gate.reasons": "KEEP CHAMPION: macro_f1 0.51 is below the floor 0.70"})
    live = LiveModel(f"models:/{NAME}@champion")
    with running_server(live, SETTINGS) as url, httpx.Client(base_url=url, timeout=10) as http:
        assert http.get("/health").json()["warning"] is None
        store.client.set_registered_model_alias(NAME, "champion", failed)  # in the MLflow UI
        with caplog.at_level(logging.WARNING):
            assert live.refresh()
        assert f"champion of {NAME} is v{failed} although the gate did not promote it (KEEP CHAMPION: macro_f1 0.51" in caplog.text
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["model"]["version"] == failed
        assert "the gate did not promote it" in health["warning"]
        assert _predict(http, image)["model"]["version"] == failed
