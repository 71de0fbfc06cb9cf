#!/usr/bin/env python3
"""Latency and throughput of the tunnel against the same backend reached directly, on loopback.

    .venv/bin/python scripts/bench_latency.py [--requests 500] [--concurrency 32] [--per-client 50]
                                              [--body-size 1048576]

Starts a small trio HTTP/1.1 backend (this script in ``--serve-backend`` mode, its own process),
``wstunnel srv`` and ``wstunnel cli`` (random token), waits until a request through the tunnel
answers 200, warms up, then measures back to back in one run:

- sequential: ``--requests`` small GETs, one keep-alive client for each path, interleaved
  (direct, tunnel, tunnel, direct, ...);
- concurrent: ``--concurrency`` trio tasks, each with its own ``httpx.AsyncClient``, doing
  ``--per-client`` requests, direct then tunnel;
- large body: ``--large-requests`` GETs of ``--body-size`` bytes each way (0 skips it).

Prints a table and a one-line JSON summary (last line). Every loop is counted and the whole run
is bounded by ``--deadline``; every process started is terminated (then killed) on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import trio

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent
SMALL_BODY = b"hello from the benchmark backend\n"
REQUEST_TIMEOUT = httpx.Timeout(30.0)


# -- the backend: a minimal keep-alive HTTP/1.1 server on trio ------------------------------------

def _response(body: bytes) -> bytes:
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    return head + body


async def _serve_connection(stream: trio.SocketStream) -> None:
    """GET/HEAD only (bodies, if any, are skipped by Content-Length); ``/bytes?size=N`` or small."""
    buffer = b""
    cache: dict[int, bytes] = {}
    small = _response(SMALL_BODY)
    try:
        while True:
            end = buffer.find(b"\r\n\r\n")
            while end < 0:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
                end = buffer.find(b"\r\n\r\n")
            head, buffer = buffer[:end], buffer[end + 4:]
            lines = head.split(b"\r\n")
            target = lines[0].split(b" ")[1] if b" " in lines[0] else b"/"
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip() or b"0")
            while len(buffer) < length:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            buffer = buffer[length:]
            if target.startswith(b"/bytes?size="):
                size = int(target.split(b"=", 1)[1])
                if size not in cache:
                    cache[size] = _response(bytes(i % 251 for i in range(size)))
                reply = cache[size]
            else:
                reply = small
            await stream.send_all(reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError, IndexError):
        return
    finally:
        await stream.aclose()


def serve_backend(port: int) -> None:
    async def main() -> None:
        await trio.serve_tcp(_serve_connection, port, host="127.0.0.1")

    with contextlib.suppress(KeyboardInterrupt):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        trio.run(main)


# -- processes ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def started(argv: list[str], log: IO[bytes], env: dict[str, str] | None = None) -> Iterator[None]:
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                               cwd=ROOT)
    try:
        yield
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_until(what: str, check: Callable[[], bool], deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return
        time.sleep(0.05)
    raise SystemExit(f"bench: {what} not ready in time")


# -- measurements -------------------------------------------------------------------------------

@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)  # seconds
    errors: int = 0
    wall: float = 0.0
    nbytes: int = 0

    def summary(self) -> dict[str, float]:
        lat = sorted(self.latencies) or [float("nan")]
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        done = len(self.latencies)
        return {
            "n": done,
            "errors": self.errors,
            "mean_ms": round(statistics.fmean(lat) * 1000, 3),
            "p50_ms": round(statistics.median(lat) * 1000, 3),
            "p99_ms": round(p99 * 1000, 3),
            "rps": round(done / self.wall, 1) if self.wall else 0.0,
            "mib_s": round(self.nbytes / self.wall / 2**20, 1) if self.wall else 0.0,
        }


class Deadline(Exception):
    pass


def timed_get(client: httpx.Client, url: str, headers: dict[str, str], stats: Stats,
              deadline: float, expect: int) -> None:
    if time.monotonic() > deadline:
        raise Deadline
    start = time.perf_counter()
    try:
        response = client.get(url, headers=headers)
    except httpx.HTTPError:
        stats.errors += 1
        return
    elapsed = time.perf_counter() - start
    if response.status_code != 200 or len(response.content) != expect:
        stats.errors += 1
        return
    stats.latencies.append(elapsed)
    stats.nbytes += len(response.content)


def sequential(paths: dict[str, tuple[str, dict[str, str]]], target: str, count: int,
               expect: int, deadline: float, warmup: int) -> dict[str, Stats]:
    """``count`` GETs per path, interleaved so drift hits both alike; one keep-alive client each."""
    results = {name: Stats() for name in paths}
    clients = {name: httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT, trust_env=False)
               for name, (base, _) in paths.items()}
    try:
        for name, (_, headers) in paths.items():
            scratch = Stats()
            for _ in range(warmup):
                timed_get(clients[name], target, headers, scratch, deadline, expect)
        names = list(paths)
        for i in range(count):
            order = names if i % 2 == 0 else names[::-1]
            for name in order:
                start = time.perf_counter()
                timed_get(clients[name], target, paths[name][1], results[name], deadline, expect)
                results[name].wall += time.perf_counter() - start
    finally:
        for client in clients.values():
            client.close()
    return results


async def _concurrent(base: str, headers: dict[str, str], concurrency: int, per_client: int,
                      deadline: float) -> Stats:
    stats = Stats()
    fail_at = trio.current_time() + max(0.0, deadline - time.monotonic())

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT, trust_env=False,
                                     headers=headers) as client:
            await client.get("/warmup")  # open the keep-alive connection before timing
            await start_line.wait()
            for _ in range(per_client):
                start = time.perf_counter()
                try:
                    response = await client.get("/small")
                except httpx.HTTPError:
                    stats.errors += 1
                    continue
                if response.status_code == 200 and response.content == SMALL_BODY:
                    stats.latencies.append(time.perf_counter() - start)
                else:
                    stats.errors += 1

    start_line = trio.Event()
    with trio.fail_at(fail_at):
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
            await trio.sleep(0.5)  # let every worker connect and warm up
            began = time.perf_counter()
            start_line.set()
        stats.wall = time.perf_counter() - began
    return stats


def concurrent(base: str, headers: dict[str, str], concurrency: int, per_client: int,
               deadline: float) -> Stats:
    try:
        return trio.run(_concurrent, base, headers, concurrency, per_client, deadline)
    except trio.TooSlowError:
        raise Deadline from None


# -- report -------------------------------------------------------------------------------------

def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


def print_table(rows: list[tuple[str, str, dict[str, float]]]) -> None:
    header = f"{'test':<12}{'path':<8}{'n':>6}{'err':>5}{'mean ms':>10}{'p50 ms':>9}{'p99 ms':>9}" \
             f"{'req/s':>9}{'MiB/s':>8}"
    print(header)
    print("-" * len(header))
    for test, path, s in rows:
        print(f"{test:<12}{path:<8}{s['n']:>6}{s['errors']:>5}{s['mean_ms']:>10.3f}"
              f"{s['p50_ms']:>9.3f}{s['p99_ms']:>9.3f}{s['rps']:>9.1f}{s['mib_s']:>8.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="sequential requests per path")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    parser.add_argument("--per-client", type=int, default=50, help="requests per concurrent client")
    parser.add_argument("--body-size", type=int, default=1 << 20,
                        help="large-body test response size in bytes (0 skips the test)")
    parser.add_argument("--large-requests", type=int, default=20, help="large-body requests per path")
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests per path first")
    parser.add_argument("--deadline", type=float, default=300.0, help="overall time limit, seconds")
    parser.add_argument("--serve-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_backend is not None:
        serve_backend(args.serve_backend)
        return 0

    deadline = time.monotonic() + args.deadline
    token = secrets.token_urlsafe(24)
    backend_port, server_port = free_port(), free_port()
    backend_url = f"http://127.0.0.1:{backend_port}"
    tunnel_url = f"http://127.0.0.1:{server_port}"
    tunnel_headers = {"X-Token": token}
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    client_env = dict(env, WSTUNCLI_TOKEN=token)
    # Queue capacity only (not a rate limit): room for every concurrent request, so none gets 503.
    queue = str(max(20, 2 * args.concurrency))
    backend = [PYTHON, str(Path(__file__).resolve()), "--serve-backend", str(backend_port)]
    server = [PYTHON, "-m", "wstunnel", "srv", "-host", "127.0.0.1", "-port", str(server_port),
              "-max-requests-per-tunnel", queue]
    client = [PYTHON, "-m", "wstunnel", "cli", "-tunnel", f"ws://127.0.0.1:{server_port}",
              "-server", backend_url, "-max-concurrent-requests", str(max(100, args.concurrency))]
    paths = {"direct": (backend_url, {}), "tunnel": (tunnel_url, tunnel_headers)}
    rows: list[tuple[str, str, dict[str, float]]] = []
    summary: dict[str, Any] = {}

    with (
        tempfile.TemporaryDirectory(prefix="wstunnel-bench-") as tmp,
        open(Path(tmp, "processes.log"), "wb") as log,
    ):
        try:
            with started(backend, log, env), started(server, log, env), \
                    started(client, log, client_env):
                ready = min(deadline, time.monotonic() + 30)
                wait_until("backend", lambda: httpx.get(backend_url).status_code == 200, ready)
                wait_until("tunnel", lambda: httpx.get(
                    f"{tunnel_url}/", headers=tunnel_headers).status_code == 200, ready)

                seq = sequential(paths, "/small", args.requests, len(SMALL_BODY), deadline,
                                 args.warmup)
                for name in paths:
                    rows.append(("sequential", name, seq[name].summary()))
                conc = {name: concurrent(base, headers, args.concurrency, args.per_client, deadline)
                        for name, (base, headers) in paths.items()}
                for name in paths:
                    rows.append((f"concur x{args.concurrency}", name, conc[name].summary()))
                if args.body_size > 0:
                    big = sequential(paths, f"/bytes?size={args.body_size}", args.large_requests,
                                     args.body_size, deadline, warmup=2)
                    for name in paths:
                        rows.append((f"body {args.body_size // 1024}K", name, big[name].summary()))
        except Deadline:
            print("bench: overall deadline reached; partial results", file=sys.stderr)
        except SystemExit:
            log.flush()
            sys.stderr.write(Path(tmp, "processes.log").read_text(errors="replace")[-4000:])
            raise

    print_table(rows)
    by_test: dict[str, dict[str, dict[str, float]]] = {}
    for test, name, s in rows:
        by_test.setdefault(test, {})[name] = s
    print()
    for test, pair in by_test.items():
        if "direct" in pair and "tunnel" in pair:
            d, t = pair["direct"], pair["tunnel"]
            print(f"{test:<12} tunnel/direct: mean x{ratio(t['mean_ms'], d['mean_ms'])}, "
                  f"p99 x{ratio(t['p99_ms'], d['p99_ms'])}, "
                  f"throughput x{ratio(t['rps'], d['rps'])}")
            summary[test.split()[0]] = {
                "direct": d, "tunnel": t,
                "ratio_mean": ratio(t["mean_ms"], d["mean_ms"]),
                "ratio_p99": ratio(t["p99_ms"], d["p99_ms"]),
                "ratio_rps": ratio(t["rps"], d["rps"]),
            }
    summary["params"] = {"requests": args.requests, "concurrency": args.concurrency,
                         "per_client": args.per_client, "body_size": args.body_size}
    print(json.dumps(summary, separators=(",", ":")))
    errors = sum(s["errors"] for _, _, s in rows)
    return 1 if errors or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
