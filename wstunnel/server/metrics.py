"""``/_metrics``: the server's counters in the Prometheus text exposition format, version 0.0.4.

Written by hand: the format is a few lines of text, not worth a dependency. Nothing here carries a
token, not even its prefix: tokens are secrets, and one label value per token would also let any
client that invents tokens grow the scrape without bound.

Counters and the latency histogram are kept as requests finish (:meth:`Metrics.observe`) and as
streams break off (:meth:`Metrics.aborted`); gauges are read from the registry and the process at
scrape time, so they cannot drift from what ``/_status`` shows.
"""

from __future__ import annotations

import bisect
import gc
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from wstunnel import procstats
from wstunnel.server.aborts import Cause, Direction
from wstunnel.server.capacity import Snapshot
from wstunnel.server.rendezvous import Registry

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
# The transport label of wstunnel_clients: both always present, so a query never finds no series.
TRANSPORTS = ("longpoll", "websocket")
# Tunnelled requests range from a few milliseconds to minutes (httptimeout defaults to 20 min),
# hence the long tail; anything slower lands in +Inf, which _count still counts.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


@dataclass(frozen=True)
class Gauges:
    """What the registry holds right now."""

    tunnels: int
    clients: int
    queue_depth: int
    pending: int
    # Clients by transport; every transport is there, with 0 when none uses it.
    clients_by_transport: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, registry: Registry) -> Gauges:
        rendezvous = list(registry)
        by_transport = Counter(dict.fromkeys(TRANSPORTS, 0))
        for r in rendezvous:
            for connection in r.connections:
                by_transport[connection.transport] += 1
        return cls(
            tunnels=len(rendezvous),
            clients=sum(len(r.connections) for r in rendezvous),
            queue_depth=sum(len(r.queue) for r in rendezvous),
            pending=sum(r.pending_count for r in rendezvous),
            clients_by_transport=tuple(sorted(by_transport.items())),
        )


class Histogram:
    """A cumulative Prometheus histogram over fixed upper bounds (``le``), plus +Inf."""

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)) or any(not math.isfinite(b) for b in bounds):
            raise ValueError("bucket bounds must be finite, distinct and ascending")
        self.bounds = tuple(bounds)
        # One slot per bound and a last one for +Inf; made cumulative only when rendered.
        self._counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le = "<=").
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        total = 0
        result = []
        for bound, count in zip((*self.bounds, math.inf), self._counts, strict=True):
            total += count
            result.append((bound, total))
        return result


class Metrics:
    """Counters of tunnelled requests; :meth:`render` turns them and the gauges into text."""

    def __init__(self, version: str, *, buckets: Sequence[float] = DURATION_BUCKETS) -> None:
        self.version = version
        self.requests_by_status: Counter[int] = Counter()
        self.request_bytes = 0
        self.response_bytes = 0
        self.duration = Histogram(buckets)
        self.aborted_streams: Counter[tuple[Direction, Cause]] = Counter()

    def observe(self, *, status: int, seconds: float, request_bytes: int, response_bytes: int) -> None:
        """Count one request answered for a token, whatever the answer (404 and 5xx included)."""
        self.requests_by_status[status] += 1
        self.request_bytes += request_bytes
        self.response_bytes += response_bytes
        self.duration.observe(max(seconds, 0.0))

    def aborted(self, direction: Direction, cause: Cause) -> None:
        """Count one stream whose body broke off (wstunnel.server.aborts)."""
        self.aborted_streams[direction, cause] += 1

    def render(self, gauges: Gauges, *, uptime: float, files: Snapshot | None = None) -> str:
        out: list[str] = []
        _family(out, "wstunnel_build_info", "gauge", "Version of the running server; always 1.",
                [({"version": self.version}, 1)])
        _family(out, "wstunnel_uptime_seconds", "gauge", "Seconds since the server started.",
                [({}, uptime)])
        _family(out, "wstunnel_tunnels", "gauge", "Tokens the server knows, with or without a client.",
                [({}, gauges.tunnels)])
        _family(out, "wstunnel_clients", "gauge", "Tunnel connections from clients, by transport.",
                [({"transport": name}, n) for name, n in gauges.clients_by_transport])
        _family(out, "wstunnel_queue_depth", "gauge",
                "Requests waiting for a tunnel connection to take them.", [({}, gauges.queue_depth)])
        _family(out, "wstunnel_requests_pending", "gauge",
                "Requests not answered yet, queued or sent through a tunnel.", [({}, gauges.pending)])
        _family(out, "wstunnel_requests_total", "counter",
                "Requests for a token, by the HTTP status the server answered.",
                [({"status": str(code)}, n) for code, n in sorted(self.requests_by_status.items())])
        _family(out, "wstunnel_request_bytes_total", "counter",
                "Body bytes of requests for a token.", [({}, self.request_bytes)])
        _family(out, "wstunnel_response_bytes_total", "counter",
                "Body bytes of the answers to requests for a token.", [({}, self.response_bytes)])
        _family(out, "wstunnel_streams_aborted_total", "counter",
                "Streamed bodies that broke off, by direction (request: the HTTP client's bytes, "
                "response: the backend's) and reason.",
                [({"direction": direction, "reason": str(cause)}, n)
                 for (direction, cause), n in sorted(self.aborted_streams.items())])
        # What the process holds: a leak shows as one of these growing with the traffic.
        for name, help_text, value in (
            ("wstunnel_trio_tasks", "Tasks alive in the server's trio run.", procstats.trio_tasks()),
            ("process_open_fds", "Number of open file descriptors.", procstats.open_fds()),
            ("process_resident_memory_bytes", "Resident memory size in bytes.",
             procstats.resident_bytes()),
            ("wstunnel_python_allocated_blocks", "Memory blocks the Python interpreter holds: "
             "grows with leaked objects, not with the allocator's kept peaks.",
             procstats.python_blocks()),
        ):
            if value is not None:
                _family(out, name, "gauge", help_text, [({}, value)])
        if files is not None:
            _open_files(out, files)
        # The names prometheus_client's process collector uses: dashboards know them. Cyclic
        # garbage made per request shows as collected objects growing with the request count.
        stats = gc.get_stats()
        _family(out, "python_gc_objects_collected_total", "counter",
                "Objects the cyclic garbage collector found unreachable, by generation.",
                [({"generation": str(gen)}, stat["collected"]) for gen, stat in enumerate(stats)])
        _family(out, "python_gc_collections_total", "counter",
                "Runs of the cyclic garbage collector, by generation.",
                [({"generation": str(gen)}, stat["collections"]) for gen, stat in enumerate(stats)])
        name = "wstunnel_request_duration_seconds"
        out.append(f"# HELP {name} Time from receiving a request for a token to having its answer.")
        out.append(f"# TYPE {name} histogram")
        for bound, count in self.duration.cumulative():
            out.append(_sample(f"{name}_bucket", {"le": _number(bound)}, count))
        out.append(_sample(f"{name}_sum", {}, self.duration.sum))
        out.append(_sample(f"{name}_count", {}, self.duration.count))
        return "\n".join(out) + "\n"


def _open_files(out: list[str], files: Snapshot) -> None:
    # process_max_fds: prometheus_client's process collector's name (process_open_fds, listed
    # afresh, is with the other process gauges).
    _family(out, "process_max_fds", "gauge", "Maximum number of open file descriptors.",
            [({}, files.limit)])
    _family(out, "wstunnel_open_files_high_water", "gauge",
            "Open files past which new tunnels and requests get 503 (the rest is kept for the "
            "server's own endpoints).", [({}, files.high_water)])
    _family(out, "wstunnel_capacity_refusals_total", "counter",
            "Tunnels and requests refused with 503 at the open-files high-water mark.",
            [({}, files.refused)])


def _family(out: list[str], name: str, kind: str, help_text: str,
            samples: Iterable[tuple[dict[str, str], float]]) -> None:
    out.append(f"# HELP {name} {_escape_help(help_text)}")
    out.append(f"# TYPE {name} {kind}")
    out.extend(_sample(name, labels, value) for labels, value in samples)


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    if not labels:
        return f"{name} {_number(value)}"
    pairs = ",".join(f'{key}="{_escape_label(text)}"' for key, text in labels.items())
    return f"{name}{{{pairs}}} {_number(value)}"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _escape_label(text: str) -> str:
    # The format's only escapes in label values: backslash, double quote and line feed.
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")
