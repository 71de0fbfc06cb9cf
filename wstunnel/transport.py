"""What the tunnel code above the transport needs from it: whole messages, in order, both ways.

Two transports satisfy :class:`MessageTransport`: a ``trio_websocket.WebSocketConnection`` (as it
is) and the HTTPS long-poll session of either end (``wstunnel.server.longpoll`` and
``wstunnel.client.longpoll``). So the protocol v2 code (``TunnelConnectionV2`` on the server,
``ClientSessionV2`` on the client), and with it queueing, retries, ids, logging, status and metrics,
runs unchanged over either.

The contract, as trio-websocket defines it: ``get_message`` returns the next message and
``send_message`` queues one, and both raise ``trio_websocket.ConnectionClosed`` (carrying a
``CloseReason``) once the transport is closed, by either side or by a failure; ``aclose`` closes it
(a second call is harmless); ``closed`` is the CloseReason once closed, else None. Long-poll raises
the same exception class so that every ``except ConnectionClosed`` above stays as it is.
"""

from __future__ import annotations

from typing import Protocol

from trio_websocket import CloseReason, ConnectionClosed

TRANSPORTS = ("websocket", "longpoll")

__all__ = [
    "TRANSPORTS", "Activity", "CloseReason", "ConnectionClosed", "MessageTransport",
    "PingableTransport",
]


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
