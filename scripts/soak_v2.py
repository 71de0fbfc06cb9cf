#!/usr/bin/env python3
"""The streams soak (``scripts/soak.py --v2``): every kind of protocol v2 traffic, over both
transports, through a tunnel whose parts keep failing on a schedule.

    .venv/bin/python scripts/soak.py --v2 --duration 1800   # the 30-minute run
    .venv/bin/python scripts/soak.py --v2 --duration 40 --flap-every 12 --restart-every 25

On 127.0.0.1: a backend (tests/support/backend_app.py), a ``wstunnel srv``, and three
``wstunnel cli``: one on a WebSocket and one over long-poll that live the whole run (each on its
own token), and a third on the WebSocket client's token, killed with SIGKILL every
``--flap-every`` seconds and started again on the other transport. Every ``--restart-every``
seconds the server is stopped, by SIGTERM and by SIGKILL in turn, and started again on its port.

``--workers`` threads send, on either token: small requests (GETs, POSTs with bodies, slow
ones), downloads and uploads of 1 to 24 MiB (half of them paced, half as fast as they go),
server-sent events and WebSocket pass-through sessions (tests/support/streams.py judges each).
Every request ends one way:

* *answered*: whole, with the right bytes;
* *aborted*: cut off, and its HTTP client could tell (a reset, a short body, no last chunk, no
  Close frame): expected when a fault strikes mid-transfer; one with no fault near it is
  reported as *unexplained*;
* *errored*: an explicit 5xx (502 Tunnel connection lost, 503 while draining...);
* *refused*: no connection (the server is restarting);
* *lost*: no answer by its deadline, or a clean end with the wrong bytes. Must be 0.

Aborts by reason, both ends, are counted from the daemons' logs: the server's ``HTTP ABORT``
lines (by direction and cause; a server killed with SIGKILL has logged them all the same) and
the clients' ``WS ABORT`` lines. Resident memory is sampled after a warm-up and at the end of
each server lifetime and of each steady client's: its growth should stay under 10 %.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from soak import BACKEND, PYTHON, Processes, free_port, rss_kib, wait_for  # noqa: E402

from tests.support.streams import Download, Events, PassThrough, Probe, Upload  # noqa: E402

# How often each kind of request is sent (relative weights).
MIX = {"small": 55, "download": 12, "upload": 12, "sse": 11, "websocket": 10}
SMALL_DEADLINE = 45.0
SERVER_WARMUP = 30.0  # seconds into a server's life when its memory is first sampled
CLIENT_WARMUP = 60.0
FAULT_WINDOW = 15.0  # an abort this close after a fault is the fault's doing
OUTCOMES = ("answered", "aborted", "errored", "refused", "lost")


@dataclass
class Record:
    kind: str
    transport: str
    outcome: str
    detail: str
    started: float
    ended: float


@dataclass
class Ledger:
    records: list[Record] = field(default_factory=list)
    faults: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, what)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, record: Record) -> None:
        with self.lock:
            self.records.append(record)

    def fault(self, what: str) -> None:
        with self.lock:
            self.faults.append((time.monotonic(), what))

    def explained(self, record: Record) -> bool:
        """A fault struck while the request ran (or just before it ended)."""
        return any(record.started - 1 <= when <= record.ended + 1
                   or when <= record.ended <= when + FAULT_WINDOW for when, _ in self.faults)


def small_request(http: httpx.Client, url: str, rng: random.Random) -> tuple[str, str]:
    """One small request; (outcome, detail)."""
    choice = rng.choices(["get", "post", "slow"], weights=[6, 3, 1])[0]
    try:
        if choice == "get":
            size = rng.randint(0, 20000)
            response = http.get(f"{url}/bytes?size={size}")
            expected = bytes(i % 251 for i in range(size))
            body = response.content
        elif choice == "post":
            sent = secrets.token_bytes(rng.randint(0, 50000))
            response = http.post(f"{url}/echo", content=sent)
            expected = sent
            body = response.json()["body"].encode("latin-1") if response.status_code == 200 else b""
        else:
            response = http.get(f"{url}/slow?secs=0.5")
            expected, body = b"slow\n", response.content
    except httpx.ConnectError:
        return "refused", ""
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        return "aborted", f"{choice}: {type(exc).__name__}"
    except httpx.TimeoutException as exc:
        return "lost", f"{choice}: {exc!r}"
    except ValueError as exc:
        return "lost", f"{choice}: 200 with a body that is not JSON: {exc}"
    if response.status_code != 200:
        return ("errored" if response.status_code >= 500 else "lost",
                f"{choice}: status {response.status_code}")
    if hashlib.sha256(body).digest() != hashlib.sha256(expected).digest():
        return "lost", f"{choice}: 200 with a body that is not what was expected"
    return "answered", ""


def probe_for(kind: str, port: int, token: str, tag: str, rng: random.Random) -> Probe:
    if kind == "download":
        probe: Probe = Download("127.0.0.1", port, token, tag, size=rng.randint(1, 24) << 20)
    elif kind == "upload":
        probe = Upload("127.0.0.1", port, token, tag, size=rng.randint(1, 24) << 20)
    elif kind == "sse":
        probe = Events("127.0.0.1", port, token, tag, events=rng.randint(10, 60))
    else:
        probe = PassThrough("127.0.0.1", port, token, tag, messages=rng.randint(10, 100))
    if kind in ("download", "upload") and rng.random() < 0.5:
        probe.hurry()  # as fast as it goes (the others are paced, ~3 MB/s)
    return probe


def judge(probe: Probe) -> str:
    if probe.outcome == "complete":
        return "answered"
    if probe.outcome in ("aborted", "refused"):
        return probe.outcome
    if probe.outcome.startswith("status 5"):
        return "errored"
    return "lost"  # hung, corrupt, a 4xx, a refused WebSocket upgrade


def worker(stop: threading.Event, ledger: Ledger, port: int, tokens: dict[str, str],
           seed: int) -> None:
    rng = random.Random(seed)
    url = f"http://127.0.0.1:{port}"
    clients = {transport: httpx.Client(timeout=SMALL_DEADLINE, headers={"X-Token": token},
                                       trust_env=False)
               for transport, token in tokens.items()}
    try:
        number = 0
        while not stop.is_set():
            number += 1
            kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
            transport = rng.choice(list(tokens))
            started = time.monotonic()
            if kind == "small":
                outcome, detail = small_request(clients[transport], url, rng)
            else:
                probe = probe_for(kind, port, tokens[transport], f"w{seed}n{number}", rng)
                probe.run()  # in this thread
                outcome, detail = judge(probe), f"{probe.outcome}: {probe.detail}"
            ledger.add(Record(kind, transport, outcome, detail, started, time.monotonic()))
            if outcome == "refused":
                stop.wait(0.2)  # the server is restarting: no need to hammer it
    finally:
        for client in clients.values():
            client.close()


def server_aborts(logdir: Path) -> Counter[str]:
    """The servers' HTTP ABORT lines, every lifetime, as "direction cause" -> count."""
    counts: Counter[str] = Counter()
    for log in logdir.glob("srv-*.log"):
        for direction, cause in re.findall(r"HTTP ABORT .*? direction=(\w+) .*? cause=(\w+)",
                                           log.read_text(errors="replace")):
            counts[f"{direction} {cause}"] += 1
    return counts


def client_aborts(logdir: Path) -> Counter[str]:
    """The clients' WS ABORT lines, every client and lifetime, by cause."""
    counts: Counter[str] = Counter()
    for log in logdir.glob("cli-*.log"):
        counts.update(re.findall(r"WS   ABORT .*? cause=(\w+)", log.read_text(errors="replace")))
    return counts


def growth(start: int | None, end: int | None) -> dict[str, object]:
    pct = round(100 * (end - start) / start, 1) if start and end else None
    return {"start_kib": start, "end_kib": end, "growth_pct": pct}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="soak.py --v2", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (600)")
    parser.add_argument("--flap-every", type=float, default=45, help="client kill period, s (45)")
    parser.add_argument("--restart-every", type=float, default=300,
                        help="server restart period, s (300)")
    parser.add_argument("--workers", type=int, default=8, help="load threads (8)")
    parser.add_argument("--logdir", type=Path, default=None, help="where the daemons log")
    args = parser.parse_args(argv)

    logdir = args.logdir or Path(os.environ.get("TMPDIR", "/tmp")) / f"wstunnel-soak-v2-{os.getpid()}"
    logdir.mkdir(parents=True, exist_ok=True)
    tokens = {"websocket": secrets.token_urlsafe(24), "longpoll": secrets.token_urlsafe(24)}
    server_port, backend_port = free_port(), free_port()
    url = f"http://127.0.0.1:{server_port}"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    server_argv = [PYTHON, "-m", "wstunnel", "srv", "-host", "127.0.0.1", "-port", str(server_port),
                   "-httptimeout", "60", "-wstimeout", "6", "-max-requests-per-tunnel", "400",
                   "-failure-limit", "0", "-shutdown-grace", "3"]

    def client_argv(transport: str) -> list[str]:
        return [PYTHON, "-m", "wstunnel", "cli", "-tunnel", f"ws://127.0.0.1:{server_port}",
                "-server", f"http://127.0.0.1:{backend_port}", "-reconnect-max-delay", "2",
                "-timeout", "6", "-transport", transport]

    def client_env(transport: str) -> dict[str, str]:
        return {**env, "WSTUNCLI_TOKEN": tokens[transport]}

    ledger = Ledger()
    stop = threading.Event()
    processes = Processes(logdir)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # a test's way to end it early
    server_lifetimes: list[dict[str, object]] = []
    steady_rss: dict[str, list[int | None]] = {}
    events: Counter[str] = Counter()
    started = time.monotonic()
    try:
        processes.start("backend", [PYTHON, str(BACKEND), str(backend_port)])
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{backend_port}/", timeout=2).status_code == 200,
                 "the backend")

        def start_server() -> int:
            pid = processes.start(f"srv-{events['server restarts'] + events['server kills']}",
                                  server_argv)
            wait_for(lambda: httpx.get(f"{url}/_health_check", timeout=2).status_code == 200,
                     "the server")
            return pid

        server_pid = start_server()
        server_started = time.monotonic()
        server_rss_start: int | None = None
        steady = {transport: processes.start(f"cli-steady-{transport}", client_argv(transport),
                                             client_env(transport))
                  for transport in tokens}
        flappy_transport = "longpoll"
        processes.start("cli-flappy-0", client_argv(flappy_transport), client_env("websocket"))

        def clients() -> int:
            tunnels = httpx.get(f"{url}/_status", timeout=2).json()["tunnels"]
            return sum(len(t["clients"]) for t in tunnels)

        wait_for(lambda: clients() == 3, "the three clients")
        workers = [threading.Thread(target=worker, args=(stop, ledger, server_port, tokens, seed),
                                    daemon=True)
                   for seed in range(args.workers)]
        started = time.monotonic()
        for thread in workers:
            thread.start()
        next_flap = started + args.flap_every
        next_restart = started + args.restart_every
        while not stop.is_set() and (now := time.monotonic()) < started + args.duration:
            if server_rss_start is None and now >= server_started + SERVER_WARMUP:
                server_rss_start = rss_kib(server_pid)
            if not steady_rss and now >= started + CLIENT_WARMUP:
                steady_rss = {transport: [rss_kib(pid)] for transport, pid in steady.items()}
            if now >= next_flap:
                flaps = events["client kills"]
                processes.stop(f"cli-flappy-{flaps}", signal.SIGKILL)
                ledger.fault("client killed")
                events["client kills"] += 1
                flappy_transport = "websocket" if flappy_transport == "longpoll" else "longpoll"
                processes.start(f"cli-flappy-{flaps + 1}", client_argv(flappy_transport),
                                client_env("websocket"))
                next_flap += args.flap_every
            if now >= next_restart:
                kill = (events["server restarts"] + events["server kills"]) % 2 == 1
                lifetime = growth(server_rss_start, rss_kib(server_pid))
                lifetime["ended_by"] = "SIGKILL" if kill else "SIGTERM"
                lifetime["secs"] = round(now - server_started)
                server_lifetimes.append(lifetime)
                ledger.fault("server killed" if kill else "server stopped")
                processes.stop(f"srv-{events['server restarts'] + events['server kills']}",
                               signal.SIGKILL if kill else signal.SIGTERM)
                events["server kills" if kill else "server restarts"] += 1
                server_pid = start_server()
                server_started, server_rss_start = time.monotonic(), None
                next_restart += args.restart_every
            time.sleep(0.2)
        if steady_rss:
            for transport, pid in steady.items():
                steady_rss[transport].append(rss_kib(pid))
        lifetime = growth(server_rss_start, rss_kib(server_pid))
        lifetime["ended_by"] = "end of the run"
        lifetime["secs"] = round(time.monotonic() - server_started)
        server_lifetimes.append(lifetime)
        stop.set()
        for thread in workers:
            thread.join(SMALL_DEADLINE + 90)
    finally:
        stop.set()
        processes.stop_all()

    records = ledger.records
    totals = Counter(record.outcome for record in records)
    by_kind: dict[str, dict[str, int]] = {}
    for record in records:
        kinds = by_kind.setdefault(f"{record.kind} ({record.transport})", dict.fromkeys(OUTCOMES, 0))
        kinds[record.outcome] += 1
    unexplained = [r for r in records if r.outcome == "aborted" and not ledger.explained(r)]
    lost = [r for r in records if r.outcome == "lost"]
    report = {
        "command": " ".join(["scripts/soak.py", "--v2", *argv]),
        "duration_s": round(time.monotonic() - started),
        "requests": len(records),
        **{outcome: totals[outcome] for outcome in OUTCOMES},
        "by_kind": by_kind,
        "aborted_by_reason": {"server (HTTP ABORT)": dict(sorted(server_aborts(logdir).items())),
                              "clients (WS ABORT)": dict(sorted(client_aborts(logdir).items()))},
        "unexplained_aborts": len(unexplained),
        "unexplained_examples": [f"{r.kind}/{r.transport}: {r.detail}" for r in unexplained[:10]],
        "lost_examples": [f"{r.kind}/{r.transport}: {r.detail}" for r in lost[:10]],
        "events": dict(events),
        "rss": {
            "server_lifetimes": server_lifetimes,
            "steady_clients": {transport: growth(*samples) if len(samples) == 2 else None
                               for transport, samples in steady_rss.items()},
        },
        "logs": str(logdir),
    }
    print(json.dumps(report, indent=2))
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
