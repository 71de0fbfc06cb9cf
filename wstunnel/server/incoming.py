"""A request as the server's front received it: its head, and its body, whole or still on the socket.

:class:`IncomingRequest` is what the front hands the application (the router, the forwarder, the
tunnel handshake, the console). A body larger than the front reads whole comes as a
:class:`RequestBody`, which whoever forwards the request pulls from the connection chunk by chunk
(a v2 tunnel as its stream has credit, a v1 tunnel whole), through the small
:class:`BodyConnection` surface of the front's HTTP connection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import h11
import trio

from wstunnel.headers import Headers
from wstunnel.server.messages import BodyBroken, BodyTimeout, BodyTooLarge, BodyVanished

RECEIVE_SIZE = 64 * 1024  # bytes read from a client's socket at once


class BodyConnection(Protocol):
    """What a RequestBody needs of the connection it came on (the front's HttpConnection)."""

    @property
    def conn(self) -> h11.Connection: ...

    @property
    def stream(self) -> trio.abc.Stream: ...

    async def continue_if_expected(self) -> None: ...


@dataclass(slots=True)
class IncomingRequest:
    method: bytes
    target: bytes
    headers: Headers
    peer: str
    body: bytes = b""
    # Set instead of ``body`` when the body is streamed: the body still on the socket.
    body_source: RequestBody | None = None
    # The subject of the client certificate verified on this connection (srv's own TLS).
    client_subject: str | None = None
    # Lowercased name -> first value, built at the first look-up: the server looks up several
    # headers per request (framing, upgrade, token, forwarding...), each a scan otherwise.
    _index: dict[bytes, bytes] | None = field(default=None, repr=False, compare=False)

    def header(self, name: bytes) -> bytes | None:
        """The first value of the header ``name`` (lowercase); ``headers`` must not change."""
        index = self._index
        if index is None:
            index = self._index = {}
            for key, value in self.headers:
                index.setdefault(key.lower(), value)
        return index.get(name)

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]

    def is_websocket_upgrade(self) -> bool:
        upgrade = (self.header(b"upgrade") or b"").lower()
        return b"websocket" in upgrade

    def head_size(self) -> int:
        """Bytes of the request line and headers, as they came on the wire (near enough)."""
        line = len(self.method) + len(self.target) + len(b"  HTTP/1.1\r\n")
        return line + sum(len(k) + len(v) + 4 for k, v in self.headers)

    def declared_length(self) -> int:
        """The Content-Length the client announced (h11 has checked it is a number), else 0."""
        value = self.header(b"content-length")
        return int(value) if value is not None else 0

    def body_size(self) -> int:
        """Body bytes received so far (all of them, once the request is over)."""
        return self.body_source.size if self.body_source is not None else len(self.body)


class RequestBody:
    """A request body still on the socket, read chunk by chunk by whoever forwards the request.

    Only one task reads it at a time (the tunnel's sender), while the connection's own task waits
    for the response; ``lock`` lets the connection take the socket back once the body's reader is
    done. A stall longer than ``timeout`` between two chunks is a BodyTimeout, so a body that keeps
    moving never times out, whatever its size.
    """

    def __init__(self, connection: BodyConnection, max_size: float, timeout: float) -> None:
        self._connection = connection
        self._max_size = max_size
        self._timeout = timeout
        self.size = 0
        self.complete = False
        self.started = False  # a chunk was handed out: the request can no longer be replayed
        self.last_activity: float | None = None
        self.lock = trio.Lock()
        self._closed = False
        self._early: list[bytes] = []  # parsed by prime(), not handed out yet

    def prime(self) -> None:
        """Parse what came with the head, without waiting: a body broken (or too large) from its
        first bytes is refused before routing, and a body that came whole is read whole."""
        conn = self._connection.conn
        while not self.complete:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                raise BodyBroken from None
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Data):
                self.size += len(event.data)
                if self.size > self._max_size:
                    raise BodyTooLarge
                self._early.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self.complete = True
            else:
                raise BodyBroken

    @property
    def buffered(self) -> int:
        """Bytes of the body held in memory (what came with the head), not handed out yet."""
        return sum(len(chunk) for chunk in self._early)

    def take_early(self) -> bytes:
        early, self._early = b"".join(self._early), []
        return early

    async def receive(self) -> bytes | None:
        """The next chunk, or None at the end; BodyError if the body will never be whole."""
        if self._early:
            self.started = True
            self.last_activity = trio.current_time()
            return self._early.pop(0)
        if self.complete:
            return None
        async with self.lock:
            if self._closed:
                raise BodyBroken
            connection = self._connection
            await connection.continue_if_expected()
            conn = connection.conn
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError:
                    self._closed = True
                    raise BodyBroken from None
                if event is h11.NEED_DATA:
                    with trio.move_on_after(self._timeout) as waited:
                        try:
                            data = await connection.stream.receive_some(RECEIVE_SIZE)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            data = b""
                    if waited.cancelled_caught:
                        self._closed = True
                        raise BodyTimeout
                    if not data:  # the client closed or reset its connection mid-body
                        self._closed = True
                        raise BodyVanished
                    conn.receive_data(bytes(data))  # bytes already: no copy
                    continue
                if isinstance(event, h11.Data):
                    self.size += len(event.data)
                    if self.size > self._max_size:
                        self._closed = True
                        raise BodyTooLarge
                    self.started = True
                    self.last_activity = trio.current_time()
                    return bytes(event.data)
                if isinstance(event, h11.EndOfMessage):
                    self.complete = True
                    return None
                self._closed = True
                raise BodyBroken

    async def read_all(self, limit: float = math.inf) -> bytes:
        """The whole rest of the body (a v1 tunnel carries bodies whole); BodyTooLarge as soon
        as the body passes ``limit`` bytes."""
        chunks: list[bytes] = []
        while (chunk := await self.receive()) is not None:
            chunks.append(chunk)
            if self.size > limit:
                self._closed = True
                raise BodyTooLarge
        return b"".join(chunks)

    def close(self) -> None:
        """Nobody will read further: the connection will not be reused."""
        self._closed = True
