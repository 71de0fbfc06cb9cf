"""Receive windows that follow the link, sans-I/O: how large a window the bytes consumed in one
round trip call for.

A window smaller than the link's bandwidth-delay product caps a stream at one window per round
trip: 256 KiB per 50 ms is 5 MB/s. The receiver measures the product the way gRPC's BDP
estimator does, with one change: it counts the bytes its application *consumed* during a round
trip (gRPC counts bytes received). When that sample comes near the window (two thirds of it or
more), the sender was held back by the window, and the window grows to twice the sample, up to a
limit. A slow consumer (an HTTP client reading at 100 KiB/s) consumes little per round trip, so
its window, and the memory that waits for it, stays where it is: a window grows with the
consumer, never with a fast sender.

Each stream's window follows what that stream consumed; the tunnel's what they all consumed
together. A new stream whose body is more than one DATA frame starts with the widest window a
stream of the tunnel has earned so far (``V2Connection.start_window``), so that a transfer after
the first one does not ramp up again: a slow consumer of such a stream holds at most that window,
once. Windows only grow, by WINDOW frames, which every v2 peer accepts: nothing on the wire
changes, and a peer that never widens its own windows still works with one that does.

Consumption comes in bursts: credit goes back half a window at a time, and the data it lets go
comes back a round trip later. A sample of exactly one round trip that starts with a grant sees
one burst where the window allows two, half the rate; so a sample spans SAMPLE_ROUND_TRIPS round
trips and is scaled back to one. The timing itself (a WebSocket ping, a long-poll request) is the
trio side's: :meth:`WindowTuner.start` when the probe leaves, :meth:`WindowTuner.finish` with the
round trip's length and the time sampled.

The round trip a probe times is not always the link's: its pong waits behind whatever is queued
ahead of it, and on a busy link that is mostly the window's own bytes. Scaled by such a round
trip, a window-bound sample would call for a wider window, whose bytes would lengthen the next
round trip, and so on to the limit: on loopback, windows of megabytes and the memory they hold
where a few hundred kilobytes fill the link. So, as BBR does with its ``min_rtt``, a sample is
scaled to the shortest round trip of the last few probes: the link's own. Across a 50 ms link that
is about 50 ms, as before; a queue no longer makes a window grow.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from wstunnel.v2._connection import V2Connection
from wstunnel.v2._frames import INITIAL_STREAM_WINDOW, INITIAL_TUNNEL_WINDOW, MAX_WINDOW, Window

__all__ = ["FIRST_WINDOW", "SAMPLE_ROUND_TRIPS", "Probe", "WindowLimits", "WindowTuner", "first_window"]

# The first window of a body on a tunnel whose windows follow the link, before any transfer has
# taught it more: a response's (the server grants it with the request) and a request body's (the
# two ends agree on it as the tunnel opens: ``wstunnel.v2.offered_request_window``). A body of a
# few MiB, most responses and uploads, then crosses a long link in one round trip, as through the
# original, which has no flow control; a 1 MiB download across a 50 ms link took two round trips
# at the protocol's 256 KiB. Half the initial tunnel window, so that one stalled consumer leaves
# the other half to the streams beside it (``V2Connection.opening_window``).
FIRST_WINDOW = 2 * 1024 * 1024

# A sample at least this share of the window means the window held the sender back.
_BOUND_NUMERATOR, _BOUND_DENOMINATOR = 2, 3
# How many round trips a sample spans (see the module's docstring).
SAMPLE_ROUND_TRIPS = 2
# The window a bound sample calls for, as a multiple of the sample: the window doubles per round
# trip, as TCP's congestion window does in slow start.
GROWTH = 2**SAMPLE_ROUND_TRIPS
# How many probes' round trips the shortest is taken from: long enough to span a queue's life,
# short enough that a link whose round trip grew (a new route) is followed within seconds.
ROUND_TRIP_MEMORY = 32


@dataclass(frozen=True, slots=True)
class WindowLimits:
    """How large a receive window may grow: each stream's, and the tunnel's (all together)."""

    # 32 MiB: a stream moves at most one window per round trip, and at 100 ms 16 MiB held a
    # 64 MiB download to 124 MB/s where 32 MiB gave 202 (scripts/bench --link-delay 50). What a
    # stopped consumer can leave in memory is still bounded by the tunnel's 64 MiB.
    stream: int = 32 * 1024 * 1024
    tunnel: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        for name, value, floor in (("stream", self.stream, INITIAL_STREAM_WINDOW),
                                   ("tunnel", self.tunnel, INITIAL_TUNNEL_WINDOW)):
            if not floor <= value <= MAX_WINDOW:
                raise ValueError(f"{name} window limit {value} out of range ({floor} to {MAX_WINDOW})")

    @property
    def fixed(self) -> bool:
        """The protocol's initial windows, never widened (as a peer from before tuning)."""
        return self.stream == INITIAL_STREAM_WINDOW and self.tunnel == INITIAL_TUNNEL_WINDOW


def first_window(limits: WindowLimits) -> int:
    """The first window of a body received under ``limits``: ``FIRST_WINDOW`` within the stream
    window's limit; the protocol's initial window when the windows are fixed."""
    return min(FIRST_WINDOW, limits.stream)


@dataclass(frozen=True, slots=True)
class Probe:
    """What had been consumed when a round-trip probe left: the tunnel's total and each stream's."""

    tunnel: int
    streams: dict[int, int]


class WindowTuner:
    """Widens a V2Connection's receive windows from round-trip samples."""

    def __init__(self, conn: V2Connection, limits: WindowLimits) -> None:
        self.conn = conn
        self.limits = limits
        self.probes = 0  # round trips sampled, windows widened, the widest stream window: for
        self.widened = 0  # status pages and tests
        self.widest_stream = INITIAL_STREAM_WINDOW
        self._round_trips: deque[float] = deque(maxlen=ROUND_TRIP_MEMORY)

    def can_grow(self) -> bool:
        """Whether a window is still below its limit: else a probe could change nothing."""
        limits = self.limits
        if self.conn.tunnel_window < limits.tunnel:
            return True
        return any(window < limits.stream for _c, window in self.conn.receiving_streams().values())

    def start(self) -> Probe:
        streams = {stream: consumed for stream, (consumed, _w) in self.conn.receiving_streams().items()}
        return Probe(self.conn.consumed_bytes, streams)

    def finish(self, probe: Probe, round_trip: float = 1.0, sampled: float = 1.0) -> list[Window]:
        """``sampled`` seconds after ``start``, the probe's ping having taken ``round_trip``:
        widen what the bytes consumed per round trip of the link (the shortest of the last
        probes') call for; the WINDOW frames."""
        self.probes += 1
        conn, limits = self.conn, self.limits
        self._round_trips.append(round_trip)
        link = min(self._round_trips)
        scale = link / sampled if sampled > 0 else 1.0
        frames = self._grow(0, int((conn.consumed_bytes - probe.tunnel) * scale),
                            conn.tunnel_window, limits.tunnel)
        for stream, (consumed, window) in conn.receiving_streams().items():
            before = probe.streams.get(stream)
            if before is not None:  # a stream opened during the probe has no whole sample
                frames += self._grow(stream, int((consumed - before) * scale), window, limits.stream)
        return frames

    def _grow(self, stream: int, sample: int, window: int, limit: int) -> list[Window]:
        if window >= limit or sample * _BOUND_DENOMINATOR < window * _BOUND_NUMERATOR:
            return []
        size = min(limit, sample * GROWTH)
        frames = self.conn.widen(stream, size)
        if frames:
            self.widened += 1
            if stream:
                self.widest_stream = max(self.widest_stream, size)
            if stream and size > self.conn.start_window:
                # The next transfer on this tunnel starts where this one got to; and the tunnel
                # window makes room for it and one more: a stream's window is of no use beyond
                # the tunnel's, which would otherwise grow only once every stream together hit it.
                self.conn.start_window = size
                frames += self.conn.widen(0, min(self.limits.tunnel, 2 * size))
        return frames
