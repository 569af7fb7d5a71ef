"""A loopback HTTP server that serves weights files as download.pytorch.org and the Hugging Face Hub do.

Files are added by the test that wrote them; a fault can be set per file: `corrupt` sends
other bytes than the ones published (same size), `cut` sends half the body then drops the
connection and answers 503 afterwards (a transfer interrupted by a failing network). Every
request is recorded, so a test can tell a cache hit (no request) from a download.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HUB_PATH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>.+)$")


@dataclass
class Served:
    content: bytes
    commit: str | None = None
    """The Hub commit the file belongs to; None for a plain file (torch hub)."""
    fault: str | None = None


@dataclass
class WeightsServer:
    """Files by URL path, the faults to inject, and the requests received."""

    files: dict[str, Served] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_file(self, path: str, content: bytes, fault: str | None = None) -> str:
        """Serve `content` at `path` (torch hub style); returns its URL."""
        self.files[path] = Served(content, fault=fault)
        return self.address + path

    def add_hub_file(self, repo_id: str, file_name: str, content: bytes, commit: str, fault: str | None = None) -> None:
        """Serve `content` as `file_name` of Hub repository `repo_id` at revision `main` = `commit`."""
        self.files[f"{repo_id}/{file_name}"] = Served(content, commit=commit, fault=fault)

    def downloads(self) -> int:
        """GET requests received so far."""
        return sum(1 for method, _ in self.requests if method == "GET")

    def start(self) -> WeightsServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep the test output clean
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                owner._answer(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                owner._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Shut down: later requests find nothing listening (no network)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _lookup(self, path: str) -> Served | None:
        hub = _HUB_PATH.match(path)
        if hub is None:
            return self.files.get(path)
        served = self.files.get(f"{hub['repo']}/{hub['file']}")
        if served is None or hub["revision"] not in ("main", served.commit):
            return None
        return served

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((handler.command, handler.path))
        served = self._lookup(handler.path)
        if served is None:
            handler.send_response(404)
            handler.send_header("X-Error-Code", "EntryNotFound")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if served.fault == "down":
            handler.send_response(503)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(served.content)))
        if served.commit is not None:
            handler.send_header("X-Repo-Commit", served.commit)
            handler.send_header("ETag", f'"{hashlib.sha256(served.content).hexdigest()}"')
        handler.end_headers()
        if not body:
            return
        if served.fault == "corrupt":
            handler.wfile.write(bytes(b ^ 0xFF for b in served.content[:64]) + served.content[64:])
        elif served.fault == "cut":
            handler.wfile.write(served.content[: len(served.content) // 2])
            handler.wfile.flush()
            served.fault = "down"  # the network stays down: retries get 503
            handler.close_connection = True
        else:
            handler.wfile.write(served.content)
