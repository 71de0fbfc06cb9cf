"""A journald stand-in for ``scripts/bench --log-target journal``: the packaged daemons log to
journald (their units run them under systemd), and there a log line costs several times what it
costs on stderr, so a benchmark that logs to stderr does not show the path users run.

The daemons' systemd-python sends each line as a datagram to ``/run/systemd/journal/socket``.
This machine's own journal must not take a benchmark's million lines, so the bench re-runs
itself in a mount namespace of its own (``unshare --mount``, root only), mounts a tmpfs on
``/run/systemd`` there, and reads that socket itself: each datagram is counted (and checked to
carry a MESSAGE field), as journald would take it, and dropped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

JOURNAL_DIR = Path("/run/systemd/journal")
# Set in the re-run bench's environment: it is in its own mount namespace already.
PRIVATE_MOUNTS = "WSTUNNEL_BENCH_PRIVATE_MOUNTS"
# What makes our daemons (and older builds of ours given as --reference) log to journald.
LOG_TARGET_ENV = {"WSTUNSRV_LOG_TARGET": "journal", "WSTUNCLI_LOG_TARGET": "journal"}


def rerun_in_private_mounts() -> None:
    """Unless already there, replace this process by the same bench in a mount namespace of its
    own, where mounting a tmpfs on /run/systemd touches nothing outside. Exits with a clear
    message where that is not possible."""
    if os.environ.get(PRIVATE_MOUNTS) == "1":
        return
    if os.geteuid() != 0:
        sys.exit("bench: --log-target journal needs root (a mount namespace of its own)")
    unshare = shutil.which("unshare")
    if unshare is None:
        sys.exit("bench: --log-target journal needs unshare(1) (util-linux)")
    os.environ[PRIVATE_MOUNTS] = "1"
    os.execv(unshare, [unshare, "--mount", "--propagation", "private", "--",
                       sys.executable, *sys.argv])


class JournalSink:
    """The socket journald would listen on, read by a thread: ``entries`` lines taken, of which
    ``malformed`` had no MESSAGE field."""

    def __init__(self) -> None:
        self.entries = 0
        self.malformed = 0
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @contextlib.contextmanager
    def running(self) -> Iterator[JournalSink]:
        if os.environ.get(PRIVATE_MOUNTS) != "1":
            raise RuntimeError("the journal sink runs only in the bench's own mount namespace")
        JOURNAL_DIR.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "bench-journal",
                        str(JOURNAL_DIR.parent)], check=True)
        JOURNAL_DIR.mkdir()
        sock = self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        sock.bind(str(JOURNAL_DIR / "socket"))
        sock.settimeout(0.2)  # how soon the reader sees that the run is over
        self._thread = threading.Thread(target=self._read, name="journal-sink", daemon=True)
        self._thread.start()
        saved = {key: os.environ.get(key) for key in LOG_TARGET_ENV}
        os.environ.update(LOG_TARGET_ENV)  # children take the bench's environment
        try:
            yield self
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            self._stop.set()
            self._thread.join(timeout=5)
            sock.close()

    def _read(self) -> None:
        assert self._socket is not None
        while not self._stop.is_set():
            try:
                data = self._socket.recv(256 * 1024)
            except TimeoutError:
                continue
            self.entries += 1
            if not (data.startswith(b"MESSAGE=") or b"\nMESSAGE=" in data):
                self.malformed += 1
