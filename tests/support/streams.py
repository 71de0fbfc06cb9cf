"""Long-lived HTTP exchanges through the tunnel, each in a thread, watched from the HTTP client's
side: a download, an upload, server-sent events and a WebSocket pass-through.

Every probe talks raw HTTP/1.1 on its own socket to the server (``X-Token`` and, when given,
``X-Host`` headers) against tests/support/backend_app.py, and paces itself so that it is still
under way when a test strikes. It tells what its HTTP client saw:

* ``complete``: the whole exchange, and the bytes are the right ones;
* ``aborted``: the connection ended (reset, or closed) before the exchange was whole, a body
  shorter than its Content-Length, a chunked body without its last chunk, a WebSocket without a
  Close frame; the HTTP client can tell it apart from a whole one;
* ``status N``: an error status answered (an upload refused before its end, say);
* ``refused``: no connection to the server at all (it is down);
* ``corrupt``: a clean end with the wrong bytes: what must never happen.

``mid`` is set once the exchange is well under way; ``vanish()`` makes its HTTP client go away
(its socket closed, with a reset if asked); ``hurry()`` stops the pacing. Every probe has a
deadline: a probe still running at it ends ``hung``.
"""

from __future__ import annotations

import contextlib
import hashlib
import select
import socket
import struct
import threading
import time
from pathlib import Path
from typing import ClassVar

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from tests.support.backend_app import big_body_sha256

DEADLINE = 60.0  # seconds any probe may run, whatever happens
PACE_BYTES = 64 * 1024  # a paced probe moves this much at a time...
PACE_GAP = 0.02  # ... then waits this long: about 3 MB/s
POLL = 0.05  # socket timeout: how often a waiting probe looks at its flags
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, zero timeout: close() sends a reset


def unread_bytes(local_port: int, remote_port: int) -> int | None:
    """What the kernel holds unread for the IPv4 TCP socket with these ports (None: no such
    socket). A process that dies with unread input resets its connections; one that had read
    everything closes them with a FIN, as a clean end would."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
            return int(queues.split(":")[1], 16)
    return None


class _Vanish(Exception):
    """The test made the HTTP client go away."""


class _Late(Exception):
    """The probe's deadline passed."""


class Probe(threading.Thread):
    """One exchange; subclasses say what to send and how to judge what comes back."""

    kind: ClassVar[str]

    def __init__(self, host: str, port: int, token: str, tag: str, *, x_host: str | None = None,
                 mid_bytes: int = 512 * 1024) -> None:
        super().__init__(daemon=True, name=f"probe-{tag}")
        self.host, self.port, self.token, self.tag = host, port, token, tag
        self.x_host = x_host
        self.mid_bytes = mid_bytes
        self.mid = threading.Event()
        self.progress = 0  # body bytes (or events, or echoed messages) moved so far
        self.outcome = "hung"
        self.detail = ""
        self.deadline = time.monotonic() + DEADLINE
        self._hurry = threading.Event()
        self._vanish = threading.Event()
        self._reset = True
        self.gone = threading.Event()  # the HTTP client went away as asked

    # -- control, from the test's thread -----------------------------------------------------

    def hurry(self) -> None:
        """Stop pacing: take or send the rest as fast as it comes."""
        self._hurry.set()

    def vanish(self, *, reset: bool = True) -> None:
        """The HTTP client goes away now, as when it is killed: its socket closed, with a TCP
        reset (as when unread data is left) or a plain FIN. Returns once it is gone."""
        self._reset = reset
        self._vanish.set()
        self.gone.wait(5)

    def finish(self, timeout: float = DEADLINE) -> str:
        self.hurry()
        self.join(timeout)
        return self.outcome

    # -- the thread ----------------------------------------------------------------------------

    def run(self) -> None:
        self.deadline = time.monotonic() + DEADLINE
        sock: socket.socket | None = None
        try:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=10)
            except OSError as exc:
                self.outcome, self.detail = "refused", repr(exc)
                return
            sock.settimeout(POLL)
            self.outcome, self.detail = self.exchange(sock)
        except _Vanish:
            assert sock is not None
            if self._reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            self.outcome, self.detail = "vanished", f"after {self.progress}"
        except _Late:
            self.outcome, self.detail = "hung", f"after {self.progress}"
        except OSError as exc:
            self.outcome, self.detail = "aborted", f"{exc!r} after {self.progress}"
        finally:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
            self.gone.set()

    def exchange(self, sock: socket.socket) -> tuple[str, str]:
        raise NotImplementedError

    def recv(self, sock: socket.socket, size: int = 65536) -> bytes:
        """The next bytes (b"" at the end); OSError if the connection broke."""
        while True:
            self._check()
            try:
                return sock.recv(size)
            except TimeoutError:
                continue

    def send(self, sock: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._check()
            try:
                view = view[sock.send(view):]
            except TimeoutError:
                continue

    def readable(self, sock: socket.socket) -> bool:
        return bool(select.select([sock], [], [], 0)[0])

    def _check(self) -> None:
        if self._vanish.is_set():
            raise _Vanish
        if time.monotonic() > self.deadline:
            raise _Late

    def request_head(self, method: str, target: str, extra: str = "") -> bytes:
        x_host = f"X-Host: {self.x_host}\r\n" if self.x_host else ""
        return (f"{method} {target} HTTP/1.1\r\nHost: tunnel\r\nX-Token: {self.token}\r\n"
                f"{x_host}{extra}\r\n").encode()

    def pace(self) -> None:
        if not self._hurry.is_set():
            self._hurry.wait(PACE_GAP)

    def moved(self, amount: int) -> None:
        self.progress += amount
        if self.progress >= self.mid_bytes:
            self.mid.set()

    def read_head(self, sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lowercase names) and the bytes after the head."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.recv(sock)
            if not chunk:
                raise ConnectionAbortedError("the connection ended before a response head")
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split(" ")[1]), headers, rest


class Download(Probe):
    """``GET /big?size=N``, read at a steady pace; whole when N bytes with the right SHA-256."""

    kind = "download"

    def __init__(self, *args: object, size: int = 32 * 1024 * 1024, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.size = size

    def exchange(self, sock: socket.socket) -> tuple[str, str]:
        self.send(sock, self.request_head("GET", f"/big?size={self.size}&tag={self.tag}"))
        status, headers, rest = self.read_head(sock)
        if status != 200:
            return f"status {status}", ""
        length = int(headers["content-length"])
        digest = hashlib.sha256(rest)
        self.moved(len(rest))
        while self.progress < length:
            chunk = self.recv(sock, PACE_BYTES)
            if not chunk:
                return "aborted", f"closed after {self.progress} of {length} bytes"
            digest.update(chunk)
            self.moved(len(chunk))
            self.pace()
        if self.progress == length and digest.hexdigest() == big_body_sha256(self.size):
            return "complete", ""
        return "corrupt", f"{self.progress} bytes, SHA-256 {digest.hexdigest()[:12]}"


class Upload(Probe):
    """``POST /sink`` with a Content-Length, sent at a steady pace; whole when the backend
    answers 200 with the size and SHA-256 of what was sent."""

    kind = "upload"

    def __init__(self, *args: object, size: int = 32 * 1024 * 1024, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.size = size

    def exchange(self, sock: socket.socket) -> tuple[str, str]:
        self.send(sock, self.request_head("POST", f"/sink?tag={self.tag}",
                                          f"Content-Length: {self.size}\r\n"))
        block = bytes(range(256)) * (PACE_BYTES // 256)
        digest = hashlib.sha256()
        while self.progress < self.size and not self.readable(sock):
            # (Readable: an answer, or the end, before the whole body: see what it is, below.)
            piece = block[: self.size - self.progress]
            try:
                self.send(sock, piece)
            except OSError:
                break  # the server stopped taking it: its answer, if any, says why
            digest.update(piece)
            self.moved(len(piece))
            self.pace()
        status, headers, rest = self.read_head(sock)
        length = int(headers.get("content-length", "0"))
        while len(rest) < length and (chunk := self.recv(sock)):
            rest += chunk
        if status != 200:
            return f"status {status}", rest[:200].decode("latin-1").strip()
        if self.progress == self.size and f'"sha256": "{digest.hexdigest()}"' in rest.decode():
            return "complete", ""
        return "corrupt", rest[:200].decode("latin-1")


class Events(Probe):
    """``GET /sse?n=N``: server-sent events over a chunked body; whole when the last event and
    the body's last chunk came."""

    kind = "sse"

    def __init__(self, *args: object, events: int = 400, gap: float = 0.05, **kwargs: object) -> None:
        kwargs.setdefault("mid_bytes", 3)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.events, self.gap = events, gap

    def exchange(self, sock: socket.socket) -> tuple[str, str]:
        self.send(sock, self.request_head("GET", f"/sse?n={self.events}&gap={self.gap}&tag={self.tag}"))
        status, headers, data = self.read_head(sock)
        if status != 200:
            return f"status {status}", ""
        if headers.get("transfer-encoding", "").lower() != "chunked":
            return "corrupt", f"not chunked: {headers}"
        while not data.endswith(b"\r\n0\r\n\r\n"):
            self.progress = data.count(b"id: ")
            if self.progress >= self.mid_bytes:
                self.mid.set()
            chunk = self.recv(sock)
            if not chunk:
                return "aborted", f"closed after {self.progress} events, without the last chunk"
            data += chunk
        if f"id: {self.events - 1}\n".encode() in data:
            return "complete", ""
        return "corrupt", f"the last chunk after {self.progress} of {self.events} events"


class PassThrough(Probe):
    """A WebSocket to the backend's echo (``/ws``) through the tunnel: a message every pace
    step, each echo checked, until ``finish()`` (or ``messages`` echoes); whole when our Close
    is answered with the backend's."""

    kind = "websocket"

    def __init__(self, *args: object, messages: int | None = None, **kwargs: object) -> None:
        kwargs.setdefault("mid_bytes", 3)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.messages = messages

    def exchange(self, sock: socket.socket) -> tuple[str, str]:
        ws = WSConnection(ConnectionType.CLIENT)
        x_host = [("X-Host", self.x_host)] if self.x_host else []
        self.send(sock, ws.send(Request(host="tunnel", target=f"/ws?tag={self.tag}",
                                        extra_headers=[("X-Token", self.token), *x_host])))
        accepted = closing = False
        sent = echoed = 0
        echo = ""  # the echo so far: wsproto hands over a message in pieces as its bytes come
        while True:
            if accepted and not closing:
                if self._hurry.is_set() or echoed == self.messages:  # close cleanly
                    self.send(sock, ws.send(CloseConnection(code=1000)))
                    closing = True
                elif sent == echoed:
                    sent += 1
                    self.send(sock, ws.send(TextMessage(data=f"message {sent} of {self.tag}")))
            data = self.recv(sock)
            if not data:
                return "aborted", f"closed after {echoed} echoes, without a Close frame"
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    accepted = True
                elif isinstance(event, TextMessage):
                    echo += event.data
                    if not event.message_finished:
                        continue
                    if echo != f"message {echoed + 1} of {self.tag}":
                        return "corrupt", f"echo {echo!r}"
                    echo = ""
                    echoed += 1
                    self.moved(1)
                    self.pace()
                elif isinstance(event, CloseConnection):
                    if closing:
                        return "complete", ""
                    return "aborted", f"Close {event.code} from the other side"
                elif not accepted:
                    return f"refused ({type(event).__name__})", ""


KINDS: tuple[type[Probe], ...] = (Download, Upload, Events, PassThrough)
