"""The console's live feed: ``GET /_admin/api/events``, server-sent events for an ``EventSource``.

A new subscriber gets the whole state at once (``event: snapshot``). After that one task, for all
subscribers together, looks at the state every TICK seconds while anyone is subscribed (less
often, down to every QUIET_TICK, while nothing changes), and sends one ``event: update`` holding
only what changed: the tunnels active since its last look (see ``snapshot.collect``), the
clients' last activity of a share of the others in turn (pings touch nothing else), the ids of
tunnels gone, the in-flight list if its membership changed, new errors, the block list if it
changed, and the server's figures.
Nothing changed: nothing is sent, but a comment every KEEPALIVE seconds, so that a proxy does not
time the stream out and a vanished reader is noticed. No subscriber: the task sleeps and the
request path pays nothing.

Each update is serialised once and the same bytes go to every subscriber. The feed counts what it
costs (CPU time around its own work, bytes made): ``GET /_admin/api/state`` shows it. A
subscriber that cannot keep up (a stalled browser) is ended once its backlog passes MAX_BACKLOG;
its ``EventSource`` reconnects and starts over with a snapshot.
"""

from __future__ import annotations

import collections
import json
import math
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import trio

from wstunnel.headers import Headers
from wstunnel.server.console.snapshot import (
    ACTIVITY_STEP,
    StateReader,
    blocked_rows,
    error_row,
    wall_clock,
)

TICK = 0.5  # at most two updates a second
# Each tick looks at every tunnel (about 5 ms for 1,000 here): after a tick that found nothing
# new the next comes twice as late, up to QUIET_TICK, and back to TICK once something changes.
QUIET_TICK = 2.0
KEEPALIVE = 15.0
MAX_BACKLOG = 4 * 1024 * 1024  # bytes waiting for one subscriber before it is ended
RETRY_MS = 3000  # how long an EventSource waits before it reconnects
# Figures of the server that move with the clock alone: they do not make an update by themselves.
_CLOCK_FIGURES = ("now", "uptime_secs")


def sse_event(name: str, document: object) -> bytes:
    data = json.dumps(document, separators=(",", ":"))  # one line: JSON escapes line feeds
    return f"event: {name}\ndata: {data}\n\n".encode()


@dataclass
class FeedCosts:
    """What the feed has cost the server so far (its CPU measured around its own work), shown
    in the API so that an operator can see what an open console costs."""

    snapshots: int = 0
    snapshot_bytes: int = 0
    snapshot_cpu: float = 0.0  # seconds
    ticks: int = 0
    tick_cpu: float = 0.0
    updates: int = 0  # each went to every subscriber of its time
    update_bytes: int = 0

    def document(self, subscribers: int) -> dict[str, Any]:
        return {
            "subscribers": subscribers,
            "snapshots": self.snapshots,
            "snapshot_bytes": self.snapshot_bytes,
            "snapshot_cpu_secs": round(self.snapshot_cpu, 4),
            "ticks": self.ticks,
            "tick_cpu_secs": round(self.tick_cpu, 4),
            "updates": self.updates,
            "update_bytes": self.update_bytes,
        }


class Subscriber:
    """One open event stream, as the HTTP front pulls its body (``messages.BodySource``)."""

    def __init__(self, feed: LiveFeed, first: bytes) -> None:
        self._feed = feed
        self._chunks: collections.deque[bytes] = collections.deque([first])
        self._backlog = len(first)
        self._ended = False
        self._lot = trio.lowlevel.ParkingLot()

    def push(self, chunk: bytes) -> None:
        if self._ended:
            return
        if self._backlog + len(chunk) > MAX_BACKLOG:
            self.end()  # too far behind: its EventSource starts over with a snapshot
            return
        self._chunks.append(chunk)
        self._backlog += len(chunk)
        self._lot.unpark_all()

    def end(self) -> None:
        self._ended = True
        self._lot.unpark_all()

    async def receive(self) -> bytes | None:
        while not self._chunks and not self._ended:
            await self._lot.park()
        return self.receive_nowait()

    def receive_nowait(self) -> bytes | None:
        if self._chunks:
            chunk = self._chunks.popleft()
            self._backlog -= len(chunk)
            return chunk
        if self._ended:
            return None
        raise trio.WouldBlock

    def consumed(self, amount: int) -> None:
        pass  # the backlog is counted as chunks leave; nothing else to credit

    @property
    def trailers(self) -> Headers:
        return []

    def close(self) -> None:
        self._ended = True
        self._feed.discard(self)


class LiveFeed:
    def __init__(self, reader: StateReader, *, tick: float = TICK) -> None:
        self.reader = reader
        self.tick_interval = tick
        self._subscribers: set[Subscriber] = set()
        self._someone = trio.Event()
        # What the subscribers have seen, as of the last update.
        self._since = 0.0  # trio clock of the last pass
        self._error_seq = 0
        self._blocked: tuple[str, ...] = ()
        self._in_flight: tuple[Hashable, ...] = ()
        self._figures: dict[str, Any] = {}
        self._last_sent = 0.0
        self.costs = FeedCosts()

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscribe(self, extra: dict[str, Any]) -> Subscriber:
        """A new stream: the whole state first (with ``extra``, the caller's CSRF token)."""
        began = time.process_time()
        reader = self.reader
        collection = reader.collect()
        if not self._subscribers:
            # Updates are relative to what the subscribers saw; the first one saw this.
            self._since = collection.at
            self._error_seq = reader.errors.last_seq
            self._blocked = tuple(entry.id for entry in reader.blocklist.entries())
            self._in_flight = collection.in_flight_key
            self._figures = _figures(collection.server)
            self._last_sent = trio.current_time()
        # Later subscribers: the next update may repeat some of what this snapshot holds
        # (changes since the last update); rows are replaced whole, so that is harmless.
        document = {**reader.document(collection), **extra}
        first = f"retry: {RETRY_MS}\n".encode() + sse_event("snapshot", document)
        subscriber = Subscriber(self, first)
        self._subscribers.add(subscriber)
        self._someone.set()
        costs = self.costs
        costs.snapshots += 1
        costs.snapshot_bytes += len(first)
        costs.snapshot_cpu += time.process_time() - began
        return subscriber

    def discard(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)

    async def run(self) -> None:
        interval = self.tick_interval
        while True:
            if not self._subscribers:
                self._someone = trio.Event()
                await self._someone.wait()
                interval = self.tick_interval
            await trio.sleep(interval)
            if self._subscribers:
                changed = self.tick()
                interval = self.tick_interval if changed else min(interval * 2, QUIET_TICK)

    def tick(self) -> bool:
        """One look at the state; an update to every subscriber if anything changed (True)."""
        began = time.process_time()
        try:
            return self._tick()
        finally:
            self.costs.ticks += 1
            self.costs.tick_cpu += time.process_time() - began

    def _tick(self) -> bool:
        reader = self.reader
        # Every tunnel is refreshed once per ACTIVITY_STEP, a share of them at each tick.
        elapsed = trio.current_time() - self._since
        refresh = math.ceil(len(reader.registry) * elapsed / ACTIVITY_STEP)
        collection = reader.collect(since=self._since, refresh=refresh)
        self._since = collection.at
        update: dict[str, Any] = {}
        if collection.tunnels:
            update["tunnels"] = collection.tunnels
        if collection.activity:  # not a change that hurries the next tick
            update["activity"] = collection.activity
        if collection.removed:
            update["removed"] = collection.removed
        if collection.in_flight_key != self._in_flight:
            self._in_flight = collection.in_flight_key
            update["in_flight"] = collection.in_flight
            update["in_flight_total"] = collection.in_flight_total
        errors = reader.errors.since(self._error_seq)
        if errors:
            wall = wall_clock()
            update["errors"] = [error_row(record, wall) for record in errors]
            self._error_seq = errors[-1].seq
        entries = reader.blocklist.entries()
        blocked = tuple(entry.id for entry in entries)
        if blocked != self._blocked:
            self._blocked = blocked
            update["blocked"] = blocked_rows(entries)
        figures = _figures(collection.server)
        if figures != self._figures:
            self._figures = figures
            update["server"] = collection.server
        changed = any(key in update for key in
                      ("tunnels", "removed", "in_flight", "errors", "blocked", "server"))
        now = trio.current_time()
        if update:
            update.setdefault("server", collection.server)
            chunk = sse_event("update", update)
            self.costs.updates += 1
            self.costs.update_bytes += len(chunk)
        elif now - self._last_sent >= KEEPALIVE:
            chunk = b": keepalive\n\n"
        else:
            return False
        self._last_sent = now
        for subscriber in list(self._subscribers):
            subscriber.push(chunk)
        return changed


def _figures(server: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in server.items() if key not in _CLOCK_FIGURES}
