"""The HTTPS long-poll transport's wire, shared by both ends: endpoints, headers, limits, and the
message queues behind the MessageTransport methods (docs/longpoll.md specifies the protocol).

The body codec is ``wstunnel.tunnel.pollbody``; each end's HTTP side is ``wstunnel.server.longpoll``
and ``wstunnel.client.longpoll``.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass

import trio

from wstunnel.tunnel import pollbody
from wstunnel.tunnel.transport import CloseReason, ConnectionClosed

# The endpoints, under the tunnel URL's path.
OPEN_PATH = "/_tunnel/poll/open"
POLL_PATH = "/_tunnel/poll"
# The session id: a secret like a token, so in a header (never in a URL, which proxies log).
SESSION_HEADER = "X-Wstunnel-Session"
# Each direction numbers its non-empty batches: a POST's number, and the number of a poll's answer.
SEQ_HEADER = "X-Wstunnel-Seq"
# A poll acknowledges the last batch its client received.
ACK_HEADER = "X-Wstunnel-Ack"
# On the DELETE that closes a session: why, as a WebSocket Close frame's reason would say.
REASON_HEADER = "X-Wstunnel-Reason"
# A reason is at most this long (a Close frame's reason is at most 123 bytes).
MAX_REASON = 123
# The server holds a poll at most this long (it says how long in the session's open answer, at
# most half its wstimeout, so that a live client always polls again in time).
MAX_POLL_WAIT = 25.0
# The largest POST body: a batch of messages, or one message alone when it is larger.
MAX_POST_BODY = max(pollbody.MAX_BATCH_BYTES, pollbody.MAX_MESSAGE + pollbody.LENGTH.size)
# Messages queued for the other side before send_message waits, as a full socket would make a
# WebSocket sender wait; v2 windows already bound the DATA in flight (4 MiB per tunnel).
SEND_HIGH_WATER = 8 * 1024 * 1024
# Messages received and not yet taken before the HTTP side waits for the tunnel code to read.
INBOX_SIZE = 256


@dataclass(frozen=True)
class SessionOpened:
    """The server's answer to a session's open: its id, and how long it holds a poll at most."""

    session: str
    poll_wait: float

    def encode(self) -> bytes:
        return json.dumps({"session": self.session, "poll_wait_secs": self.poll_wait,
                           "max_batch_bytes": pollbody.MAX_BATCH_BYTES}).encode()

    @classmethod
    def decode(cls, body: bytes) -> SessionOpened:
        """ValueError if ``body`` is not an open answer."""
        try:
            document = json.loads(body)
            session = str(document["session"])
            wait = min(MAX_POLL_WAIT, float(document.get("poll_wait_secs", MAX_POLL_WAIT)))
        except (ValueError, KeyError, TypeError):
            raise ValueError("not a long-poll session's open answer") from None
        return cls(session, wait)


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

    @property
    def queued_bytes(self) -> int:
        """Bytes of the messages waiting for the other side to take them."""
        return self._outbox_bytes

    def _close_queues(self, reason: CloseReason) -> None:
        """Closed with ``reason``: every waiter wakes; get_message raises once the inbox is read.

        The outbox is emptied at once: no request carries it any more, and a session that
        ends by an error often lives on as garbage in a reference cycle (its tasks'
        tracebacks) until the collector's oldest generation runs, with up to SEND_HIGH_WATER
        of frames in it."""
        if self._closed is None:
            self._closed = reason
        self._outbox.clear()
        self._outbox_bytes = 0
        self._inbox_in.close()
        self._frames_ready.unpark_all()
        self._room.unpark_all()
