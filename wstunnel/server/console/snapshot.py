"""What the console shows, read from the server's own state: the JSON documents of the API.

Nothing here runs per request. A :func:`collect` is one pass over the registry, made for a page
load or an API call, and by the live feed at most a few times a second while a console is open;
it also says, per tunnel, a cheap signature of what could have changed, so that the feed sends a
tunnel's row again only when its signature moved.

Times go out as Unix epoch seconds (the page shows them in the viewer's time zone, and ages
from them); tokens as their 8-character prefix only, never more.
"""

from __future__ import annotations

import calendar
import collections
import time
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import trio

from wstunnel.server.audit import ErrorLog, ErrorRecord, TunnelAudit, safe_path
from wstunnel.server.blocklist import BlockedToken, Blocklist
from wstunnel.server.metrics import Metrics
from wstunnel.server.rendezvous import Carrier, PendingRequest, Registry, Rendezvous
from wstunnel.tokens import Token

# The in-flight list shows the oldest requests first, this many at most (with the total).
IN_FLIGHT_SHOWN = 100
# A client's "last activity" counts its pings too; resending every row at every ping would
# be most of the feed, so a change of activity alone refreshes a row at most this often.
ACTIVITY_STEP = 30.0
RATE_WINDOW = 10.0  # requests per second, averaged over this long


@dataclass
class ServerFacts:
    """What the console needs of the running server beyond its parts."""

    version: str
    started_at: float  # trio clock
    listening: Callable[[], list[str]]
    draining: Callable[[], bool]


class RateMeter:
    """Requests per second over the last RATE_WINDOW seconds, from the metrics' count."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def sample(self, now: float) -> None:
        samples = self._samples
        samples.append((now, self.metrics.duration.count))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()

    def rate(self, now: float) -> float:
        self.sample(now)
        (first, counted), (last, count) = self._samples[0], self._samples[-1]
        return round((count - counted) / (last - first), 2) if last - first >= 0.5 else 0.0

    async def run(self) -> None:
        """Sample once a second, so that a rate is there whenever someone asks."""
        while True:
            self.sample(trio.current_time())
            await trio.sleep(1.0)


class TunnelIds:
    """A tunnel's ``id`` in the API: its token's keyed fingerprint, as the block list keeps it
    (so a blocked entry and its tunnel share an id), worked out once per token."""

    def __init__(self, blocklist: Blocklist) -> None:
        self.blocklist = blocklist
        self._ids: weakref.WeakKeyDictionary[Rendezvous, str] = weakref.WeakKeyDictionary()

    def of(self, rendezvous: Rendezvous) -> str:
        found = self._ids.get(rendezvous)
        if found is None:
            found = self._ids[rendezvous] = self.blocklist.fingerprint(rendezvous.token)
        return found

    def find(self, registry: Registry, tunnel_id: str) -> Rendezvous | None:
        for rendezvous in registry:
            if self.of(rendezvous) == tunnel_id:
                return rendezvous
        return None


@dataclass
class Collection:
    """One pass over the server's state."""

    server: dict[str, Any]
    tunnels: list[dict[str, Any]]  # all of them, or only those whose signature changed
    signatures: dict[str, Hashable]  # every tunnel's
    removed: list[str]  # ids gone since the previous pass
    in_flight: list[dict[str, Any]]
    in_flight_total: int
    in_flight_key: tuple[tuple[str, int, float], ...]  # which requests the list holds


@dataclass(eq=False)
class StateReader:
    registry: Registry
    metrics: Metrics
    errors: ErrorLog
    blocklist: Blocklist
    facts: ServerFacts
    meter: RateMeter = field(init=False)
    ids: TunnelIds = field(init=False)

    def __post_init__(self) -> None:
        self.meter = RateMeter(self.metrics)
        self.ids = TunnelIds(self.blocklist)

    def collect(self, previous: dict[str, Hashable] | None = None) -> Collection:
        """Everything, or with ``previous`` signatures only the tunnels that changed since."""
        now = trio.current_time()
        wall = _WallClock(now)
        tunnels: list[dict[str, Any]] = []
        signatures: dict[str, Hashable] = {}
        waiting: list[tuple[float, str, Token, PendingRequest]] = []
        clients = queue_depth = pending = 0
        by_transport: collections.Counter[str] = collections.Counter()
        for rendezvous in self.registry:
            tunnel_id = self.ids.of(rendezvous)
            connections = rendezvous.connections
            clients += len(connections)
            for connection in connections:
                by_transport[connection.transport] += 1
            queued = len(rendezvous.queue)
            queue_depth += queued
            audit = rendezvous.audit
            counters = rendezvous.counters
            signature = (
                rendezvous.last_activity, rendezvous.blocked, counters.completed,
                counters.errored, queued, audit.success_at, audit.error_at,
                tuple((id(c), int((now - c.idle_secs()) // ACTIVITY_STEP)) for c in connections),
            )
            signatures[tunnel_id] = signature
            for request in rendezvous.live():
                if request.outcome is None and not request.abandoned:
                    pending += 1
                    waiting.append((request.started, tunnel_id, rendezvous.token, request))
            if previous is None or previous.get(tunnel_id) != signature:
                tunnels.append(self._tunnel(rendezvous, tunnel_id, now, wall))
        removed = [] if previous is None else [i for i in previous if i not in signatures]
        waiting.sort(key=lambda item: item[0])
        in_flight = [_in_flight(started, tunnel_id, token, request, now, wall)
                     for started, tunnel_id, token, request in waiting[:IN_FLIGHT_SHOWN]]
        server = {
            "version": self.facts.version,
            "started": wall(self.facts.started_at),
            "now": wall(now),
            "uptime_secs": round(now - self.facts.started_at, 1),
            "listening": self.facts.listening(),
            "draining": self.facts.draining(),
            "tunnels": len(signatures),
            "clients": clients,
            "clients_by_transport": dict(sorted(by_transport.items())),
            "queue_depth": queue_depth,
            "pending": pending,
            "requests_total": self.metrics.duration.count,
            "requests_per_sec": self.meter.rate(now),
            "bytes_in": self.metrics.request_bytes,
            "bytes_out": self.metrics.response_bytes,
            "blocked_tokens": len(self.blocklist),
        }
        key = tuple((tunnel_id, request.id, started)
                    for started, tunnel_id, _, request in waiting[:IN_FLIGHT_SHOWN])
        return Collection(server, tunnels, signatures, removed, in_flight, len(waiting), key)

    def document(self, collection: Collection) -> dict[str, Any]:
        """The whole state, as ``GET /_admin/api/state`` answers it."""
        wall = _WallClock(trio.current_time())
        return {
            "server": collection.server,
            "tunnels": collection.tunnels,
            "in_flight": collection.in_flight,
            "in_flight_total": collection.in_flight_total,
            "errors": [error_row(record, wall) for record in self.errors.since(0)],
            "blocked": blocked_rows(self.blocklist.entries()),
        }

    def _tunnel(self, rendezvous: Rendezvous, tunnel_id: str, now: float,
                wall: _WallClock) -> dict[str, Any]:
        audit = rendezvous.audit
        counters = rendezvous.counters
        return {
            "id": tunnel_id,
            "token": str(rendezvous.token),
            "blocked": rendezvous.blocked,
            "pending": rendezvous.pending_count,
            "queued": len(rendezvous.queue),
            "completed": counters.completed,
            "errored": counters.errored,
            "last_activity": wall(rendezvous.last_activity),
            "clients": [_client(connection, now, wall) for connection in rendezvous.connections],
            "last_success": _outcome(audit, success=True, wall=wall),
            "last_error": _outcome(audit, success=False, wall=wall),
        }


class _WallClock:
    """trio's clock to Unix time, with one offset for a whole document."""

    def __init__(self, now: float) -> None:
        self._offset = time.time() - now

    def __call__(self, at: float) -> float:
        return round(at + self._offset, 3)


def _client(connection: Carrier, now: float, wall: _WallClock) -> dict[str, Any]:
    return {
        "address": connection.addr,
        "version": connection.client_version,
        "protocol": connection.protocol,
        "transport": connection.transport,
        "connected_since": wall(connection.connected_at),
        "last_activity": wall(now - connection.idle_secs()),
        "in_flight": len(connection.in_flight),
        "answered": connection.answered,
    }


def _outcome(audit: TunnelAudit, *, success: bool, wall: _WallClock) -> dict[str, Any] | None:
    at = audit.success_at if success else audit.error_at
    if at is None:
        return None
    reason = audit.success_reason if success else audit.error_reason
    return {
        "time": wall(at),
        "status": audit.success_status if success else audit.error_status,
        "reason": reason.decode("latin-1") if isinstance(reason, bytes) else reason,
        "client_address": audit.success_addr if success else audit.error_addr,
    }


def _in_flight(started: float, tunnel_id: str, token: Token, request: PendingRequest, now: float,
               wall: _WallClock) -> dict[str, Any]:
    return {
        "tunnel": tunnel_id,
        "token": str(token),
        "id": request.id,
        "method": request.method.decode("latin-1")[:16],
        "path": safe_path(request.request.target, token),
        "since": wall(started),
        "age_secs": round(now - started, 1),
        "client_address": request.addr,
        "state": "queued" if request.holder is None else "sent",
    }


def error_row(record: ErrorRecord, wall: _WallClock) -> dict[str, Any]:
    return {
        "seq": record.seq,
        "time": wall(record.at),
        "token": record.token,
        "status": record.status,
        "reason": record.reason,
        "client_address": record.addr,
        "method": record.method,
        "path": record.path,
    }


def blocked_rows(entries: list[BlockedToken]) -> list[dict[str, Any]]:
    return [{"id": e.id, "token": e.token, "since": _epoch(e.since), "by": e.by} for e in entries]


def _epoch(rfc3339: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(rfc3339, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def wall_clock() -> _WallClock:
    return _WallClock(trio.current_time())
