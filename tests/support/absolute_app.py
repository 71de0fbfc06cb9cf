"""A web app that uses absolute paths, as most do, run as its own process for the host routing
tests:

    python tests/support/absolute_app.py PORT

``/`` is a page whose stylesheet, script and image are ``/static/...`` and whose script calls
``/api/...``, all by absolute path: reached through ``/_token/<token>/`` they would miss the
tunnel, through a host name that names the tunnel they work. The page's script keeps what it
saw in ``window.results`` (``done`` once all is settled), as tests/support/browser.py reads it.

``/api/info`` answers, as JSON, the path and the headers the app received (a test looks for
what must not reach it: X-Token, the tunnel's own Authorization).
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FILES = Path(__file__).with_name("absolute_app")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css",
         ".svg": "image/svg+xml"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        if path.startswith("/api/"):
            seen = {"method": self.command, "path": self.path, "body": body.decode("latin-1"),
                    "headers": {k.lower(): v for k, v in self.headers.items()}}
            self._send(200, json.dumps(seen).encode(), "application/json")
            return
        name = "index.html" if path == "/" else path.removeprefix("/static/")
        file = FILES / name
        if (path != "/" and not path.startswith("/static/")) or file.parent != FILES \
                or not file.is_file():
            self._send(404, f"no such page: {path}\n".encode(), "text/plain")
            return
        self._send(200, file.read_bytes(), TYPES.get(file.suffix, "application/octet-stream"))

    do_GET = do_POST = do_HEAD = _handle


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
