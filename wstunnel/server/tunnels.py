"""The server's rendez-vous: tokens, their request queues, and the tunnel connections serving them.

A :class:`Rendezvous` exists per token. HTTP requests for the token wait in its queue; every tunnel
connection registered with the token (:class:`TunnelConnection`) pulls from that queue, so requests
spread over the token's clients and wait there while none is connected. A request whose tunnel
dies after it was sent is retried on the next connection if its method is idempotent, and answered
502 at once otherwise (the original left it hanging for ``httptimeout``). A request whose body was
streamed (front.RequestBody) cannot be replayed once a byte of it has left: 502 as well.

A streamed body is not read while its request waits in the queue: the HTTP client waits with it
(TCP backpressure), so the queue holds no more bytes than it holds for bodiless requests.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio
import trio_websocket

from wstunnel import framing
from wstunnel.errors import HttpPayloadError, TunnelMessageError
from wstunnel.logs import EventLogger
from wstunnel.server.front import BodyError, RequestBody, StreamingResponse
from wstunnel.tokens import Token
from wstunnel.transport import Activity, MessageTransport

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
MAX_TRIES = 3
CLOSE_TIMEOUT = 2.0  # for the peer to answer our Close frame
# A close with a deadline (the server stopping) keeps at least this long to put its Close frame
# out: on an idle socket the send does not block, but a task scheduled after the deadline would
# otherwise be cancelled at its first checkpoint, before the frame leaves, and its client would
# only see the socket drop.
CLOSE_SEND_MIN = 0.2


class QueueFull(Exception):
    """The token already has ``max_requests_per_tunnel`` requests waiting."""


@dataclass(eq=False)
class Failure:
    status: int
    text: str


@dataclass(eq=False)
class PendingRequest:
    """One HTTP request on its way through a tunnel, and, once known, its outcome."""

    id: int
    request: framing.Request
    # The body, when it is still on the HTTP client's socket (request.body is then empty).
    body_source: RequestBody | None = None
    upgrade: bool = False  # a WebSocket upgrade: only a v2 tunnel can carry it
    tries: int = 0
    abandoned: bool = False
    holder: TunnelConnection | None = None
    # A v1 tunnel answers with a whole Response; a v2 tunnel with a StreamingResponse.
    outcome: framing.Response | StreamingResponse | Failure | None = None
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

    def __init__(self, token: Token, *, max_requests: int, max_bytes: int | None = None) -> None:
        self.token = token
        self.queue = RequestQueue(max_requests, max_bytes)
        self.connections: list[TunnelConnection] = []
        self.counters = RequestCounters()
        self.last_activity = trio.current_time()
        self.created_wall = trio.current_time()
        self._ids = itertools.cycle(range(1, framing.MAX_ASSIGNED_ID + 1))
        self._live: dict[int, PendingRequest] = {}
        self._turn = 0  # which connection _dispatch looks at first

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

    @property
    def pending_count(self) -> int:
        return sum(1 for p in self._live.values() if not p.abandoned and p.outcome is None)

    def touch(self) -> None:
        self.last_activity = trio.current_time()

    def idle_for(self) -> float:
        return trio.current_time() - self.last_activity

    def _dispatch(self, pending: PendingRequest) -> None:
        """Start ``pending`` on a connection that can take it at once, else queue it.

        Handing it over here, in the HTTP request's own task, spares the wake-up of a sender task
        per request; and requests that a tunnel can take at once never count against the queue's
        capacity, which is for requests that wait (a tunnel that is down or at its stream cap).
        Nothing overtakes a request already waiting. The least loaded connection takes it, the
        next one in turn among equals, so requests spread over a token's clients; a token that
        also has a v1 client queues everything, for that client's sender to get its share.
        """
        connections = self.connections
        if not self.queue and connections:
            count = len(connections)
            self._turn = (self._turn + 1) % count
            taker: TunnelConnection | None = None
            for index in range(self._turn, self._turn + count):
                connection = connections[index % count]
                if not connection.takes_directly:
                    taker = None
                    break
                if connection.can_start_now() and (taker is None or connection.load < taker.load):
                    taker = connection
            if taker is not None:
                taker.start_now(pending)
                return
        self.queue.put_nowait(pending)

    async def exchange(
        self, pending: PendingRequest, *, deadline: float
    ) -> framing.Response | StreamingResponse | Failure:
        """Queue ``pending`` and wait for its outcome until ``deadline`` (trio clock)."""
        self.touch()
        try:
            self._dispatch(pending)
        except QueueFull:
            pending.abandoned = True
            self.release(pending)
            raise
        timeout = deadline - trio.current_time()
        try:
            if pending.holder is not None:
                await pending.holder.send_early()
            while True:
                with trio.move_on_at(deadline):
                    await pending.done.wait()
                # An upload that keeps moving is not late, whatever its size: the deadline
                # counts from its last byte.
                moved = pending.last_activity()
                if pending.done.is_set() or moved is None or moved + timeout <= deadline:
                    break
                deadline = moved + timeout
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
    """All tokens the server currently knows."""

    def __init__(self, *, max_requests: int, token_idle_timeout: float,
                 max_bytes: int | None = None) -> None:
        self._by_token: dict[Token, Rendezvous] = {}
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.token_idle_timeout = token_idle_timeout

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
        rendezvous = self._by_token.get(token)
        if rendezvous is None:
            rendezvous = Rendezvous(token, max_requests=self.max_requests, max_bytes=self.max_bytes)
            self._by_token[token] = rendezvous
        rendezvous.touch()
        return rendezvous

    def forget(self, token: Token) -> None:
        """Drop a token now (its access was revoked): everything waiting for it gets a 404."""
        rendezvous = self._by_token.pop(token, None)
        if rendezvous is None:
            return
        for pending in list(rendezvous._live.values()):
            pending.finish(Failure(404, "Tunnel not found"))
            rendezvous.queue.discard(pending)

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

    def connections(self) -> Iterator[TunnelConnection]:
        for rendezvous in self:
            yield from rendezvous.connections


class TunnelConnection:
    """One client's WebSocket, pulling requests from its token's queue and returning responses."""

    protocol = "v1"

    def __init__(
        self,
        rendezvous: Rendezvous,
        ws: MessageTransport,  # a WebSocket, or a long-poll session
        stream: Activity,
        *,
        addr: str,
        client_version: str,
        transport: str,
        wstimeout: float,
        log: EventLogger,
    ) -> None:
        self.rendezvous = rendezvous
        self.ws = ws
        self.stream = stream
        self.addr = addr
        self.client_version = client_version
        self.transport = transport
        self.wstimeout = wstimeout
        self.log = log
        self.connected_at = trio.current_time()
        self.in_flight: dict[int, PendingRequest] = {}
        self.answered = 0
        self.closing_reason: str | None = None
        self._closing = False
        self._closed = trio.Event()
        self._nursery: trio.Nursery | None = None
        # Requests whose streamed bodies are being read whole before they go out (v1 only).
        self._reading: dict[int, trio.CancelScope] = {}

    @property
    def token(self) -> Token:
        return self.rendezvous.token

    def idle_secs(self) -> float:
        return max(0.0, trio.current_time() - self.stream.last_receive)

    async def serve(self) -> None:
        """Run until the WebSocket closes, the peer breaks the protocol or falls silent."""
        self.rendezvous.connections.append(self)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._start_tasks(nursery)
                nursery.start_soon(self._send_requests)
                nursery.start_soon(self._watch_silence, nursery.cancel_scope)
                await self._receive()
                nursery.cancel_scope.cancel()
        finally:
            self.rendezvous.connections.remove(self)
            self._connection_lost()

    # Hooks for the protocol versions: v1 needs no extra task and answers whole messages.

    def _start_tasks(self, nursery: trio.Nursery) -> None:
        pass

    async def _receive(self) -> None:
        await self._receive_responses()

    def _connection_lost(self) -> None:
        self._fail_in_flight()

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
                try:
                    await self.ws.aclose(code, reason)
                finally:
                    self._closed.set()
        return not scope.cancelled_caught

    # v1 connections only take requests from the queue; v2 ones take them directly, too.
    takes_directly = False

    async def send_early(self) -> None:
        """After ``start_now``: send what waits if it is a batch's worth (v2 batching)."""

    def can_start_now(self) -> bool:
        """Whether ``start_now`` would take a request now."""
        return False

    @property
    def load(self) -> int:
        """Requests this connection carries now: the least loaded one gets the next request."""
        return len(self.in_flight)

    def start_now(self, pending: PendingRequest) -> None:
        raise NotImplementedError("only connections that can_start_now() take requests directly")

    def abandon(self, pending: PendingRequest) -> None:
        """The HTTP side gave up on ``pending``: v1 has no way to tell the client, but can stop
        reading its body."""
        scope = self._reading.get(pending.id)
        if scope is not None:
            scope.cancel()

    async def _send_requests(self) -> None:
        queue = self.rendezvous.queue
        while True:
            pending = await queue.get()
            if pending.abandoned:
                continue
            if pending.upgrade:
                self.log.info("HTTP RET", token=self.token, id=pending.id, status=501,
                              err="upgrade over a v1 tunnel")
                pending.finish(Failure(501, "WebSocket pass-through needs a protocol v2 tunnel client"))
                self.rendezvous.release(pending)
                continue
            if pending.body_source is not None:
                # A v1 message carries the body whole: read it first, without holding up the
                # requests behind it.
                assert self._nursery is not None
                pending.holder = self
                self.in_flight[pending.id] = pending
                scope = self._reading[pending.id] = trio.CancelScope()
                self._nursery.start_soon(self._read_then_send, pending, scope)
                continue
            if not await self._send_one(pending):
                return

    async def _read_then_send(self, pending: PendingRequest, scope: trio.CancelScope) -> None:
        source = pending.body_source
        assert source is not None
        failure: Failure | None = None
        with scope:
            try:
                body = await source.read_all()
            except BodyError as exc:
                failure = Failure(exc.status, exc.text)
        self._reading.pop(pending.id, None)
        if scope.cancelled_caught or failure is not None:
            self.in_flight.pop(pending.id, None)
            pending.holder = None
            if failure is not None:
                pending.finish(failure)
            self.rendezvous.release(pending)
            return
        # Whole in memory now: from here on, like any v1 request (and replayable).
        pending.request = dataclasses.replace(pending.request, body=body)
        pending.body_source = None
        if not await self._send_one(pending):
            await self.close(1011, "tunnel send failed")

    async def _send_one(self, pending: PendingRequest) -> bool:
        """Send ``pending``; False if the WebSocket is closed (the request is back in the queue)."""
        pending.holder = self
        pending.tries += 1
        self.in_flight[pending.id] = pending
        message = framing.encode_request(pending.id, pending.request)
        try:
            await self.ws.send_message(message)
        except trio_websocket.ConnectionClosed:
            # Never delivered, so safe to retry whatever the method: put it back first.
            del self.in_flight[pending.id]
            pending.holder = None
            pending.tries -= 1
            self.rendezvous.queue.put_front(pending)
            return False
        self.log.info(
            "WS   SND", token=self.token, id=pending.id,
            info=f"{pending.method.decode('latin-1')} {_short_target(pending.request.target)}",
        )
        return True

    async def _receive_responses(self) -> None:
        while True:
            try:
                message = await self.ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            self.rendezvous.touch()
            try:
                request_id, payload = framing.split_message(message)
            except TunnelMessageError as exc:
                self.log.warning("WS   ERR", token=self.token, err=str(exc))
                await self.close(1003 if isinstance(message, str) else 1002, "protocol error")
                return
            pending = self.in_flight.pop(request_id, None)
            if pending is None:
                self.log.warning("WS   ERR", token=self.token, id=request_id, err="unknown request id")
                await self.close(1002, "unknown request id")
                return
            pending.holder = None
            self.log.info("WS   RCV", token=self.token, id=request_id, ws=self.addr, len=len(message))
            try:
                response: framing.Response | Failure = framing.parse_response(
                    payload, request_method=pending.method
                )
            except HttpPayloadError as exc:
                self.log.warning("WS   ERR", token=self.token, id=request_id, err=str(exc))
                response = Failure(502, "Bad response from tunnel client")
            self.answered += 1
            pending.finish(response)
            self.rendezvous.release(pending)

    async def _watch_silence(self, scope: trio.CancelScope) -> None:
        """Close the tunnel once the client has sent nothing (not even a ping) for wstimeout."""
        while True:
            deadline = self.stream.last_receive + self.wstimeout
            if trio.current_time() >= deadline:
                self.log.warning("WS   TIMEOUT", token=self.token, addr=self.addr,
                                 idle_secs=round(self.idle_secs(), 1))
                await self.close(1001, "tunnel silent too long")
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
                pending.finish(Failure(502, "Tunnel connection lost"))
                self.rendezvous.release(pending)
        self.in_flight.clear()


def _short_target(target: bytes, limit: int = 120) -> str:
    text = target.decode("latin-1")
    return text if len(text) <= limit else text[:limit] + "..."


def seconds(value: float) -> float:
    return math.floor(value * 10) / 10
