"""The tunnel's WebSocket on a trio stream, read by the task that wants the messages.

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
``H11Handshake``; once open, frames are read and written by our own codec
(``wstunnel.tunnel._wsframes``) in place of wsproto's ``Connection``, with less work per frame
(no extension is negotiated: we offer none and accept none).

Concurrency: one task reads (the receive loop; ``aclose`` reads only when nobody else does);
any task may send. Answers the reader owes (Pong, the Close reply) are sent by the reader.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import OrderedDict, deque
from collections.abc import Iterable

import trio
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected, HandshakeError
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

from wstunnel.tunnel import _wsframes as frames

__all__ = ["WebSocket", "accept", "connect"]

Headers = Iterable[tuple[bytes, bytes]]

# How long aclose waits for the peer's Close reply before closing the TCP connection anyway.
CLOSE_TIMEOUT = 2.0
# What a refusing server's body may be (ConnectionRejected.body); the rest is not read.
MAX_REJECTION_BODY = 64 * 1024
# A handshake head held back from h11 until it is whole; longer, h11 sees it (and refuses it:
# its own limit is 16 KiB).
MAX_HANDSHAKE_HEAD = 16 * 1024
ABNORMAL_CLOSURE = 1006
# Where the closing handshake is (RFC 6455 7): open; our Close sent, its reply awaited; done
# (the peer's Close came and was answered, or answered ours, or the stream ended).
OPEN, LOCAL_CLOSING, CLOSED = "open", "local closing", "closed"
_BLANK_LINE = re.compile(b"\n\r?\n")


class WebSocket:
    """An open WebSocket; see the module docstring for what it promises."""

    __slots__ = (
        "_closed", "_is_server", "_masked", "_messages", "_peer_closed", "_pings", "_read_done",
        "_reader", "_reading", "_receive_size", "_send_lock", "_state", "_stream", "_stream_end",
        "answer_headers", "subprotocol",
    )

    def __init__(self, stream: trio.abc.Stream, *, client: bool, subprotocol: str | None,
                 max_message_size: int, receive_size: int,
                 answer_headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self._stream = stream
        self._is_server = not client
        self._masked = client  # what a client sends is masked (RFC 6455 5.3)
        self._reader = frames.FrameReader(client=client, max_message_size=max_message_size)
        self._state = OPEN
        self.subprotocol = subprotocol
        # The client's: the headers of the server's 101 answer (what else it agreed to).
        self.answer_headers = answer_headers
        self._receive_size = receive_size
        self._closed: CloseReason | None = None
        self._peer_closed = False  # its Close frame came, or the stream ended
        self._messages: deque[bytes | bytearray | str] = deque()  # received whole, not yet taken
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
            if self._state is CLOSED:
                self._peer_closed = True  # after our Close and its reply: nothing more to read
                return
            if data:
                await self._handle_events(self._reader.receive(bytes(data)))
            else:
                await self._on_stream_end()
        finally:
            self._reading = False
            self._read_done.unpark_all()

    async def _handle_events(self, events: list[frames.Event]) -> None:
        for event in events:
            if isinstance(event, bytes | str):
                if self._closed is None:  # else we said Close: nobody will take it
                    self._messages.append(event)
            elif isinstance(event, frames.Ping):
                if self._state is OPEN:
                    await self._send_quietly(frames.encode_pong(event.payload,
                                                                masked=self._masked))
            elif isinstance(event, frames.Pong):
                self._on_pong(event.payload)
            elif isinstance(event, frames.Close):
                await self._on_close(event)
            else:
                await self._on_failure(event)

    def _on_pong(self, payload: bytes) -> None:
        """A pong answers its ping and every earlier one (a peer may answer several at once)."""
        if payload not in self._pings:
            return
        while self._pings:
            answered, pong = self._pings.popitem(last=False)
            pong.set()
            if answered == payload:
                return

    async def _on_close(self, event: frames.Close) -> None:
        """The peer closes (send_message fails from now on), or its reply to our Close came."""
        replying = self._state is OPEN
        self._state = CLOSED
        self._closing(event.code, event.reason or None)
        if replying:  # RFC 6455 5.5.1: its code and reason back
            await self._send_quietly(frames.encode_close(event.code, event.reason,
                                                         masked=self._masked))
        await self._peer_gone()

    async def _on_stream_end(self) -> None:
        """The stream ended without a Close frame (1006), or after ours without its reply."""
        self._state = CLOSED
        self._closing(ABNORMAL_CLOSURE, self._vanished(self._stream_end))
        await self._peer_gone()

    async def _on_failure(self, failure: frames.Failure) -> None:
        """The peer's frames broke the protocol: we close with the code the codec gives."""
        if self._state is OPEN:
            await self._fail(failure.code, failure.reason)
        else:  # while we wait for the reply to our Close: as good as the reply
            await self._peer_gone()

    async def _peer_gone(self) -> None:
        self._peer_closed = True
        if self._is_server:
            # "the server SHOULD initiate a TCP Close immediately" (RFC 6455 7.1.1)
            await self._close_stream()

    async def _fail(self, code: int, reason: str | None) -> None:
        """We end the WebSocket over what the peer sent: Close with ``code``, then hang up."""
        self._closing(code, reason)
        if self._state is OPEN:
            self._state = LOCAL_CLOSING
            await self._send_quietly(frames.encode_close(code, reason, masked=self._masked))
        await self._close_stream()

    # -- sending ----------------------------------------------------------------------------

    async def send_message(self, message: bytes | str) -> None:
        """Send one message; ConnectionClosed if the WebSocket is closed (or closing)."""
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        await self._send(frames.encode_message(message, masked=self._masked))

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
            await self._send(frames.encode_ping(payload, masked=self._masked))
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
                if self._state is OPEN:
                    self._state = LOCAL_CLOSING
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await self._send_quietly(frames.encode_close(code, reason,
                                                                     masked=self._masked))
                        await self._wait_for_close_reply()
        finally:
            # trio's aclose closes the stream even when cancelled (then it raises Cancelled).
            await self._close_stream()

    async def _wait_for_close_reply(self) -> None:
        while not self._peer_closed and self._state is not CLOSED:
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


def _head_end(received: bytes) -> int | None:
    """Where the first HTTP head in ``received`` ends (h11's blank line: LF, optional CR, LF);
    None while it may still come. A head too long is given to h11 whole, which refuses it."""
    blank_line = _BLANK_LINE.search(received)
    if blank_line is None:
        return len(received) if len(received) > MAX_HANDSHAKE_HEAD else None
    return blank_line.end()


async def _opened(ws: WebSocket, received: bytes) -> WebSocket:
    """Frames that came in the same read as the handshake (a server may send the first request
    right behind its 101): take them now, or they would wait for the next bytes on the socket.

    The handshake is given the bytes of its head only, so what follows it is ours to read."""
    if received:
        await ws._handle_events(ws._reader.receive(received))
    return ws


async def accept(stream: trio.abc.Stream, *, subprotocol: str | None, extra_headers: Headers,
                 max_message_size: int, receive_size: int) -> WebSocket:
    """Server side: read the upgrade request from ``stream`` and accept it with ``subprotocol``.

    A request wsproto finds bad is answered (400) and raised as HandshakeError; a stream that
    ends first raises BrokenResourceError. The caller bounds the time.
    """
    handshake = H11Handshake(ConnectionType.SERVER)
    received = b""  # not yet given to the handshake
    while True:
        data = await stream.receive_some(receive_size)
        if not data:
            raise trio.BrokenResourceError("connection closed during the WebSocket handshake")
        received += data
        end = _head_end(received)
        if end is None:
            continue
        head, received = received[:end], received[end:]
        try:
            handshake.receive_data(head)
        except RemoteProtocolError as exc:
            if exc.event_hint is not None:
                await stream.send_all(handshake.send(exc.event_hint))
            raise HandshakeError(f"bad WebSocket upgrade request: {exc}") from None
        if any(isinstance(event, Request) for event in handshake.events()):
            break
    await stream.send_all(handshake.send(
        AcceptConnection(subprotocol=subprotocol, extra_headers=list(extra_headers))
    ))
    return await _opened(WebSocket(stream, client=False, subprotocol=subprotocol,
                                   max_message_size=max_message_size, receive_size=receive_size),
                         received)


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
    received = b""  # not yet given to the handshake: after a 101's head, the first frames
    while True:
        data = await stream.receive_some(receive_size)
        if not data:
            if refusal is not None:  # a refusal whose body ends with the connection
                raise ConnectionRejected(refusal.status_code, tuple(refusal.headers), bytes(body))
            raise trio.BrokenResourceError("connection closed during the WebSocket handshake")
        if refusal is None:  # the answer's head: given to the handshake alone
            received += data
            end = _head_end(received)
            if end is None:
                continue
            pending, received = [received[:end]], received[end:]
        else:  # a refusal's body
            pending = [bytes(data)]
        while pending:
            try:
                handshake.receive_data(pending.pop())
            except RemoteProtocolError as exc:
                raise HandshakeError(f"bad WebSocket handshake response: {exc}") from None
            for event in handshake.events():
                if isinstance(event, AcceptConnection):
                    return await _opened(WebSocket(
                        stream, client=True, subprotocol=event.subprotocol,
                        max_message_size=max_message_size, receive_size=receive_size,
                        answer_headers=tuple(event.extra_headers),
                    ), received)
                if isinstance(event, RejectConnection):
                    if not event.has_body:
                        raise ConnectionRejected(event.status_code, tuple(event.headers), None)
                    refusal = event
                    if received:  # the body's start, in the same read as the head
                        pending.append(received)
                        received = b""
                elif isinstance(event, RejectData) and refusal is not None:
                    body += event.data
                    if event.body_finished or len(body) >= MAX_REJECTION_BODY:
                        raise ConnectionRejected(refusal.status_code, tuple(refusal.headers),
                                                 bytes(body[:MAX_REJECTION_BODY]))
