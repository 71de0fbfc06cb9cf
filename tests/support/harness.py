"""Real processes on 127.0.0.1 for the end-to-end tests: backends, servers, clients, proxies.

Every process a test starts is registered with its :class:`Harness`, which stops them all when
the test ends, pass or fail, and then checks that no log of the run holds a whole token.
Waiting is always on a condition with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

ROOT = Path(__file__).resolve().parents[2]
SUPPORT = ROOT / "tests" / "support"
PYTHON = sys.executable
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_stat(path: Path) -> list[str]:
    """The fields of a ``/proc/.../stat`` file after the command name (the state first, then the
    parent's pid); the name, in parentheses, may hold spaces and parentheses. OSError once the
    process or thread is gone."""
    return path.read_text().rsplit(")", 1)[1].split()


def wait_until(predicate: Callable[[], T], *, timeout: float = 15.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} ({last_error!r})")
        time.sleep(0.05)


def raw_exchange(port: int, data: bytes, *, timeout: float = 15.0) -> bytes:
    """Send raw bytes to a server on 127.0.0.1; read until it closes or a response head is in."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        # The server may refuse before reading everything; its answer is what counts.
        with contextlib.suppress(OSError):
            sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


class Process:
    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path = ROOT):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        # Text the token scan skips: only for a program not ours whose own defect it is (the
        # original WStunnel prints a whole token; tests/support/reference.py says where).
        self.tolerated_leak: re.Pattern[str] | None = None
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_output(self, *texts: str, timeout: float = 15.0) -> str:
        """The output once it holds each of ``texts``. A daemon serving requests writes a line up
        to ``wstunnel.daemon.WRITE_AFTER`` after it logs it: read at once after whatever made
        it log one, its output may not hold the line yet."""
        def holding() -> str:
            output = self.output()
            return output if all(text in output for text in texts) else ""
        return wait_until(holding, timeout=timeout,
                          what=f"{self.name} to log {', '.join(map(repr, texts))}")

    def signal(self, signum: int) -> None:
        if self.alive():
            self.popen.send_signal(signum)

    def freeze(self, timeout: float = 10.0) -> None:
        """SIGSTOP, and return once every thread has stopped. The signal only asks: a thread
        the machine has not run since stops when it next runs, and may first finish a read it
        was in, taking bytes a test saw waiting in its socket."""
        self.signal(signal.SIGSTOP)
        wait_until(self._stopped, timeout=timeout, what=f"every thread of {self.name} to stop")

    def _stopped(self) -> bool:
        for stat in Path(f"/proc/{self.pid}/task").glob("*/stat"):
            try:
                state = proc_stat(stat)[0]
            except OSError:
                continue  # a thread that ended meanwhile
            if state not in ("T", "t"):
                return False
        return True

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, SIGKILL if it will not go; returns the exit status."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait()

    def wait_exit(self, timeout: float = 15.0) -> int:
        return self.popen.wait(timeout)


@dataclass
class Backend:
    process: Process
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Server:
    process: Process
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def status(self) -> dict:
        return httpx.get(f"{self.url}/_status", timeout=5).json()

    def clients(self, token: str) -> int:
        for tunnel in self.status()["tunnels"]:
            if tunnel["token"] == token[:8] + "...":
                return len(tunnel["clients"])
        return 0

    def wait_clients(self, token: str, count: int, timeout: float = 20.0) -> None:
        wait_until(lambda: self.clients(token) == count, timeout=timeout,
                   what=f"{count} client(s) on the token")

    def get(self, path: str, token: str | None = None, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["X-Token"] = token
        kwargs.setdefault("timeout", 30)
        return httpx.request(kwargs.pop("method", "GET"), f"{self.url}{path}", headers=headers, **kwargs)


@dataclass
class Client:
    process: Process
    token: str


class Harness:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: list[Process] = []
        self.tokens: set[str] = set()
        self._backend: Backend | None = None
        # The tunnel transport clients use unless a test names one: WSTUNNEL_TEST_TRANSPORT runs
        # a whole test module over long-poll, and tests/test_longpoll.py sets it per test.
        self.transport: str | None = os.environ.get("WSTUNNEL_TEST_TRANSPORT") or None

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: Path = ROOT) -> Process:
        """``cwd``: where ``python -m wstunnel`` finds the package (another version's tree)."""
        log_path = self.directory / f"{name}-{len(self.processes)}.log"
        process = Process(name, argv, log_path, env=environ() if env is None else env, cwd=cwd)
        self.processes.append(process)
        return process

    def new_token(self, prefix: str = "") -> str:
        token = prefix + secrets.token_urlsafe(24)
        self.tokens.add(token)
        return token

    def backend(self) -> Backend:
        if self._backend is None:
            port = free_port()
            process = self.start("backend", [PYTHON, str(SUPPORT / "backend_app.py"), str(port)])
            backend = Backend(process, port)
            wait_until(lambda: httpx.get(f"{backend.url}/", timeout=2).status_code == 200,
                       what="the test backend")
            self._backend = backend
        return self._backend

    def server(self, *flags: str, env: dict[str, str] | None = None, port: int | None = None,
               wait: bool = True, cwd: Path = ROOT) -> Server:
        # Port 0 lets the kernel pick, with no window for another process to take the port
        # between our choice and the bind; the server logs the port it got.
        ask_kernel = port is None and wait and "-logfile" not in flags
        port = 0 if ask_kernel else (free_port() if port is None else port)
        argv = [PYTHON, "-m", "wstunnel", "srv", "-host", "127.0.0.1", "-port", str(port), *flags]
        if "-restart-grace" not in flags:
            # Tests want an unknown token's 404 at once, not after the post-start grace.
            argv[4:4] = ["-restart-grace", "0"]
        process = self.start("srv", argv, env=env, cwd=cwd)
        if ask_kernel:
            found = wait_until(lambda: re.search(r"Listening +pkg=WStunsrv port=(\d+)", process.output()),
                               what="wstunnel srv to log its port")
            port = int(found.group(1))
        server = Server(process, port)
        if wait:
            wait_until(lambda: server.get("/_health_check", timeout=2).status_code == 200,
                       what="wstunnel srv to listen")
        return server

    def client(self, server: Server | str, token: str, *flags: str, backend: str | None = None,
               env: dict[str, str] | None = None, wait: bool = True, cwd: Path = ROOT) -> Client:
        tunnel = server.ws_url if isinstance(server, Server) else server
        if backend is None and "-regexp" not in flags:
            backend = self.backend().url
        argv = [PYTHON, "-m", "wstunnel", "cli", "-tunnel", tunnel, *flags]
        if self.transport is not None and "-transport" not in flags:
            argv += ["-transport", self.transport]
        if token:  # empty: the token comes from the environment or a config file
            self.tokens.add(token)
            argv += ["-token", token]
        if backend is not None:
            argv += ["-server", backend]
        before = server.clients(token) if isinstance(server, Server) and wait else 0
        client = Client(self.start("cli", argv, env=env, cwd=cwd), token)
        if wait and isinstance(server, Server):
            server.wait_clients(token, before + 1)
        return client

    def close(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                process.stop()

    def leaked_tokens(self) -> list[str]:
        """Every (log file, token) pair where a whole token appears in a log of this test."""
        leaks = []
        for process in self.processes:
            text = process.output() if process.log_path.exists() else ""
            if process.tolerated_leak is not None:
                text = process.tolerated_leak.sub("", text)
            leaks += [f"{process.log_path.name}: {t[:8]}..." for t in self.tokens if t in text]
        return leaks


def status_json(text: str) -> dict:
    return json.loads(text)


def environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(extra)
    return env
