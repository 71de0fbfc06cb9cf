#!/usr/bin/env python3
"""What the operator's console costs the server: a page load and a live update, with N tunnels.

    .venv/bin/python scripts/console_cost.py [--tunnels 1000] [--loads 20] [--duration 30]
                                             [--rate 4] [--json FILE] [--smoke]

Starts, in a temporary directory on 127.0.0.1: ``wstunnel srv``, the test backend, and N tunnel
clients co-hosted in one process (tests/support/many_clients.py, the real client code, as
``scripts/bench --idle`` runs them). Once all N are connected it measures the server's CPU time
(user + system, from /proc/<pid>/stat) and the bytes it sends:

- **idle**: the server with N idle tunnels and no console open, for ``--duration`` seconds: the
  floor every other figure is taken from.
- **page load**: ``--loads`` times what a browser fetches for the page: ``/_admin/``, its CSS and
  script, and the event stream up to the end of its first event (the snapshot), then closed;
  CPU per load (idle floor subtracted) and the bytes the server sent for it (bodies and the
  event stream's framing; response heads left out).
- **updates**: ``--duration`` seconds of ``--rate`` requests a second spread over the tokens,
  once with no console open and once with one event stream open, same requests: the extra CPU
  divided by the updates the stream received, and the bytes of one update; and the same with
  the tunnels idle (the updates then come from clients' pings, whose activity a row shows to
  the nearest 30 s).

The machine is shared: every figure is the difference of two measurements of the same length,
and the idle floor is measured again after the loads; take several runs before believing a
digit. Every process started is stopped at the end, even on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TICKS = os.sysconf("SC_CLK_TCK")
RATE_SETTLE = 12.0  # the server's requests/s is averaged over 10 s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"console_cost: timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)


@contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in reversed(started):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def start(started: list[subprocess.Popen[bytes]], argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=ROOT)
    started.append(process)
    return process


def page_load(url: str) -> int:
    """One load of the page, as a browser makes it; the bytes received."""
    received = 0
    with httpx.Client(base_url=url, timeout=60) as http:
        for path in ("/_admin/", "/_admin/console.css", "/_admin/console.js"):
            response = http.get(path)
            response.raise_for_status()
            received += len(response.content)
    received += first_event(url)
    return received


def first_event(url: str) -> int:
    """Open the event stream, read until its first event is whole, close; the body bytes."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"GET /_admin/api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while b"\n\n" not in data.partition(b"event: snapshot")[2]:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise SystemExit("console_cost: the event stream ended before its snapshot")
            data += chunk
    return len(data)


class Subscriber(threading.Thread):
    """An open event stream, counting its update events and their bytes."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.port = int(url.rsplit(":", 1)[1])
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        self.sock.sendall(b"GET /_admin/api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.buffer = b""
        self.counting = False
        self.updates = 0
        self.update_bytes = 0
        self.snapshot_seen = threading.Event()
        self.stopped = False

    def run(self) -> None:
        while not self.stopped:
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            self.buffer += chunk
            while b"\n\n" in self.buffer:
                event, self.buffer = self.buffer.split(b"\n\n", 1)
                if b"event: snapshot" in event:
                    self.snapshot_seen.set()
                elif b"event: update" in event and self.counting:
                    self.updates += 1
                    self.update_bytes += len(event) + 2

    def close(self) -> None:
        self.stopped = True
        self.sock.close()


def feed_costs(url: str) -> dict[str, Any]:
    """What the console's feed says it has cost so far."""
    return dict(httpx.get(f"{url}/_admin/api/state", timeout=60).json()["feed"])


def traffic(url: str, tokens: list[str], rate: float, duration: float) -> int:
    """``rate`` GETs a second, each for the next token, for ``duration`` s; how many were sent."""
    if rate <= 0:
        time.sleep(duration)
        return 0
    sent = 0
    began = time.monotonic()
    with httpx.Client(base_url=url, timeout=30) as http:
        while (elapsed := time.monotonic() - began) < duration:
            token = tokens[sent % len(tokens)]
            http.get("/echo/cost", headers={"X-Token": token}).raise_for_status()
            sent += 1
            time.sleep(max(0.0, sent / rate - (time.monotonic() - began)))
            del elapsed
    return sent


def measure(pid: int, work: Callable[[], Any]) -> tuple[float, float, Any]:
    """(CPU seconds, wall seconds, work's result) of the server during ``work``."""
    cpu, began = cpu_seconds(pid), time.monotonic()
    result = work()
    return cpu_seconds(pid) - cpu, time.monotonic() - began, result


def run(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    port, backend_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    tokens = [f"cost{i:04d}" + secrets.token_urlsafe(18) for i in range(args.tunnels)]
    token_file = directory / "tokens"
    token_file.write_text("".join(t + "\n" for t in tokens))
    token_file.chmod(0o600)
    with processes() as started:
        server = start(started, [PYTHON, "-m", "wstunnel", "srv", "-host", "127.0.0.1", "-port",
                                 str(port), "-state-file", str(directory / "state.json"),
                                 "-log-level", "warning"], directory / "srv.log")
        start(started, [PYTHON, str(ROOT / "tests" / "support" / "backend_app.py"),
                        str(backend_port)], directory / "backend.log")
        wait_for("the server", lambda: httpx.get(f"{url}/_health_check", timeout=2).status_code == 200, 30)
        wait_for("the backend", lambda: httpx.get(f"http://127.0.0.1:{backend_port}/", timeout=2)
                 .status_code == 200, 30)
        start(started, [PYTHON, str(ROOT / "tests" / "support" / "many_clients.py"), f"ws://127.0.0.1:{port}",
                        f"http://127.0.0.1:{backend_port}", str(token_file), str(directory / "clients.log")],
              directory / "clients.out")

        def all_connected() -> bool:
            server_figures = httpx.get(f"{url}/_admin/api/state", timeout=30).json()["server"]
            return bool(server_figures["clients"] == args.tunnels)

        wait_for(f"{args.tunnels} tunnels", all_connected, 60 + args.tunnels / 20)
        time.sleep(2)  # the handshakes' work over
        pid = server.pid
        result: dict[str, Any] = {"tunnels": args.tunnels}

        idle_cpu, idle_wall, _ = measure(pid, lambda: time.sleep(args.duration))
        before = feed_costs(url)
        loads_cpu, loads_wall, received = measure(
            pid, lambda: [page_load(url) for _ in range(args.loads)])
        after = feed_costs(url)
        idle_again, idle_again_wall, _ = measure(pid, lambda: time.sleep(args.duration))
        floor = (idle_cpu + idle_again) / (idle_wall + idle_again_wall)
        snapshots = after["snapshots"] - before["snapshots"]
        result["idle_cpu_ms_per_s"] = round(floor * 1000, 2)
        result["page_load"] = {
            "loads": args.loads,
            # The server's whole CPU during the loads, less the idle floor: every request of
            # the page, its sockets, its snapshot.
            "cpu_ms": round((loads_cpu - floor * loads_wall) / args.loads * 1000, 1),
            # The part the console measures itself: making the snapshot (one pass, JSON).
            "snapshot_cpu_ms": round((after["snapshot_cpu_secs"] - before["snapshot_cpu_secs"])
                                     / snapshots * 1000, 1),
            "snapshot_bytes": round((after["snapshot_bytes"] - before["snapshot_bytes"]) / snapshots),
            "bytes_received": round(sum(received) / args.loads),
        }

        for name, rate in (("updates_under_requests", args.rate), ("updates_idle_tunnels", 0.0)):
            if rate == 0:
                time.sleep(RATE_SETTLE)  # the requests/s figure back to 0 first
            without, without_wall, sent = measure(
                pid, lambda rate=rate: traffic(url, tokens, rate, args.duration))
            subscriber = Subscriber(url)
            subscriber.start()
            if not subscriber.snapshot_seen.wait(60):
                raise SystemExit("console_cost: no snapshot on the event stream")
            time.sleep(1)
            before = feed_costs(url)
            subscriber.counting = True
            with_cpu, with_wall, sent_with = measure(
                pid, lambda rate=rate: traffic(url, tokens, rate, args.duration))
            subscriber.counting = False
            after = feed_costs(url)
            subscriber.close()
            extra = with_cpu - without * with_wall / without_wall
            updates = max(subscriber.updates, 1)
            ticks = after["ticks"] - before["ticks"]
            tick_cpu = after["tick_cpu_secs"] - before["tick_cpu_secs"]
            result[name] = {
                "requests_per_s": rate,
                "seconds": round(with_wall, 1),
                "ticks": ticks,
                "updates": subscriber.updates,
                # Measured by the feed around its own work: a look at every tunnel each tick,
                # and the update it makes when something changed.
                "tick_cpu_ms": round(tick_cpu / max(ticks, 1) * 1000, 2),
                "feed_cpu_ms_per_s": round(tick_cpu / with_wall * 1000, 2),
                "bytes_per_update": round(subscriber.update_bytes / updates),
                # The server's whole CPU with the stream open, less the same without it (this
                # includes writing the updates to the socket; idle tunnels' pings make it noisy).
                "proc_extra_cpu_ms_per_s": round(extra / with_wall * 1000, 2),
                "requests": [sent, sent_with],
            }
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tunnels", type=int, default=1000)
    parser.add_argument("--loads", type=int, default=20, help="page loads to average over")
    parser.add_argument("--duration", type=float, default=30.0,
                        help="seconds of each phase (a multiple of the clients' 10 s ping period)")
    parser.add_argument("--rate", type=float, default=4.0, help="requests a second, updates phase")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--smoke", action="store_true", help="tiny: 20 tunnels, 2 loads, 3 s phases")
    args = parser.parse_args()
    if args.smoke:
        args.tunnels, args.loads, args.duration = 20, 2, 3.0
    with tempfile.TemporaryDirectory(prefix="console-cost-") as work:
        result = run(args, Path(work))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
