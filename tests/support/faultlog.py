"""Reading what the daemons told about a fault: their log lines, ``/_metrics`` and STATS lines.

Log lines are the original's ``LEVEL EVENT  key=value ...`` form (wstunnel/logs.py): values with
spaces are double-quoted with backslash escapes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

from tests.support.harness import Process, wait_until

_FIELD = re.compile(r'(\w[\w-]*)=("(?:[^"\\]|\\.)*"|\S*)')


def fields(line: str) -> dict[str, str]:
    """The ``key=value`` fields of one log line, quotes and escapes undone."""
    found = {}
    for key, value in _FIELD.findall(line):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        found[key] = value
    return found


def events(output: str, event: str) -> list[dict[str, str]]:
    """The fields of every ``event`` line (``HTTP ABORT``, ``WS   CLOSE``...) in a log."""
    pattern = re.compile(r"\b" + r" +".join(map(re.escape, event.split())) + r" ")
    return [fields(line) for line in output.splitlines() if pattern.search(line)]


def ids_by_tag(output: str, event: str = "HTTP RCV") -> dict[str, str]:
    """Request id by the ``tag`` query parameter of its URL, from a daemon's request lines
    (the server's ``HTTP RCV``, the client's ``WS   RCV``)."""
    found = {}
    for line in events(output, event):
        tag = parse_qs(urlsplit(line.get("url", "")).query).get("tag")
        if tag:
            found[tag[0]] = line["id"]
    return found


def lines_of_tags(output: str, tags: set[str]) -> list[str]:
    """The server's log lines about the tagged requests (by the id its ``HTTP RCV`` gave each),
    for a failure's message: what srv said of a stream whose outcome a test waited for."""
    ids = {request_id for tag, request_id in ids_by_tag(output).items() if tag in tags}
    return [line for line in output.splitlines() if fields(line).get("id") in ids]


def aborts_by_tag(output: str, *, server: bool = True) -> dict[str, dict[str, str]]:
    """The abort line of each tagged request: the server's ``HTTP ABORT`` or the client's
    ``WS   ABORT``."""
    ids = ids_by_tag(output, "HTTP RCV" if server else "WS   RCV")
    aborts = {line["id"]: line for line in events(output, "HTTP ABORT" if server else "WS   ABORT")}
    return {tag: aborts[request_id] for tag, request_id in ids.items() if request_id in aborts}


def metric_samples(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one family of ``/_metrics``, by their sorted labels."""
    text = httpx.get(f"{url}/_metrics", timeout=10).text
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if match:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(1) or "")))
            samples[labels] = float(match.group(2))
    return samples


def aborted_counts(url: str) -> dict[tuple[str, str], int]:
    """``wstunnel_streams_aborted_total`` as {(direction, reason): count}."""
    counts = {}
    for labels, value in metric_samples(url, "wstunnel_streams_aborted_total").items():
        named = dict(labels)
        counts[named["direction"], named["reason"]] = int(value)
    return counts


def stats(process: Process, *, timeout: float = 15.0) -> dict[str, str]:
    """Ask a daemon for its STATS line (SIGUSR1) and return the new line's fields."""
    before = len(events(process.output(), "STATS"))
    process.signal(signal.SIGUSR1)
    wait_until(lambda: len(events(process.output(), "STATS")) > before, timeout=timeout,
               what=f"a STATS line from {process.name}")
    return events(process.output(), "STATS")[-1]


def open_files(pid: int) -> list[str]:
    """What a process has open, sockets as ``tcp <local port> -> <remote port> <state>``: for
    the message of a failed leak check."""
    sockets = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cells = line.split()
                local, remote = (int(cells[i].rsplit(":", 1)[1], 16) for i in (1, 2))
                sockets[cells[9]] = f"tcp {local} -> {remote} state {cells[3]}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            cells = line.split()
            sockets[cells[6]] = "unix " + (cells[7] if len(cells) > 7 else "(unnamed)")
    found = []
    with contextlib.suppress(OSError):
        for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                inode = target.removeprefix("socket:[").removesuffix("]")
                found.append(f"{fd}: {sockets.get(inode, target)}")
    return found
