#!/usr/bin/env python3
"""The benchmark: wstunnel against the direct path to an nginx backend, in the same run.

    scripts/bench [--rounds 3] [--duration 10] [--only NAME,...] [--idle 1000[,10000]]
                  [--tokens 100] [--reference PATH ...] [--longpoll] [--json FILE] [--smoke]

(``scripts/bench`` installs wrk and nginx and sets up the venv, then runs this file.)

Everything runs on 127.0.0.1 from a temporary directory: an nginx of our own (``daemon off``,
its own configuration, pid file and temp paths there) serving generated files of 1 KiB, 64 KiB,
1 MiB and 100 MiB and taking uploads; ``wstunnel srv`` and ``wstunnel cli`` (token from
``WSTUNCLI_TOKEN``, ``-server`` the nginx); and, per ``--reference PATH``, any other program with
the same ``srv``/``cli`` command line (``PATH srv -port P``; ``PATH cli -tunnel ws://... -server
... -token ...``), such as an original WStunnel binary, as one more column; with ``--longpoll``,
our own tunnel again over HTTPS long-poll (``-transport longpoll``): the ``wstunnel-longpoll``
column.

Workloads (``--only`` takes these names, or the groups ``get``, ``download``, ``upload``,
``transfer``):

- ``get-c1``, ``get-c32``, ``get-c128``: 1 KiB GETs with ``wrk -t1 -c1``, ``-t2 -c32`` and
  ``-t2 -c128`` for ``--duration`` seconds: req/s, p50/p99 latency, responses >= 400 (wrk's
  "Non-2xx or 3xx"), socket errors (connect, read, write, timeout); a Lua ``done()`` hook prints
  them as JSON. With ``--segments`` (root, perf), each tunnel's ``get-c1`` run is followed by a
  shorter one under ``perf record``: the time from a read to the write it leads to inside each
  daemon, for a request and for its response (scripts/bench_segments.py), where one request at a
  time shows whose work the wait is.
- ``download-small``/``download-large`` (1 MiB, 100 MiB) and ``upload-small``/``upload-large``
  (PUT of the same sizes): curl, one keep-alive connection, transfers back to back for
  ``--duration`` seconds (at least one): MB/s (10^6 bytes) over the transfer times, failed
  transfers, and the peak resident memory of srv and cli (each with its children) sampled from
  /proc every 50 ms.
- ``busy-latency``: ``BUSY_REQUESTS`` sequential 1 KiB GETs on one keep-alive connection, timed
  on an idle path, then again while curl downloads the large file on the same path (same token,
  so the same tunnel): p50 of each and their ratio (issue 5: within 2x), and whether the
  download was still running when the GETs were done.
- ``sse``: a server-sent-events backend in this process (behind the same nginx, ``proxy_buffering
  off``) writes ``SSE_EVENTS`` events ``SSE_GAP`` s apart; the time from each write to its arrival
  at the HTTP client (one clock: both ends are threads of this process): p50 and max (issue 5:
  under 20 ms).
- ``idle-N`` for each N of ``--idle``: a fresh server, N tunnels from tests/support/many_clients.py (the
  real TunnelClient, co-hosted in one process): server memory per tunnel (VmRSS growth / N),
  client memory per tunnel, then the server is restarted (SIGTERM, start again on its port) and
  the time until all N are back is taken from when it listens again (clients' backoff cap:
  ``--reconnect-cap``). A reference server gets the same co-hosted wstunnel clients.
- ``tokens``: ``--tokens`` tokens with one co-hosted client each on the main server, under wrk
  ``-t2 -c100`` with a Lua mix rotating the tokens: 80 % GET 1 KiB, 10 % GET 64 KiB,
  10 % POST 1 KiB. Direct runs the same mix against nginx.

Each round runs every workload on every target back to back, the order of the targets reversed
on odd rounds. The table shows medians across rounds, the ratio tunnel / direct, and error
counts summed over the rounds. Every wait and run is bounded, the whole by ``--deadline``
(partial results are printed when it is reached); every process started is stopped in a
``finally`` (SIGTERM to its process group, then SIGKILL).

Uploads: nginx cannot store a body without extra modules, so ``/upload/`` is proxied with
``proxy_request_buffering on`` (nginx reads the whole body first) and ``proxy_pass_request_body
off`` to a second server block of the same nginx that answers 204: the 204 comes after the last
byte was read, and no body crosses loopback twice.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx
from bench_journal import JournalSink, rerun_in_private_mounts
from bench_segments import SyscallTrace, unavailable

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MANY_CLIENTS = ROOT / "tests" / "support" / "many_clients.py"
DELAY_RELAY = ROOT / "tests" / "support" / "delay_relay.py"
KiB, MiB = 1024, 1024 * 1024
T = TypeVar("T")

GET_WORKLOADS = {"get-c1": (1, 1), "get-c32": (2, 32), "get-c128": (2, 128)}  # wrk -t, -c
TRANSFER_WORKLOADS = ("download-small", "download-large", "upload-small", "upload-large")
GROUPS = {
    "get": list(GET_WORKLOADS),
    "download": ["download-small", "download-large"],
    "upload": ["upload-small", "upload-large"],
    "transfer": list(TRANSFER_WORKLOADS),
}
STREAM_WORKLOADS = ("busy-latency", "sse")
GROUPS["stream"] = list(STREAM_WORKLOADS)
ALL_WORKLOADS = [*GET_WORKLOADS, *TRANSFER_WORKLOADS, *STREAM_WORKLOADS, "idle", "tokens"]
BUSY_REQUESTS = 200  # small GETs timed on an idle path, then as many during a large download
SSE_EVENTS, SSE_GAP = 50, 0.02  # events per stream, seconds between them
TOKENS_CONNECTIONS = 100
WRK_TIMEOUT = "10s"
# Seconds of the traced get-c1 run (--segments), at most --duration: thousands of requests.
SEGMENTS_DURATION = 3

# Printed by every wrk run: one JSON line (latencies in microseconds).
REPORT_LUA = r"""
function done(summary, latency, requests)
  local e = summary.errors
  local mean = 0
  if summary.requests > 0 then mean = latency.mean end
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "status_errors": %d, ' ..
    '"connect": %d, "read": %d, "write": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "mean_us": %.1f, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99), mean,
    latency.max))
end
"""

# The tokens workload: each request carries the next token; 8 of 10 GET 1 KiB, 1 GET 64 KiB,
# 1 POST 1 KiB. The token file is the script's argument (wrk URL -- FILE).
MIXED_LUA = r"""
local requests_, n = {}, 0
local counter = 0

function setup(thread)
  thread:set("offset", counter)
  counter = counter + 1
end

function init(args)
  local tokens = {}
  for line in io.lines(args[1]) do
    if #line > 0 then tokens[#tokens + 1] = line end
  end
  local body = string.rep("x", 1024)
  for kind = 1, 10 do
    for _, token in ipairs(tokens) do
      local headers = {["X-Token"] = token}
      if kind == 9 then
        requests_[#requests_ + 1] = wrk.format("GET", "/64k.bin", headers)
      elseif kind == 10 then
        requests_[#requests_ + 1] = wrk.format("POST", "/upload/mixed", headers, body)
      else
        requests_[#requests_ + 1] = wrk.format("GET", "/1k.bin", headers)
      end
    end
  end
  n = ((offset or 0) * 487) % #requests_
end

function request()
  n = n % #requests_ + 1
  return requests_[n]
end
""" + REPORT_LUA

NGINX_CONF = """\
daemon off;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log error;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    types {{ }}
    default_type application/octet-stream;
    client_body_temp_path {dir}/nginx-temp/body;
    proxy_temp_path {dir}/nginx-temp/proxy;
    fastcgi_temp_path {dir}/nginx-temp/fastcgi;
    uwsgi_temp_path {dir}/nginx-temp/uwsgi;
    scgi_temp_path {dir}/nginx-temp/scgi;
    upstream upload_sink {{
        server 127.0.0.1:{sink_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {dir}/www;
        client_max_body_size 0;
        client_body_buffer_size 1m;
        # Uploads: the whole body is read (buffered: memory up to 1 MiB, a temp file past it)
        # before the sink is asked; the sink gets the head only and answers 204.
        location /upload/ {{
            proxy_request_buffering on;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://upload_sink;
        }}
        # The server-sent-events backend (a thread of the benchmark): events pass unbuffered.
        location /sse/ {{
            proxy_buffering off;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://127.0.0.1:{sse_port};
        }}
    }}
    server {{
        listen 127.0.0.1:{sink_port};
        location / {{ return 204; }}
    }}
}}
"""


class DeadlineReached(Exception):
    pass


class ClientsDied(Exception):
    pass


@dataclass
class Clock:
    end: float

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, need: float = 0.0) -> None:
        if self.left() < need:
            raise DeadlineReached

    def bound(self, seconds: float) -> float:
        """``seconds``, or less if the deadline is nearer; raises once it has passed."""
        self.check()
        return max(0.1, min(seconds, self.left()))


def http_get(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url, trust_env=False, **kwargs)  # never through a proxy from the environment


def http_put(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.put(url, trust_env=False, **kwargs)


def write_private(path: Path, text: str) -> None:
    path.touch(0o600)
    path.write_text(text)


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, check: Callable[[], T], clock: Clock, timeout: float,
               interval: float = 0.05) -> T:
    """Poll ``check`` until truthy; SystemExit after ``timeout`` (DeadlineReached past the deadline)."""
    end = time.monotonic() + clock.bound(timeout)
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, OSError, ValueError) as exc:
            last = exc
        if time.monotonic() >= end:
            clock.check()
            raise SystemExit(f"bench: {what} not ready after {timeout:g} s ({last!r})")
        time.sleep(interval)


# -- processes and their memory --------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo and len(pids) < 1000:
        current = todo.pop()
        pids.append(current)
        todo += _children(current)
    return pids


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(found.group(1)) if found else 0


def tree_rss_kib(pid: int) -> int:
    return sum(rss_kib(p) for p in tree(pid))


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of ``pid`` so far (all its threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in tree(pid))


class Proc:
    """A process in its own process group, output to a log file; ``stop`` ends the whole group."""

    def __init__(self, name: str, argv: list[str], logdir: Path, env: dict[str, str],
                 cwd: Path = ROOT) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        with self.log_path.open("ab") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, cwd=cwd, env=env,
                                          start_new_session=True)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def stop(self, grace: float = 10.0, first: signal.Signals = signal.SIGTERM) -> None:
        members = tree(self.pid) if self.alive() else []
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, first)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            log(f"{self.name} ignored SIGTERM for {grace:g} s: SIGKILL")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for pid in members[1:]:  # any that left the group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


class Procs:
    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: list[Proc] = []
        self.counter = 0
        self.started: list[int] = []  # every pid, for the record (the test checks none is left)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: Path = ROOT) -> Proc:
        self.counter += 1
        proc = Proc(f"{self.counter:03d}-{name}", argv, self.logdir, env or child_env(), cwd)
        self.running.append(proc)
        self.started.append(proc.pid)
        return proc

    def stop(self, proc: Proc, first: signal.Signals = signal.SIGTERM) -> None:
        proc.stop(first=first)
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.running[:]):
            try:
                self.stop(proc)
            except Exception as exc:  # keep stopping the others
                log(f"stopping {proc.name}: {exc!r}")


def child_env(*, checkout: bool = True, **extra: str) -> dict[str, str]:
    """The environment of a child: with this checkout first on its module path for our programs
    (the daemons run on Debian's python3, not the venv); without it for a ``--reference``, which
    must run its own code (an older tree of ours would otherwise import this one's)."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    if checkout:
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    else:
        env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


class PeakSampler:
    """Peak resident memory (KiB, each process with its children) sampled every 50 ms, and the
    CPU time each process tree used while it ran."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = {name: tree_rss_kib(pid) for name, pid in pids.items()}
        self._cpu_start = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
        self.cpu = {name: 0.0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], tree_rss_kib(pid))

    def __enter__(self) -> PeakSampler:
        if self.pids:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self.cpu = {name: tree_cpu_seconds(pid) - self._cpu_start[name]
                    for name, pid in self.pids.items()}
        if self._thread.is_alive():
            self._thread.join(5)

    def cpu_per_request(self, requests: int) -> dict[str, float]:
        """Microseconds of CPU per request, each process apart (srv, cli)."""
        if requests <= 0:
            return {}
        return {f"{name}_cpu_us": round(seconds * 1e6 / requests, 1)
                for name, seconds in self.cpu.items()}

    def mib(self) -> dict[str, float]:
        return {f"{name}_peak_mib": round(kib / 1024, 1) for name, kib in self.peak.items()}


# -- the targets ---------------------------------------------------------------------------------

@dataclass
class Target:
    """A column: ``direct`` (nginx itself) or a tunnel program with the srv/cli command line."""

    name: str
    program: list[str] | None  # None: direct
    ours: bool = False
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    port: int = 0
    server: Proc | None = None
    client: Proc | None = None
    count_source: str | None = None  # "metrics" or "stats", found on first use
    transport: str | None = None  # ours only: the cli's -transport (None: its default)
    link_port: int = 0  # with --link-delay: the relay the cli dials instead of the server

    @property
    def tunnel(self) -> bool:
        return self.program is not None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"X-Token": self.token} if self.tunnel else {}

    def env(self, **extra: str) -> dict[str, str]:
        return child_env(checkout=self.ours, **extra)

    @property
    def cwd(self) -> Path:
        """Where its processes start: ``python -m`` looks in the current directory first, so a
        reference starts outside this checkout."""
        return ROOT if self.ours else Path("/")

    def server_argv(self, port: int) -> list[str]:
        assert self.program is not None
        argv = [*self.program, "srv", "-port", str(port)]
        if self.ours:
            # Loopback only; room for every wrk connection's request (a queue bound, not a rate
            # limit: a 503 still means overload); one address sends every request and tunnel,
            # so no failure limit. Streamed bodies have no size limit by default; v1 bodies are
            # not ours to carry here.
            argv += ["-host", "127.0.0.1", "-max-requests-per-tunnel", "4096",
                     "-failure-limit", "0"]
        return argv

    def client_argv(self, port: int, backend: str) -> tuple[list[str], dict[str, str]]:
        assert self.program is not None
        argv = [*self.program, "cli", "-tunnel", f"ws://127.0.0.1:{self.link_port or port}",
                "-server", backend]
        if self.ours:
            argv += ["-transport", self.transport] if self.transport else []
            return argv, self.env(WSTUNCLI_TOKEN=self.token)
        return [*argv, "-token", self.token], self.env()

    def pids(self) -> dict[str, int]:
        if self.server is None or self.client is None:
            return {}
        return {"srv": self.server.pid, "cli": self.client.pid}


def start_server(procs: Procs, target: Target, port: int, clock: Clock,
                 name: str = "srv") -> Proc:
    proc = procs.start(f"{target.name}-{name}", target.server_argv(port), target.env(), target.cwd)

    def healthy() -> bool:
        if not proc.alive():
            raise SystemExit(f"bench: {target.name} {name} exited:\n{proc.tail()}")
        return http_get(f"http://127.0.0.1:{port}/_health_check", timeout=2).status_code == 200

    wait_until(f"{target.name} {name} on port {port}", healthy, clock, 30)
    return proc


def start_link(procs: Procs, name: str, target_port: int, delay_ms: float, clock: Clock) -> int:
    """A relay on its own port that holds every byte ``delay_ms`` each way before passing it on
    to ``target_port`` (tests/support/delay_relay.py): a long link on loopback. Its port."""
    port = free_port()
    proc = procs.start(f"{name}-link", [PYTHON, str(DELAY_RELAY), str(port), str(target_port),
                                        str(delay_ms)])

    def listening() -> bool:
        if not proc.alive():
            raise SystemExit(f"bench: the {name} relay exited:\n{proc.tail()}")
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True

    wait_until(f"the {name} relay", listening, clock, 20)
    return port


def start_tunnel(procs: Procs, target: Target, backend: str, clock: Clock,
                 link_delay: float = 0.0) -> None:
    target.port = free_port()
    target.server = start_server(procs, target, target.port, clock)
    if link_delay:
        target.link_port = start_link(procs, target.name, target.port, link_delay, clock)
    argv, env = target.client_argv(target.port, backend)
    target.client = procs.start(f"{target.name}-cli", argv, env, target.cwd)
    client = target.client

    def through() -> bool:
        if not client.alive():
            raise SystemExit(f"bench: {target.name} cli exited:\n{client.tail()}")
        response = http_get(f"{target.url}/1k.bin", headers=target.headers(), timeout=5)
        return response.status_code == 200 and len(response.content) == KiB

    wait_until(f"the {target.name} tunnel", through, clock, 60)


def connected_clients(target: Target, url: str) -> int:
    """Tunnel connections the server at ``url`` has: /_metrics if it has it, else /_stats."""
    if target.count_source in (None, "metrics"):
        response = http_get(f"{url}/_metrics", timeout=10)
        # One series per transport label (older servers: one series without labels).
        found = re.findall(r"^wstunnel_clients(?:\{[^}]*\})? (\d+)$", response.text, re.M)
        if response.status_code == 200 and found:
            target.count_source = "metrics"
            return sum(int(count) for count in found)
        if target.count_source == "metrics":
            raise ValueError("no wstunnel_clients in /_metrics")
    response = http_get(f"{url}/_stats", timeout=10)
    found = re.search(r"^tunnels=(\d+)$", response.text, re.M)
    if found is None:
        raise ValueError("no tunnels= in /_stats")
    target.count_source = "stats"
    return int(found.group(1))


# -- measurements --------------------------------------------------------------------------------

def run_wrk(url: str, threads: int, connections: int, duration: int, headers: dict[str, str],
            script: Path, clock: Clock, script_args: list[str] | None = None) -> dict[str, Any]:
    clock.check(duration + 2)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", WRK_TIMEOUT,
            "-s", str(script)]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    if script_args:
        argv += ["--", *script_args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    found = re.search(r"^WRKJSON (\{.*\})$", done.stdout, re.M)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"bench: wrk failed ({done.returncode}): {shlex.join(argv)}\n"
                         f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    raw = json.loads(found.group(1))
    seconds = raw["duration_us"] / 1e6 or 1.0
    sock = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    return {
        "rps": round(raw["requests"] / seconds, 1),
        "ok_rps": round((raw["requests"] - raw["status_errors"]) / seconds, 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "mean_ms": round(raw["mean_us"] / 1000, 3),
        "max_ms": raw["max_us"] / 1000,
        "requests": raw["requests"],
        "non2xx": raw["status_errors"],
        "socket_errors": sock,
        "wrk": raw,
    }


def run_transfers(url: str, headers: dict[str, str], size: int, upload: Path | None,
                  duration: float, clock: Clock) -> dict[str, Any]:
    """curl, transfers back to back on one keep-alive connection per curl run, for ``duration``."""
    batch = max(1, min(50, (64 * MiB) // size))
    started = time.monotonic()
    times: list[float] = []
    moved = failed = non2xx = 0
    runs = 0
    while runs == 0 or (time.monotonic() - started < duration and runs < 1000):
        runs += 1
        limit = clock.bound(600)
        argv = ["curl", "-sS", "--noproxy", "*", "--max-time", f"{limit:.0f}", "-H", "Expect:",
                "-w", "%{http_code} %{size_download} %{size_upload} %{time_total}\\n"]
        for name, value in headers.items():
            argv += ["-H", f"{name}: {value}"]
        for i in range(batch):
            if upload is not None:
                argv += ["-T", str(upload), "-o", "/dev/null", f"{url}/upload/{runs}-{i}"]
            else:
                argv += ["-o", "/dev/null", url]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=limit + 30, check=False)
        lines = done.stdout.split()
        results = [lines[i:i + 4] for i in range(0, len(lines) - 3, 4)]
        for code, down, up, total in results:
            nbytes = int(float(up if upload is not None else down))
            if code == "000":  # no response at all
                failed += 1
            elif not code.startswith("2"):
                non2xx += 1
            elif nbytes != size:
                failed += 1
            else:
                times.append(float(total))
                moved += nbytes
        failed += batch - len(results)  # never started: curl gave up (its exit code says why)
        if failed and done.returncode != 0:
            log(f"curl exit {done.returncode}: {done.stderr.strip()[-300:]}")
            break
    busy = sum(times)
    return {
        "mb_s": round(moved / busy / 1e6, 1) if busy else 0.0,
        "transfers": len(times),
        "median_s": round(statistics.median(times), 4) if times else 0.0,
        "non2xx": non2xx,
        "failed": failed,
    }


class EventSource:
    """The ``sse`` workload's backend: a thread of this process writing server-sent events.

    ``GET /sse/KEY?n=N&gap=S`` answers ``text/event-stream`` and writes N events (``data: I``) S
    seconds apart, each in its own chunk, noting when it wrote each one under KEY, so the reader
    (another thread here, on the same monotonic clock) can tell how long each took to arrive.
    """

    def __init__(self) -> None:
        self.writes: dict[str, list[float]] = {}
        source = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # each event is one small write: no 40 ms Nagle wait

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                count = min(int(query.get("n", "10")), 10_000)
                gap = min(float(query.get("gap", "0.02")), 5.0)
                times = source.writes.setdefault(url.path.rsplit("/", 1)[-1], [])
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for index in range(count):
                        event = b"data: %d\n\n" % index
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                        self.wfile.flush()
                        times.append(time.monotonic())
                        time.sleep(gap)  # the pace of the event source, not a wait on a condition
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> EventSource:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_sse(url: str, headers: dict[str, str], source: EventSource, clock: Clock) -> dict[str, Any]:
    """Delays from each event's write at the backend to its arrival here, in ms."""
    key = secrets.token_hex(6)
    arrivals: list[float] = []
    timeout = clock.bound(SSE_EVENTS * SSE_GAP + 30)
    with httpx.Client(trust_env=False, timeout=timeout) as client, client.stream(
            "GET", f"{url}/sse/{key}?n={SSE_EVENTS}&gap={SSE_GAP}", headers=headers) as response:
        if response.status_code != 200:
            return {"non2xx": 1, "events": 0}
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
    writes = source.writes.pop(key, [])
    delays = [(arrived - written) * 1000 for arrived, written in zip(arrivals, writes, strict=False)]
    if not delays:
        return {"non2xx": 0, "events": 0, "missing": SSE_EVENTS}
    delays.sort()
    return {"event_p50_ms": round(statistics.median(delays), 3),
            "event_p99_ms": round(delays[min(len(delays) - 1, int(len(delays) * 0.99))], 3),
            "event_max_ms": round(delays[-1], 3), "events": len(delays),
            "missing": SSE_EVENTS - len(delays), "non2xx": 0}


def timed_gets(client: httpx.Client, url: str, count: int, clock: Clock) -> tuple[list[float], int]:
    """Milliseconds of ``count`` sequential GETs (fewer if the deadline nears), and non-2xx seen."""
    times: list[float] = []
    bad = 0
    for _ in range(count):
        clock.check(1)
        started = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - started) * 1000)
        bad += response.status_code != 200
    return times, bad


def run_busy_latency(url: str, headers: dict[str, str], large: str, size: int,
                     clock: Clock) -> dict[str, Any]:
    """Small GETs on an idle path, then while curl downloads ``large`` on the same path."""
    with httpx.Client(trust_env=False, headers=headers, timeout=clock.bound(30)) as client:
        timed_gets(client, f"{url}/1k.bin", 10, clock)  # untimed: the connection, the pools
        idle, bad = timed_gets(client, f"{url}/1k.bin", BUSY_REQUESTS, clock)
        argv = ["curl", "-sS", "--noproxy", "*", "--max-time", f"{clock.bound(600):.0f}"]
        for name, value in headers.items():
            argv += ["-H", f"{name}: {value}"]
        # Enough back-to-back copies for the download to outlast the timed GETs, bounded.
        copies = max(1, min(20, (256 * MiB) // size))
        for _ in range(copies):
            argv += ["-o", "/dev/null", f"{url}/{large}"]
        download = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            busy, busy_bad = timed_gets(client, f"{url}/1k.bin", BUSY_REQUESTS, clock)
            overlapped = download.poll() is None  # still downloading once the GETs were done
        finally:
            download.terminate()
            download.communicate(timeout=30)
    idle_p50, busy_p50 = statistics.median(idle), statistics.median(busy)
    return {"idle_p50_ms": round(idle_p50, 3), "busy_p50_ms": round(busy_p50, 3),
            "slowdown": round(busy_p50 / idle_p50, 2), "busy_p99_ms": round(
                sorted(busy)[int(len(busy) * 0.99) - 1], 3),
            "overlapped": int(overlapped), "non2xx": bad + busy_bad}


@dataclass
class Settings:
    rounds: int
    duration: int
    transfer_duration: float
    sizes: dict[str, int]  # file name -> bytes
    small: str
    large: str
    idle: list[int]
    tokens: int
    reconnect_cap: float
    warmup: int
    restart_signal: signal.Signals = signal.SIGTERM
    segments: bool = False  # trace get-c1's system calls (bench_segments)


def idle_run(procs: Procs, target: Target, count: int, backend: str, work: Path, cfg: Settings,
             clock: Clock) -> dict[str, Any]:
    """A fresh server, ``count`` co-hosted tunnels: memory per tunnel, then a server restart."""
    port = free_port()
    server = start_server(procs, target, port, clock, name=f"idle{count}-srv")
    url = f"http://127.0.0.1:{port}"
    wait_until("a settled server", lambda: connected_clients(target, url) == 0, clock, 10)
    time.sleep(0.5)
    base_kib = tree_rss_kib(server.pid)
    tokens = [f"idle{i:05d}" + secrets.token_urlsafe(18) for i in range(count)]
    token_file = work / f"idle-tokens-{count}-{target.name}"
    write_private(token_file, "".join(t + "\n" for t in tokens))
    clients = procs.start(f"{target.name}-idle{count}-clients", [
        PYTHON, str(MANY_CLIENTS), f"ws://127.0.0.1:{port}", backend, str(token_file),
        str(work / f"{target.name}-idle{count}-clients.events.log"),
        "-reconnect-max-delay", f"{cfg.reconnect_cap:g}"])
    result: dict[str, Any] = {"clients": count, "missing": count}
    seen = [0]

    def connected() -> bool:
        if not clients.alive():
            raise ClientsDied(f"the co-hosted clients exited (code {clients.popen.returncode}): "
                              f"{clients.tail(1500)}")
        seen[0] = connected_clients(target, url)
        return seen[0] >= count

    try:
        began = time.monotonic()
        wait_until(f"{count} idle tunnels", connected, clock, 60 + count / 20, interval=0.2)
        result["connect_s"] = round(time.monotonic() - began, 2)
        time.sleep(2.0)  # let the handshakes' garbage go
        after_kib = tree_rss_kib(server.pid)
        check = http_get(f"{url}/1k.bin", headers={"X-Token": tokens[-1]}, timeout=30)
        result.update({
            "srv_base_mib": round(base_kib / 1024, 1),
            "srv_mib": round(after_kib / 1024, 1),
            "srv_kib_per_tunnel": round((after_kib - base_kib) / count, 1),
            "cli_kib_per_tunnel": round(tree_rss_kib(clients.pid) / count, 1),
            "request_status": check.status_code,
        })
        stopping = time.monotonic()
        procs.stop(server, first=cfg.restart_signal)
        stopped = time.monotonic()
        server = start_server(procs, target, port, clock, name=f"idle{count}-srv-again")
        listening = time.monotonic()
        seen[0] = 0
        wait_until(f"{count} tunnels back", connected, clock, 60 + count / 20, interval=0.1)
        result.update({
            "stop_s": round(stopped - stopping, 2),
            "restart_s": round(listening - stopped, 2),
            "reconnect_s": round(time.monotonic() - listening, 2),
        })
    except (SystemExit, ClientsDied) as exc:  # recorded; the other workloads still run
        result["error"] = str(exc)[:2000]
        log(f"idle-{count} {target.name}: {exc}")
    finally:
        result["missing"] = count - seen[0]
        procs.stop(clients)
        procs.stop(server)
    return result


def tokens_run(procs: Procs, target: Target, backend: str, direct: str, work: Path, cfg: Settings,
               mixed: Path, clock: Clock) -> dict[str, Any]:
    tokens = [f"tok{i:04d}" + secrets.token_urlsafe(18) for i in range(cfg.tokens)]
    token_file = work / f"mixed-tokens-{target.name}"
    write_private(token_file, "".join(t + "\n" for t in tokens))
    clients: Proc | None = None
    url = target.url if target.tunnel else direct
    try:
        if target.tunnel:
            clients = procs.start(f"{target.name}-tokens-clients", [
                PYTHON, str(MANY_CLIENTS), f"ws://127.0.0.1:{target.link_port or target.port}", backend,
                str(token_file), str(work / f"{target.name}-tokens-clients.events.log")])
            before = connected_clients(target, url)
            running = clients

            def registered() -> bool:
                if not running.alive():
                    raise SystemExit(f"bench: the co-hosted clients exited: {running.tail(1500)}")
                return connected_clients(target, url) >= before + cfg.tokens

            wait_until(f"{cfg.tokens} token clients", registered, clock, 60, interval=0.1)
            pending = list(tokens)

            def all_answer() -> bool:
                for token in pending[:]:
                    response = http_get(f"{url}/1k.bin", headers={"X-Token": token}, timeout=10)
                    if response.status_code == 200:
                        pending.remove(token)
                return not pending

            wait_until("every token to answer", all_answer, clock, 60, interval=0.2)
        pids = target.pids()
        if pids and clients is not None:
            pids["cli"] = clients.pid  # the tokens' traffic crosses the co-hosted clients
        with PeakSampler(pids) as peak:
            result = run_wrk(f"{url}/", 2, TOKENS_CONNECTIONS, cfg.duration, {}, mixed, clock,
                             [str(token_file)])
        if pids:
            result.update(peak.mib())
            result.update(peak.cpu_per_request(result["requests"]))
        result["tokens"] = cfg.tokens
        return result
    finally:
        if clients is not None:
            procs.stop(clients)


# -- the report ----------------------------------------------------------------------------------

# (key, label, how: "median" or "sum", format)
METRICS: dict[str, list[tuple[str, str, str, str]]] = {
    "get": [("rps", "req/s", "median", "{:,.0f}"), ("ok_rps", "successful req/s", "median", "{:,.0f}"),
            ("p50_ms", "p50 ms", "median", "{:.2f}"),
            ("p99_ms", "p99 ms", "median", "{:.2f}"),
            ("srv_cpu_us", "srv CPU µs/req", "median", "{:,.0f}"),
            ("cli_cpu_us", "cli CPU µs/req", "median", "{:,.0f}"),
            ("non2xx", "non-2xx (sum)", "sum", "{:,}"),
            ("socket_errors", "socket errors (sum)", "sum", "{:,}"),
            # --segments (bench_segments): read -> write inside each daemon, µs
            ("srv_request_us", "srv request read->write µs", "median", "{:,.0f}"),
            ("cli_request_us", "cli request read->write µs", "median", "{:,.0f}"),
            ("cli_response_us", "cli response read->write µs", "median", "{:,.0f}"),
            ("srv_response_us", "srv response read->write µs", "median", "{:,.0f}")],
    "transfer": [("mb_s", "MB/s", "median", "{:,.1f}"),
                 ("srv_peak_mib", "srv peak RSS MiB", "median", "{:,.1f}"),
                 ("cli_peak_mib", "cli peak RSS MiB", "median", "{:,.1f}"),
                 ("non2xx", "non-2xx (sum)", "sum", "{:,}"), ("failed", "failed (sum)", "sum", "{:,}")],
    "idle": [("connect_s", "all connected s", "median", "{:.2f}"),
             ("srv_kib_per_tunnel", "srv KiB/tunnel", "median", "{:.1f}"),
             ("cli_kib_per_tunnel", "cli KiB/tunnel (process/N)", "median", "{:.1f}"),
             ("reconnect_s", "all back after restart s", "median", "{:.2f}"),
             ("stop_s", "srv stop s", "median", "{:.2f}"),
             ("missing", "tunnels missing (sum)", "sum", "{:,}")],
    "busy": [("idle_p50_ms", "idle p50 ms", "median", "{:.2f}"),
             ("busy_p50_ms", "p50 ms during download", "median", "{:.2f}"),
             ("slowdown", "during / idle", "median", "{:.2f}"),
             ("overlapped", "overlapped runs (sum)", "sum", "{:,}"),
             ("non2xx", "non-2xx (sum)", "sum", "{:,}")],
    "sse": [("event_p50_ms", "event delay p50 ms", "median", "{:.2f}"),
            ("event_max_ms", "event delay max ms", "median", "{:.2f}"),
            ("missing", "events missing (sum)", "sum", "{:,}"),
            ("non2xx", "non-2xx (sum)", "sum", "{:,}")],
    "tokens": [("rps", "req/s", "median", "{:,.0f}"), ("ok_rps", "successful req/s", "median", "{:,.0f}"),
               ("p50_ms", "p50 ms", "median", "{:.2f}"),
               ("p99_ms", "p99 ms", "median", "{:.2f}"),
               ("srv_cpu_us", "srv CPU µs/req", "median", "{:,.0f}"),
               ("cli_cpu_us", "cli CPU µs/req", "median", "{:,.0f}"),
               ("srv_peak_mib", "srv peak RSS MiB", "median", "{:,.1f}"),
               ("non2xx", "non-2xx (sum)", "sum", "{:,}"),
               ("socket_errors", "socket errors (sum)", "sum", "{:,}")],
}


def kind_of(workload: str) -> str:
    if workload in GET_WORKLOADS:
        return "get"
    if workload in TRANSFER_WORKLOADS:
        return "transfer"
    if workload in STREAM_WORKLOADS:
        return "busy" if workload == "busy-latency" else "sse"
    return "idle" if workload.startswith("idle-") else "tokens"


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per workload and target: medians (sums for error counts) over rounds, and ratios."""
    out: dict[str, Any] = {}
    for run in runs:
        entry = out.setdefault(run["workload"], {"kind": kind_of(run["workload"]),
                                                 "label": run["label"], "targets": {}})
        entry["targets"].setdefault(run["target"], {"rounds": []})["rounds"].append(run["result"])
    for entry in out.values():
        for data in entry["targets"].values():
            summary: dict[str, float] = {}
            for key, _, how, _ in METRICS[entry["kind"]]:
                values = [r[key] for r in data["rounds"] if isinstance(r.get(key), int | float)]
                if values:
                    summary[key] = sum(values) if how == "sum" else statistics.median(values)
            data["summary"] = summary
        direct = entry["targets"].get("direct", {}).get("summary", {})
        entry["ratios"] = {}
        for name, data in entry["targets"].items():
            if name == "direct" or not direct:
                continue
            entry["ratios"][name] = {
                key: round(data["summary"][key] / direct[key], 3)
                for key, _, how, _ in METRICS[entry["kind"]]
                if how == "median" and direct.get(key) and key in data["summary"]
            }
    return out


def render_table(summary: dict[str, Any], targets: list[str]) -> str:
    tunnels = [t for t in targets if t != "direct"]
    header = ["workload", "metric", "direct"]
    for name in tunnels:
        header += [name, f"{name}/direct"]
    rows = [header]
    for entry in summary.values():
        # Rows no target has (the --segments ones, without it) are left out.
        metrics = [metric for metric in METRICS[entry["kind"]]
                   if any(metric[0] in data["summary"] for data in entry["targets"].values())
                   ] or METRICS[entry["kind"]]
        for index, (key, label, how, fmt) in enumerate(metrics):
            row = [entry["label"] if index == 0 else "", label]
            for name in ["direct", *tunnels]:
                value = entry["targets"].get(name, {}).get("summary", {}).get(key)
                row.append("-" if value is None else fmt.format(value))
                if name != "direct":
                    ratio = entry["ratios"].get(name, {}).get(key) if how == "median" else None
                    row.append("" if ratio is None else f"x{ratio:.2f}")
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.ljust(width) if i < 2 else cell.rjust(width)
                 for i, (cell, width) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Workloads: " + ", ".join(ALL_WORKLOADS) + "; groups: " + ", ".join(GROUPS))
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every workload (3)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (10)")
    parser.add_argument("--transfer-duration", type=float, default=None,
                        help="seconds of back-to-back transfers per run (--duration)")
    parser.add_argument("--only", default="", help="comma-separated workloads or groups")
    parser.add_argument("--large-size", type=int, default=100, metavar="MIB",
                        help="size of the large download/upload file, MiB (100; 1024 for issue 5)")
    parser.add_argument("--idle", default="1000", help="idle tunnel counts, comma-separated (1000)")
    parser.add_argument("--tokens", type=int, default=100, help="tokens of the tokens workload (100)")
    parser.add_argument("--longpoll", action="store_true",
                        help="also run our tunnel over long-poll (-transport longpoll), as a column")
    parser.add_argument("--reconnect-cap", type=float, default=5.0,
                        help="backoff cap of the idle clients, s (5)")
    parser.add_argument("--restart-signal", choices=["TERM", "KILL"], default="TERM",
                        help="how idle-N stops the server before starting it again (TERM)")
    parser.add_argument("--reference", action="append", default=[], metavar="PATH",
                        help="another program with the srv/cli command line: one more column")
    parser.add_argument("--link-delay", type=float, default=0.0, metavar="MS",
                        help="a relay holding bytes MS ms each way between cli and srv, and the same "
                             "relay on the direct path to nginx: a long link (0: none)")
    parser.add_argument("--log-target", choices=["stderr", "journal"], default="stderr",
                        help="where our daemons log: stderr (default), or journald as under their "
                             "systemd units, to a journal socket of the run's own (root only; "
                             "scripts/bench_journal.py)")
    parser.add_argument("--segments", action="store_true",
                        help="after each tunnel's get-c1 run, a shorter one traced by perf (root): "
                             "read-to-write times inside srv and cli (scripts/bench_segments.py)")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--logs", type=Path, help="copy every process's log to this directory")
    parser.add_argument("--deadline", type=float, default=None,
                        help="overall time limit, s (3600; 240 with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny: 1 round, 1 s runs, 256 KiB/4 MiB files, 20 idle, 20 tokens")
    parser.add_argument("--skip-venv-setup", action="store_true",
                        help="(scripts/bench: do not run scripts/setup)")
    args = parser.parse_args(argv)
    selected: list[str] = []
    for name in filter(None, (n.strip() for n in args.only.split(","))):
        names = GROUPS.get(name, [name])
        for item in names:
            if item not in ALL_WORKLOADS:
                parser.error(f"unknown workload {item!r}; known: {', '.join(ALL_WORKLOADS)}")
            selected.append(item)
    args.workloads = [w for w in ALL_WORKLOADS if not selected or w in selected]
    try:
        args.idle_counts = [int(n) for n in args.idle.split(",") if n.strip()]
    except ValueError:
        parser.error("--idle takes counts like 1000,10000")
    if args.rounds < 1 or args.duration < 1 or args.tokens < 1 or min(args.idle_counts, default=1) < 1:
        parser.error("rounds, duration, tokens and idle counts must be at least 1")
    if not 1 <= args.large_size <= 16 * 1024:
        parser.error("--large-size is in MiB, 1 to 16384")
    if args.segments and (reason := unavailable()) is not None:
        parser.error(reason)
    return args


def settings_of(args: argparse.Namespace) -> Settings:
    if args.smoke:
        return Settings(rounds=1, duration=1, transfer_duration=0.5,
                        sizes={"1k.bin": KiB, "64k.bin": 64 * KiB, "small.bin": 256 * KiB,
                               "large.bin": 4 * MiB},
                        small="small.bin", large="large.bin", idle=[20], tokens=20,
                        reconnect_cap=1.0, warmup=1,
                        restart_signal=signal.Signals["SIG" + args.restart_signal],
                        segments=args.segments)
    transfer = args.transfer_duration if args.transfer_duration is not None else args.duration
    return Settings(rounds=args.rounds, duration=args.duration, transfer_duration=transfer,
                    sizes={"1k.bin": KiB, "64k.bin": 64 * KiB, "small.bin": MiB,
                           "large.bin": args.large_size * MiB},
                    small="small.bin", large="large.bin", idle=args.idle_counts, tokens=args.tokens,
                    reconnect_cap=args.reconnect_cap, warmup=2,
                    restart_signal=signal.Signals["SIG" + args.restart_signal],
                    segments=args.segments)


def human(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


def start_nginx(procs: Procs, work: Path, cfg: Settings, sse_port: int, clock: Clock) -> str:
    # nginx's workers run as another user (nobody) when we are root: they must read the files.
    work.chmod(0o755)
    www = work / "www"
    www.mkdir(mode=0o755)
    for name, size in cfg.sizes.items():
        with (www / name).open("wb") as out:
            left = size
            while left:
                chunk = os.urandom(min(left, 4 * MiB))
                out.write(chunk)
                left -= len(chunk)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / "nginx-temp" / sub).mkdir(parents=True)
    port, sink = free_port(), free_port()
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=work, port=port, sink_port=sink, sse_port=sse_port,
                                      workers=os.cpu_count() or 1))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = procs.start("nginx", [nginx, "-c", str(conf), "-p", str(work), "-e",
                                 str(work / "nginx-error.log")])
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not proc.alive():
            raise SystemExit(f"bench: nginx exited:\n{proc.tail()}\n"
                             f"{(work / 'nginx-error.log').read_text(errors='replace')[-2000:]}")
        ok = http_get(f"{url}/1k.bin", timeout=2).status_code == 200
        return ok and http_put(f"{url}/upload/check", content=b"x" * 2048, timeout=2).status_code == 204

    wait_until("nginx", up, clock, 20)
    return url


def versions(references: list[str]) -> dict[str, str]:
    def out(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            return (done.stdout + done.stderr).strip().splitlines()[0]
        return "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1) if found else "?"
    from wstunnel import __version__, compiled

    commit = out(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    # The figures hang on it: the same tree runs its request path compiled or interpreted.
    modules = len(compiled.COMPILED_MODULES)
    built = f"{modules - len(compiled.interpreted())} of {modules} modules (wstunnel/compiled.py)"
    return {"wstunnel": f"{__version__} ({commit})", "compiled": built,
            "python": platform.python_version(),
            "nginx": out(["nginx", "-v"]), "wrk": out(["wrk", "--version"]),
            "curl": out(["curl", "--version"]), "kernel": platform.release(), "cpu": cpu,
            "cpus": str(os.cpu_count()), **{f"reference {r}": r for r in references}}


def run(args: argparse.Namespace) -> int:
    cfg = settings_of(args)
    deadline = args.deadline if args.deadline is not None else (240.0 if args.smoke else 3600.0)
    clock = Clock(time.monotonic() + deadline)
    wall_start = time.time()
    with contextlib.suppress(ValueError, OSError):
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    targets = [Target("direct", None), Target("wstunnel", [PYTHON, "-m", "wstunnel"], ours=True)]
    if args.longpoll:  # the same program over HTTPS long-poll, as one more column
        targets.append(Target("wstunnel-longpoll", [PYTHON, "-m", "wstunnel"], ours=True,
                              transport="longpoll"))
    for index, path in enumerate(args.reference, start=1):
        program = str(Path(path).resolve()) if Path(path).exists() else path
        name = f"ref{index}:{Path(path).name}" if len(args.reference) > 1 else f"ref:{Path(path).name}"
        targets.append(Target(name, [program]))
    runs: list[dict[str, Any]] = []
    status = "complete"
    journal = JournalSink() if args.log_target == "journal" else None
    with tempfile.TemporaryDirectory(prefix="wstunnel-bench-") as tmp, contextlib.ExitStack() as stack:
        if journal is not None:
            stack.enter_context(journal.running())
            log("our daemons log to journald: a journal socket of this run's own")
        work = Path(tmp)
        (work / "logs").mkdir()
        procs = Procs(work / "logs")
        report_lua, mixed_lua = work / "report.lua", work / "mixed.lua"
        report_lua.write_text(REPORT_LUA)
        mixed_lua.write_text(MIXED_LUA)
        events = EventSource()
        try:
            stack.enter_context(events)
            backend = start_nginx(procs, work, cfg, events.port, clock)
            log(f"nginx on {backend}")
            # The direct column crosses the same link as a tunnel's traffic: HTTP client -> srv
            # stays local, cli -> nginx too; the link is between srv and cli, or client and nginx.
            direct = backend
            if args.link_delay:
                nginx_port = int(backend.rsplit(":", 1)[1])
                direct = f"http://127.0.0.1:{start_link(procs, 'direct', nginx_port, args.link_delay, clock)}"
                log(f"a link of {args.link_delay:g} ms each way before nginx ({direct}) and srv")
            for target in targets:
                if target.tunnel:
                    start_tunnel(procs, target, backend, clock, args.link_delay)
                    log(f"{target.name}: srv on port {target.port}, pids {target.pids()}")
            for target in targets:  # untimed: first requests, lazy imports, pools
                url = target.url if target.tunnel else direct
                run_wrk(f"{url}/1k.bin", 2, 32, cfg.warmup, target.headers(), report_lua, clock)
            for round_ in range(cfg.rounds):
                order = targets if round_ % 2 == 0 else targets[::-1]
                for workload in args.workloads:
                    for label, name, measure, only_tunnels in plan(workload, cfg, procs, backend,
                                                                    direct, work, mixed_lua,
                                                                    report_lua, events, clock):
                        for target in order:
                            if only_tunnels and not target.tunnel:
                                continue
                            clock.check()
                            result = measure(target)
                            runs.append({"round": round_ + 1, "workload": name, "label": label,
                                         "target": target.name, "result": result})
                            log(f"round {round_ + 1} {name} {target.name}: "
                                + ", ".join(f"{k}={v}" for k, v in result.items() if k != "wrk"))
        except DeadlineReached:
            status = "deadline reached: partial results"
            log(status)
        except SystemExit as exc:
            status = f"failed: {exc}"
            log(status)
            for proc in procs.running:
                if not proc.alive():
                    log(f"{proc.name} log:\n{proc.tail()}")
        except KeyboardInterrupt:
            status = "interrupted: partial results"
            log(status)
        finally:
            procs.stop_all()
            stack.close()
            if args.logs:  # the daemons' output and the co-hosted clients' event logs
                args.logs.mkdir(parents=True, exist_ok=True)
                for path in [*(work / "logs").iterdir(), *work.glob("*.events.log")]:
                    shutil.copy(path, args.logs / path.name)
                log(f"logs copied to {args.logs}")
        started_pids = procs.started
    summary = summarise(runs)
    names = [t.name for t in targets]
    table = render_table(summary, names)
    runtime = round(time.time() - wall_start, 1)
    print(table)
    logged = ("" if journal is None else
              f"; our daemons logged to journald: {journal.entries} entries"
              + (f" ({journal.malformed} without MESSAGE)" if journal.malformed else ""))
    print(f"\nmedians over {cfg.rounds} round(s), {cfg.duration} s per wrk run; x = tunnel / direct;"
          f" error counts summed over rounds; {status}; {runtime} s{logged}")
    if args.json:
        document = {
            "status": status,
            "complete": status == "complete",
            "command": shlex.join(["scripts/bench", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall_start)),
            "runtime_s": runtime,
            "params": {"rounds": cfg.rounds, "duration_s": cfg.duration,
                       "transfer_duration_s": cfg.transfer_duration, "sizes": cfg.sizes,
                       "idle": cfg.idle, "tokens": cfg.tokens, "reconnect_cap_s": cfg.reconnect_cap,
                       "restart_signal": cfg.restart_signal.name,
                       "workloads": args.workloads, "targets": names, "smoke": args.smoke,
                       "log_target": args.log_target},
            "journal": None if journal is None else {"entries": journal.entries,
                                                      "malformed": journal.malformed},
            "versions": versions(args.reference),
            "workloads": summary,
            "table": table,
            "pids": started_pids,
        }
        args.json.write_text(json.dumps(document, indent=1) + "\n")
    return 0 if status == "complete" else 1


Measure = Callable[[Target], dict[str, Any]]


def plan(workload: str, cfg: Settings, procs: Procs, backend: str, direct: str, work: Path,
         mixed: Path, report: Path, events: EventSource, clock: Clock
         ) -> Iterator[tuple[str, str, Measure, bool]]:
    """(label, name, measure(target), tunnels only) for each measurement ``workload`` stands for;
    ``backend`` is nginx for tunnel clients, ``direct`` the direct column's way to it."""
    if workload in GET_WORKLOADS:
        threads, connections = GET_WORKLOADS[workload]

        def get(target: Target) -> dict[str, Any]:
            url = target.url if target.tunnel else direct
            pids = target.pids()
            with PeakSampler(pids) as peak:
                result = run_wrk(f"{url}/1k.bin", threads, connections, cfg.duration,
                                 target.headers(), report, clock)
            result = {**result, **peak.mib(), **peak.cpu_per_request(result["requests"])}
            if cfg.segments and connections == 1 and pids:
                # Apart from the run above: the trace slows every system call a little.
                with SyscallTrace(pids) as trace:
                    run_wrk(f"{url}/1k.bin", threads, connections,
                            min(cfg.duration, SEGMENTS_DURATION),
                            target.headers(), report, clock)
                for name, found in trace.results.items():
                    result.update({f"{name}_{key}": value for key, value in found.items()})
            return result

        yield f"GET 1 KiB -t{threads} -c{connections}", workload, get, False
    elif workload in TRANSFER_WORKLOADS:
        direction, which = workload.split("-")
        file_name = cfg.small if which == "small" else cfg.large
        size = cfg.sizes[file_name]

        def transfer(target: Target) -> dict[str, Any]:
            url = target.url if target.tunnel else direct
            pids = target.pids()
            with PeakSampler(pids) as peak:
                if direction == "download":
                    result = run_transfers(f"{url}/{file_name}", target.headers(), size, None,
                                           cfg.transfer_duration, clock)
                else:
                    result = run_transfers(url, target.headers(), size, work / "www" / file_name,
                                           cfg.transfer_duration, clock)
            return {**result, **peak.mib(), "size": size}

        yield f"{direction} {human(size)}", workload, transfer, False
    elif workload == "busy-latency":
        size = cfg.sizes[cfg.large]

        def busy(target: Target) -> dict[str, Any]:
            url = target.url if target.tunnel else direct
            return run_busy_latency(url, target.headers(), cfg.large, size, clock)

        yield f"GET 1 KiB during a {human(size)} download", workload, busy, False
    elif workload == "sse":
        def sse(target: Target) -> dict[str, Any]:
            url = target.url if target.tunnel else direct
            return run_sse(url, target.headers(), events, clock)

        yield f"SSE, {SSE_EVENTS} events {SSE_GAP * 1000:g} ms apart", workload, sse, False
    elif workload == "idle":
        for count in cfg.idle:
            def idle(target: Target, count: int = count) -> dict[str, Any]:
                return idle_run(procs, target, count, backend, work, cfg, clock)

            label = f"{count:,} idle tunnels, restart by {cfg.restart_signal.name}"
            yield label, f"idle-{count}", idle, True
    elif workload == "tokens":
        def tokens(target: Target) -> dict[str, Any]:
            return tokens_run(procs, target, backend, direct, work, cfg, mixed, clock)

        yield (f"{cfg.tokens} tokens, mixed -c{TOKENS_CONNECTIONS}", "tokens", tokens, False)


def main() -> int:
    args = parse_args()
    if args.log_target == "journal":
        rerun_in_private_mounts()  # returns only when already in a mount namespace of its own
    # SIGTERM (timeout(1), a CI job cancelled) ends a run as Ctrl-C does: partial results, and
    # every process it started stopped. Python's default for SIGTERM ends it on the spot and
    # left nginx, the daemons and the co-hosted clients running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
