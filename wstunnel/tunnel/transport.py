"""What the tunnel code above the transport needs from it: whole messages, in order, both ways.

Two transports satisfy :class:`MessageTransport`: a WebSocket (``wstunnel.tunnel.websocket``, with
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

from typing import Protocol

import trio
from trio_websocket import CloseReason, ConnectionClosed, HandshakeError

__all__ = [
    "NOTSENT_LOWAT",
    "TRANSPORTS",
    "VERSION_HEADER",
    "WS_RECEIVE_SIZE",
    "Activity",
    "ActivityStream",
    "CloseReason",
    "ConnectionClosed",
    "HandshakeError",
    "MessageTransport",
    "half_close",
    "tune_tunnel_socket",
]

TRANSPORTS = ("websocket", "longpoll")
# A WebSocket's reads from the socket, both ends.
WS_RECEIVE_SIZE = 64 * 1024
# Our version, in both directions of either transport's opening (the WebSocket handshake, the
# long-poll session's open): each end logs the other's and /_status shows the client's.
VERSION_HEADER = b"X-Wstunnel-Version"


class MessageTransport(Protocol):
    @property
    def closed(self) -> CloseReason | None: ...

    @property
    def subprotocol(self) -> str | None: ...

    async def get_message(self) -> bytes | bytearray | str: ...

    async def send_message(self, message: str | bytes) -> None: ...

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None: ...

    async def ping(self, payload: bytes | None = None) -> None:
        """One round trip to the peer and back (a WebSocket ping; a long-poll request's answer):
        the client's keepalive, and either end's window tuner, time it."""
        ...


class Activity(Protocol):
    """When the peer was last heard from (trio clock): the server's silence watch reads it."""

    @property
    def last_receive(self) -> float: ...


# Unsent bytes the kernel keeps for a tunnel socket before it stops asking for more: the rest
# waits in the tunnel's own outbox, where a small response's frames can still go ahead of a bulk
# transfer's (the kernel's autotuned send buffer, megabytes, would hold them all in line). Sent
# bytes awaiting their acknowledgement do not count, so throughput is unchanged.
NOTSENT_LOWAT = 128 * 1024


async def half_close(stream: trio.abc.Stream) -> None:
    """Send EOF where ``stream`` can take one (TCP can, TLS cannot), leaving its peer free to go
    on sending: the end of one direction of a pipe, or of a response before a linger."""
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()


def tune_tunnel_socket(sock: trio.socket.SocketType) -> None:
    """Options every tunnel socket gets, at either end: no Nagle delay, little unsent backlog."""
    sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
    lowat = getattr(trio.socket, "TCP_NOTSENT_LOWAT", None)  # Linux and BSDs
    if lowat is not None:
        sock.setsockopt(trio.socket.IPPROTO_TCP, lowat, NOTSENT_LOWAT)


class ActivityStream(trio.abc.Stream):
    """A stream that first replays ``prefix``, then reads ``inner``, noting when bytes arrive.

    The HTTP front has already read (and parsed) the WebSocket handshake when it learns that a
    connection is a tunnel; replaying those bytes lets ``wstunnel.tunnel.websocket.accept`` read the
    handshake itself. ``last_receive`` lets the server close a tunnel that has sent nothing for
    ``wstimeout``: pings count as activity although the WebSocket layer answers them itself.
    """

    def __init__(self, inner: trio.abc.Stream, prefix: bytes = b"") -> None:
        self._inner = inner
        self._prefix = prefix
        self.last_receive = trio.current_time()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        data = bytes(await self._inner.receive_some(max_bytes))  # no copy when it is bytes
        self.last_receive = trio.current_time()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._inner.aclose()
