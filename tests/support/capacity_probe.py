"""What a load balancer and the HTTP clients see of a server under load, measured from one process.

    python capacity_probe.py fetch SERVER TOKEN_FILE --path /hello.txt --expect TEXT [--tunnels N]
    python capacity_probe.py watch SERVER --secs S

Run with the installed package's own interpreter (``/usr/lib/wstunnel/bin/python``: trio and httpx
are there), inside the test container, so that the only network is the container's loopback.

Both modes ask ``/_health_check`` every POLL_GAP seconds the way a load balancer does, on a new
connection each time, and ``/_status`` as an operator's monitoring would, throughout. ``fetch``
first waits (up to ``--deadline``) for ``--tunnels`` clients on the server (``/_metrics``), then
sends one request for every token of TOKEN_FILE through the server (``X-Token``), CONCURRENCY at
a time, and checks each body. ``watch`` only polls, for ``--secs``. Either prints one JSON
document: how long things took, each answer's status counted, the slowest health check, and the
first failures, for the test to judge; the slowest health check apart for the time the clients
were connecting (a storm of handshakes) and for after.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

POLL_GAP = 0.25
CONCURRENCY = 32
HEALTH_TEXT = "WSTUNSRV RUNNING\n"


class Watch:
    """The health and status polls, and what they saw."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.health: collections.Counter[str] = collections.Counter()
        self.status: collections.Counter[str] = collections.Counter()
        # The slowest health check of each phase: while the clients connect (``connect``, a
        # storm of handshakes), and after (``steady``).
        self.phase = "connect"
        self.slowest_health: dict[str, float] = {}
        self.failures: list[str] = []
        self.open_files: dict[str, Any] = {}

    async def run(self) -> None:
        # A new connection for every poll: a kept-alive one would be one the server took in
        # before it filled up, which tells nothing about a new caller.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=10) as http:
            while True:
                await self._poll(http, "/_health_check", self.health)
                await self._poll(http, "/_status", self.status)
                await trio.sleep(POLL_GAP)

    async def _poll(self, http: httpx.AsyncClient, path: str, seen: collections.Counter[str]
                    ) -> None:
        started = time.monotonic()
        try:
            response = await http.get(self.server + path)
        except httpx.HTTPError as exc:
            seen[type(exc).__name__] += 1
            self._fail(f"{path}: {type(exc).__name__}: {exc}")
            return
        seen[str(response.status_code)] += 1
        if path == "/_health_check":
            took = round(time.monotonic() - started, 3)
            self.slowest_health[self.phase] = max(self.slowest_health.get(self.phase, 0.0), took)
            if response.text != HEALTH_TEXT:
                self._fail(f"{path}: {response.status_code} {response.text[:200]!r}")
        elif response.status_code == 200:
            self.open_files = response.json().get("open_files", {})
        else:
            self._fail(f"{path}: {response.status_code} {response.text[:200]!r}")

    def _fail(self, text: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(text)

    def report(self) -> dict[str, Any]:
        return {"health": dict(self.health), "status": dict(self.status),
                "slowest_health_secs": self.slowest_health,
                "open_files": self.open_files, "watch_failures": self.failures}


async def clients_on(http: httpx.AsyncClient, server: str) -> int:
    """Tunnel connections on the server, every transport together (-1 if it shows none)."""
    text = (await http.get(server + "/_metrics")).text
    found = re.findall(r"^wstunnel_clients(?:\{[^}]*\})? (\d+)$", text, re.M)
    return sum(int(n) for n in found) if found else -1


async def fetch(args: argparse.Namespace, watch: Watch) -> dict[str, Any]:
    tokens = [line.strip() for line in args.token_file.read_text().splitlines() if line.strip()]
    report: dict[str, Any] = {}
    began = time.monotonic()
    async with httpx.AsyncClient(timeout=30) as http:
        clients = await clients_on(http, args.server)
        deadline = time.monotonic() + args.deadline
        while clients < args.tunnels and time.monotonic() < deadline:
            await trio.sleep(0.5)  # polling another process: no event to wait on
            clients = await clients_on(http, args.server)
        report["clients"] = clients
        report["connect_secs"] = round(time.monotonic() - began, 1)
        watch.phase = "steady"
        if clients < args.tunnels:
            return report
        answers: collections.Counter[str] = collections.Counter()
        wrong: list[str] = []
        queue = list(tokens)
        started = time.monotonic()

        async def worker() -> None:
            while queue:
                token = queue.pop()
                try:
                    response = await http.get(args.server + args.path, headers={"X-Token": token})
                except httpx.HTTPError as exc:
                    answers[type(exc).__name__] += 1
                    wrong.append(f"{token[:8]}...: {type(exc).__name__}")
                    continue
                answers[str(response.status_code)] += 1
                if response.status_code != 200 or response.text != args.expect:
                    wrong.append(f"{token[:8]}...: {response.status_code} {response.text[:100]!r}")

        async with trio.open_nursery() as workers:
            for _ in range(CONCURRENCY):
                workers.start_soon(worker)
        report["answers"] = dict(answers)
        report["fetch_secs"] = round(time.monotonic() - started, 1)
        report["wrong"] = wrong[:20]
    return report


async def main(args: argparse.Namespace) -> None:
    watch = Watch(args.server)
    report: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)
        if args.mode == "fetch":
            report = await fetch(args, watch)
        else:
            watch.phase = "steady"
            await trio.sleep(args.secs)
        nursery.cancel_scope.cancel()
    report.update(watch.report())
    json.dump(report, sys.stdout)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    modes = parser.add_subparsers(dest="mode", required=True)
    fetching = modes.add_parser("fetch")
    fetching.add_argument("server")
    fetching.add_argument("token_file", type=Path)
    fetching.add_argument("--path", default="/hello.txt")
    fetching.add_argument("--expect", required=True)
    fetching.add_argument("--tunnels", type=int, default=0)
    fetching.add_argument("--deadline", type=float, default=120.0)
    watching = modes.add_parser("watch")
    watching.add_argument("server")
    watching.add_argument("--secs", type=float, required=True)
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse(sys.argv[1:]))
