"""The server's open files, kept under the limit with room held back for its own endpoints.

Each tunnel and each HTTP connection holds one descriptor; at the limit accept() fails with
EMFILE. trio.serve_listeners then logs a traceback every 100 ms and retries, the connections
queue unanswered in the kernel, and ``/_health_check`` goes silent: a load balancer would take the
server for dead while its tunnels are fine. Instead, with L the open-files limit:

- below the **high-water mark** (L minus a reserve, :func:`reserve_for`), everything is served;
- a connection accepted at or above the mark is **limited**: it may ask for the built-in endpoints
  (:func:`is_reserved`: health check, stats, status, metrics, ``/_admin/``) and they answer as
  ever, from the reserve; a tunnel or a request for a token gets **503 with Retry-After** and a
  clear reason; the connection closes after its one answer, and must send its head within
  LIMITED_HEADER_TIMEOUT, so the reserve frees itself;
- at the **ceiling** (L minus SPARE) the accept loop closes the oldest limited connection that
  has not sent its head yet (a flood of silent connections must not keep the health check out),
  and takes nothing more until a connection closes: new connections wait in the kernel's listen
  queue meanwhile, and SPARE descriptors stay free for what the process opens on its own (the
  journal's socket, sd_notify's for the watchdog ping, the /proc/self/fd listing).

Refusals are logged as one warning line per WARN_INTERVAL at most, with their count, and one more
line says when capacity is back. Nothing here costs a system call per request: connections are
counted as the accept loop opens and closes them (an addition each), and ``/proc/self/fd`` is
listed only every RESAMPLE_INTERVAL (more often near the mark) to account for whatever else is
open (listeners, log files, the event loop's own descriptors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from wstunnel.logs import EventLogger
from wstunnel.server.admission import Refusal

# Held back for the built-in endpoints: 1/64 of the limit, at least 32, at most 1,024.
RESERVE_FRACTION = 64
MIN_RESERVE = 32
MAX_RESERVE = 1024
# Never used by connections: what the process opens by itself while at the ceiling.
SPARE = 8
# A limited connection's head must come this fast (else a few silent ones would hold the reserve).
LIMITED_HEADER_TIMEOUT = 5.0
RETRY_AFTER_SECS = 5
WARN_INTERVAL = 10.0
# How often /proc/self/fd is listed: rarely while far from the mark, often near it.
RESAMPLE_INTERVAL = 30.0
RESAMPLE_NEAR_MARK = 2.0
# Paths a limited connection may ask for: the server's own endpoints, not tunnels or tokens.
RESERVED_PATHS = frozenset({b"/_health_check", b"/_stats", b"/_status", b"/_metrics"})
RESERVED_PREFIX = b"/_admin"

# What each warning tells the operator.
REASONS = {
    "refusing": "open files at the high-water mark: new tunnels and requests get 503, "
                "the server's own endpoints still answer",
    "paused": "open files at the ceiling: no connection accepted until one closes",
    "accept failed": "accept() found no descriptor: trying again shortly",
}

AT_CAPACITY = Refusal(
    503, "Server at capacity (open files at the high-water mark): try again later",
    [(b"Retry-After", b"%d" % RETRY_AFTER_SECS)],
)


def reserve_for(limit: int) -> int:
    """Descriptors kept back from tunnels and requests under an open-files limit of ``limit``."""
    return max(MIN_RESERVE, min(MAX_RESERVE, limit // RESERVE_FRACTION))


def is_reserved(path: bytes) -> bool:
    """Whether a limited connection may ask for ``path``: the health check, the operators' views
    and the admin endpoints (``/_admin`` and anything under it)."""
    return path in RESERVED_PATHS or path == RESERVED_PREFIX or path.startswith(RESERVED_PREFIX + b"/")


@dataclass(frozen=True)
class Snapshot:
    """What ``/_status`` and ``/_metrics`` show."""

    in_use: int
    limit: int
    high_water: int
    refusing: bool
    refused: int

    def as_dict(self) -> dict[str, int | bool]:
        return {"in_use": self.in_use, "limit": self.limit, "high_water": self.high_water,
                "refusing": self.refusing, "refused": self.refused}


class FileBudget:
    """Connections counted against the open-files limit, and what to do with the next one."""

    def __init__(self, limit: int, log: EventLogger, *, others: int,
                 count: Callable[[], int | None], clock: Callable[[], float]) -> None:
        self.limit = limit
        self.reserve = reserve_for(limit)
        self.high_water = limit - self.reserve
        self.ceiling = limit - SPARE
        self.log = log
        self.connections = 0  # accepted and not closed yet
        self.others = others  # everything else open: listeners, log files, the event loop's
        # What is open for good once the server listens: a count never puts others below it.
        self._floor = others
        self.refused = 0  # tunnels and requests refused at the mark, since start
        self._count = count
        self._clock = clock
        self._alarmed = False  # a warning went out; a line says so when capacity is back
        self._unreported = 0  # refusals not in a line yet
        self._said_at: float | None = None  # the last Capacity line
        self._paused = False  # the accept loop waits at the ceiling
        self._room = trio.Event()
        # Limited connections still waiting for their head, oldest first: the ones to drop.
        self._silent: dict[trio.CancelScope, None] = {}

    @property
    def in_use(self) -> int:
        return self.others + self.connections

    def over_high_water(self) -> bool:
        return self.in_use >= self.high_water

    # -- the accept loop's side ----------------------------------------------------------------

    def at_ceiling(self) -> bool:
        return self.in_use >= self.ceiling

    def admit(self) -> bool:
        """Count a connection the accept loop has just taken; True if it is limited."""
        limited = self.in_use >= self.high_water
        self.connections += 1
        return limited

    def release(self) -> None:
        """A connection closed (its descriptor with it)."""
        self.connections -= 1
        if self._paused and self.in_use < self.ceiling:
            self._room.set()

    async def wait_for_room(self) -> None:
        """At the ceiling: drop the oldest silent limited connection, if any, and wait until a
        connection closes (or a while, then count afresh)."""
        oldest = next(iter(self._silent), None)
        if oldest is not None:
            del self._silent[oldest]
            oldest.cancel()  # its task closes the socket, and release() makes the room
        if not self._paused:
            self._paused = True
            self._warn("paused")
        with trio.move_on_after(RESAMPLE_NEAR_MARK):
            await self._room.wait()
        self._room = trio.Event()
        self._paused = False
        self.resample()

    def accept_failed(self, errno_name: str) -> None:
        """accept() ran out all the same (something else took descriptors): count afresh."""
        self.resample()
        self._warn("accept failed", err=errno_name)

    # -- the connections' side -----------------------------------------------------------------

    def waiting_for_head(self, scope: trio.CancelScope) -> None:
        """A limited connection is reading its head: at the ceiling, cancelling ``scope`` drops it."""
        self._silent[scope] = None

    def head_received(self, scope: trio.CancelScope) -> None:
        self._silent.pop(scope, None)

    def refuse(self) -> Refusal:
        """A limited connection asked for a tunnel or a token: the answer, counted and logged."""
        self.refused += 1
        self._unreported += 1
        self._warn("refusing")
        return AT_CAPACITY

    # -- the log -------------------------------------------------------------------------------

    def _quiet(self) -> bool:
        """Whether a Capacity line went out less than WARN_INTERVAL ago."""
        return self._said_at is not None and self._clock() - self._said_at < WARN_INTERVAL

    def _warn(self, state: str, **fields: str) -> None:
        """One line per WARN_INTERVAL at most, with the refusals since the last one."""
        if self._quiet():
            return
        self._said_at = self._clock()
        self._alarmed = True
        self.log.warning("Capacity", state=state, refused=self._unreported, open_files=self.in_use,
                         limit=self.limit, high_water=self.high_water,
                         retry_after=RETRY_AFTER_SECS, **fields, reason=REASONS[state])
        self._unreported = 0

    def report(self) -> None:
        """The periodic look: refusals the rate limit held back, or capacity back after them."""
        if self._quiet():
            return
        if self._unreported:
            self._warn("refusing")
        elif self._alarmed and not self.over_high_water():
            self._said_at = self._clock()
            self._alarmed = False
            self.log.info("Capacity", state="back", open_files=self.in_use, limit=self.limit,
                          high_water=self.high_water, refused=self.refused)

    # -- counting ------------------------------------------------------------------------------

    def settle(self) -> None:
        """The server listens: what is open now (and not a connection) stays open."""
        self.resample()
        self._floor = self.others

    def resample(self) -> None:
        """List the open descriptors; what the count of connections does not explain is others'.

        A connection's socket is closed a scheduling step before the connection is uncounted
        (trio's aclose checkpoints in between), so a listing taken while many connections end
        comes up short of the count; never below the floor, then: else the mark would move up
        by as many connections as were closing.
        """
        counted = self._count()
        if counted is not None:
            self.others = max(self._floor, counted - self.connections)

    def resample_interval(self) -> float:
        near = self.in_use >= self.high_water - self.reserve
        return RESAMPLE_NEAR_MARK if near or self._alarmed else RESAMPLE_INTERVAL

    async def watch(self) -> None:
        """Report, and count afresh every 30 s, or every 2 s near the mark, forever."""
        counted_at = self._clock()
        while True:
            await trio.sleep(RESAMPLE_NEAR_MARK)
            if self._clock() - counted_at >= self.resample_interval():
                self.resample()
                counted_at = self._clock()
            self.report()

    def snapshot(self) -> Snapshot:
        self.resample()
        return Snapshot(self.in_use, self.limit, self.high_water, self.over_high_water(),
                        self.refused)

    def capacity(self) -> int:
        """Connections (tunnels and HTTP connections together) that fit below the mark now."""
        return max(0, self.high_water - self.others)
