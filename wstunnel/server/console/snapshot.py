"""What the console shows, read from the server's own state: the JSON documents of the API.

Nothing here runs per request. A :meth:`StateReader.collect` is one pass over the registry, made
for a page load or an API call, and by the live feed at most a few times a second while a console
is open; for the feed it makes rows only for the tunnels active since its previous pass.

Times go out as Unix epoch seconds (the page shows them in the viewer's time zone, and ages
from them); tokens as their 8-character prefix only, never more.
"""

from __future__ import annotations

import calendar
import collections
import time
from collections.abc import Callable
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
# A client's "last activity" counts its pings too (every 10 s by default), which touch nothing
# the feed watches; resending rows at every ping would be most of the feed (1,000 idle tunnels:
# 35 KiB/s), so the feed refreshes every tunnel in turn once per step: a client's activity on
# the page is at most this old.
ACTIVITY_STEP = 60.0
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
        return round((count - counted) / (last - first), 1) if last - first >= 0.5 else 0.0

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
        self._ids: dict[Rendezvous, str] = {}

    def of(self, rendezvous: Rendezvous) -> str:
        found = self._ids.get(rendezvous)
        if found is None:
            found = self._ids[rendezvous] = self.blocklist.fingerprint(rendezvous.token)
        return found

    def forget_gone(self, registry: Registry) -> None:
        """Drop the ids of tokens the registry forgot (keeps a plain dict from growing)."""
        if len(self._ids) > 2 * len(registry) + 100:
            self._ids = {r: self._ids[r] for r in registry if r in self._ids}

    def find(self, registry: Registry, tunnel_id: str) -> Rendezvous | None:
        for rendezvous in registry:
            if self.of(rendezvous) == tunnel_id:
                return rendezvous
        return None


@dataclass
class Collection:
    """One pass over the server's state."""

    server: dict[str, Any]
    tunnels: list[dict[str, Any]]  # all of them, or those active since the previous pass
    activity: dict[str, list[float]]  # id -> its clients' last activity, for those refreshed
    removed: list[str]  # ids gone since the previous pass
    in_flight: list[dict[str, Any]]
    in_flight_total: int
    in_flight_key: tuple[tuple[int, int, float, bool], ...]  # which requests, queued or not
    at: float  # trio clock: a later pass with since=at sees what moved after this one


@dataclass(eq=False)
class StateReader:
    registry: Registry
    metrics: Metrics
    errors: ErrorLog
    blocklist: Blocklist
    facts: ServerFacts
    meter: RateMeter = field(init=False)
    ids: TunnelIds = field(init=False)
    _members: set[Rendezvous] = field(init=False, default_factory=set)  # as of the last pass
    _cursor: int = field(init=False, default=0)  # where the next refresh starts

    def __post_init__(self) -> None:
        self.meter = RateMeter(self.metrics)
        self.ids = TunnelIds(self.blocklist)

    def collect(self, since: float | None = None, refresh: int = 0) -> Collection:
        """Everything (``since`` None), or only the tunnels active after ``since`` (trio clock),
        and for the next ``refresh`` tunnels in turn that have clients their clients' last
        activity (pings, which touch nothing), so that it reaches the page now and then.

        "Active" is the rendez-vous' own ``last_activity``: every request, tunnel message,
        client arriving or leaving and console action touches it. So the pass does for most
        tunnels a few reads and a comparison (it runs up to twice a second while a console is
        open), and the work of a row only for those that moved.
        """
        now = trio.current_time()
        wall = _WallClock(now)
        ids = self.ids.of
        everyone = list(self.registry)
        count = len(everyone)
        first = self._cursor % count if count else 0
        last = first + min(refresh, count)  # refresh rows [first, last), wrapping around
        self._cursor = last
        tunnels: list[dict[str, Any]] = []
        activity: dict[str, list[float]] = {}
        waiting: list[tuple[float, Rendezvous, PendingRequest]] = []
        clients = queue_depth = 0
        by_transport: collections.Counter[str] = collections.Counter()
        for index, rendezvous in enumerate(everyone):
            connections = rendezvous.connections
            clients += len(connections)
            for connection in connections:
                by_transport[connection.transport] += 1
            queue_depth += len(rendezvous.queue)
            live = rendezvous.live()
            if live:  # most tunnels have nothing going on: not even a loop for them
                for request in live:
                    if request.outcome is None and not request.abandoned:
                        waiting.append((request.started, rendezvous, request))
            if since is None or rendezvous.last_activity > since:
                tunnels.append(self._tunnel(rendezvous, ids(rendezvous), now, wall))
            elif connections and (first <= index < last or index < last - count):
                # Only its clients' activity can have moved: a few numbers, not the row.
                activity[ids(rendezvous)] = [wall(now - c.idle_secs()) for c in connections]
        members = set(everyone)
        removed = [] if since is None else [ids(r) for r in self._members - members]
        self._members = members
        self.ids.forget_gone(self.registry)
        waiting.sort(key=lambda item: item[0])
        shown = waiting[:IN_FLIGHT_SHOWN]
        in_flight = [_in_flight(started, ids(rendezvous), rendezvous.token, request, now, wall)
                     for started, rendezvous, request in shown]
        server = {
            "version": self.facts.version,
            "started": wall(self.facts.started_at),
            "now": wall(now),
            "uptime_secs": round(now - self.facts.started_at, 1),
            "listening": self.facts.listening(),
            "draining": self.facts.draining(),
            "tunnels": count,
            "clients": clients,
            "clients_by_transport": dict(sorted(by_transport.items())),
            "queue_depth": queue_depth,
            "pending": len(waiting),
            "requests_total": self.metrics.duration.count,
            "requests_per_sec": self.meter.rate(now),
            "bytes_in": self.metrics.request_bytes,
            "bytes_out": self.metrics.response_bytes,
            "blocked_tokens": len(self.blocklist),
        }
        key = tuple((id(rendezvous), request.id, started, request.holder is None)
                    for started, rendezvous, request in shown)
        return Collection(server, tunnels, activity, removed, in_flight, len(waiting), key, now)

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
