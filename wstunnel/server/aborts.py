"""Streams that did not end cleanly: why (a :class:`Cut`), the record the server keeps of each
(:class:`StreamAbort`), and the tally a tunnel keeps of them (:class:`AbortTally`).

A stream is *aborted* when a body was under way, one way or the other, and did not arrive whole:
a download whose tunnel died, an upload whose HTTP client vanished, a WebSocket pass-through whose
backend went away. The part that sees the break says why (the front, the tunnel connection); the
forwarder, which logged the request's ``HTTP RCV`` and ``HTTP RET`` lines, logs one ``HTTP ABORT``
line for it, counts it in ``/_metrics`` and adds it to the tallies of its token's rendez-vous and
of the tunnel connection that carried it (``/_status`` and the operator's console read those).

Causes are a short fixed list, so that they can be a metric label; the reason is free text for
the log line and names the particulars (the close reason of a lost tunnel, the backend's error).
"""

from __future__ import annotations

import enum
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["AbortTally", "Cause", "Cut", "Direction", "StreamAbort"]

# "request": the HTTP client's bytes on their way to the backend (an upload, the client's side of
# a pass-through); "response": the backend's on their way back.
Direction = Literal["request", "response"]
# How many abort records a tally keeps, newest last: enough for a console's "last errors".
RECENT_ABORTS = 20


class Cause(enum.StrEnum):
    """Why a stream broke off, as counted (a metric label: a fixed, short list)."""

    TUNNEL_LOST = "tunnel_lost"  # the tunnel connection went (either end killed, cut, closed)
    RESET = "reset"  # the tunnel client reset the stream (a limit of its own, a stop)
    BACKEND_FAILED = "backend_failed"  # the backend's connection broke in the middle of the body
    CLIENT_GONE = "client_gone"  # the HTTP client went away
    STALLED = "stalled"  # nothing moved for the idle timeout
    TOO_LARGE = "too_large"  # the body went over a size limit
    BAD_FRAMING = "bad_framing"  # a body that does not match its own framing (Content-Length, chunks)
    SERVER_STOPPING = "server_stopping"  # the server stopped before the body could end


@dataclass(frozen=True, slots=True)
class Cut:
    """Why one stream broke off, as the part that saw it tells."""

    direction: Direction
    cause: Cause
    reason: str


@dataclass(frozen=True, slots=True)
class StreamAbort:
    """One aborted stream, as logged in its ``HTTP ABORT`` line."""

    request_id: int
    direction: Direction
    cause: Cause
    reason: str
    bytes: int  # body bytes that made it across in ``direction`` before the break
    secs: float  # from the request's arrival to the break
    at: float  # wall clock (time.time()) of the break

    def document(self) -> dict[str, object]:
        """The record as JSON-ready values (``/_status``, the console)."""
        return {"id": self.request_id, "direction": self.direction, "cause": str(self.cause),
                "reason": self.reason, "bytes": self.bytes, "secs": round(self.secs, 3),
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at))}


@dataclass(eq=False)
class AbortTally:
    """Aborted streams counted by direction and cause, and the last few records."""

    counts: Counter[tuple[Direction, Cause]] = field(default_factory=Counter)
    recent: deque[StreamAbort] = field(default_factory=lambda: deque(maxlen=RECENT_ABORTS))

    def add(self, abort: StreamAbort) -> None:
        self.counts[abort.direction, abort.cause] += 1
        self.recent.append(abort)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_direction(self) -> dict[str, dict[str, int]]:
        """``{"response": {"tunnel_lost": 2}, ...}``, directions and causes that occurred only."""
        document: dict[str, dict[str, int]] = {}
        for (direction, cause), count in sorted(self.counts.items()):
            document.setdefault(direction, {})[str(cause)] = count
        return document
