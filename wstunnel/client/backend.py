"""Replay tunnelled requests against the local HTTP server and capture its responses as they are.

The backend is ``server`` or, when the request carries ``X-Host`` and the whole value matches
``regexp``, that host. Responses pass through untouched: no redirect is followed and no body is
decompressed, no cookie is kept (wstunnel.client.origin, our own HTTP/1.1 client). Hop-by-hop
headers, ``X-Host`` and ``X-Token`` never reach the backend.

Backend connections are bounded by the pool (``max_concurrent_requests``); should the process run
out of descriptors all the same (a limit set too low for it), a request that cannot have a
connection gets 503 with Retry-After, saying so, rather than a 502 that blames the backend.
"""

from __future__ import annotations

import math
import re
import ssl
from collections.abc import AsyncIterable
from dataclasses import dataclass

import trio

from wstunnel import framing, limits
from wstunnel.client.origin import OriginPool, Response, Timeouts, default_ssl_context
from wstunnel.client.wire import parse_base
from wstunnel.errors import BackendError, BackendTimeout, OutOfFiles
from wstunnel.headers import get as get_header
from wstunnel.headers import without_hop_by_hop
from wstunnel.logs import EventLogger

# The server gives up after its httptimeout (20 minutes by default); we need not wait longer.
BACKEND_TIMEOUT = Timeouts(connect=30.0, io=1200.0)
# Out of descriptors for a backend connection: the request gets a 503 saying to come back this
# much later, and the log one warning line per interval with the count.
OUT_OF_FILES_RETRY_AFTER = 5
OUT_OF_FILES_WARN_INTERVAL = 10.0


@dataclass(slots=True)
class Refusal(Exception):
    """A request we answer ourselves instead of replaying it."""

    status: int
    text: str
    backend_failed: bool = False  # the backend's connection failed (not a choice of ours)
    retry_after: int | None = None

    def response(self) -> framing.Response:
        from http import HTTPStatus

        body = (self.text + "\n").encode()
        headers = [(b"Content-Type", b"text/plain; charset=utf-8")]
        if self.retry_after is not None:
            headers.append((b"Retry-After", b"%d" % self.retry_after))
        return framing.Response(self.status, HTTPStatus(self.status).phrase.encode(), headers, body)


class Backend:
    def __init__(self, *, server: str | None, regexp: str | None, max_body_size: int,
                 max_connections: int, verify: ssl.SSLContext | bool = True,
                 max_stream_size: int = 0, log: EventLogger | None = None) -> None:
        self.server = server
        self.log = log
        self.out_of_files = 0  # requests answered 503 for want of a descriptor
        self._unreported = 0
        self._warned_at: float | None = None
        self.pattern = re.compile(regexp) if regexp else None
        self.max_body_size = max_body_size  # a body held whole (protocol v1)
        self.max_stream_size: float = max_stream_size or math.inf  # a body streamed (v2)
        # Proxy variables are for the tunnel, never for the backend: the pool knows none.
        self.pool = OriginPool(max_connections=max_connections, ssl_context=default_ssl_context(verify),
                               timeouts=BACKEND_TIMEOUT)

    def reconfigure(self, *, server: str | None, regexp: str | None, max_body_size: int,
                    max_stream_size: int = 0) -> None:
        self.server = server
        self.pattern = re.compile(regexp) if regexp else None
        self.max_body_size = max_body_size
        self.max_stream_size = max_stream_size or math.inf

    async def aclose(self) -> None:
        self.pool.close()

    def base_url(self, request: framing.Request) -> str:
        x_host = get_header(request.headers, b"x-host")
        if x_host:
            value = x_host.decode("latin-1").strip()
            if self.pattern is not None and self.pattern.fullmatch(value):
                return value.rstrip("/")
            raise Refusal(403, "X-Host not allowed by the tunnel client")
        if self.server is None:
            raise Refusal(400, "Request needs an X-Host header: the tunnel client has no -server")
        return self.server

    async def replay(self, request: framing.Request) -> framing.Response:
        try:
            base = self.base_url(request)
            return await self._send(base, request)
        except Refusal as refusal:
            return refusal.response()

    async def open_stream(
        self, request: framing.Request, body: AsyncIterable[bytes] | None = None,
        *, upgrade: bytes | None = None,
    ) -> Response:
        """Send ``request`` and return the response once its head is in; the body is left to
        read (``async for chunk in response``), and the caller must ``aclose`` the response
        (in a ``finally``). Refusal if we answer it ourselves or the backend fails before the
        head.

        ``body`` streams the request body instead of ``request.body`` (its Content-Length, if the
        request has one, goes with it; else it is sent chunked). ``upgrade`` asks the backend to
        switch to that protocol; on a 101 the connection is ``response.stream``, the caller's
        until the response is closed.

        Not an asynccontextmanager: its async generator and contextlib's wrapper cost every
        request ~10 Python calls and a reference cycle left to the garbage collector.
        """
        base = self.base_url(request)
        return await self._start(base, request, body, upgrade=upgrade)

    async def _start(self, base: str, request: framing.Request,
                     body: AsyncIterable[bytes] | None = None,
                     *, upgrade: bytes | None = None) -> Response:
        target = request.target if request.target.startswith(b"/") else b"/" + request.target
        headers = without_hop_by_hop(request.headers, b"x-host", b"x-token", b"host",
                                     b"content-length")
        if body is not None:
            # With a Content-Length, the streamed body is framed by it instead of chunked.
            length = get_header(request.headers, b"content-length")
            if length is not None:
                headers.append((b"Content-Length", length))
        if upgrade is not None:
            headers += [(b"Connection", b"Upgrade"), (b"Upgrade", upgrade)]
        try:
            return await self.pool.request(parse_base(base), request.method, target, headers,
                                           request.body if body is None else body)
        except BackendTimeout:
            raise Refusal(504, "Backend timeout") from None
        except OutOfFiles:
            self._count_out_of_files()
            raise Refusal(503, "Tunnel client out of open files: try again later",
                          retry_after=OUT_OF_FILES_RETRY_AFTER) from None
        except BackendError as exc:
            raise Refusal(502, f"Backend unreachable: {type(exc).__name__}",
                          backend_failed=True) from None

    def _count_out_of_files(self) -> None:
        """One warning line per interval at most, with the refusals since the last one."""
        self.out_of_files += 1
        self._unreported += 1
        now = trio.current_time()
        if self.log is None or (self._warned_at is not None
                                and now - self._warned_at < OUT_OF_FILES_WARN_INTERVAL):
            return
        self._warned_at = now
        self.log.warning("Capacity", state="refusing", refused=self._unreported,
                         limit=limits.soft_open_files_limit(),
                         backend_connections=self.pool.open_connections,
                         retry_after=OUT_OF_FILES_RETRY_AFTER,
                         reason="no descriptor for a backend connection: answering 503")
        self._unreported = 0

    async def _send(self, base: str, request: framing.Request) -> framing.Response:
        response = await self._start(base, request)
        try:
            chunks: list[bytes] = []
            size = 0
            async for chunk in response:
                size += len(chunk)
                if size > self.max_body_size:
                    raise Refusal(502, "Backend response larger than max_body_size")
                chunks.append(chunk)
        except BackendError as exc:
            raise Refusal(502, f"Backend response broken: {type(exc).__name__}") from None
        finally:
            await response.aclose()
        return framing.Response(
            status=response.status,
            reason=response.reason,
            headers=without_hop_by_hop(response.headers),
            body=b"".join(chunks),
        )
