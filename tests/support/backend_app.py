"""A real HTTP/1.1 backend for the end-to-end tests, run as its own process.

    python tests/support/backend_app.py PORT

Endpoints: ``/echo`` (the request as JSON), ``/status/N``, ``/slow?secs=S``, ``/bytes?size=N``,
``/redirect``, ``/gzip`` (a body gzip-encoded on the wire), ``/chunked`` (Transfer-Encoding
chunked), ``/sha256`` (the request body's SHA-256 in hex, its length in ``X-Body-Length``),
``/garbage`` (bytes that are not HTTP, then close), ``/nul-header`` (a NUL byte in a header
value: a lenient HTTP client passes it on, a strict parser refuses it), anything else: a small
text page naming the path.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, content_type: str = "text/plain",
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if status != 204:
            self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)

    def _handle(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        body = self._body()
        if url.path == "/echo" or url.path.startswith("/echo/"):
            document = {
                "method": self.command,
                "path": self.path,
                "headers": [[k, v] for k, v in self.headers.items()],
                "body": body.decode("latin-1"),
            }
            self._send(200, json.dumps(document).encode(), "application/json")
        elif url.path.startswith("/status/"):
            status = int(url.path.rsplit("/", 1)[1])
            self._send(status, f"status {status}\n".encode())
        elif url.path == "/slow":
            time.sleep(float(query.get("secs", ["1"])[0]))
            self._send(200, b"slow\n")
        elif url.path == "/bytes":
            size = int(query.get("size", ["1024"])[0])
            self._send(200, bytes(i % 251 for i in range(size)), "application/octet-stream")
        elif url.path == "/sha256":
            self._send(200, hashlib.sha256(body).hexdigest().encode(),
                       extra={"X-Body-Length": str(len(body))})
        elif url.path == "/garbage":
            self.wfile.write(b"this is not HTTP\r\n\r\n")
            self.close_connection = True
        elif url.path == "/nul-header":
            self._send(200, b"nul\n", extra={"X-Odd": "a\x00b"})
        elif url.path == "/redirect":
            self._send(302, b"moved\n", extra={"Location": "/echo"})
        elif url.path == "/gzip":
            self._send(200, gzip.compress(b"compressed body\n"), extra={"Content-Encoding": "gzip"})
        elif url.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world\n"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._send(200, f"backend page {url.path}\n".encode())

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle


def main() -> None:
    port = int(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
