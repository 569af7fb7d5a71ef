"""Screenshots of what a promoter meets in MLflow's own UI, taken again after any change to the registry's pages.

    .venv/bin/python scripts/mlflow_screenshots.py                    # the project's store (after `make run`)
    .venv/bin/python scripts/mlflow_screenshots.py --fresh /tmp/demo  # two `graft run`s on the demo data first

Starts a real `mlflow server` on the store, drives headless Chromium (Debian's `chromium` package) over the
DevTools protocol, switches MLflow 3's UI from its GenAI mode to *Model training*, closes its assistant panel,
and writes PNGs to `docs/images/`: the registered model's page, the champion's version page, its run, the model
card in MLflow's artifact viewer (the HTML card at its pictures, the Markdown card at its variants table) and the
runs table.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--hide-scrollbars", "--remote-debugging-port=0")
WIDTH, HEIGHT = 1440, 1000


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds:.0f} s")


@contextmanager
def mlflow_server(store_dir: Path) -> Iterator[str]:
    """`mlflow server` on the SQLite store and artifacts under `store_dir`, on a free localhost port."""
    port = free_port()
    log = open(store_dir / "screenshots-mlflow.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store_dir / 'mlflow.db'}",
         "--default-artifact-root", str(store_dir / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", 120)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


class Browser:
    """Headless Chromium driven over the DevTools protocol: navigate, run JavaScript, take screenshots."""

    def __init__(self, profile: Path) -> None:
        from websockets.sync.client import connect

        chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if chromium is None:
            raise SystemExit("error: no chromium on PATH; apt-get install chromium")
        self.process = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}",
                                         "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        endpoint = None
        for line in self.process.stderr:
            if line.startswith("DevTools listening on "):
                endpoint = line.split()[-1]
                break
        if endpoint is None:
            raise SystemExit("error: chromium did not start its DevTools endpoint")
        http_root = endpoint.replace("ws://", "http://").split("/devtools/")[0]
        with urllib.request.urlopen(f"{http_root}/json/list", timeout=10) as response:
            page = next(target for target in json.loads(response.read()) if target["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024)
        self.ids = itertools.count(1)
        self.events: list[dict] = []
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, session: str | None = None, **params: object) -> dict:
        """One DevTools command (`session`: a frame attached with `frame_session`); events seen meanwhile are kept."""
        message_id = next(self.ids)
        message = {"id": message_id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        self.socket.send(json.dumps(message))
        while True:
            answer = json.loads(self.socket.recv())
            if answer.get("id") == message_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            if "method" in answer:
                self.events.append(answer)

    def evaluate(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def open(self, url: str, text: str, seconds: float = 60) -> None:
        """Go to `url` and wait until the page shows `text` (MLflow's UI renders after the page has loaded).

        Each page is loaded whole (through about:blank): MLflow's routes differ only after `#`, and a route
        change keeps the previous page's text on screen for a while."""
        self.call("Page.navigate", url="about:blank")
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + seconds
        while not self.evaluate(f"document.body && document.body.innerText.includes({json.dumps(text)})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} never showed {text!r}")
            time.sleep(0.3)
        time.sleep(1.5)  # images and late panels

    def wait_for(self, condition: str, seconds: float = 60) -> None:
        """Wait until the JavaScript `condition` holds in the page (a route change keeps the old text a while)."""
        deadline = time.monotonic() + seconds
        while not self.evaluate(condition):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never met {condition!r}")
            time.sleep(0.3)

    def click_text(self, text: str) -> bool:
        """Click the innermost element whose whole text is `text`; False when there is none."""
        return bool(self.evaluate(f"""(() => {{
            const all = [...document.querySelectorAll('button, [role=radio], [role=tab], label, a, span, div')]
              .filter(e => e.textContent.trim() === {json.dumps(text)} && e.offsetParent !== null);
            const target = all.find(e => ![...e.children].some(c => c.textContent.trim() === {json.dumps(text)})) || all[0];
            if (!target) return false;
            target.click();
            return true;
        }})()"""))

    def close_assistant(self) -> None:
        """Keep MLflow's assistant panel closed (it would take a third of every shot): it remembers that in
        localStorage, read when the page loads."""
        self.evaluate("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false')")
        self.call("Page.reload", ignoreCache=True)
        time.sleep(3)

    def scroll_to_heading(self, text: str) -> bool:
        """Scroll the page until the heading reading `text` is at the top of its panel."""
        found = self.evaluate(f"""(() => {{
            const h = [...document.querySelectorAll('h1, h2, h3')].find(e => e.textContent.trim() === {json.dumps(text)});
            if (!h) return false;
            h.scrollIntoView();
            return true;
        }})()""")
        time.sleep(0.8)
        return bool(found)

    def frame_session(self) -> str | None:
        """A DevTools session on the page's child frame: MLflow shows an HTML artifact in a sandboxed frame, which
        Chromium runs in a process of its own, so it is reached by attaching to it."""
        self.events.clear()
        self.call("Target.setAutoAttach", autoAttach=True, waitForDebuggerOnStart=False, flatten=True)
        time.sleep(0.5)
        self.call("Runtime.evaluate", expression="1")  # collects the attach events
        attached = [e["params"] for e in self.events if e.get("method") == "Target.attachedToTarget"]
        frame = next((a["sessionId"] for a in attached if a["targetInfo"]["type"] == "iframe"), None)
        return frame

    def scroll_frame(self, selector: str) -> bool:
        """Scroll the child frame until `selector` is at its top."""
        session = self.frame_session()
        if session is None:
            return False
        result = self.call("Runtime.evaluate", session=session, returnByValue=True,
                           expression=f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                                      "if (!e) return false; e.scrollIntoView(); window.scrollBy(0, -8); return true; })()")
        time.sleep(0.8)
        return bool(result.get("result", {}).get("value"))

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
        return path

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=30)


def fresh_store(folder: Path) -> Path:
    """Two `graft run`s of the demo data into `folder`: v1 becomes champion, v2 (the same model again) challenger."""
    folder.mkdir(parents=True, exist_ok=True)
    overrides = [f"tracking.store_dir={folder / 'mlflow'}", f"deploy.output_dir={folder / 'outputs'}"]
    for _ in range(2):
        args = [str(BIN / "graft"), "run", "--params", str(REPO / "params.yaml")]
        for item in overrides:
            args += ["--set", item]
        subprocess.run(args, cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return folder / "mlflow"


def take(store_dir: Path, out_dir: Path, name: str) -> list[Path]:
    """The screenshots of model `name` in the store at `store_dir`, written to `out_dir`."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{store_dir / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    champion = client.get_model_version_by_alias(name, "champion")
    experiment = client.get_run(champion.run_id).info.experiment_id
    written = []
    with mlflow_server(store_dir) as server, tempfile.TemporaryDirectory(prefix="graft-chromium-", ignore_cleanup_errors=True) as profile:
        browser = Browser(Path(profile))
        try:
            browser.open(f"{server}/#/models/{name}", "Versions")
            browser.click_text("Model training")  # MLflow 3 opens in its GenAI mode
            browser.close_assistant()
            browser.open(f"{server}/#/models/{name}", "Versions")
            written.append(browser.screenshot(out_dir / "mlflow-model-page.png"))
            browser.open(f"{server}/#/models/{name}/versions/{champion.version}", "Description")
            written.append(browser.screenshot(out_dir / "mlflow-version-page.png"))
            browser.open(f"{server}/#/experiments/{experiment}/runs/{champion.run_id}", "About this run")
            written.append(browser.screenshot(out_dir / "mlflow-run-page.png"))
            browser.open(f"{server}/#/experiments/{experiment}/runs", "Run Name")
            written.append(browser.screenshot(out_dir / "mlflow-runs.png"))
            card = f"{server}/#/experiments/{experiment}/runs/{champion.run_id}/artifacts/model_card"
            browser.open(f"{card}/model_card.md", "Variants")
            browser.scroll_to_heading("Variants")  # the variants table, and links that open in MLflow
            written.append(browser.screenshot(out_dir / "mlflow-model-card-markdown.png"))
            browser.open(f"{card}/model_card.html", "model_card.html")
            browser.wait_for("document.querySelector('iframe') !== null")  # the HTML card renders inside its own frame
            time.sleep(2)
            browser.scroll_frame("figure")  # its pictures, inside the page (attaching to the frame comes last)
            written.append(browser.screenshot(out_dir / "mlflow-model-card.png"))
        finally:
            browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=REPO / "mlflow", help="the MLflow store folder (mlflow.db, artifacts/)")
    parser.add_argument("--fresh", type=Path, metavar="DIR", help="first run `graft run` twice on the demo data into DIR, and use that store")
    parser.add_argument("--name", default="graft-digits", help="the registered model to show")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args(argv)
    store = fresh_store(args.fresh.resolve()) if args.fresh else args.store.resolve()
    if not (store / "mlflow.db").is_file():
        raise SystemExit(f"error: no MLflow store at {store / 'mlflow.db'}; run `make run` first, or pass --fresh DIR")
    take(store, args.out.resolve(), args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
