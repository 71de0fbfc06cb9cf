"""What the tunnel code above the transport needs from it: whole messages, in order, both ways.

Two transports satisfy :class:`MessageTransport`: a WebSocket (``wstunnel.websocket``, with
trio-websocket's contract) and the HTTPS long-poll session of either end
(``wstunnel.server.longpoll`` and ``wstunnel.client.longpoll``). So the protocol v2 code
(``TunnelConnectionV2`` on the server, ``ClientSessionV2`` on the client), and with it queueing,
retries, ids, logging, status and metrics, runs unchanged over either.

The contract, as trio-websocket defines it: ``get_message`` returns the next message and
``send_message`` queues one, and both raise ``trio_websocket.ConnectionClosed`` (carrying a
``CloseReason``) once the transport is closed, by either side or by a failure; ``aclose`` closes it
(a second call is harmless); ``closed`` is the CloseReason once closed, else None. Long-poll raises
the same exception class so that every ``except ConnectionClosed`` above stays as it is.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import trio
from trio_websocket import CloseReason, ConnectionClosed, HandshakeError

from wstunnel import pollbody, v2

TRANSPORTS = ("websocket", "longpoll")
# A WebSocket's reads from the socket, both ends.
WS_RECEIVE_SIZE = 64 * 1024

__all__ = [
    "EARLY_SEND_FRAMES", "TRANSPORTS", "WS_RECEIVE_SIZE", "Activity", "CloseReason",
    "ConnectionClosed", "FrameOutbox", "HandshakeError", "MessageTransport",
    "PingableTransport", "PolledMessages",
]

# Messages queued for the other side before send_message waits, as a full socket would make a
# WebSocket sender wait; v2 windows already bound the DATA in flight (4 MiB per tunnel).
SEND_HIGH_WATER = 8 * 1024 * 1024
# Messages received and not yet taken before the HTTP side waits for the tunnel code to read.
INBOX_SIZE = 256


class MessageTransport(Protocol):
    @property
    def closed(self) -> CloseReason | None: ...

    @property
    def subprotocol(self) -> str | None: ...

    async def get_message(self) -> str | bytes: ...

    async def send_message(self, message: str | bytes) -> None: ...

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None: ...


class PingableTransport(MessageTransport, Protocol):
    """The client's keepalive also needs a round trip to the server (a WebSocket ping)."""

    async def ping(self, payload: bytes | None = None) -> None: ...


class Activity(Protocol):
    """When the peer was last heard from (trio clock): the server's silence watch reads it."""

    @property
    def last_receive(self) -> float: ...


class PolledMessages:
    """The message queues of either end of a long-poll session, behind the MessageTransport
    methods: received messages wait in an inbox for ``get_message``; ``send_message`` fills an
    outbox that the HTTP side empties batch by batch (``_take_batch``), waiting above
    SEND_HIGH_WATER. Subclasses move the batches over HTTP and close with ``_close_queues``.
    """

    def __init__(self) -> None:
        self._closed: CloseReason | None = None
        self._inbox_in, self._inbox_out = trio.open_memory_channel[bytes](INBOX_SIZE)
        self._outbox: deque[bytes] = deque()
        self._outbox_bytes = 0
        self._frames_ready = trio.lowlevel.ParkingLot()  # the outbox's drainer waits here
        self._room = trio.lowlevel.ParkingLot()  # send_message waits here above the high water

    @property
    def closed(self) -> CloseReason | None:
        return self._closed

    async def get_message(self) -> bytes:
        try:
            return await self._inbox_out.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionClosed(self._closed) from None

    async def send_message(self, message: str | bytes) -> None:
        if isinstance(message, str):
            raise TypeError("long-poll carries binary messages only")
        while self._closed is None and self._outbox_bytes > SEND_HIGH_WATER:
            await self._room.park()
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        self._outbox.append(message)
        self._outbox_bytes += len(message)
        self._frames_ready.unpark_all()

    def _take_batch(self) -> list[bytes]:
        """The next body's worth of queued messages (pollbody.take_batch), making room."""
        batch = pollbody.take_batch(self._outbox)
        self._outbox_bytes -= sum(len(message) for message in batch)
        if self._outbox_bytes <= SEND_HIGH_WATER:
            self._room.unpark_all()
        return batch

    def _close_queues(self, reason: CloseReason) -> None:
        """Closed with ``reason``: every waiter wakes; get_message raises once the inbox is read."""
        if self._closed is None:
            self._closed = reason
        self._inbox_in.close()
        self._frames_ready.unpark_all()
        self._room.unpark_all()


# A batch's worth of frames: once this many wait, the task that put the last of them sends them
# (send_early) rather than leave them for the writer's next turn. trio runs a woken writer only
# after every task already runnable has had its turn; with 32 requests in flight those turns took
# milliseconds, every finished response waited through them, and the other daemon sat idle in the
# meantime: the two worked in lockstep. Paired runs at -c32 (wrk, 1 KiB): 2 frames: no gain
# (more, smaller messages); 8: +15 %; 16 and 32: +25-45 %, 32 with the least CPU per request.
EARLY_SEND_FRAMES = 32


class FrameOutbox:
    """Encoded v2 frames on their way to the transport, in the order they were put.

    ``put`` never waits (framing_v2's ordering rule: a frame goes out right after the V2Connection
    call that made it, with no checkpoint between); one writer task (``pump``) sends them as
    messages (``next_message``): one frame a message, or, on a batching tunnel, every frame
    waiting (up to MAX_BATCH_SIZE) in one message, or a batch's worth sent early by the task that
    filled it (``send_early``). One message is on its way at a time, so they leave in the order
    taken. Unbounded: what waits here is bounded by the peer's windows (DATA) or tiny (heads,
    WINDOW, RESET).
    """

    def __init__(self, *, batched: bool) -> None:
        self.batched = batched
        self._frames: deque[bytes] = deque()
        self._closed = False
        self._sending = False  # a message is on its way (the writer's or an early one)
        self._ready = trio.lowlevel.ParkingLot()

    def put(self, frame: bytes) -> None:
        if self._closed:
            return  # the tunnel is gone: so is everything we would have said
        self._frames.append(frame)
        if self._ready:
            self._ready.unpark()

    def close(self) -> None:
        """No more frames; the writer still gets those already put, then None."""
        self._closed = True
        self._ready.unpark_all()

    async def pump(self, transport: MessageTransport) -> None:
        """The writer task: send what is put, in order, until closed (or the transport is)."""
        while (message := await self.next_message()) is not None:
            if not await self._send(transport, message):
                return  # the receive loop sees the close too, and ends the tunnel

    async def send_early(self, transport: MessageTransport) -> None:
        """Called by a task that has just put frames: if a batch's worth waits and no message is
        on its way, send it from here, now. Shielded: a send cut short would leave part of a
        message on the wire and break the tunnel for everyone."""
        if not self.batched or self._sending or len(self._frames) < EARLY_SEND_FRAMES:
            return
        with trio.CancelScope(shield=True):
            await self._send(transport, self._take())

    async def next_message(self) -> bytes | None:
        """The next message to send, waiting for a frame; None once closed and drained."""
        frames = self._frames
        while not frames or self._sending:
            if self._closed and not frames:
                return None
            await self._ready.park()
        return self._take()

    async def _send(self, transport: MessageTransport, message: bytes) -> bool:
        """Send ``message``; False if the transport has closed."""
        self._sending = True
        try:
            await transport.send_message(message)
        except ConnectionClosed:
            return False
        finally:
            self._sending = False
            if self._frames and self._ready:
                self._ready.unpark()  # the writer, waiting for our message to be on its way
        return True

    def _take(self) -> bytes:
        frames = self._frames
        if not self.batched:
            return frames.popleft()
        batch = [frames.popleft()]
        size = len(batch[0]) + v2.BATCH_ENTRY_OVERHEAD
        while frames and size + len(frames[0]) + v2.BATCH_ENTRY_OVERHEAD <= v2.MAX_BATCH_SIZE:
            batch.append(frames.popleft())
            size += len(batch[-1]) + v2.BATCH_ENTRY_OVERHEAD
        return v2.pack_batch(batch)
