"""The console's live feed: ``GET /_admin/api/events``, server-sent events for an ``EventSource``.

A new subscriber gets the whole state at once (``event: snapshot``). After that one task, for all
subscribers together, looks at the state every TICK seconds while anyone is subscribed, and
sends one ``event: update`` holding only what changed: the tunnels whose signature moved (see
``snapshot.collect``), the ids of tunnels gone, the in-flight list if its membership changed, new
errors, the block list if it changed, and the server's figures. Nothing changed: nothing is sent,
but a comment every KEEPALIVE seconds, so that a proxy does not time the stream out and a
vanished reader is noticed. No subscriber: the task sleeps and the request path pays nothing.

Each update is serialised once and the same bytes go to every subscriber. A subscriber that
cannot keep up (a stalled browser) is ended once its backlog passes MAX_BACKLOG; its
``EventSource`` reconnects and starts over with a snapshot.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Hashable
from typing import Any

import trio

from wstunnel.headers import Headers
from wstunnel.server.console.snapshot import StateReader, blocked_rows, error_row, wall_clock

TICK = 0.5  # at most two updates a second
KEEPALIVE = 15.0
MAX_BACKLOG = 4 * 1024 * 1024  # bytes waiting for one subscriber before it is ended
RETRY_MS = 3000  # how long an EventSource waits before it reconnects
# Figures of the server that move with the clock alone: they do not make an update by themselves.
_CLOCK_FIGURES = ("now", "uptime_secs")


def sse_event(name: str, document: object) -> bytes:
    data = json.dumps(document, separators=(",", ":"))  # one line: JSON escapes line feeds
    return f"event: {name}\ndata: {data}\n\n".encode()


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
        self._signatures: dict[str, Hashable] = {}
        self._error_seq = 0
        self._blocked: tuple[str, ...] = ()
        self._in_flight: tuple[Hashable, ...] = ()
        self._figures: dict[str, Any] = {}
        self._last_sent = 0.0
        self.updates_sent = 0  # updates made (each went to every subscriber)

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscribe(self, extra: dict[str, Any]) -> Subscriber:
        """A new stream: the whole state first (with ``extra``, the caller's CSRF token)."""
        reader = self.reader
        collection = reader.collect()
        if not self._subscribers:
            # Updates are relative to what the subscribers saw; the first one saw this.
            self._signatures = collection.signatures
            self._error_seq = reader.errors.last_seq
            self._blocked = tuple(entry.id for entry in reader.blocklist.entries())
            self._in_flight = collection.in_flight_key
            self._figures = _figures(collection.server)
            self._last_sent = trio.current_time()
        # Later subscribers: the next update may repeat some of what this snapshot holds
        # (changes since the last update); rows are replaced whole, so that is harmless.
        document = {**reader.document(collection), **extra}
        subscriber = Subscriber(self, f"retry: {RETRY_MS}\n".encode() + sse_event("snapshot", document))
        self._subscribers.add(subscriber)
        self._someone.set()
        return subscriber

    def discard(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)

    async def run(self) -> None:
        while True:
            if not self._subscribers:
                self._someone = trio.Event()
                await self._someone.wait()
            await trio.sleep(self.tick_interval)
            if self._subscribers:
                self.tick()

    def tick(self) -> None:
        """One look at the state; an update to every subscriber if anything changed."""
        reader = self.reader
        collection = reader.collect(previous=self._signatures)
        self._signatures = collection.signatures
        update: dict[str, Any] = {}
        if collection.tunnels:
            update["tunnels"] = collection.tunnels
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
        now = trio.current_time()
        if update:
            update.setdefault("server", collection.server)
            chunk = sse_event("update", update)
            self.updates_sent += 1
        elif now - self._last_sent >= KEEPALIVE:
            chunk = b": keepalive\n\n"
        else:
            return
        self._last_sent = now
        for subscriber in list(self._subscribers):
            subscriber.push(chunk)


def _figures(server: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in server.items() if key not in _CLOCK_FIGURES}
