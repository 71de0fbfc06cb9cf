"""``wstunnel status [URL]``: a server's ``/_status`` as a table, or as JSON for scripts."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import httpx

from wstunnel.ops.common import CommandLine, OpsError, parser
from wstunnel.tokens import redact

DEFAULT_URL = "http://127.0.0.1:8080"
COLUMNS = ("TOKEN", "CLIENTS", "ADDRESSES", "VERSION", "PROTOCOL", "TRANSPORT", "PENDING",
           "COMPLETED", "ERRORED", "IDLE")


def command_line() -> CommandLine:
    top = parser("wstunnel status", "Show the tunnels of a running server.")
    top.add_argument("url", metavar="URL", nargs="?", default=DEFAULT_URL,
                     help=f"the server (default {DEFAULT_URL})")
    top.add_argument("-json", "--json", action="store_true", help="print /_status as received")
    top.add_argument("-timeout", "--timeout", type=float, default=10.0, help="seconds to wait")
    return CommandLine(top)


def main(argv: list[str]) -> int:
    args = command_line().parser.parse_args(argv)
    base = args.url if "://" in args.url else f"http://{args.url}"
    url = base.rstrip("/") + "/_status"
    try:
        response = httpx.get(url, timeout=args.timeout)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise OpsError(f"cannot reach {url}: {exc or type(exc).__name__}") from None
    if response.status_code != 200:
        raise OpsError(f"{url} answered {response.status_code} {response.reason_phrase}")
    try:
        document = response.json()
    except ValueError:
        raise OpsError(f"{url} did not answer JSON; is it a wstunnel server?") from None
    if args.json:
        sys.stdout.write(response.text)
        return 0
    print(render(document, base.rstrip("/")))
    return 0


def render(document: dict[str, Any], url: str) -> str:
    tunnels = document.get("tunnels") or []
    header = (f"wstunnel {document.get('version', '?')} at {url}, "
              f"up {duration(document.get('uptime_secs'))}, {len(tunnels)} tunnel(s)"
              f"{open_files(document.get('open_files'))}")
    if not tunnels:
        return f"{header}\n(no tunnels)"
    rows = [COLUMNS, *(_row(tunnel) for tunnel in tunnels)]
    return "\n".join([header, "", *table(rows)])


def open_files(files: Any) -> str:
    """``, open files 230 of 65536 (503 past 64512)``; says so when the server is refusing."""
    if not isinstance(files, dict) or not {"in_use", "limit", "high_water"} <= files.keys():
        return ""  # an older server, or another implementation
    text = f", open files {files['in_use']} of {files['limit']}"
    if files.get("refusing"):
        return f"{text}: AT CAPACITY, new tunnels and requests get 503 (past {files['high_water']})"
    return f"{text} (503 past {files['high_water']})"


def _row(tunnel: dict[str, Any]) -> tuple[str, ...]:
    clients = tunnel.get("clients") or []
    # Each distinct value once, in the clients' order: "v1,v2", "websocket,longpoll".
    versions = dict.fromkeys(str(c.get("client_version", "?")) for c in clients)
    protocols = dict.fromkeys(str(c.get("protocol", "?")) for c in clients)
    transports = dict.fromkeys(str(c.get("transport", "?")) for c in clients)
    # Our server sends the 8-character prefix already; cut again anyway, so that a server that
    # sent more (another implementation, a future bug) still never puts a secret on the screen.
    token = redact(str(tunnel.get("token", "?")).removesuffix("..."))
    return (
        token,
        str(len(clients)),
        ",".join(str(c.get("address", "?")) for c in clients) or "-",
        ",".join(versions) or "-",
        ",".join(protocols) or "-",
        ",".join(transports) or "-",
        str(tunnel.get("pending", "?")),
        str(tunnel.get("completed", "?")),
        str(tunnel.get("errored", "?")),
        duration(tunnel.get("idle_secs")),
    )


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def duration(value: Any) -> str:
    """``4.2s``, ``3m 05s``, ``2h 03m``, ``5d 02h``: short enough for a column."""
    try:
        secs = float(value)
    except (TypeError, ValueError):
        return "?"
    if not math.isfinite(secs):
        return "?"
    if secs < 60:
        return f"{secs:.1f}s"
    minutes, s = divmod(int(secs), 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    if hours == 0:
        return f"{m}m {s:02d}s"
    if days == 0:
        return f"{h}h {m:02d}m"
    return f"{days}d {h:02d}h"
