"""What every tunnel connection of the server does, whatever its protocol: register with its
token, watch for silence, close with a handshake, and retry or fail what it held when it is lost.

The protocols are siblings over this base: ``wstunnel.server.tunnel_v1`` (the original's, one
whole message per request) and ``wstunnel.server.tunnel_v2`` (streams with flow control). Each
runs its own tasks (``_run``) and says what becomes of its streams when the tunnel is lost
(``_lost``); this base runs the rest.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, NotRequired, TypedDict, Unpack

import trio

from wstunnel.logs import EventLogger
from wstunnel.server.aborts import AbortTally, Cause, Cut
from wstunnel.server.rendezvous import DirectCarrier, Failure, PendingRequest, Rendezvous
from wstunnel.tokens import Token
from wstunnel.tunnel.transport import Activity, MessageTransport

MAX_TRIES = 3
CLOSE_TIMEOUT = 2.0  # for the peer to answer our Close frame
# A close with a deadline (the server stopping) keeps at least this long to put its Close frame
# out: on an idle socket the send does not block, but a task scheduled after the deadline would
# otherwise be cancelled at its first checkpoint, before the frame leaves, and its client would
# only see the socket drop.
CLOSE_SEND_MIN = 0.2
# A Close frame's reason is at most 123 bytes (RFC 6455 5.5: control frames carry 125 at most).
MAX_CLOSE_REASON = 123


class ConnectionOptions(TypedDict):
    """Who is on the other end, and how the connection behaves: every protocol's keywords."""

    addr: str  # the client's address (behind a trusted proxy: the one it forwarded)
    client_version: str
    transport: str  # "websocket" or "longpoll"
    wstimeout: float
    log: EventLogger
    # The subject of the client certificate the tunnel opened with (ours or a frontend's TLS).
    client_subject: NotRequired[str | None]


class TunnelConnection(ABC):
    """One client's tunnel (a WebSocket or a long-poll session), serving its token's requests."""

    protocol: ClassVar[str]

    def __init__(
        self,
        rendezvous: Rendezvous,
        ws: MessageTransport,  # a WebSocket, or a long-poll session
        stream: Activity,
        **options: Unpack[ConnectionOptions],
    ) -> None:
        self.rendezvous = rendezvous
        self.ws = ws
        self.stream = stream
        self.addr = options["addr"]
        self.client_version = options["client_version"]
        self.transport = options["transport"]
        self.wstimeout = options["wstimeout"]
        self.log = options["log"]
        self.client_subject = options.get("client_subject")
        self.connected_at = trio.current_time()
        self.in_flight: dict[int, PendingRequest] = {}
        self.answered = 0
        self.aborts = AbortTally()  # the streams it carried that broke off
        # Why we closed the tunnel (the whole text; the Close frame carries what fits), and the
        # code to close with once serve() has ended the streams (_end_soon).
        self.closing_reason: str | None = None
        self._close_code = 1000
        self._closing = False
        self._closed = trio.Event()
        # Set by a connection that takes requests handed to it directly (it is then itself).
        self.direct: DirectCarrier | None = None

    @property
    def token(self) -> Token:
        return self.rendezvous.token

    def idle_secs(self) -> float:
        return max(0.0, trio.current_time() - self.stream.last_receive)

    def flow(self) -> dict[str, int] | None:
        """Streams, flow-control windows and round-trip probes for /_status and leak checks,
        where the protocol has flow control (v2)."""
        return None

    async def serve_logged(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                           **details: object) -> None:
        """``serve()`` between its ``WS NEW`` and ``WS CLOSE`` lines (``details`` on both); the
        tunnel is closed after, with the handshake it is owed."""
        self.log.info("WS   NEW", token=self.token, addr=self.addr, version=self.client_version,
                      protocol=self.protocol, clients=len(self.rendezvous.connections) + 1,
                      subject=self.client_subject, **details)
        task_status.started()
        try:
            await self.serve()
        finally:
            closed = self.ws.closed
            self.log.info("WS   CLOSE", token=self.token, addr=self.addr,
                          code=closed.code if closed is not None else self._close_code,
                          reason=self.close_description(), **details)
            await self.close(self._close_code, self.closing_reason)

    def close_description(self) -> str:
        """Why the tunnel closed (or is closing), in words, never empty: our own reason if we
        closed it, else the client's Close frame's, else what the transport saw."""
        if self.closing_reason:
            return self.closing_reason
        closed = self.ws.closed
        if closed is None:
            return "tunnel connection ended"
        if closed.reason:
            return closed.reason
        return f"closed by the client with code {closed.code} ({closed.name}) and no reason"

    async def serve(self) -> None:
        """Run until the tunnel closes, the peer breaks the protocol or falls silent."""
        rendezvous, direct = self.rendezvous, self.direct
        rendezvous.attach(self, direct)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_silence, nursery.cancel_scope)
                await self._run(nursery)
                nursery.cancel_scope.cancel()
        finally:
            rendezvous.detach(self, direct, self.close_description())
            self._lost()

    @abstractmethod
    async def _run(self, nursery: trio.Nursery) -> None:
        """The protocol's own work: returns when the tunnel is over; tasks go in ``nursery``."""

    @abstractmethod
    def _lost(self) -> None:
        """The tunnel is gone: end every request it still carries (``_fail_in_flight``)."""

    @abstractmethod
    def abandon(self, pending: PendingRequest) -> None:
        """The HTTP side gave up on ``pending``, which this connection holds."""

    async def close(self, code: int = 1000, reason: str | None = None, *,
                    deadline: float = math.inf) -> bool:
        """Close with a Close frame; a second caller waits for the first one's handshake.

        get_message() ends once our Close frame is out, so serve() returns while the peer's
        answer is still on its way; the caller that then tears the connection down must wait
        here, or it cancels the aclose() that is reading that answer.

        The wait for the answer ends after CLOSE_TIMEOUT, or earlier at ``deadline`` (trio
        clock; a stopping server shares one among all its tunnels), and the socket is closed
        without it. True if the handshake finished in time.
        """
        now = trio.current_time()
        limit = min(now + CLOSE_TIMEOUT, max(deadline, now + CLOSE_SEND_MIN))
        with trio.move_on_at(limit) as scope:
            scope.shield = True
            if self._closing:
                await self._closed.wait()
            else:
                self._closing = True
                self.closing_reason = self.closing_reason or reason
                if reason is not None and len(reason.encode()) > MAX_CLOSE_REASON:
                    reason = reason.encode()[:MAX_CLOSE_REASON].decode("utf-8", "ignore")
                try:
                    await self.ws.aclose(code, reason)
                finally:
                    self._closed.set()
        return not scope.cancelled_caught

    def _end_soon(self, code: int, reason: str) -> None:
        """Decide to close with ``code`` and ``reason``; the caller then lets serve() end. Its
        streams are ended first, the close handshake after: a peer that is gone or broken would
        only hold them up for CLOSE_TIMEOUT."""
        self.closing_reason = self.closing_reason or reason
        self._close_code = code

    async def _watch_silence(self, scope: trio.CancelScope) -> None:
        """Close the tunnel once the client has sent nothing (not even a ping) for wstimeout."""
        while True:
            deadline = self.stream.last_receive + self.wstimeout
            if trio.current_time() >= deadline:
                self.log.warning("WS   TIMEOUT", token=self.token, addr=self.addr,
                                 idle_secs=round(self.idle_secs(), 1))
                if self.transport == "longpoll":
                    reason = f"long-poll session expired: silent too long (no poll for {self.wstimeout:g}s)"
                else:
                    reason = f"tunnel silent too long: no ping or data for {self.wstimeout:g}s"
                self._end_soon(1001, reason)
                scope.cancel()
                return
            await trio.sleep_until(deadline)

    def _fail_in_flight(self) -> None:
        """Requests sent on this connection lost their answer: retry or fail them, at once."""
        for pending in self.in_flight.values():
            pending.holder = None
            if pending.abandoned or pending.outcome is not None:
                self.rendezvous.release(pending)
            elif pending.idempotent and pending.tries < MAX_TRIES and pending.replayable:
                self.log.info("WS   RETRY", token=self.token, id=pending.id, try_=pending.tries)
                self.rendezvous.queue.put_front(pending)
            else:
                failure = Failure(502, "Tunnel connection lost", tunnel_aborts=self.aborts)
                if pending.body_source is not None and pending.body_source.started:
                    # Its body was on its way: the upload broke off with the tunnel.
                    failure.cut = Cut("request", Cause.TUNNEL_LOST,
                                      f"tunnel connection lost: {self.close_description()}")
                pending.finish(failure)
                self.rendezvous.release(pending)
        self.in_flight.clear()


def short_target(target: bytes, limit: int = 120) -> str:
    """A request target for the ``WS SND`` line's info field: never huge."""
    text = target.decode("latin-1")
    return text if len(text) <= limit else text[:limit] + "..."
