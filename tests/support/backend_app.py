"""A real HTTP/1.1 backend for the end-to-end tests, run as its own process.

    python tests/support/backend_app.py PORT

Endpoints: ``/echo`` (the request as JSON), ``/status/N``, ``/slow?secs=S``, ``/bytes?size=N``,
``/redirect``, ``/gzip`` (a body gzip-encoded on the wire), ``/chunked`` (Transfer-Encoding
chunked), ``/head?size=N`` (a response head of N bytes and more), ``/sha256`` (the request
body's SHA-256 in hex, its length in ``X-Body-Length``), ``/garbage`` (bytes that are not HTTP,
then close), ``/nul-header`` (a NUL byte in a header value: a lenient HTTP client passes it on,
a strict parser refuses it), anything else: a small text page naming the path.

For the streaming and browser tests (tests/test_nginx_streams.py), each also under ``/app/``, where the
page of :mod:`tests.support.browser_app` uses them:

* ``/big?size=N``: N bytes of :data:`BLOCK` repeated, written as the client takes them;
* ``/sink`` (POST, PUT): reads the body as it arrives and answers its size and SHA-256;
* ``/sse?n=N&gap=S`` (``/app/events``): N server-sent events S seconds apart, each naming the
  ``time.monotonic()`` it was written at (one clock for every process of the machine);
* ``/trailers``: a chunked body with trailer fields;
* ``/ws`` (``/app/ws``): a WebSocket that echoes every message (wsproto on this connection);
* ``/app/``: the browser page; ``/app/many?n=N``: a page of N small assets, ``/app/asset/...``.

``/_backend/state`` tells, as JSON, what the streaming endpoints saw: how far the body of the
current ``/sink`` has come, how many ``/big`` downloads, ``/sink`` uploads, ``/sse`` streams and
``/ws`` connections were cut off by the other side (a WebSocket that ends without a Close frame),
and the ``tag`` query parameters of those requests (``cut_tags``), so a test can see a hang-up
reach the backend, and which.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BufferedIOBase
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)

BLOCK = random.Random(5).randbytes(64 * 1024)  # /big repeats it


def big_body_sha256(size: int) -> str:
    """The SHA-256 of ``/big?size=size`` (and of the same bytes uploaded to ``/sink``)."""
    digest = hashlib.sha256()
    for start in range(0, size, len(BLOCK)):
        digest.update(BLOCK[: min(len(BLOCK), size - start)])
    return digest.hexdigest()


def big_body(size: int) -> Iterator[bytes]:
    for start in range(0, size, len(BLOCK)):
        yield BLOCK[: min(len(BLOCK), size - start)]


class State:
    """What the streaming endpoints saw, shared by the server's threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sink_bytes = 0  # body bytes the latest /sink has read so far
        self.sinks_done = 0
        self.sinks_cut = 0  # /sink bodies that ended before they were whole
        self.bigs_cut = 0  # /big downloads whose client went away
        self.sses_cut = 0  # /sse streams whose client went away
        self.websockets = 0  # WebSocket connections accepted
        self.websockets_cut = 0  # ... that ended without a Close frame
        self.cut_tags: list[str] = []  # the ``tag`` parameters of the requests cut off
        # The client port of each tagged WebSocket: a test finds its socket in /proc/net/tcp.
        self.websocket_peers: dict[str, int] = {}

    def document(self) -> dict[str, int]:
        with self.lock:
            return {"sink_bytes": self.sink_bytes, "sinks_done": self.sinks_done,
                    "sinks_cut": self.sinks_cut, "bigs_cut": self.bigs_cut,
                    "sses_cut": self.sses_cut, "websockets": self.websockets,
                    "websockets_cut": self.websockets_cut, "cut_tags": list(self.cut_tags),
                    "websocket_peers": dict(self.websocket_peers)}

    def cut(self, counter: str, tag: str | None) -> None:
        with self.lock:
            setattr(self, counter, getattr(self, counter) + 1)
            if tag is not None:
                self.cut_tags.append(tag)


STATE = State()
PAGE_FILES = Path(__file__).with_name("browser_page")
PAGE_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css",
              ".svg": "image/svg+xml"}


def page(path: str, query: dict[str, str]) -> tuple[int, bytes, str]:
    """(status, body, content type) of the browser page's files under /app/.

    ``/many?n=N`` is a page of N small assets (a stylesheet, scripts and images, as a web app's
    first load has them), ``/asset/I.EXT`` one of them.
    """
    if path == "/":
        path = "/index.html"
    if path == "/many":
        count = int(query.get("n", "50"))
        kinds = ["css"] + ["js"] * (count // 5) + ["svg"] * (count - 1 - count // 5)
        tags = [{"css": '<link rel="stylesheet" href="asset/{i}.css">',
                 "js": '<script src="asset/{i}.js"></script>',
                 "svg": '<img src="asset/{i}.svg" width="16" height="16" alt="">'}[kind].format(i=i)
                for i, kind in enumerate(kinds)]
        html = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>many assets</title>"
                + "".join(t for t in tags if not t.startswith("<img")) + "</head><body>"
                + "".join(t for t in tags if t.startswith("<img")) + "</body></html>")
        return 200, html.encode(), PAGE_TYPES[".html"]
    if path.startswith("/asset/"):
        index, _, kind = path.removeprefix("/asset/").partition(".")
        filler = "/* %s */\n" % ("x" * 1000)  # about 8 KiB each: a small app's modules
        body = {"css": f".a{index} {{ color: #{int(index) % 4096:03x}; }}\n" + filler * 8,
                "js": f"window.asset{index} = {index};\n" + filler * 8,
                "svg": '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16">'
                       f'<rect width="16" height="16" fill="#{int(index) % 4096:03x}"/>'
                       f'<!-- {"x" * 8000} --></svg>'}.get(kind)
        if body is None:
            return 404, b"no such asset\n", "text/plain"
        return 200, body.encode(), PAGE_TYPES["." + kind]
    file = PAGE_FILES / path.lstrip("/")
    if file.parent != PAGE_FILES or not file.is_file():
        return 404, b"no such page\n", "text/plain"
    return 200, file.read_bytes(), PAGE_TYPES.get(file.suffix, "application/octet-stream")


def body_pieces(handler: BaseHTTPRequestHandler) -> Iterator[bytes]:
    """A request's body piece by piece, as it arrives (chunked or by Content-Length); EOFError if
    it breaks off."""
    rfile = handler.rfile
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        while True:
            line = rfile.readline()
            if not line:
                raise EOFError
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailer fields
                return
            yield from _exactly(rfile, size)
            rfile.readline()
    else:
        yield from _exactly(rfile, int(handler.headers.get("Content-Length") or 0))


def _exactly(rfile: BufferedIOBase, size: int) -> Iterator[bytes]:
    while size:
        chunk = rfile.read1(min(size, 256 * 1024))
        if not chunk:
            raise EOFError
        size -= len(chunk)
        yield chunk


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body go out in separate writes: with Nagle on, the second can wait ~40 ms for the
    # peer's delayed ACK, which would swamp the event latencies measured through it.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        return b"".join(body_pieces(self))

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
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        # The browser page's endpoints are the same under /app/ (its relative URLs).
        path = url.path.removeprefix("/app") if url.path.startswith("/app/") else url.path
        try:
            if path == "/ws" and "websocket" in self.headers.get("Upgrade", "").lower():
                self._websocket()
            elif path == "/sink":
                self._sink()
            elif path == "/big":
                self._body()
                self._big(int(query["size"]))
            elif path in ("/sse", "/events"):
                self._body()
                self._sse(int(query.get("n", "3")), float(query.get("gap", "0.2")))
            elif path == "/trailers":
                self._body()
                self._trailers()
            elif url.path.startswith("/app/") and path != "/api":
                self._body()
                self._send(*page(path, query))
            else:
                self._classic(path, query, self._body())
        except (BrokenPipeError, ConnectionResetError):
            counter = {"/big": "bigs_cut", "/sse": "sses_cut", "/events": "sses_cut",
                       "/ws": "websockets_cut", "/sink": "sinks_cut"}.get(path)
            if counter is not None:
                STATE.cut(counter, query.get("tag"))
            self.close_connection = True

    def _classic(self, path: str, query: dict[str, str], body: bytes) -> None:
        if path == "/echo" or path.startswith("/echo/") or path == "/api":
            document = {
                "method": self.command,
                "path": self.path,
                "headers": [[k, v] for k, v in self.headers.items()],
                "body": body.decode("latin-1"),
            }
            self._send(200, json.dumps(document).encode(), "application/json")
        elif path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            self._send(status, f"status {status}\n".encode())
        elif path == "/slow":
            time.sleep(float(query.get("secs", "1")))
            self._send(200, b"slow\n")
        elif path == "/bytes":
            size = int(query.get("size", "1024"))
            self._send(200, bytes(i % 251 for i in range(size)), "application/octet-stream")
        elif path == "/sha256":
            self._send(200, hashlib.sha256(body).hexdigest().encode(),
                       extra={"X-Body-Length": str(len(body))})
        elif path == "/garbage":
            self.wfile.write(b"this is not HTTP\r\n\r\n")
            self.close_connection = True
        elif path == "/nul-header":
            self._send(200, b"nul\n", extra={"X-Odd": "a\x00b"})
        elif path == "/redirect":
            self._send(302, b"moved\n", extra={"Location": "/echo"})
        elif path == "/gzip":
            self._send(200, gzip.compress(b"compressed body\n"), extra={"Content-Encoding": "gzip"})
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world\n"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/head":  # a response head of about ``size`` bytes
            self._send(200, b"large head\n", extra={"X-Filler": "x" * int(query.get("size", "0"))})
        elif path == "/_backend/state":
            self._send(200, json.dumps(STATE.document()).encode(), "application/json")
        else:
            self._send(200, f"backend page {path}\n".encode())

    # -- streaming ------------------------------------------------------------------------------

    def _sink(self) -> None:
        digest = hashlib.sha256()
        size = 0
        with STATE.lock:
            STATE.sink_bytes = 0
        try:
            for chunk in body_pieces(self):
                digest.update(chunk)
                size += len(chunk)
                with STATE.lock:
                    STATE.sink_bytes = size
        except EOFError:
            STATE.cut("sinks_cut", parse_qs(urlsplit(self.path).query).get("tag", [None])[0])
            self.close_connection = True
            return
        with STATE.lock:
            STATE.sinks_done += 1
        self._send(200, json.dumps({"size": size, "sha256": digest.hexdigest()}).encode(),
                   "application/json")

    def _big(self, size: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        for part in big_body(size):
            self.wfile.write(part)

    def _sse(self, count: int, gap: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for index in range(count):
            if index:
                time.sleep(gap)  # the backend's pace, not a synchronisation
            event = b"id: %d\ndata: event %d written at %.6f\n\n" % (index, index, time.monotonic())
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _trailers(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Trailer", "X-Checksum")
        self.end_headers()
        for part in (b"first,", b"second"):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        self.wfile.write(b"0\r\nX-Checksum: sha256=abc\r\n\r\n")

    def _websocket(self) -> None:
        """Echo every message until the peer closes (wsproto on this very connection)."""
        self.close_connection = True
        ws = WSConnection(ConnectionType.SERVER)
        ws.initiate_upgrade_connection(list(self.headers.items()), self.path)
        tag = parse_qs(urlsplit(self.path).query).get("tag", [None])[0]
        while True:
            for event in ws.events():
                if isinstance(event, Request):
                    self.wfile.write(ws.send(AcceptConnection()))
                    with STATE.lock:
                        STATE.websockets += 1
                        if tag is not None:
                            STATE.websocket_peers[tag] = self.client_address[1]
                elif isinstance(event, TextMessage | BytesMessage):
                    # Fragments are echoed as they come, each with its own end-of-message flag.
                    self.wfile.write(ws.send(type(event)(data=event.data,
                                                         message_finished=event.message_finished)))
                elif isinstance(event, Ping):
                    self.wfile.write(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self.wfile.write(ws.send(event.response()))
                    return
            data = self.rfile.read1(65536)
            if not data:  # the connection ended without a Close frame: cut off
                STATE.cut("websockets_cut", tag)
                return
            ws.receive_data(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle


def main() -> None:
    port = int(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
