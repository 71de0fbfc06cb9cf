"""Where one request's time goes inside each daemon, for ``scripts/bench --segments``.

At one connection a request crosses srv and cli one after the other, and each daemon's share of
the wait is the time from a read to the write it leads to:

    srv request:   the HTTP client's request read  -> its HEAD written to the tunnel
    cli request:   the HEAD read                   -> the request written to the backend
    cli response:  the backend's answer read       -> its frames written to the tunnel
    srv response:  the frames read                 -> the response written to the HTTP client

:class:`SyscallTrace` records the two daemons' reads and writes with ``perf record`` (tracepoints
of the system calls: root, and perf from Debian's ``linux-perf``) while requests go one at a
time; :func:`segments` pairs each read that brought bytes with the next write to another file
descriptor, and tells the two directions apart by what was read: a request (a GET's head, a
HEAD frame) is a few hundred bytes, a 1 KiB response is more. The same holds for any program
with the srv/cli command line, so the original's figures come out of the same trace, beside ours.

perf slows every system call a little: the figures are for comparing the columns of one run,
not for adding up to a request's latency (wrk's p50 is measured without the trace).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = ["EVENTS", "REQUEST_MAX_READ", "Call", "SyscallTrace", "parse", "segments", "unavailable"]

# Reads and writes as our daemons make them (os.read/os.write; trio's own sockets recv/send) and
# as the original does (read/write).
EVENTS = [f"syscalls:sys_{edge}_{call}" for call in ("read", "recvfrom") for edge in ("enter", "exit")]
EVENTS += [f"syscalls:sys_enter_{call}" for call in ("write", "sendto")]
# A read of at most this many bytes carries a request; a larger one, a response.
REQUEST_MAX_READ = 600
# The standard streams: a daemon's log lines are written there, and are nobody's request.
_STDIO = 2
_LINE = re.compile(r"\s*(\d+)\s+([\d.]+):\s+syscalls:sys_(enter|exit)_(\w+):\s*(.*)")


@dataclass(frozen=True)
class Call:
    """One read that brought bytes, or one write, of one process."""

    at_us: float
    write: bool
    fd: int
    size: int


def parse(script: str) -> dict[int, list[Call]]:
    """``perf script -F pid,time,event,trace`` output -> each process's calls, in order. A read's
    file descriptor comes from its entry, its size from its exit; reads that brought nothing
    (EAGAIN, end of file) are left out."""
    calls: dict[int, list[Call]] = defaultdict(list)
    reading: dict[int, int] = {}  # pid -> fd of the read under way
    for line in script.splitlines():
        found = _LINE.match(line)
        if found is None:
            continue
        pid, at_us = int(found[1]), float(found[2]) * 1e6
        edge, name, fields = found[3], found[4], found[5]
        if name in ("read", "recvfrom"):
            if edge == "enter":
                reading[pid] = _field(fields, "fd")
                continue
            fd = reading.pop(pid, -1)
            result = int(fields.strip(), 16)
            if 0 < result < 1 << 62:  # an error comes back as a huge unsigned
                calls[pid].append(Call(at_us, False, fd, result))
        elif edge == "enter" and name in ("write", "sendto"):
            size = _field(fields, "count" if name == "write" else "len")
            calls[pid].append(Call(at_us, True, _field(fields, "fd"), size))
    return dict(calls)


def _field(fields: str, name: str) -> int:
    found = re.search(rf"\b{name}: (0x[0-9a-f]+)", fields)
    if found is None:
        raise ValueError(f"no {name} in a traced call: {fields!r}")
    return int(found[1], 16)


def segments(calls: list[Call]) -> dict[str, float]:
    """One process's median time, in µs, from a read to the next write to another descriptor,
    for reads of requests (``request_us``) and of responses (``response_us``); each only if the
    trace has it. Only the commonest descriptor pair of each direction counts: the requests'
    path, not a health check or a keepalive ping that crossed the trace."""
    spans: dict[tuple[bool, int, int], list[float]] = defaultdict(list)
    last_read: Call | None = None
    for call in calls:
        if call.fd <= _STDIO:
            continue
        if not call.write:
            last_read = call
        elif last_read is not None and call.fd != last_read.fd:
            response = last_read.size > REQUEST_MAX_READ
            spans[(response, last_read.fd, call.fd)].append(call.at_us - last_read.at_us)
            last_read = None
    result: dict[str, float] = {}
    for response, key in ((False, "request_us"), (True, "response_us")):
        pairs = [pair for pair in spans if pair[0] == response]
        if pairs:
            commonest = max(pairs, key=lambda pair: len(spans[pair]))
            result[key] = round(statistics.median(spans[commonest]), 1)
    return result


def unavailable() -> str | None:
    """Why this machine cannot trace (None if it can): asked before a run, not in its middle."""
    if os.geteuid() != 0:
        return "--segments needs root (perf's system-call tracepoints)"
    if shutil.which("perf") is None:
        return "--segments needs perf (apt install linux-perf)"
    with tempfile.TemporaryDirectory(prefix="wstunnel-segments-") as tmp:
        # A kernel without the tracepoints (or tracefs) fails here, naming what it lacks.
        tried = subprocess.run(["perf", "record", "-q", "-o", str(Path(tmp) / "probe.data"),
                                "-e", EVENTS[0], "--", "true"],
                               capture_output=True, text=True, timeout=60, check=False)
    if tried.returncode != 0:
        return f"--segments: perf cannot trace system calls here: {tried.stderr.strip()[-300:]}"
    return None


class SyscallTrace:
    """``perf record`` of the processes named in ``pids`` ({"srv": ..., "cli": ...}) for the
    duration of the ``with`` block; then ``results``: each name's :func:`segments`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.results: dict[str, dict[str, float]] = {}
        self._dir = tempfile.TemporaryDirectory(prefix="wstunnel-segments-")
        self._data = Path(self._dir.name) / "perf.data"
        self._perf: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SyscallTrace:
        argv = ["perf", "record", "-q", "-o", str(self._data), "-e", ",".join(EVENTS),
                "-p", ",".join(str(pid) for pid in self.pids.values())]
        self._perf = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        perf = self._perf
        assert perf is not None
        try:
            # SIGINT: perf stops recording and writes its file, as at a ^C.
            perf.send_signal(signal.SIGINT)
            _, stderr = perf.communicate(timeout=60)
            if kind is None:
                if not self._data.exists():
                    raise SystemExit(f"bench: perf record failed: {stderr.decode()[-1000:]}")
                script = subprocess.run(
                    ["perf", "script", "-i", str(self._data), "-F", "pid,time,event,trace"],
                    capture_output=True, text=True, timeout=300, check=True).stdout
                calls = parse(script)
                self.results = {name: segments(calls.get(pid, [])) for name, pid in self.pids.items()}
        finally:
            if perf.poll() is None:
                perf.kill()
                perf.wait()
            self._dir.cleanup()
