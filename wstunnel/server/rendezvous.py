"""The server's rendez-vous: tokens, their request queues, and the connections that serve them.

A :class:`Rendezvous` exists per token. HTTP requests for the token wait in its queue; every tunnel
connection registered with the token pulls from that queue, so requests spread over the token's
clients and wait there while none is connected. A request whose tunnel dies after it was sent is
retried on the next connection if its method is idempotent, and answered 502 at once otherwise (the
original left it hanging for ``httptimeout``). A request whose body is streamed cannot be replayed
once a byte of it has left: 502 as well.

A streamed body is not read while its request waits in the queue: the HTTP client waits with it
(TCP backpressure), so the queue holds no more bytes than it holds for bodiless requests.

Nothing here knows a protocol: what the rendez-vous needs of a connection is :class:`Carrier`,
and, of one that takes requests handed to it directly (a v2 tunnel), :class:`DirectCarrier`.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import trio

from wstunnel import framing
from wstunnel.alarms import Alarms
from wstunnel.logs import EventLogger
from wstunnel.server.aborts import AbortTally, Cut
from wstunnel.server.audit import TunnelAudit
from wstunnel.server.messages import RequestBodySource, StreamingResponse
from wstunnel.tokens import Token

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# Distinct unknown tokens that may wait during restart_grace; beyond it, 404 at once.
MAX_AWAITED_TOKENS = 10_000


class QueueFull(Exception):
    """The token already has ``max_requests_per_tunnel`` requests waiting."""


@dataclass(eq=False)
class Failure:
    status: int
    text: str
    # Set when the request's body was under way and broke off: the upload's abort.
    cut: Cut | None = None
    # The abort tally of the tunnel connection that held the request, if one did.
    tunnel_aborts: AbortTally | None = None


class Carrier(Protocol):
    """A tunnel connection, as its token's rendez-vous (and the status pages) see it."""

    @property
    def addr(self) -> str: ...

    @property
    def client_version(self) -> str: ...

    @property
    def transport(self) -> str:
        """"websocket" or "longpoll"."""
        ...

    @property
    def protocol(self) -> str:
        """"v1" or "v2"."""
        ...

    @property
    def connected_at(self) -> float: ...

    @property
    def client_subject(self) -> str | None:
        """The subject of the client certificate the tunnel opened with, if any."""
        ...

    @property
    def answered(self) -> int: ...

    @property
    def in_flight(self) -> dict[int, PendingRequest]: ...

    @property
    def aborts(self) -> AbortTally:
        """The streams it carried that broke off (wstunnel.server.aborts)."""
        ...

    def idle_secs(self) -> float:
        """Seconds since the client last sent anything."""
        ...

    def flow(self) -> dict[str, int] | None:
        """Protocol v2's flow-control figures (windows, round-trip probes); None for v1."""
        ...

    def abandon(self, pending: PendingRequest) -> None:
        """The HTTP side gave up on ``pending``, which this connection holds."""
        ...

    async def close(self, code: int = 1000, reason: str | None = None, *,
                    deadline: float = math.inf) -> bool:
        """Close the tunnel; True if the peer answered in time."""
        ...


class DirectCarrier(Protocol):
    """A connection that also takes requests handed to it by the HTTP request's own task."""

    @property
    def load(self) -> int:
        """Requests it carries now: the least loaded one gets the next request."""
        ...

    def can_start_now(self) -> bool:
        """Whether ``start_now`` would take a request now."""
        ...

    def start_now(self, pending: PendingRequest) -> None:
        """Take ``pending`` and start it, without a checkpoint; ``send_early`` must follow."""
        ...

    async def send_early(self) -> None:
        """After ``start_now``, before any other checkpoint: send what waits if it is a batch's
        worth, or if the request is alone on its tunnel."""
        ...


@dataclass(eq=False)
class PendingRequest:
    """One HTTP request on its way through a tunnel, and, once known, its outcome."""

    id: int
    request: framing.Request
    # The body, when it is still on the HTTP client's socket (request.body is then empty).
    body_source: RequestBodySource | None = None
    upgrade: bool = False  # a WebSocket upgrade: only a v2 tunnel can carry it
    # For the console's list of requests in flight: the HTTP client, and when it asked.
    addr: str = ""
    started: float = 0.0
    tries: int = 0
    abandoned: bool = False
    holder: Carrier | None = None
    # A v1 tunnel answers with a whole Response; a v2 tunnel with a StreamingResponse.
    outcome: framing.Response | StreamingResponse | Failure | None = None
    # Set with the outcome, or by the alarm of the wait for it (exchange).
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def method(self) -> bytes:
        return self.request.method

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT_METHODS

    @property
    def replayable(self) -> bool:
        """Can be sent again: its body is whole in memory, or not a byte of it was taken yet."""
        return self.body_source is None or not self.body_source.started

    @property
    def held_bytes(self) -> int:
        """Request bytes in memory while it waits: its body, or what came with the head of a
        streamed one (the rest stays with the HTTP client until a tunnel takes it)."""
        source = self.body_source
        return len(self.request.body) + (source.buffered if source is not None else 0)

    def last_activity(self) -> float | None:
        """When its streamed body last moved, if it did."""
        return self.body_source.last_activity if self.body_source is not None else None

    def finish(self, outcome: framing.Response | StreamingResponse | Failure) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.done.set()


class RequestQueue:
    """FIFO of requests waiting for a tunnel connection; abandoned ones can be taken out.

    Bounded twice: by count (``max_requests_per_tunnel``) and by the request bytes held
    (``max_queued_bytes``), since twenty requests of 100 MiB each are not "twenty requests".
    """

    def __init__(self, capacity: int, max_bytes: int | None = None) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0
        # Made on first use: an empty deque still allocates a 64-slot block (760 bytes), and a
        # token's queue is empty most of its life (every idle tunnel has one).
        self._items: collections.deque[PendingRequest] | None = None
        self._lot = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else 0

    def put_nowait(self, item: PendingRequest) -> None:
        if len(self) >= self.capacity:
            raise QueueFull
        size = item.held_bytes
        # One request alone may always wait, whatever its size (the body cap bounds it).
        if self.max_bytes is not None and self._items and self.bytes + size > self.max_bytes:
            raise QueueFull
        self._append(item, front=False)

    def put_front(self, item: PendingRequest) -> None:
        """Requeue a request that already had its place: it goes first, whatever the capacity."""
        self._append(item, front=True)

    def _append(self, item: PendingRequest, *, front: bool) -> None:
        if self._items is None:
            self._items = collections.deque()
        if front:
            self._items.appendleft(item)
        else:
            self._items.append(item)
        self.bytes += item.held_bytes
        self._lot.unpark()

    def discard(self, item: PendingRequest) -> bool:
        if self._items is None:
            return False
        try:
            self._items.remove(item)
        except ValueError:
            return False
        self.bytes -= item.held_bytes
        return True

    async def get(self) -> PendingRequest:
        while not self._items:
            await self._lot.park()
        assert self._items is not None
        item = self._items.popleft()
        self.bytes -= item.held_bytes
        return item


@dataclass(eq=False)
class RequestCounters:
    completed: int = 0
    errored: int = 0


class Rendezvous:
    """Everything the server knows about one token."""

    def __init__(self, token: Token, *, alarms: Alarms, max_requests: int,
                 max_bytes: int | None = None) -> None:
        self.token = token
        self.alarms = alarms  # the daemon's: a request's wait for its answer ends at one
        self.queue = RequestQueue(max_requests, max_bytes)
        self.connections: list[Carrier] = []
        self.counters = RequestCounters()
        self.audit = TunnelAudit()
        # Set by the console's block action: requests get 403 and tunnels are refused.
        self.blocked = False
        # Trio clock of the last request, tunnel message, client arriving or leaving, or
        # console action: what idle_for() counts from, and what the console's feed watches.
        # Aborted streams of every connection the token had, and why its last one closed.
        self.aborts = AbortTally()
        self.last_close: str | None = None
        self.last_activity = trio.current_time()
        self.created_wall = trio.current_time()
        self._ids = itertools.cycle(range(1, framing.MAX_ASSIGNED_ID + 1))
        self._live: dict[int, PendingRequest] = {}
        # The connections that take requests handed to them (v2), and how many only pull from
        # the queue (v1): while one of those is there, every request goes through the queue.
        self._direct: list[DirectCarrier] = []
        self._queue_only = 0
        self._turn = 0  # which direct carrier _dispatch looks at first

    def attach(self, connection: Carrier, direct: DirectCarrier | None) -> None:
        """A connection starts serving the token; ``direct`` is the same connection if it takes
        requests handed to it, else None."""
        self.connections.append(connection)
        if direct is None:
            self._queue_only += 1
        else:
            self._direct.append(direct)
        self.touch()  # a client coming or going is activity (the console shows it)

    def detach(self, connection: Carrier, direct: DirectCarrier | None,
               reason: str | None = None) -> None:
        """A connection stops serving the token; ``reason`` says why it closed."""
        self.connections.remove(connection)
        if reason is not None:
            self.last_close = reason
        if direct is None:
            self._queue_only -= 1
        else:
            self._direct.remove(direct)
        self.touch()  # and token_idle_timeout counts from the last client's leaving

    def new_request(self, request: framing.Request) -> PendingRequest:
        """Give ``request`` the next free id (1, 2, ... 0x7fff, 1, ...)."""
        if len(self._live) >= framing.MAX_ASSIGNED_ID:
            raise QueueFull
        for request_id in self._ids:
            if request_id not in self._live:
                pending = PendingRequest(id=request_id, request=request)
                self._live[request_id] = pending
                return pending
        raise AssertionError("unreachable: itertools.cycle never ends")

    def release(self, pending: PendingRequest) -> None:
        """Free the id once neither the HTTP side nor a tunnel connection holds the request."""
        finished = pending.outcome is not None or pending.abandoned
        if pending.holder is None and finished and self._live.get(pending.id) is pending:
            del self._live[pending.id]

    def fail_all(self, failure: Failure) -> None:
        """Answer everything waiting for the token with ``failure`` (its access was revoked)."""
        for pending in list(self._live.values()):
            pending.finish(failure)
            self.queue.discard(pending)

    def live(self) -> Iterable[PendingRequest]:
        """The requests that hold an id now: queued, in flight, or just answered."""
        return self._live.values()

    @property
    def pending_count(self) -> int:
        return sum(1 for p in self._live.values() if not p.abandoned and p.outcome is None)

    def touch(self) -> None:
        self.last_activity = trio.current_time()

    def idle_for(self) -> float:
        return trio.current_time() - self.last_activity

    def _dispatch(self, pending: PendingRequest) -> DirectCarrier | None:
        """Start ``pending`` on a connection that can take it at once (and return that one),
        else queue it.

        Handing it over here, in the HTTP request's own task, spares the wake-up of a sender task
        per request; and requests that a tunnel can take at once never count against the queue's
        capacity, which is for requests that wait (a tunnel that is down or at its stream cap).
        Nothing overtakes a request already waiting. The least loaded connection takes it, the
        next one in turn among equals, so requests spread over a token's clients; a token that
        also has a v1 client queues everything, for that client's sender to get its share.
        """
        direct = self._direct
        if not self.queue and direct and not self._queue_only:
            count = len(direct)
            self._turn = (self._turn + 1) % count
            taker: DirectCarrier | None = None
            for index in range(self._turn, self._turn + count):
                carrier = direct[index % count]
                if carrier.can_start_now() and (taker is None or carrier.load < taker.load):
                    taker = carrier
            if taker is not None:
                taker.start_now(pending)
                return taker
        self.queue.put_nowait(pending)
        return None

    async def exchange(
        self, pending: PendingRequest, *, deadline: float
    ) -> framing.Response | StreamingResponse | Failure:
        """Queue ``pending`` and wait for its outcome until ``deadline`` (trio clock)."""
        self.touch()
        try:
            taker = self._dispatch(pending)
        except QueueFull:
            pending.abandoned = True
            self.release(pending)
            raise
        timeout = deadline - trio.current_time()
        try:
            if taker is not None:
                await taker.send_early()
            while True:
                # An alarm, not a cancel scope: the answer ends nearly every wait, and a scope
                # per request cost more than the wait (see wstunnel.alarms).
                alarm = self.alarms.at(deadline, pending.done.set)
                try:
                    await pending.done.wait()
                finally:
                    alarm.cancel()
                if pending.outcome is not None:
                    break
                # An upload that keeps moving is not late, whatever its size: the deadline
                # counts from its last byte.
                moved = pending.last_activity()
                if moved is None or moved + timeout <= deadline:
                    break
                deadline = moved + timeout
                pending.done = trio.Event()  # the alarm set the last one
        finally:
            if pending.outcome is None:
                # Timed out or the HTTP client went away: leave the queue, free the id.
                pending.abandoned = True
                self.queue.discard(pending)
                if pending.holder is not None:
                    pending.holder.abandon(pending)  # v2 cancels the stream; v1 cannot
            self.release(pending)
            self.touch()
        if pending.outcome is None:
            self.counters.errored += 1
            return Failure(504, "Tunnel timeout")
        if isinstance(pending.outcome, Failure):
            self.counters.errored += 1
        else:
            self.counters.completed += 1
        return pending.outcome


class Registry:
    """All tokens the server currently knows, and those it awaits just after a (re)start."""

    def __init__(self, *, alarms: Alarms, max_requests: int, token_idle_timeout: float,
                 max_bytes: int | None = None) -> None:
        self.alarms = alarms
        self._by_token: dict[Token, Rendezvous] = {}
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.token_idle_timeout = token_idle_timeout
        self._awaited: dict[Token, trio.Event] = {}

    def resize(self, max_requests: int, max_bytes: int | None = None) -> None:
        """New queue bounds for every token, known and future; queued requests stay queued."""
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        for rendezvous in self._by_token.values():
            rendezvous.queue.capacity = max_requests
            rendezvous.queue.max_bytes = max_bytes

    def __iter__(self) -> Iterator[Rendezvous]:
        return iter(list(self._by_token.values()))

    def __len__(self) -> int:
        return len(self._by_token)

    def get(self, token: Token) -> Rendezvous | None:
        return self._by_token.get(token)

    def register(self, token: Token) -> Rendezvous:
        """The token's rendez-vous for a new tunnel; requests awaiting it may go now."""
        rendezvous = self._by_token.get(token)
        if rendezvous is None:
            rendezvous = Rendezvous(token, alarms=self.alarms, max_requests=self.max_requests,
                                    max_bytes=self.max_bytes)
            self._by_token[token] = rendezvous
        rendezvous.touch()
        arrival = self._awaited.pop(token, None)
        if arrival is not None:
            arrival.set()
        return rendezvous

    async def await_registration(self, token: Token, *, until: float) -> Rendezvous | None:
        """The token's rendez-vous once a tunnel registers it, or None at ``until`` (trio clock).

        Just after a (re)start no token is known yet, though clients are on their way back: for
        ``restart_grace`` seconds a request for an unknown token waits for its tunnel instead of
        a 404 that would only mean "too early".
        """
        if trio.current_time() >= until or len(self._awaited) >= MAX_AWAITED_TOKENS:
            return None
        arrival = self._awaited.get(token)
        if arrival is None:
            arrival = self._awaited[token] = trio.Event()
        with trio.move_on_at(until):
            await arrival.wait()
        if self._awaited.get(token) is arrival and not arrival.is_set():
            del self._awaited[token]
        return self.get(token)

    def forget(self, token: Token) -> None:
        """Drop a token now (its access was revoked): everything waiting for it gets a 404."""
        rendezvous = self._by_token.pop(token, None)
        if rendezvous is not None:
            rendezvous.fail_all(Failure(404, "Tunnel not found"))

    def forget_idle(self) -> list[Rendezvous]:
        """Drop tokens with no connection and no request for ``token_idle_timeout``."""
        gone = [
            r for r in self._by_token.values()
            if not r.connections and r.pending_count == 0 and r.idle_for() >= self.token_idle_timeout
        ]
        for rendezvous in gone:
            del self._by_token[rendezvous.token]
        return gone

    async def reap_forever(self, log: EventLogger) -> None:
        period = min(60.0, max(0.5, self.token_idle_timeout / 4))
        while True:
            await trio.sleep(period)
            for rendezvous in self.forget_idle():
                log.info("WS   FORGET", token=rendezvous.token)

    def connections(self) -> Iterator[Carrier]:
        for rendezvous in self:
            yield from rendezvous.connections
