#!/usr/bin/env python3
"""Bounded soak: steady mixed load through a real tunnel while its parts keep failing.

    .venv/bin/python scripts/soak.py                 # 10 minutes
    .venv/bin/python scripts/soak.py --duration 120  # a short one
    .venv/bin/python scripts/soak.py --v2 --duration 1800  # streams, both transports (soak_v2.py)

On 127.0.0.1: a backend, a ``wstunnel srv``, two ``wstunnel cli`` on one token (one steady, one
that is killed with SIGKILL and started again every ``--flap-every`` seconds), and
``--workers`` load threads sending a mix of GETs, POSTs with bodies and slow requests. Every
``--restart-every`` seconds the server is stopped (SIGTERM) and started again on its port.

Every request ends one of three ways: *answered* (any HTTP response; 5xx counted apart as
*errored*, they are explicit), *refused* (connection refused while the server restarts: also
explicit), or *lost* (no answer within its deadline, or a body that is not what was sent).
Lost must be 0. Resident memory of the steady client and of each server lifetime is sampled
after a warm-up and at the end; growth should stay under 10 %.

``--v2`` runs the streams soak of scripts/soak_v2.py instead: large transfers, server-sent events
and WebSocket pass-through beside the small requests, over both transports, with aborts counted
by reason.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BACKEND = ROOT / "tests" / "support" / "backend_app.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Tally:
    counts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    lost_examples: list[str] = field(default_factory=list)

    def add(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.counts[outcome] += 1
            if outcome == "lost" and len(self.lost_examples) < 10:
                self.lost_examples.append(detail)


class Processes:
    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        log = (self.logdir / f"{name}.log").open("ab")
        self.running[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
        return self.running[name].pid

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int | None:
        process = self.running.pop(name, None)
        if process is None:
            return None
        process.send_signal(sig)
        try:
            return process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)


def wait_for(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, OSError, ValueError, KeyError):
            if check():  # type: ignore[operator]
                return
        time.sleep(0.05)
    raise SystemExit(f"soak: timed out waiting for {what}")


def load_worker(stop: threading.Event, url: str, token: str, tally: Tally, deadline_s: float,
                seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=deadline_s, headers={"X-Token": token}) as client:
        while not stop.is_set():
            kind = rng.choices(["get", "post", "slow"], weights=[6, 3, 1])[0]
            try:
                if kind == "get":
                    size = rng.randint(0, 20000)
                    response = client.get(f"{url}/bytes?size={size}")
                    expected = hashlib.sha256(bytes(i % 251 for i in range(size))).digest()
                    def seen(r: httpx.Response) -> bytes:
                        return hashlib.sha256(r.content).digest()
                elif kind == "post":
                    body = secrets.token_bytes(rng.randint(0, 50000))
                    response = client.post(f"{url}/echo", content=body)
                    expected = hashlib.sha256(body).digest()
                    def seen(r: httpx.Response) -> bytes:
                        return hashlib.sha256(r.json()["body"].encode("latin-1")).digest()
                else:
                    response = client.get(f"{url}/slow?secs=0.5")
                    expected = hashlib.sha256(b"slow\n").digest()
                    def seen(r: httpx.Response) -> bytes:
                        return hashlib.sha256(r.content).digest()
            except httpx.ConnectError:
                tally.add("refused")
                time.sleep(0.05)
                continue
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                # The server went away mid-exchange (its restart): explicit, not silent.
                tally.add("dropped")
                continue
            except httpx.TimeoutException as exc:
                tally.add("lost", f"{kind}: {exc!r}")
                continue
            if response.status_code != 200:
                # An explicit refusal: counted by status, judged by the reader of the report.
                tally.add(f"status {response.status_code}")
                continue
            try:
                ok = seen(response) == expected
            except (ValueError, KeyError):
                ok = False
            if ok:
                tally.add("answered")
            else:
                tally.add("lost", f"{kind}: 200 with a body that is not what was expected")


def main() -> int:
    if "--v2" in sys.argv[1:]:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import soak_v2  # a sibling script, not a package

        return soak_v2.main([arg for arg in sys.argv[1:] if arg != "--v2"])
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (600)")
    parser.add_argument("--flap-every", type=float, default=30, help="client kill period, s (30)")
    parser.add_argument("--restart-every", type=float, default=180,
                        help="server restart period, s (180)")
    parser.add_argument("--workers", type=int, default=8, help="load threads (8)")
    parser.add_argument("--logdir", type=Path, default=None, help="where the daemons log")
    parser.add_argument("--v2", action="store_true",
                        help="the streams soak over both transports (scripts/soak_v2.py)")
    args = parser.parse_args()

    logdir = args.logdir or Path(os.environ.get("TMPDIR", "/tmp")) / f"wstunnel-soak-{os.getpid()}"
    logdir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    server_port, backend_port = free_port(), free_port()
    url = f"http://127.0.0.1:{server_port}"
    env = {**os.environ, "WSTUNCLI_TOKEN": token}
    env = {k: v for k, v in env.items() if not k.lower().endswith("_proxy")}
    server_argv = [PYTHON, "-m", "wstunnel", "srv", "-host", "127.0.0.1", "-port", str(server_port),
                   "-httptimeout", "30", "-max-requests-per-tunnel", "200", "-failure-limit", "0"]
    client_argv = [PYTHON, "-m", "wstunnel", "cli", "-tunnel", f"ws://127.0.0.1:{server_port}",
                   "-server", f"http://127.0.0.1:{backend_port}", "-reconnect-max-delay", "2",
                   "-timeout", "6"]
    tally = Tally()
    memory: dict[str, list[int]] = {"client": [], "server lifetimes growth %": []}
    stop = threading.Event()
    processes = Processes(logdir)
    try:
        processes.start("backend", [PYTHON, str(BACKEND), str(backend_port)])
        backend_url = f"http://127.0.0.1:{backend_port}/"
        wait_for(lambda: httpx.get(backend_url, timeout=2).status_code == 200, "the backend")
        server_pid = processes.start("srv", server_argv)
        wait_for(lambda: httpx.get(f"{url}/_health_check", timeout=2).status_code == 200, "the server")
        steady_pid = processes.start("cli-steady", client_argv, env)
        processes.start("cli-flappy", client_argv, env)

        def clients() -> int:
            tunnels = httpx.get(f"{url}/_status", timeout=2).json()["tunnels"]
            return sum(len(t["clients"]) for t in tunnels)

        wait_for(lambda: clients() == 2, "both clients")
        workers = [threading.Thread(target=load_worker,
                                    args=(stop, url, token, tally, 45.0, seed), daemon=True)
                   for seed in range(args.workers)]
        started = time.monotonic()
        for worker in workers:
            worker.start()
        warm = started + min(30.0, args.duration / 4)
        next_flap = started + args.flap_every
        next_restart = started + args.restart_every
        server_rss_start: int | None = None
        events: Counter[str] = Counter()
        while (now := time.monotonic()) < started + args.duration:
            if server_rss_start is None and now >= warm:
                server_rss_start = rss_kib(server_pid)
                if not memory["client"]:
                    memory["client"].append(rss_kib(steady_pid) or 0)
            if now >= next_flap:
                processes.stop("cli-flappy", signal.SIGKILL)
                processes.start("cli-flappy", client_argv, env)
                events["client flaps"] += 1
                next_flap += args.flap_every
            if now >= next_restart:
                end_rss = rss_kib(server_pid)
                if server_rss_start and end_rss:
                    memory["server lifetimes growth %"].append(
                        round(100 * (end_rss - server_rss_start) / server_rss_start, 1))
                processes.stop("srv")
                server_pid = processes.start("srv", server_argv)
                wait_for(lambda: httpx.get(f"{url}/_health_check", timeout=2).status_code == 200,
                         "the restarted server")
                server_rss_start = None
                warm = time.monotonic() + 20
                events["server restarts"] += 1
                next_restart += args.restart_every
            time.sleep(0.2)
        memory["client"].append(rss_kib(steady_pid) or 0)
        if server_rss_start:
            end_rss = rss_kib(server_pid) or server_rss_start
            memory["server lifetimes growth %"].append(
                round(100 * (end_rss - server_rss_start) / server_rss_start, 1))
        stop.set()
        for worker in workers:
            worker.join(60)
    finally:
        stop.set()
        processes.stop_all()
    sent = sum(tally.counts.values())
    rss = memory["client"]
    client_growth = round(100 * (rss[-1] - rss[0]) / rss[0], 1) if len(rss) >= 2 and rss[0] else None
    report = {
        "duration_s": args.duration,
        "sent": sent,
        "outcomes": dict(tally.counts),
        "lost": tally.counts["lost"],
        "lost_examples": tally.lost_examples,
        "events": dict(events),
        "steady_client_rss_kib": memory["client"],
        "steady_client_rss_growth_pct": client_growth,
        "server_rss_growth_pct_per_lifetime": memory["server lifetimes growth %"],
        "logs": str(logdir),
    }
    print(json.dumps(report, indent=2))
    return 1 if tally.counts["lost"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
