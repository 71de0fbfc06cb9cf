"""What the server says about itself: ``/_health_check``, ``/_stats`` and ``/_status``.

``/_stats`` keeps the original's plain ``key=value`` text, keys and order, so existing monitoring
scripts keep parsing it; details go only to loopback peers (or trusted proxies' loopback clients).
``/_status`` is the JSON view with everything we know per tunnel.
"""

from __future__ import annotations

import json
import math
import time

import trio

from wstunnel import __version__
from wstunnel.server.rendezvous import Registry

HEALTH_TEXT = "WSTUNSRV RUNNING\n"
# What the original tells callers that are not on loopback; scripts may look for it.
MORE_STATS_TEXT = "More stats available when called from localhost..."
DEAD_AFTER_SECS = 60.0


def render_stats(registry: Registry, *, detailed: bool) -> str:
    lines = [f"tunnels={len(registry)}"]
    if not detailed:
        lines.append(MORE_STATS_TEXT)
        return "\n".join(lines) + "\n"
    req_pending = 0
    dead_tunnels = 0
    for index, rendezvous in enumerate(registry):
        prefix = f"tunnel{index:02d}"
        pending = rendezvous.pending_count
        req_pending += pending
        lines.append("")
        lines.append(f"{prefix}_token={rendezvous.token}")
        lines.append(f"{prefix}_req_pending={pending}")
        addrs = ",".join(c.addr for c in rendezvous.connections)
        lines.append(f"{prefix}_tun_addr={addrs}")
        if rendezvous.connections:
            idle = seconds(min(c.idle_secs() for c in rendezvous.connections))
            lines.append(f"{prefix}_idle_secs={idle:.1f}")
            dead_tunnels += idle > DEAD_AFTER_SECS
        else:
            # The original prints NaN for a tunnel with no activity to measure.
            lines.append(f"{prefix}_idle_secs=NaN")
            dead_tunnels += 1
        # Keys the original did not have go after its own.
        lines.append(f"{prefix}_clients={len(rendezvous.connections)}")
        lines.append(f"{prefix}_transports={','.join(c.transport for c in rendezvous.connections)}")
    lines.append("")
    lines.append(f"req_pending={req_pending}")
    lines.append(f"dead_tunnels={dead_tunnels}")
    return "\n".join(lines) + "\n"


def render_status(registry: Registry, *, started_at: float,
                  open_files: dict[str, int | bool] | None = None) -> str:
    """``open_files``: descriptors in use, the limit, the high-water mark past which new
    tunnels and requests are refused, whether they are now, and how many were."""
    now = trio.current_time()
    wall_now = time.time()
    tunnels = []
    for rendezvous in registry:
        clients = [
            {
                "address": conn.addr,
                "client_version": conn.client_version,
                "transport": conn.transport,
                "protocol": conn.protocol,
                "client_subject": conn.client_subject,
                "connected_secs": round(now - conn.connected_at, 1),
                "idle_secs": round(conn.idle_secs(), 1),
                "in_flight": len(conn.in_flight),
                "answered": conn.answered,
                "aborted": conn.aborts.total,
                **({"flow": flow} if (flow := conn.flow()) is not None else {}),
            }
            for conn in rendezvous.connections
        ]
        tunnels.append(
            {
                "token": str(rendezvous.token),
                "clients": clients,
                "pending": rendezvous.pending_count,
                "queued": len(rendezvous.queue),
                "completed": rendezvous.counters.completed,
                "errored": rendezvous.counters.errored,
                # Streams whose body broke off, by direction and cause (wstunnel.server.aborts).
                "aborted": rendezvous.aborts.by_direction(),
                "last_close": rendezvous.last_close,
                "last_activity": _iso(wall_now - (now - rendezvous.last_activity)),
                "idle_secs": round(now - rendezvous.last_activity, 1),
            }
        )
    document = {
        "version": __version__,
        "uptime_secs": round(now - started_at, 1),
        **({"open_files": open_files} if open_files is not None else {}),
        "tunnels": tunnels,
    }
    return json.dumps(document, indent=2) + "\n"


def seconds(value: float) -> float:
    """Tenths of a second, rounded down, as the original prints idle times."""
    return math.floor(value * 10) / 10


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
