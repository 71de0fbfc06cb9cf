"""A lean HTTP/1.1 client for the tunnel client's backends: h11 over trio streams, pooled.

httpx/httpcore cost ~300 µs of CPU per small request (issue 7); this does what the tunnel needs
and nothing else, for ~80. Responses come back untouched: status, reason, raw headers in their
order and case, the body as raw bytes as they arrive (no decompression, redirects or cookies).

One pool serves every origin (scheme, host, port) with keep-alive connections. ``max_connections``
caps the requests in flight (FIFO waiters, a trio.CapacityLimiter) and so, with idle connections
evicted when a new one needs the room, the connections open. An idle connection is reused only if
it is younger than ``Timeouts.keepalive`` and its socket is not readable (a readable idle socket means
the backend closed it or sent junk). A request that fails on a reused connection before any
response byte is retried once on a fresh connection when its body can be sent again (bytes, not a
stream). A connection whose exchange did not end cleanly with both sides DONE is closed, never
pooled: ``Connection: close``, read-until-close bodies, errors, a body left unread or cancelled.

The bytes themselves (a request's head, the common response head read without h11, a base URL
parsed) are ``wstunnel.client.wire``'s, which does no I/O; this module is the pool and its
connections.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

import certifi
import h11
import trio

from wstunnel.client.wire import Origin, Outgoing, ResponseHead, Target, fast_head
from wstunnel.errors import (
    BackendError,
    BackendTimeout,
    ConnectError,
    LocalRequestError,
    OutOfFiles,
    ReadError,
    RemoteProtocolError,
    WriteError,
)
from wstunnel.headers import Headers
from wstunnel.limits import out_of_files
from wstunnel.tunnel.sockets import DirectSocketStream

READ_SIZE = 64 * 1024
# A request body up to this size goes out in the same write as its head.
COALESCE_SIZE = 64 * 1024
_RETRYABLE = (ReadError, WriteError, RemoteProtocolError)


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 30.0
    # Each read or write on a connection, and the wait for a free connection slot.
    io: float = 1200.0
    # httpx's default: an idle connection older than this may be closing on the backend's side
    # (many servers time out idle keep-alive at 5 s), and a streamed upload cannot be retried.
    keepalive: float = 5.0


def default_ssl_context(verify: ssl.SSLContext | bool = True) -> ssl.SSLContext:
    """The context for https:// backends, as httpx built it: certifi's CAs, or no checks at all."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    return _shared_context(bool(verify))


@functools.cache
def _shared_context(verify: bool) -> ssl.SSLContext:
    """One per process: loading the CA store costs ~15 ms and ~800 KiB per context, which
    processes hosting many tunnel clients (tests/support/many_clients.py, the benchmark) paid per client.
    Nothing changes a context once it is built, so sharing it is safe."""
    if verify:
        context = ssl.create_default_context(cafile=certifi.where())
    else:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


class _Connection:
    __slots__ = ("eof", "h11", "idle_since", "origin", "received", "reusable", "socket", "stream")

    def __init__(self, origin: Origin, stream: trio.abc.Stream, socket: trio.socket.SocketType) -> None:
        self.origin = origin
        self.stream = stream
        self.socket = socket
        # The current exchange's response parser when it is off the fast path (see Outgoing),
        # else None: h11 only where its generality is needed.
        self.h11: h11.Connection | None = None
        # The fast path's verdict: keep-alive and nothing read past the response.
        self.reusable = False
        self.idle_since = 0.0
        # Whether the backend sent any byte for the current request: if not, a failure on a
        # reused connection is the backend having closed it, and a replay is safe.
        self.received = False
        # The backend closed its side: h11 still says DONE after a body read until close.
        self.eof = False

    def close(self) -> None:
        # Synchronous on purpose: it runs in cancelled scopes and finally blocks. A TLS
        # connection goes without close_notify, which backends take as a plain close.
        self.socket.close()


class UpgradedStream(trio.abc.Stream):
    """The backend connection after a 101, starting with any bytes h11 read past the 101's head.

    Errors come out as ReadError / WriteError, like the rest of this module.
    """

    def __init__(self, connection: _Connection, buffered: bytes) -> None:
        self._connection = connection
        self._buffered = buffered

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._buffered:
            await trio.lowlevel.checkpoint()
            size = len(self._buffered) if max_bytes is None else max_bytes
            data, self._buffered = self._buffered[:size], self._buffered[size:]
            return data
        try:
            return bytes(await self._connection.stream.receive_some(max_bytes))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ReadError(f"upgraded connection: {type(exc).__name__}") from None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._connection.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise WriteError(f"upgraded connection: {type(exc).__name__}") from None

    async def wait_send_all_might_not_block(self) -> None:
        await self._connection.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._connection.close()
        await trio.lowlevel.checkpoint()


class Response:
    """A backend's response head; iterate it for the body's raw bytes, then ``aclose`` it.

    ``complete`` turns true as soon as the end of the body is known, which may be before the
    last chunk is handed out (the parser already holds the end): the caller can mark that chunk
    as the last. On a 101 to an upgrade request, ``stream`` is the raw connection; it is the
    caller's until ``aclose``.
    """

    __slots__ = ("_borrower", "_connection", "_length", "_peeked", "_pending", "_pool", "_remaining",
                 "complete", "headers", "http_version", "reason", "status", "stream", "trailers")

    def __init__(self, pool: OriginPool, connection: _Connection, borrower: object,
                 head: ResponseHead) -> None:
        self.status: int = head.status
        self.reason: bytes = head.reason
        self.headers: Headers = head.headers
        self.http_version: bytes = head.http_version
        self.stream: UpgradedStream | None = None
        self.complete = False
        self.trailers: Headers = []  # a chunked body's trailer fields, once complete
        self._pool = pool
        self._connection: _Connection | None = connection
        self._borrower: object | None = borrower
        self._peeked: h11.Event | None = None
        # The fast path's body: its size, the bytes read with the head and not yet handed out,
        # the bytes still to read from the backend; None: h11 reads the body.
        self._length = head.length
        self._pending = head.body
        self._remaining: int | None = None
        if head.length is not None:
            self._remaining = self._taken(len(head.body))
            if len(self._pending) > head.length:
                self._pending = self._pending[:head.length]

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._pending:  # the fast path's bytes that came with the head
            data, self._pending = self._pending, b""
            return data
        connection = self._connection
        if connection is None or self.complete or self.stream is not None:
            raise StopAsyncIteration
        if self._remaining is not None:
            return await self._next_fast(connection)
        while True:
            event, self._peeked = self._peeked, None
            if event is None:
                event = self._pool.poll_event(connection)
            if event is None:
                # A cancel scope only when we wait: what h11 already holds needs none.
                with trio.CancelScope(deadline=trio.current_time() + self._pool.timeouts.io):
                    event = await self._pool.next_event(connection)
                if event is None:
                    raise BackendTimeout("the backend sent nothing in time")
            if type(event) is h11.Data:
                self._peek_end(connection)
                return bytes(event.data)
            if type(event) is h11.EndOfMessage:
                self._finish(list(event.headers.raw_items()))
                raise StopAsyncIteration
            raise RemoteProtocolError(f"unexpected {type(event).__name__} in the response body")

    async def _next_fast(self, connection: _Connection) -> bytes:
        received: bytes | None = None
        with trio.CancelScope(deadline=trio.current_time() + self._pool.timeouts.io):
            received = await self._pool.receive(connection)
        if received is None:
            raise BackendTimeout("the backend sent nothing in time")
        assert self._length is not None and self._remaining is not None
        if not received:
            raise RemoteProtocolError(
                "peer closed connection without sending complete message body (received "
                f"{self._length - self._remaining} bytes, expected {self._length})")
        wanted = self._remaining
        self._remaining = self._taken(len(received))
        return received if len(received) <= wanted else received[:wanted]

    def _taken(self, size: int) -> int:
        """Count ``size`` body bytes against the fast path's body; what is left to read.

        The end of the body finishes the response at once, before its last bytes are handed
        out. Bytes past it leave the connection unfit for reuse (h11 would take them for the
        next response; they are junk or a pipelining bug)."""
        assert self._length is not None  # the fast path's body only
        left = (self._length if self._remaining is None else self._remaining) - size
        if left > 0:
            return left
        if left < 0 and self._connection is not None:
            self._connection.reusable = False
        self._finish([])
        return 0

    def _peek_end(self, connection: _Connection) -> None:
        """Without waiting: if h11 already holds the end of the body, finish now."""
        assert connection.h11 is not None
        try:
            event = connection.h11.next_event()
        except h11.RemoteProtocolError:
            return  # h11 stays in its error state: the next __anext__ raises it
        if type(event) is h11.EndOfMessage:
            self._finish(list(event.headers.raw_items()))
        elif isinstance(event, h11.Event):  # not NEED_DATA: h11 says what came, the next call reads it
            self._peeked = event

    def _finish(self, trailers: Headers) -> None:
        self.trailers = trailers
        self.complete = True
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool.release(connection)
        self._release_slot()

    def _release_slot(self) -> None:
        borrower, self._borrower = self._borrower, None
        if borrower is not None:
            self._pool.release_slot(borrower)

    async def aclose(self) -> None:
        """Done with the response: an unfinished body (or an upgraded stream) closes the connection."""
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool.discard(connection)
        self._release_slot()


class OriginPool:
    def __init__(self, *, max_connections: int, ssl_context: ssl.SSLContext,
                 timeouts: Timeouts = Timeouts()) -> None:
        self.ssl_context = ssl_context
        self.timeouts = timeouts
        self._slots = trio.CapacityLimiter(max_connections)
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open = 0  # connections open, idle or in use
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    def close(self) -> None:
        """Close the idle connections; those in use close with their responses."""
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                self.discard(connection)
        self._idle.clear()

    # -- one request --------------------------------------------------------------------------

    async def request(self, target: Target, method: bytes, path: bytes, headers: Headers,
                      body: bytes | AsyncIterable[bytes] = b"") -> Response:
        """Send a request and return the response once its head (final, or a 101) is in.

        ``headers`` must not frame the body: bytes get a Content-Length here, and a streamed body
        goes chunked unless ``headers`` hold its Content-Length. Host comes from ``target``.
        """
        replayable = isinstance(body, bytes | bytearray | memoryview)
        outgoing = Outgoing(target, method, path, headers, body)
        borrower = object()
        try:
            # Without a wait, no trip through the scheduler (trio hands a freed slot straight
            # to the first waiter, so this never jumps the queue).
            self._slots.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            with trio.move_on_after(self.timeouts.io) as waited:
                await self._slots.acquire_on_behalf_of(borrower)
            if waited.cancelled_caught:  # cancelled inside acquire: no slot is held
                raise BackendTimeout("no free backend connection in time") from None
        connection: _Connection | None = None
        try:
            connection, reused = await self._connection(target.origin)
            try:
                head = await self._exchange(connection, outgoing, body)
            except _RETRYABLE:
                if not (reused and replayable and not connection.received):
                    raise
                # The backend closed the idle connection as we sent on it: once more, fresh.
                stale, connection = connection, None
                self.discard(stale)
                connection = await self._connect(target.origin)
                head = await self._exchange(connection, outgoing, body)
        except BaseException:
            if connection is not None:
                self.discard(connection)
            self.release_slot(borrower)
            raise
        response = Response(self, connection, borrower, head)
        if head.status == 101:
            assert connection.h11 is not None  # an upgrade request is never on the fast path
            trailing, _ = connection.h11.trailing_data
            response.stream = UpgradedStream(connection, bytes(trailing))
        return response

    async def _exchange(self, connection: _Connection, outgoing: Outgoing,
                        body: bytes | AsyncIterable[bytes]) -> ResponseHead:
        # One deadline for the whole exchange, not one per read and write: a cancel scope costs
        # ~10 µs. A streamed body moves it on with each chunk written, so a long upload is fine.
        with trio.CancelScope(deadline=trio.current_time() + self.timeouts.io) as scope:
            return await self._exchange_in(connection, outgoing, body, scope)
        raise BackendTimeout("the backend did not take the request or answer in time")

    async def _exchange_in(self, connection: _Connection, outgoing: Outgoing,
                           body: bytes | AsyncIterable[bytes], scope: trio.CancelScope) -> ResponseHead:
        connection.received = False
        connection.reusable = False
        connection.h11 = None
        try:
            if isinstance(body, bytes | bytearray | memoryview):
                if len(body) <= COALESCE_SIZE:
                    # One write, one syscall: the head and a small body together.
                    await self._send(connection, outgoing.head + body if body else outgoing.head)
                else:
                    await self._send(connection, outgoing.head)
                    await self._send(connection, body)
            else:
                await self._send(connection, outgoing.head)
                left = outgoing.length
                async for chunk in body:
                    if not chunk:
                        continue  # an empty chunk would read as the end of a chunked body
                    if left is None:
                        await self._send(connection, b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    else:
                        left -= len(chunk)
                        if left < 0:
                            raise LocalRequestError("Too much data for declared Content-Length")
                        await self._send(connection, chunk)
                    scope.deadline = trio.current_time() + self.timeouts.io
                if left is None:
                    await self._send(connection, b"0\r\n\r\n")
                elif left:
                    raise LocalRequestError("Too little data for declared Content-Length")
        except WriteError:
            # The backend may have answered early (a 413, say) and closed: that answer is the
            # one to pass on, if it is there.
            try:
                return await self._head(connection, outgoing)
            except BackendError:
                pass
            raise
        return await self._head(connection, outgoing)

    async def _head(self, connection: _Connection, outgoing: Outgoing) -> ResponseHead:
        data = await self.receive(connection)
        if outgoing.simple:
            fast = fast_head(data, outgoing.method)
            if fast is not None:
                head, connection.reusable = fast
                return head
        h = connection.h11 = outgoing.parser()
        h.receive_data(data)
        while True:
            event = await self.next_event(connection)
            if type(event) is h11.Response or (type(event) is h11.InformationalResponse
                                               and event.status_code == 101):
                assert isinstance(event, h11.Response | h11.InformationalResponse)
                return ResponseHead(event.status_code, event.reason, list(event.headers.raw_items()),
                             event.http_version)
            if type(event) is h11.InformationalResponse:
                continue  # 100 Continue, 103 Early Hints: for this hop only
            raise RemoteProtocolError(f"unexpected {type(event).__name__} before the response")

    @staticmethod
    def poll_event(connection: _Connection) -> h11.Event | None:
        """The next event h11 already holds, or None if it needs data."""
        assert connection.h11 is not None
        try:
            event = connection.h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise RemoteProtocolError(str(exc)) from None
        if event is h11.NEED_DATA:
            return None
        if not isinstance(event, h11.Event) or type(event) is h11.ConnectionClosed:
            # PAUSED: the exchange is over for h11, and nothing more will come for it.
            raise RemoteProtocolError("the backend closed the connection")
        return event

    async def next_event(self, connection: _Connection) -> h11.Event:
        """The next event, reading as needed; the caller bounds the wait (a cancel scope)."""
        assert connection.h11 is not None
        while (event := self.poll_event(connection)) is None:
            connection.h11.receive_data(await self.receive(connection))
        return event

    @staticmethod
    async def receive(connection: _Connection) -> bytes:
        try:
            # bytes() of bytes is the same object: no copy but for an SSLStream's bytearray.
            data = bytes(await connection.stream.receive_some(READ_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ReadError(f"{type(exc).__name__}: {exc}") from None
        if data:
            connection.received = True
        else:
            connection.eof = True
        return data

    @staticmethod
    async def _send(connection: _Connection, data: bytes) -> None:
        try:
            await connection.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise WriteError(f"{type(exc).__name__}: {exc}") from None

    # -- connections --------------------------------------------------------------------------

    async def _connection(self, origin: Origin) -> tuple[_Connection, bool]:
        """An idle connection to ``origin`` still fit for use, else a new one; and whether reused."""
        idle = self._idle.get(origin)
        if idle:
            now = trio.current_time()
            while idle:
                connection = idle.pop()  # the most recent: the least likely to be timing out
                if now - connection.idle_since < self.timeouts.keepalive \
                        and not connection.socket.is_readable():
                    return connection, True
                self.discard(connection)
            # The rest are older still.
        return await self._connect(origin), False

    async def _connect(self, origin: Origin) -> _Connection:
        self._sweep()
        if self._open >= self._slots.total_tokens:
            self._evict()
        self._open += 1
        try:
            return await self._dial(origin)
        except BaseException:
            self._open -= 1
            raise

    def _sweep(self) -> None:
        """Close the expired idle connections of every origin (an X-Host used once would keep
        its connection open otherwise). On each new connection only: not per request."""
        oldest = trio.current_time() - self.timeouts.keepalive
        for connections in self._idle.values():
            # Each list is in the order the connections went idle.
            while connections and connections[0].idle_since <= oldest:
                self.discard(connections.pop(0))

    def _evict(self) -> None:
        """Close one idle connection to make room (every slot-holder beside us may be idle)."""
        for connections in self._idle.values():
            if connections:
                self.discard(connections.pop(0))  # the oldest of its origin
                return

    async def _dial(self, origin: Origin) -> _Connection:
        with trio.move_on_after(self.timeouts.connect):
            try:
                tcp = await trio.open_tcp_stream(origin.host, origin.port)
            except OSError as exc:
                if out_of_files(exc):
                    raise OutOfFiles(f"{origin.host}:{origin.port}: no descriptor for a socket") from None
                raise ConnectError(f"{origin.host}:{origin.port}: {exc}") from None
            if origin.scheme == "http":
                return _Connection(origin, DirectSocketStream(tcp), tcp.socket)
            tls = trio.SSLStream(tcp, self.ssl_context, server_hostname=origin.host,
                                 https_compatible=True)
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, OSError) as exc:
                tcp.socket.close()
                cause = exc.__cause__ or exc
                raise ConnectError(f"{origin.host}:{origin.port}: TLS: {cause}") from None
            except BaseException:
                tcp.socket.close()
                raise
            return _Connection(origin, tls, tcp.socket)
        raise BackendTimeout(f"connecting to {origin.host}:{origin.port} timed out")

    def release(self, connection: _Connection) -> None:
        """A finished exchange: keep the connection if both sides may go on, else close it."""
        h = connection.h11
        if h is None:
            fit = connection.reusable
        else:
            # Bytes past the response would be read as the next one: not a connection to reuse.
            fit = (not connection.eof and h.our_state is h11.DONE and h.their_state is h11.DONE
                   and not h.trailing_data[0])
            connection.h11 = None
        if self._closed or not fit:
            self.discard(connection)
            return
        connection.idle_since = trio.current_time()
        self._idle.setdefault(connection.origin, []).append(connection)

    def discard(self, connection: _Connection) -> None:
        connection.close()
        self._open -= 1

    def release_slot(self, borrower: object) -> None:
        self._slots.release_on_behalf_of(borrower)

