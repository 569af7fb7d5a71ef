"""`graft serve`: a real uvicorn server on 127.0.0.1 answering real requests, refusing bad ones, following the alias."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from components.serve.server import LiveModel, ServeSettings, running_server
from tests.conftest import REPO
from tests.deploy.fixtures import NAME, active_registry, registry, tiny_model  # noqa: F401
from tests.models import png_claiming

LIMIT = 64 * 1024


@pytest.fixture
def server(active_registry):  # noqa: F811
    active_registry.client.set_registered_model_alias(NAME, "champion", active_registry.v1)
    settings = ServeSettings(poll_seconds=0.2, max_upload_bytes=LIMIT, max_batch=4, timeout_seconds=10)
    live = LiveModel(f"models:/{NAME}@champion")
    with running_server(live, settings) as url, httpx.Client(base_url=url, timeout=10) as http:
        yield http


def _png(path) -> bytes:
    return path.read_bytes()


def _truth(tiny_model, count):  # noqa: F811
    samples = tiny_model.split.val[:count]
    return [s.path for s in samples], [tiny_model.split.classes[s.label] for s in samples]


def test_answers_uploads_json_batches_and_raw_bodies(server, tiny_model):  # noqa: F811
    paths, truth = _truth(tiny_model, 4)
    one = server.post("/predict", files={"file": ("a.png", _png(paths[0]), "image/png")})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["model"]["version"] and body["model"]["variant"] == "fp32"
    assert body["predictions"][0]["label"] == truth[0] and 0 < body["predictions"][0]["score"] <= 1
    batch = server.post("/predict", json={"images": [base64.b64encode(_png(p)).decode() for p in paths]})
    assert batch.status_code == 200
    labels = [row["label"] for row in batch.json()["predictions"]]
    assert sum(a == b for a, b in zip(labels, truth)) >= 3
    raw = server.post("/predict", content=_png(paths[1]), headers={"content-type": "image/png"})
    assert raw.status_code == 200 and raw.json()["predictions"][0]["label"] == labels[1]
    health, meta = server.get("/health").json(), server.get("/metadata").json()
    assert health["status"] == "ok" and health["model"]["provider"] == "CPUExecutionProvider"
    assert meta["classes"] == ["0", "1", "7"] and meta["image_size"] == 64 and len(meta["mean"]) == 3
    assert meta["limits"]["max_batch"] == 4


def test_the_serve_settings_come_from_params_yaml_each_to_its_place():
    from components.core.config import load_params

    params = load_params(REPO / "params.yaml", ["deploy.serve_poll_seconds=2.5", "deploy.serve_max_upload_mb=3",
                                                "deploy.serve_max_batch=7", "deploy.serve_timeout_seconds=4.5"])
    assert ServeSettings.from_params(params, "int8") == ServeSettings(2.5, 3 * 1024 * 1024, 7, 4.5, "int8")


def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(server, tiny_model):  # noqa: F811
    paths, _ = _truth(tiny_model, 1)
    noisy = io.BytesIO()
    Image.effect_noise((400, 400), 80).convert("RGB").save(noisy, "PNG")
    cases = {
        "non-image": (server.post("/predict", files={"file": ("notes.txt", b"hello, not a picture", "text/plain")}), 415, "not a readable image"),
        "empty": (server.post("/predict", files={"file": ("empty.png", b"", "image/png")}), 400, "empty upload"),
        "oversized": (server.post("/predict", files={"file": ("big.png", noisy.getvalue(), "image/png")}), 413, "byte limit"),
        "bomb": (server.post("/predict", files={"file": ("bomb.png", png_claiming(9000, 8000), "image/png")}), 413, "9000x8000 pixels is over the 64,000,000-pixel limit"),
        "too many": (server.post("/predict", json={"images": [base64.b64encode(_png(paths[0])).decode()] * 5}), 413, "deploy.serve_max_batch"),
        "too many files": (server.post("/predict", files=[("file", ("a.png", _png(paths[0]), "image/png"))] * 5), 413, "deploy.serve_max_batch"),
        "bad base64": (server.post("/predict", json={"images": ["***"]}), 400, "not valid base64"),
        "bad json": (server.post("/predict", content=b"{", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        "no files": (server.post("/predict", files={"note": (None, "just text")}), 400, "no image"),
        "wrong type": (server.post("/predict", content=b"x", headers={"content-type": "text/csv"}), 415, "not accepted"),
    }
    for case, (response, status, words) in cases.items():
        assert response.status_code == status, (case, response.text)
        assert words in response.json()["error"], case
        assert "Traceback" not in response.text
    ok = server.post("/predict", files={"file": ("a.png", _png(paths[0]), "image/png")})
    assert ok.status_code == 200 and server.get("/health").json()["status"] == "ok"


def test_reloads_when_the_champion_alias_moves(server, active_registry, tiny_model):  # noqa: F811
    paths, _ = _truth(tiny_model, 2)
    before = server.get("/health").json()["model"]["version"]
    assert before == active_registry.v1
    active_registry.client.set_registered_model_alias(NAME, "champion", active_registry.v2)
    deadline = time.monotonic() + 20
    while server.get("/health").json()["model"]["version"] != active_registry.v2:
        assert time.monotonic() < deadline, "the server did not follow the alias"
        time.sleep(0.2)
    rows = server.post("/predict", json={"images": [base64.b64encode(_png(p)).decode() for p in paths]}).json()["predictions"]
    assert [row["label"] for row in rows] == ["7", "7"]  # v2 always answers '7'
    assert server.get("/health").json()["reloads"] == 1


def test_a_move_in_the_mlflow_ui_is_recorded_by_graft_serve_and_the_model_page_follows(server, active_registry):  # noqa: F811
    """The promoter moves `champion` in the UI; the server that follows it also records the move in the alias history
    and rewrites the model page, instead of leaving both for Graft's next move."""
    from components.registry.history import read_history

    client, v1, v2 = active_registry.client, active_registry.v1, active_registry.v2

    def wait_for(what: str, done) -> None:  # noqa: ANN001
        deadline = time.monotonic() + 30
        while not done():
            assert time.monotonic() < deadline, what
            time.sleep(0.2)

    try:
        wait_for("the history does not reach v1", lambda: read_history(client, NAME)[-1].version == v1)  # the fixture's hand move
        recorded = len(read_history(client, NAME))
        client.set_registered_model_alias(NAME, "champion", v2)
        wait_for("the move was not recorded", lambda: len(read_history(client, NAME)) > recorded)
        assert server.get("/health").json()["model"]["version"] == v2
        last = read_history(client, NAME)[-1]
        assert (last.action, last.why) == ("manual", "moved outside Graft; noticed by graft serve")
        wait_for("the model page still names the old champion", lambda: f"**Champion: v{v2}**" in client.get_registered_model(NAME).description)
        client.delete_registered_model_alias(NAME, "champion")
        wait_for("the removal was not recorded", lambda: read_history(client, NAME)[-1].removed)
        wait_for("the model page still names a champion", lambda: "**No champion**" in client.get_registered_model(NAME).description)
        assert server.get("/health").json()["model"]["version"] == v2  # the last good model keeps serving
    finally:
        client.set_registered_model_alias(NAME, "champion", v1)


def test_a_request_over_the_time_limit_gets_504(active_registry, tiny_model):  # noqa: F811
    paths, _ = _truth(tiny_model, 1)
    settings = ServeSettings(poll_seconds=60, max_upload_bytes=LIMIT, max_batch=4, timeout_seconds=1e-6)
    with running_server(LiveModel(str(tiny_model.onnx_path)), settings) as url:
        response = httpx.post(f"{url}/predict", files={"file": ("a.png", _png(paths[0]), "image/png")}, timeout=10)
        assert response.status_code == 504 and "deploy.serve_timeout_seconds" in response.json()["error"]
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def _big_jpeg() -> bytes:
    """A 1,500 x 1,500 JPEG: small on the wire, tens of milliseconds to decode and resize."""
    out = io.BytesIO()
    Image.linear_gradient("L").resize((1500, 1500)).convert("RGB").save(out, "JPEG", quality=80)
    return out.getvalue()


def test_a_request_past_its_time_limit_stops_its_work_and_frees_the_worker(tiny_model, caplog):  # noqa: F811
    """The 504 comes at the time limit; the decoding behind it stops there too, not after the last image."""
    count, data = 200, _big_jpeg()
    settings = ServeSettings(poll_seconds=60, max_upload_bytes=2 * count * len(data), max_batch=count, timeout_seconds=0.3)
    caplog.set_level("INFO", logger="components.serve.server")
    with running_server(LiveModel(str(tiny_model.onnx_path)), settings) as url:
        response = httpx.post(f"{url}/predict", json={"images": [base64.b64encode(data).decode()] * count}, timeout=60)
        assert response.status_code == 504, response.text
        answered = time.monotonic()
        while not any("stopped a request's work" in r.getMessage() for r in caplog.records):
            assert time.monotonic() - answered < 10, "the worker went on decoding after the 504"
            time.sleep(0.05)
        assert "between images" in next(r.getMessage() for r in caplog.records if "stopped a request's work" in r.getMessage())
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"


def test_large_uploads_sent_at_once_decode_within_the_servers_pixel_budget_and_all_answer(tiny_model, monkeypatch):  # noqa: F811
    """Six requests at once, each with a 1,500 x 1,500 image (2.25 M pixels), on a budget of 3 M pixels: the images
    decode one at a time (a small one passes beside a large one) and every request is answered. Decoded pixels held at
    once are counted where Pillow converts them, outside the budget's own bookkeeping."""
    import threading

    import components.serve.server as server

    monkeypatch.setattr(server.DECODING, "capacity", 3_000_000)
    held, lock, real = {"now": 0, "most": 0}, threading.Lock(), server.to_rgb

    def converting(image):  # noqa: ANN001, ANN202 - what decode_image does with each decoded image
        with lock:
            held["now"] += image.width * image.height
            held["most"] = max(held["most"], held["now"])
        try:
            time.sleep(0.1)  # long enough that the requests' decodes would overlap without the budget
            return real(image)
        finally:
            with lock:
                held["now"] -= image.width * image.height

    monkeypatch.setattr(server, "to_rgb", converting)
    big, small = _big_jpeg(), _png(_truth(tiny_model, 1)[0][0])
    settings = ServeSettings(poll_seconds=60, max_upload_bytes=4 * len(big), max_batch=4, timeout_seconds=30)
    with running_server(LiveModel(str(tiny_model.onnx_path)), settings) as url:
        def post(data: bytes) -> int:
            return httpx.post(f"{url}/predict", content=data, headers={"content-type": "image/jpeg"}, timeout=60).status_code

        answers = []
        threads = [threading.Thread(target=lambda d=d: answers.append(post(d))) for d in [big] * 6 + [small]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert answers == [200] * 7
    assert 1500 * 1500 <= held["most"] <= 3_000_000, held
    assert server.DECODING.used == 0


def test_a_large_image_waiting_for_the_pixel_budget_is_not_overtaken_by_small_ones():
    """First come, first served: with a small image decoding, a large one waits for the whole budget, and a small one
    that comes after it waits behind it although it would fit; else a stream of small images would hold the large
    one back until its request timed out."""
    import threading

    from components.serve.server import PixelBudget

    budget, order, first_in = PixelBudget(capacity=10), [], threading.Event()
    release = threading.Event()

    def decode(name: str, pixels: int, hold: threading.Event | None = None) -> None:
        with budget.hold(pixels):
            order.append(name)
            if hold is not None:
                first_in.set()
                hold.wait(5)

    threads = [threading.Thread(target=decode, args=("small, first", 6, release))]
    threads[0].start()
    assert first_in.wait(5)
    for name, pixels in (("large", 10), ("small, after the large one", 2)):
        threads.append(threading.Thread(target=decode, args=(name, pixels)))
        threads[-1].start()
        deadline = time.monotonic() + 5
        while len(budget._queue) < len(threads) - 1:  # queued before the next one asks
            assert time.monotonic() < deadline
            time.sleep(0.01)
    release.set()
    for thread in threads:
        thread.join(5)
    assert order == ["small, first", "large", "small, after the large one"] and budget.used == 0


def test_a_stop_ends_a_run_onnxruntime_has_in_flight(tiny_model):  # noqa: F811
    """`Stop` (what a request past its time limit sets) ends onnxruntime's run itself, not only the loop around it."""
    import threading

    from components.runtime.model import OnnxClassifier, Stop

    model = OnnxClassifier(tiny_model.onnx_path)
    images = np.zeros((2048, model.image_size, model.image_size, 3), np.uint8)  # one run of a second or more
    stop = Stop()
    threading.Timer(0.05, stop.stop).start()
    with pytest.raises(Exception, match="terminate flag"):
        model.predict_proba(images, batch_size=len(images), stop=stop)
    assert model.predict_proba(images[:2]).shape == (2, 3)  # the session serves the next request as before


def test_graft_serve_against_a_registry_that_is_gone_stops_with_one_line_in_seconds(tmp_path):
    """Under Graft's own four tries, MLflow's HTTP retries (seven, backing off to minutes) would keep `graft serve`
    starting, and a running one reporting a healthy registry, for many minutes: every command turns them off."""
    from tests import services

    env = {**services.clean_env(), "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{services.free_port()}"}
    env.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "--model", "models:/gone@champion", "--port", str(services.free_port())],
                          cwd=tmp_path, capture_output=True, text=True, timeout=150, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: reading alias 'champion' of 'gone' failed 4 times")
    assert "Ctrl-C stops it" not in done.stdout  # nothing claims to serve a model that never loaded


def test_graft_serve_imports_no_torch():
    code = (
        "import sys; from flows.cli import build_parser; build_parser();"
        "import components.serve.server, uvicorn, fastapi; from components.serve.server import create_app;"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
