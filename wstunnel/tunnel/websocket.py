"""The tunnel's WebSocket: wsproto on a trio stream, read by the task that wants the messages.

trio-websocket gives every connection a reader task that hands each message to ours through a
memory channel, and serialises sends with a lock. Each of those costs a pass of trio's scheduler
per message (a task switch, an epoll_wait): with one request in flight, two of the eight passes
each daemon makes per request. Here the tunnel's receive loop reads the socket itself
(``get_message``), and a send goes straight to the socket unless another one is under way.

:class:`WebSocket` keeps trio-websocket's contract (``transport.MessageTransport``: get_message,
send_message, ping, aclose, closed, subprotocol) and raises trio-websocket's exceptions
(``ConnectionClosed`` with a ``CloseReason``; ``HandshakeError``, ``ConnectionRejected``), so the
tunnel code and its callers do not know which one they hold; the long-poll transports raise the
same. Opening handshakes: :func:`accept` (server) and :func:`connect` (client), with wsproto's
``H11Handshake``; once open only wsproto's ``Connection`` is kept.

Concurrency: one task reads (the receive loop; ``aclose`` reads only when nobody else does);
any task may send. Answers the reader owes (Pong, the Close reply) are sent by the reader.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict, deque
from collections.abc import Iterable

import trio
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected, HandshakeError
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

__all__ = ["WebSocket", "accept", "connect"]

Headers = Iterable[tuple[bytes, bytes]]

# How long aclose waits for the peer's Close reply before closing the TCP connection anyway.
CLOSE_TIMEOUT = 2.0
# What a refusing server's body may be (ConnectionRejected.body); the rest is not read.
MAX_REJECTION_BODY = 64 * 1024
MESSAGE_TOO_BIG = 1009
ABNORMAL_CLOSURE = 1006
OPEN, CLOSED = ConnectionState.OPEN, ConnectionState.CLOSED


class WebSocket:
    """An open WebSocket; see the module docstring for what it promises."""

    __slots__ = (
        "_closed", "_connection", "_is_server", "_max_message_size", "_message_size", "_messages",
        "_parts", "_peer_closed", "_pings", "_read_done", "_reading", "_receive_size", "_send_lock",
        "_stream", "_stream_end", "answer_headers", "subprotocol",
    )

    def __init__(self, stream: trio.abc.Stream, connection: Connection, *,
                 subprotocol: str | None, max_message_size: int, receive_size: int,
                 answer_headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self._stream = stream
        self._connection = connection
        self._is_server = not connection.client
        self.subprotocol = subprotocol
        # The client's: the headers of the server's 101 answer (what else it agreed to).
        self.answer_headers = answer_headers
        self._max_message_size = max_message_size
        self._receive_size = receive_size
        self._closed: CloseReason | None = None
        self._peer_closed = False  # its Close frame came, or the stream ended
        # Received whole, not yet taken: wsproto's bytearray as it is (a copy to bytes would
        # cost a pass over every byte received).
        self._messages: deque[bytes | bytearray | str] = deque()
        self._parts: list[bytes | bytearray | str] = []  # of a message still arriving
        self._message_size = 0
        self._pings: OrderedDict[bytes, trio.Event] = OrderedDict()
        self._reading = False
        self._read_done = trio.lowlevel.ParkingLot()  # aclose waits here while another reads
        self._send_lock = trio.Lock()  # hands itself to the next waiting sender, in order
        self._stream_end = "connection closed"  # how the stream ended, if it ends unannounced

    @property
    def closed(self) -> CloseReason | None:
        """Why the WebSocket closed (or is closing), else None."""
        return self._closed

    # -- receiving --------------------------------------------------------------------------

    async def get_message(self) -> bytes | bytearray | str:
        """The next message; ConnectionClosed once closed and every message received is taken.

        Messages that one read of the socket brought are returned without a checkpoint: that
        read was one, and what it can bring is bounded by its size.
        """
        messages = self._messages
        while not messages:
            if self._closed is not None:
                raise ConnectionClosed(self._closed)
            await self._read()
        return messages.popleft()

    async def _read(self) -> None:
        """One read of the socket, and what it brought handled."""
        if self._reading:
            raise trio.BusyResourceError("another task is already reading this WebSocket")
        self._reading = True
        try:
            try:
                data = await self._stream.receive_some(self._receive_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
                self._stream_end = "connection reset"
            if self._connection.state is CLOSED:
                self._peer_closed = True  # after our Close and its reply: nothing more to read
                return
            self._connection.receive_data(bytes(data) or None)  # None: the stream ended
            await self._handle_events()
        finally:
            self._reading = False
            self._read_done.unpark_all()

    async def _handle_events(self) -> None:
        for event in self._connection.events():
            if isinstance(event, BytesMessage | TextMessage):
                await self._on_message_part(event)
            elif isinstance(event, Ping):
                if self._connection.state is OPEN:
                    await self._send_quietly(self._connection.send(event.response()))
            elif isinstance(event, Pong):
                self._on_pong(bytes(event.payload))
            elif isinstance(event, CloseConnection):
                await self._on_close(event)

    async def _on_message_part(self, event: BytesMessage | TextMessage) -> None:
        if self._closed is not None:
            return  # a message after we said Close: nobody will take it
        size = self._message_size + len(event.data)
        if size > self._max_message_size:
            self._parts, self._message_size = [], 0
            await self._fail(MESSAGE_TOO_BIG,
                             f"Exceeded maximum message size: {self._max_message_size} bytes")
            return
        if not event.message_finished:
            self._parts.append(event.data)
            self._message_size = size
            return
        if self._parts:
            self._parts.append(event.data)
            parts, self._parts, self._message_size = self._parts, [], 0
            joiner = b"" if isinstance(event, BytesMessage) else ""
            self._messages.append(joiner.join(parts))  # type: ignore[arg-type]
        else:
            self._messages.append(event.data)

    def _on_pong(self, payload: bytes) -> None:
        """A pong answers its ping and every earlier one (a peer may answer several at once)."""
        if payload not in self._pings:
            return
        while self._pings:
            answered, pong = self._pings.popitem(last=False)
            pong.set()
            if answered == payload:
                return

    async def _on_close(self, event: CloseConnection) -> None:
        state = self._connection.state
        if state is OPEN:
            # wsproto found the peer's frames bad (ParseFailed): we close, with its code.
            await self._fail(event.code, event.reason)
            return
        # The peer closes (send_message fails from now on), or, after our Close, its reply came,
        # or the stream ended without a Close (1006).
        reason = event.reason or None
        if reason is None and event.code == ABNORMAL_CLOSURE:
            reason = self._vanished(self._stream_end)
        self._closing(event.code, reason)
        if state is ConnectionState.REMOTE_CLOSING:
            await self._send_quietly(self._connection.send(event.response()))  # RFC 6455 5.5.1
        self._peer_closed = True
        if self._is_server:
            # "the server SHOULD initiate a TCP Close immediately" (RFC 6455 7.1.1)
            await self._close_stream()

    async def _fail(self, code: int, reason: str | None) -> None:
        """We end the WebSocket over what the peer sent: Close with ``code``, then hang up."""
        self._closing(code, reason)
        if self._connection.state is OPEN:
            await self._send_quietly(self._connection.send(CloseConnection(code, reason)))
        await self._close_stream()

    # -- sending ----------------------------------------------------------------------------

    async def send_message(self, message: bytes | str) -> None:
        """Send one message; ConnectionClosed if the WebSocket is closed (or closing)."""
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        event = TextMessage(message) if isinstance(message, str) else BytesMessage(message)
        await self._send(self._connection.send(event))

    async def ping(self, payload: bytes | None = None) -> None:
        """Send a Ping and wait for its Pong; ConnectionClosed if the WebSocket closes first."""
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        if payload is None:
            payload = os.urandom(4)
        if payload in self._pings:
            raise ValueError(f"a ping with payload {payload!r} is already in flight")
        pong = self._pings[payload] = trio.Event()
        try:
            await self._send(self._connection.send(Ping(payload)))
            await pong.wait()
        finally:
            unanswered = self._pings.pop(payload, None) is pong  # a pong pops its ping
        if unanswered:  # woken by the close
            raise ConnectionClosed(self._closed)

    async def _send(self, data: bytes | bytearray) -> None:
        """Write ``data`` whole, after any send under way (in the order they asked)."""
        lock = self._send_lock
        try:
            lock.acquire_nowait()  # nobody sending: no pass through the scheduler first
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._closing(ABNORMAL_CLOSURE, self._vanished("connection broken while sending"))
            raise ConnectionClosed(self._closed) from None
        finally:
            lock.release()

    async def _send_quietly(self, data: bytes | bytearray) -> None:
        """A control frame the protocol owes: if the stream is gone, the close says enough."""
        with contextlib.suppress(ConnectionClosed):
            await self._send(data)

    # -- closing ----------------------------------------------------------------------------

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close: send Close, wait (at most CLOSE_TIMEOUT) for the reply, hang up. Idempotent.

        The stream is closed however this ends: a caller's own deadline may cut the handshake
        short (a peer cut off, whose socket takes no more bytes), and the socket must not
        outlive it (it did, one per cut tunnel).
        """
        try:
            if self._closed is None:
                self._closing(code, reason)
                if self._connection.state is OPEN:
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await self._send_quietly(self._connection.send(CloseConnection(code, reason)))
                        await self._wait_for_close_reply()
        finally:
            # trio's aclose closes the stream even when cancelled (then it raises Cancelled).
            await self._close_stream()

    async def _wait_for_close_reply(self) -> None:
        while not self._peer_closed and self._connection.state is not CLOSED:
            if self._reading:
                await self._read_done.park()  # the receive loop reads the reply for us
            else:
                await self._read()

    async def _close_stream(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # already gone: closed either way
            await self._stream.aclose()

    def _vanished(self, how: str) -> str:
        """The close reason when the peer went without a Close frame (killed, cut off)."""
        return f"{'client' if self._is_server else 'server'} vanished ({how}, no Close frame)"

    def _closing(self, code: int, reason: str | None) -> None:
        """Closed from now on (the first reason given stays); pings waiting for a pong end."""
        if self._closed is None:
            self._closed = CloseReason(code, reason)
        for pong in self._pings.values():
            pong.set()


# -- opening handshakes -------------------------------------------------------------------------


async def _opened(ws: WebSocket) -> WebSocket:
    """Frames that came in the same read as the handshake (a server may send the first request
    right behind its 101) are in wsproto already: take them now, or they would wait for the
    next bytes on the socket."""
    await ws._handle_events()
    return ws


async def accept(stream: trio.abc.Stream, *, subprotocol: str | None, extra_headers: Headers,
                 max_message_size: int, receive_size: int) -> WebSocket:
    """Server side: read the upgrade request from ``stream`` and accept it with ``subprotocol``.

    A request wsproto finds bad is answered (400) and raised as HandshakeError; a stream that
    ends first raises BrokenResourceError. The caller bounds the time.
    """
    handshake = H11Handshake(ConnectionType.SERVER)
    while True:
        data = await stream.receive_some(receive_size)
        if not data:
            raise trio.BrokenResourceError("connection closed during the WebSocket handshake")
        try:
            handshake.receive_data(bytes(data))
        except RemoteProtocolError as exc:
            if exc.event_hint is not None:
                await stream.send_all(handshake.send(exc.event_hint))
            raise HandshakeError(f"bad WebSocket upgrade request: {exc}") from None
        if any(isinstance(event, Request) for event in handshake.events()):
            break
    await stream.send_all(handshake.send(
        AcceptConnection(subprotocol=subprotocol, extra_headers=list(extra_headers))
    ))
    connection = handshake.connection
    assert connection is not None  # open once the AcceptConnection is sent
    return await _opened(WebSocket(stream, connection, subprotocol=subprotocol,
                                   max_message_size=max_message_size, receive_size=receive_size))


async def connect(stream: trio.abc.Stream, host: str, resource: str, *,
                  subprotocols: Iterable[str], extra_headers: Headers,
                  max_message_size: int, receive_size: int) -> WebSocket:
    """Client side: send the upgrade request on ``stream`` and read the answer.

    Raises ConnectionRejected (status, headers, body) for an answer other than 101,
    HandshakeError for a 101 that is not a valid WebSocket acceptance, BrokenResourceError if the
    stream ends first. The caller bounds the time.
    """
    handshake = H11Handshake(ConnectionType.CLIENT)
    await stream.send_all(handshake.send(Request(
        host=host, target=resource, subprotocols=list(subprotocols),
        extra_headers=list(extra_headers),
    )))
    refusal: RejectConnection | None = None
    body = bytearray()
    while True:
        data = await stream.receive_some(receive_size)
        if not data:
            if refusal is not None:  # a refusal whose body ends with the connection
                raise ConnectionRejected(refusal.status_code, tuple(refusal.headers), bytes(body))
            raise trio.BrokenResourceError("connection closed during the WebSocket handshake")
        try:
            handshake.receive_data(bytes(data))
        except RemoteProtocolError as exc:
            raise HandshakeError(f"bad WebSocket handshake response: {exc}") from None
        for event in handshake.events():
            if isinstance(event, AcceptConnection):
                connection = handshake.connection
                assert connection is not None
                return await _opened(WebSocket(
                    stream, connection, subprotocol=event.subprotocol,
                    max_message_size=max_message_size, receive_size=receive_size,
                    answer_headers=tuple(event.extra_headers),
                ))
            if isinstance(event, RejectConnection):
                if not event.has_body:
                    raise ConnectionRejected(event.status_code, tuple(event.headers), None)
                refusal = event
            elif isinstance(event, RejectData) and refusal is not None:
                body += event.data
                if event.body_finished or len(body) >= MAX_REJECTION_BODY:
                    raise ConnectionRejected(refusal.status_code, tuple(refusal.headers),
                                             bytes(body[:MAX_REJECTION_BODY]))
