"""Faults, end to end: real processes killed, stopped, cut off and restarted under load.

Every test measures what it asserts and prints the figures (``pytest -s`` shows them): request
counts by outcome, detection and recovery times, the peak reconnection rate. Load generators are
bounded in requests and time, and every request has a deadline; "hangs" means "ran into it".
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import re
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.support import netns
from tests.support.harness import PYTHON, ROOT, Backend, Client, Harness, Server, free_port, wait_until
from wstunnel.config import ServerSettings

# The server's restart grace at its default, where it has one: the harness turns it off, but
# these tests restart servers and must see what users get.
_GRACE_FIELD = ServerSettings.model_fields.get("restart_grace")
RESTART_GRACE = [] if _GRACE_FIELD is None else ["-restart-grace", f"{_GRACE_FIELD.default:g}"]
DEADLINE = 8.0  # seconds any one request of a load generator may take, whatever happens
CONNECTION_ERRORS = (httpx.ConnectError, httpx.ReadError, httpx.WriteError,
                     httpx.RemoteProtocolError, httpx.CloseError)


# -- load ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    index: int
    token: int  # index into the generator's tokens
    path: str
    started: float  # time.monotonic()
    ended: float
    status: int | None = None
    error: str | None = None  # the exception's class name, for a request without a response
    retry_after: str | None = None

    @property
    def elapsed(self) -> float:
        return self.ended - self.started

    @property
    def kind(self) -> str:
        if self.status is not None:
            return str(self.status)
        return self.error or "?"


class LoadGenerator:
    """Threads sending requests round-robin over tokens and paths until stopped or ``limit``.

    ``paths`` are formats with ``{i}``, the request's number. Each thread paces itself to one
    request per ``pace`` seconds at most, so a dead server (instant refusals) cannot burn the
    whole budget. With ``forwarded``, each request comes "from" its own address through a
    trusted proxy (X-Forwarded-For), as when the server sits behind nginx and serves many users.
    """

    def __init__(self, url: str, tokens: list[str], paths: list[str], *, threads: int = 6,
                 limit: int = 3000, pace: float = 0.02, forwarded: bool = False) -> None:
        self.url = url
        self.tokens = tokens
        self.paths = paths
        self.limit = limit
        self.pace = pace
        self.forwarded = forwarded
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._sent = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(threads)]

    def start(self) -> LoadGenerator:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(DEADLINE + 10)
            assert not thread.is_alive(), "a load generator thread outlived its deadline"
        return sorted(self.outcomes, key=lambda o: o.index)

    def count(self, kind: str, *, since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes if o.kind == kind and o.started >= since)

    def _next(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or self._sent >= self.limit:
                return None
            self._sent += 1
            return self._sent - 1

    def _work(self) -> None:
        timeout = httpx.Timeout(DEADLINE)
        limits = httpx.Limits(max_keepalive_connections=0)  # a new connection per request
        with httpx.Client(timeout=timeout, limits=limits, trust_env=False) as http:
            while (index := self._next()) is not None:
                token = index % len(self.tokens)
                path = self.paths[index % len(self.paths)].format(i=index)
                headers = {"X-Token": self.tokens[token]}
                if self.forwarded:
                    headers["X-Forwarded-For"] = f"10.77.{index // 250 % 250}.{index % 250 + 1}"
                outcome = Outcome(index, token, path, time.monotonic(), 0.0)
                try:
                    response = http.get(self.url + path, headers=headers)
                except httpx.HTTPError as exc:
                    outcome.error = type(exc).__name__
                else:
                    outcome.status = response.status_code
                    outcome.retry_after = response.headers.get("retry-after")
                outcome.ended = time.monotonic()
                with self._lock:
                    self.outcomes.append(outcome)
                self._stop.wait(max(0.0, self.pace - outcome.elapsed))


def summarize(outcomes: list[Outcome]) -> str:
    kinds = collections.Counter(o.kind for o in outcomes)
    slowest = max((o.elapsed for o in outcomes), default=0.0)
    parts = ", ".join(f"{kind}: {n}" for kind, n in sorted(kinds.items()))
    return f"{len(outcomes)} requests ({parts}); slowest {slowest:.2f}s"


def assert_none_hung(outcomes: list[Outcome]) -> None:
    hung = [o for o in outcomes if o.error is not None and "Timeout" in o.error]
    assert not hung, f"{len(hung)} request(s) hung until their deadline: {hung[:3]}"
    assert all(o.elapsed < DEADLINE + 2 for o in outcomes)


def is_connection_error(outcome: Outcome) -> bool:
    return outcome.error in {cls.__name__ for cls in CONNECTION_ERRORS}


# -- small helpers ---------------------------------------------------------------------------


def tunnel_of(server: Server, token: str) -> dict:
    for tunnel in server.status()["tunnels"]:
        if tunnel["token"] == token[:8] + "...":
            return tunnel
    raise KeyError(token[:8])


def metrics_clients(server: Server) -> int:
    text = httpx.get(f"{server.url}/_metrics", timeout=5).text
    found = re.findall(r"^wstunnel_clients(?:\{[^}]*\})? (\d+)$", text, re.M)  # one per transport
    if not found:
        raise ValueError("no wstunnel_clients gauge")
    return sum(int(count) for count in found)


def clients_back(server: Server, tokens: list[str], *, timeout: float) -> dict[str, float]:
    """Poll every 50 ms; the monotonic time at which each token was first seen with a client."""
    back: dict[str, float] = {}

    def all_back() -> bool:
        document = server.status()
        now = time.monotonic()
        present = {t["token"] for t in document["tunnels"] if t["clients"]}
        for token in tokens:
            if token[:8] + "..." in present:
                back.setdefault(token, now)
        return len(back) == len(tokens)

    wait_until(all_back, timeout=timeout, what=f"all {len(tokens)} clients back")
    return back


def holder_of(clients: list[Client], tag: str) -> Client | None:
    """The client whose log shows it received the request tagged ``tag``."""
    return next((c for c in clients if tag in c.process.output()), None)


# -- 1. kill -9 the server under load ---------------------------------------------------------


def test_server_killed_under_load_clients_return_within_backoff_cap(harness: Harness) -> None:
    cap = 2.0
    margin = 3.0  # the dial and handshake on a busy machine
    flags = ("-trusted-proxies", "127.0.0.1")
    server = harness.server(*flags)
    tokens = [harness.new_token() for _ in range(3)]
    for token in tokens:
        harness.client(server, token, "-reconnect-max-delay", f"{cap:g}")
    load = LoadGenerator(server.url, tokens, ["/echo/{i}", "/slow?secs=0.3&i={i}"],
                         threads=6, forwarded=True).start()
    try:
        wait_until(lambda: load.count("200") >= 30, timeout=30, what="30 answered requests")
        killed_at = time.monotonic()
        server.process.kill()
        restarted = harness.server(*flags, *RESTART_GRACE, port=server.port)
        up_at = time.monotonic()
        back = clients_back(restarted, tokens, timeout=cap + margin + 10)
        healed_at = max(back.values()) + 1.0
        wait_until(lambda: load.count("200", since=healed_at) >= 30, timeout=30,
                   what="30 answered requests after the restart")
    finally:
        outcomes = load.stop()

    print(f"\n[server kill -9] {summarize(outcomes)}")
    print(f"[server kill -9] restart took {up_at - killed_at:.2f}s; clients back after "
          + ", ".join(f"{back[t] - up_at:.2f}s" for t in tokens) + f" (cap {cap:g}s)")
    assert_none_hung(outcomes)
    for token in tokens:
        assert back[token] - up_at <= cap + margin
    assert any(o.started < killed_at and o.status == 200 for o in outcomes)
    unexplained = []
    for outcome in outcomes:
        if outcome.status == 200 or (outcome.status is not None and outcome.status >= 500):
            continue
        if is_connection_error(outcome) and killed_at - DEADLINE <= outcome.started <= up_at + 0.5:
            continue  # in flight at the kill, or sent while nothing listened
        if (outcome.status == 404 and not RESTART_GRACE
                and killed_at <= outcome.started < back[tokens[outcome.token]]):
            # The new server has not met the token yet; see the xfail test below.
            continue
        unexplained.append(outcome)
    assert not unexplained, f"unexpected outcomes: {unexplained[:5]}"
    after = [o for o in outcomes if o.started >= healed_at]
    assert after and all(o.status == 200 for o in after), summarize(after)


def _unread_by_server(server_port: int, client_ports: set[int]) -> int:
    """Our connections to the server whose bytes it has not read yet (kernel receive queue).

    Tells, whatever the server then does with them (answer, queue, wait), that every request
    has reached it; loopback delivers a send before the call returns.
    """
    unread = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        established = fields[3] == "01"
        if local_port == server_port and remote_port in client_ports and established:
            unread += int(fields[4].split(":")[1], 16) > 0
    return unread


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str]]:
    """Status and headers of the response on ``sock`` (sent with Connection: close)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
    return int(head[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}


@pytest.mark.xfail(not RESTART_GRACE, strict=True, reason=(
    "bug: a restarted server answers 404 'Tunnel not found' (no 5xx, nothing queued) to requests "
    "for tokens whose clients are still in reconnect backoff (wstunnel/server/forwarding.py "
    "Forwarder._exchange); with the failure brake, 30 such 404s also lock the address out, "
    "the tunnel client's own handshakes included (429 for failure_window)"
))
def test_request_to_restarted_server_before_its_client_returns_is_not_404(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    client = harness.client(server, token, "-reconnect-max-delay", "2")
    requests = 40
    sockets: list[socket.socket] = []
    client.process.signal(signal.SIGSTOP)  # still in backoff, as far as the new server can tell
    try:
        server.process.kill()
        restarted = harness.server(*RESTART_GRACE, port=server.port)
        for i in range(requests):
            sock = socket.create_connection(("127.0.0.1", restarted.port), timeout=30)
            sockets.append(sock)
            sock.sendall(f"GET /echo/{i} HTTP/1.1\r\nHost: x\r\nX-Token: {token}\r\n"
                         "Connection: close\r\n\r\n".encode())
        ports = {sock.getsockname()[1] for sock in sockets}
        wait_until(lambda: _unread_by_server(restarted.port, ports) == 0, timeout=20,
                   what="the new server to read every request")
        client.process.signal(signal.SIGCONT)  # back after its backoff: 0.5 s at the least
        answers = [_read_response(sock) for sock in sockets]
    finally:
        client.process.signal(signal.SIGCONT)
        for sock in sockets:
            sock.close()
    statuses = collections.Counter(status for status, _ in answers)
    print(f"\n[request before the client returns] {dict(statuses)}"
          + (f" (restart grace {RESTART_GRACE[1]}s)" if RESTART_GRACE else " (no restart grace)"))
    # Delivered once the client is back, or a 5xx to retry; never a "no such tunnel" that a
    # caller takes for a wrong token, and that the failure brake counts as guessing.
    assert all(status == 200 or (status == 503 and "retry-after" in headers)
               for status, headers in answers), statuses
    restarted.wait_clients(token, 1, timeout=10)
    assert restarted.get("/after", token).status_code == 200


# -- 2. kill -9 a client mid-request ----------------------------------------------------------


def test_client_killed_mid_request_get_moves_to_the_other_client_post_gets_502(
        harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    clients = [harness.client(server, token), harness.client(server, token)]
    with ThreadPoolExecutor(1) as pool:
        tag = secrets.token_hex(6)
        future = pool.submit(server.get, f"/slow?secs=2&tag={tag}", token, timeout=30)
        holder = wait_until(lambda: holder_of(clients, tag), what="a client to take the GET")
        other = clients[1 - clients.index(holder)]
        killed_at = time.monotonic()
        holder.process.kill()
        response = future.result(timeout=30)
        get_secs = time.monotonic() - killed_at
        assert response.status_code == 200
        assert response.text == "slow\n"
        assert tag in other.process.output()  # replayed there
        assert "WS   RETRY" in server.process.output()
        assert get_secs < 2 + 3  # at once, plus the backend's own 2 s

        server.wait_clients(token, 1)
        clients = [other, harness.client(server, token)]
        tag = secrets.token_hex(6)
        future = pool.submit(server.get, f"/slow?secs=20&tag={tag}", token, method="POST",
                             content=b"not idempotent")
        holder = wait_until(lambda: holder_of(clients, tag), what="a client to take the POST")
        other = clients[1 - clients.index(holder)]
        killed_at = time.monotonic()
        holder.process.kill()
        response = future.result(timeout=15)
        post_secs = time.monotonic() - killed_at
    print(f"\n[client kill -9, two clients] GET answered 200 {get_secs:.2f}s after the kill "
          f"(backend takes 2 s); POST answered {response.status_code} after {post_secs:.3f}s")
    assert response.status_code == 502
    assert response.text.strip() == "Tunnel connection lost"
    assert post_secs < 1.0
    assert tag not in other.process.output()  # never replayed


def test_client_killed_mid_get_single_client_retried_after_it_reconnects(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    doomed = harness.client(server, token)
    tag = secrets.token_hex(6)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(server.get, f"/slow?secs=1&tag={tag}", token, timeout=30)
        wait_until(lambda: tag in doomed.process.output(), what="the client to take the GET")
        killed_at = time.monotonic()
        doomed.process.kill()
        server.wait_clients(token, 0)
        wait_until(lambda: tunnel_of(server, token)["queued"] == 1, what="the GET back in the queue")
        replacement = harness.client(server, token)
        response = future.result(timeout=30)
        secs = time.monotonic() - killed_at
    print(f"\n[client kill -9, one client] GET answered {response.status_code} {secs:.2f}s after "
          "the kill, by the restarted client")
    assert response.status_code == 200
    assert response.text == "slow\n"
    assert tag in replacement.process.output()


# -- 3. silent network cut between two namespaces ---------------------------------------------


@dataclass
class NetnsServer(Server):
    host: str = "127.0.0.1"  # where the test reaches /_status
    tunnel_host: str = "127.0.0.1"  # where clients dial

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.tunnel_host}:{self.port}"



def test_silent_network_cut_is_detected_by_ping_timeout_and_tunnel_heals(
        harness: Harness, namespace: netns.Netns) -> None:
    timeout, wstimeout, cap = 3.0, 3.0, 2.0
    port = 8080  # the namespace is new: nothing else listens in it
    argv = [PYTHON, "-m", "wstunnel", "srv", "-host", "0.0.0.0", "-port", str(port),
            "-wstimeout", f"{wstimeout:g}", "-trusted-proxies", namespace.host_address]
    process = harness.start("srv", namespace.wrap(argv))
    server = NetnsServer(process, port, host=namespace.operator_address,
                         tunnel_host=namespace.tunnel_address)
    wait_until(lambda: server.get("/_health_check", timeout=2).status_code == 200,
               what="wstunnel srv in the namespace")
    token = harness.new_token()
    client = harness.client(server, token, "-timeout", f"{timeout:g}",
                            "-reconnect-max-delay", f"{cap:g}")
    assert server.get("/before", token).status_code == 200

    namespace.cut()
    cut_at = time.monotonic()
    pool = ThreadPoolExecutor(2)
    try:
        # Sent into the dead tunnel: the GET must survive the cut, the POST must fail explicitly.
        get = pool.submit(server.get, "/echo/during-cut", token, timeout=60)
        post = pool.submit(_timed, lambda: server.get("/echo/during-cut", token, method="POST",
                                                      content=b"once", timeout=60))
        server.wait_clients(token, 0, timeout=wstimeout + 10)
        server_secs = time.monotonic() - cut_at
        wait_until(lambda: f"no pong within {timeout:g}s" in client.process.output(),
                   timeout=timeout * 2 + 10, what="the client's ping timeout")
        client_secs = time.monotonic() - cut_at
        assert "WS   TIMEOUT" in server.process.output()
        # While cut, redials go nowhere either: no SYN is answered, not even refused.
        wait_until(lambda: "timed out connecting" in client.process.output(), timeout=timeout * 3 + 10,
                   what="a redial to time out")
        assert server.clients(token) == 0

        posted, post_secs = post.result(timeout=30)
        assert posted.status_code == 502
        assert posted.text.strip() == "Tunnel connection lost"

        namespace.heal()
        healed_at = time.monotonic()
        server.wait_clients(token, 1, timeout=timeout + cap + 15)
        heal_secs = time.monotonic() - healed_at
        retried = get.result(timeout=30)
        assert retried.status_code == 200
        assert retried.json()["method"] == "GET"
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    assert server.get("/after", token).status_code == 200
    print(f"\n[silent cut] server dropped the tunnel after {server_secs:.1f}s (wstimeout "
          f"{wstimeout:g}s), client logged the ping timeout after {client_secs:.1f}s (timeout "
          f"{timeout:g}s); tunnel back {heal_secs:.1f}s after the path healed "
          f"(dial timeout {timeout:g}s + backoff cap {cap:g}s); a POST sent into the cut got "
          f"502 after {post_secs:.1f}s, a GET was delivered after the heal")
    assert server_secs <= wstimeout + 4
    assert client_secs <= timeout + timeout / 3 + 4
    assert heal_secs <= timeout + cap + 4
    assert post_secs <= wstimeout + 4


def _timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


# -- 4. backend faults -------------------------------------------------------------------------


class MisbehavingBackend:
    """A raw-socket HTTP backend that breaks its responses on purpose, by path.

    ``/short-length``: announces Content-Length 1000000, sends 1000 bytes, closes.
    ``/short-chunked``: chunked; one whole chunk of 1000 bytes, half of the next, closes.
    ``/head-only``: the head (Content-Length 5000) and nothing else, closes.
    ``/reset``: head and 1000 bytes, then a TCP reset (SO_LINGER 0).
    ``/complete``: a proper small response, for contrast.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone does not
        self.sock.close()
        self._thread.join(5)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            path = head.split(b" ", 2)[1].decode()
            body = b"x" * 1000
            if path == "/short-length":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + body)
            elif path == "/short-chunked":
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"3e8\r\n" + body + b"\r\n3e8\r\n" + body[:500])
            elif path == "/head-only":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
            elif path == "/reset":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + body)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\n"
                             b"whole\n")


@pytest.fixture
def misbehaving() -> Iterator[MisbehavingBackend]:
    backend = MisbehavingBackend()
    try:
        yield backend
    finally:
        backend.close()


def test_backend_down_slow_or_closing_mid_response_gives_explicit_errors(
        harness: Harness, misbehaving: MisbehavingBackend) -> None:
    httptimeout = 2.0
    server = harness.server("-httptimeout", f"{httptimeout:g}")
    token = harness.new_token()
    backend = harness.backend()
    harness.client(server, token, "-regexp", r"http://127\.0\.0\.1:[0-9]+", backend=backend.url)
    dead = f"http://127.0.0.1:{free_port()}"

    def get(base: str, path: str) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        response = server.get(path, token, headers={"X-Host": base}, timeout=20)
        return response, time.monotonic() - started

    down, down_secs = get(dead, "/anything")
    assert down.status_code == 502
    assert down.text.strip() == "Backend unreachable: ConnectError"

    slow, slow_secs = get(backend.url, "/slow?secs=6")
    assert slow.status_code == 504
    assert slow.text.strip() == "Tunnel timeout"
    assert httptimeout - 0.1 <= slow_secs < httptimeout + 2

    broken: dict[str, tuple[int | str, float]] = {}
    for path in ("/short-length", "/short-chunked", "/head-only", "/reset"):
        started = time.monotonic()
        try:
            response, secs = get(misbehaving.url, path)
        except httpx.HTTPError as exc:
            # Streamed (protocol v2, our cli): the head went out before the body broke, so the
            # HTTP connection is aborted; the client sees an error, never a clean short 200.
            broken[path] = (type(exc).__name__, time.monotonic() - started)
            assert time.monotonic() - started < 5
            continue
        broken[path] = (response.status_code, secs)
        # Buffered by the client (protocol v1): the whole 502, never a 200 with a short body.
        assert response.status_code == 502, (path, response.status_code, len(response.content))
        assert response.text.startswith("Backend response broken:"), (path, response.text)
        assert int(response.headers["content-length"]) == len(response.content)
        assert secs < 5
    whole, _ = get(misbehaving.url, "/complete")
    assert (whole.status_code, whole.content) == (200, b"whole\n")
    assert get(backend.url, "/fine")[0].status_code == 200
    print(f"\n[backend faults] down: {down.status_code} in {down_secs:.2f}s; slower than "
          f"httptimeout {httptimeout:g}s: {slow.status_code} in {slow_secs:.2f}s; closed mid-response: "
          + ", ".join(f"{p} {s} in {t:.2f}s" for p, (s, t) in broken.items()))


# -- 5. server restart with many clients -------------------------------------------------------


MANY_CLIENTS = int(os.environ.get("WSTUNNEL_FAULTS_CLIENTS", "1000"))
STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z (WS   \w+)\s+pkg=\S+ token=(\S+)")


def _events(log: Path, event: str, *, after: float) -> list[tuple[float, str, str]]:
    """(wall time, token prefix, line) of each ``event`` line of the many-clients log after ``after``."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        match = STAMP.match(line)
        if match and match.group(2) == event:
            when = datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)
            if when.timestamp() >= after:
                found.append((when.timestamp(), match.group(3), line))
    return found


def _peak(times: list[float], width: float) -> int:
    """Most events in any window of ``width`` seconds."""
    times = sorted(times)
    best, low = 0, 0
    for high, now in enumerate(times):
        while now - times[low] > width:
            low += 1
        best = max(best, high - low + 1)
    return best


def start_many_clients(harness: Harness, server: Server, backend: Backend, prefix: str,
                       count: int, cap: float) -> tuple[list[str], Path]:
    """``count`` real TunnelClients co-hosted by tests/support/many_clients.py, tokens ``<prefix>NNNNN…``
    (backoff capped at ``cap`` s): their tokens, and the helper's own event log."""
    tokens = [f"{prefix}{i:05d}" + secrets.token_urlsafe(18) for i in range(count)]
    harness.tokens.update(tokens)
    token_file = harness.directory / "tokens"
    token_file.touch(0o600)
    token_file.write_text("".join(t + "\n" for t in tokens))
    log = harness.directory / "many-clients.log"
    harness.start("many", [PYTHON, str(ROOT / "tests" / "support" / "many_clients.py"), server.ws_url,
                           backend.url, str(token_file), str(log), "-reconnect-max-delay", f"{cap:g}"])
    return tokens, log


def test_server_restart_with_many_clients_spreads_reconnections(harness: Harness) -> None:
    count, cap = MANY_CLIENTS, 5.0
    margin = 10.0  # a 2-core machine handshakes a few hundred clients a second, at best
    server = harness.server()
    backend = harness.backend()
    tokens, log = start_many_clients(harness, server, backend, "mc", count, cap)
    wait_until(lambda: metrics_clients(server) == count, timeout=120,
               what=f"{count} clients to register")
    assert server.get("/echo", tokens[-1]).status_code == 200

    killed_wall = time.time()
    server.process.kill()
    restarted = harness.server(port=server.port)
    up_wall = time.time()
    curve: list[tuple[float, int]] = []

    def all_back() -> bool:
        clients = metrics_clients(restarted)
        curve.append((time.time() - up_wall, clients))
        return clients == count

    wait_until(all_back, timeout=cap + margin + 30, what=f"all {count} clients back")
    back_secs = time.time() - up_wall
    # The server counts a tunnel once it has sent the 101; the client logs CONNECTED once it has
    # read it, and the one process hosting every client may be a moment behind.
    wait_until(lambda: len({prefix for _, prefix, _ in
                            _events(log, "WS   CONNECTED", after=killed_wall)}) == count,
               timeout=30, what=f"all {count} clients' CONNECTED lines")

    dials = _events(log, "WS   DIAL", after=killed_wall)
    connected = _events(log, "WS   CONNECTED", after=killed_wall)
    reconnects = _events(log, "WS   RECONNECT", after=killed_wall)
    first_dials = sorted({prefix: when for when, prefix, _ in reversed(dials)}.values())
    # The delay each client drew after losing the server (0.1 s resolution in the log).
    first_delays = {prefix: float(re.findall(r"delay_secs=([0-9.]+)", line)[0])
                    for _, prefix, line in reversed(reconnects)}
    arrivals = sorted(when for when, _, _ in connected)
    assert len({prefix for _, prefix, _ in connected}) == count
    # The harness scans only process logs for whole tokens; this one is the helper's own file.
    assert not re.search(r"mc\d{5}[\w-]{2}", log.read_text(errors="replace"))
    assert len(first_delays) == count
    delay_share = max(collections.Counter(first_delays.values()).values()) / count
    dial_peak = _peak(first_dials, 0.2)
    arrival_peak = _peak(arrivals, 0.2)
    per_second = _peak(arrivals, 1.0)
    per_log_second = collections.Counter(
        line.split(" ")[1] for line in restarted.process.output().splitlines() if "WS   NEW" in line
    )
    steps = [b - a for (_, a), (_, b) in itertools.pairwise(curve)]
    print(f"\n[{count} clients] server restart took {up_wall - killed_wall:.2f}s; all back "
          f"{back_secs:.2f}s after it listened (cap {cap:g}s); {len(dials)} dials, "
          f"{len(connected)} handshakes")
    print(f"[{count} clients] first delays drawn {min(first_delays.values()):g}.."
          f"{max(first_delays.values()):g}s, the commonest (0.1 s steps) by {delay_share:.0%}; "
          f"first redials: peak {dial_peak} in 200 ms, spread over "
          f"{first_dials[-1] - first_dials[0]:.2f}s")
    print(f"[{count} clients] handshakes: peak {arrival_peak} in 200 ms, {per_second}/s; "
          f"/_metrics polls: {len(curve)}, biggest step {max(steps, default=0)}")
    by_second = [per_log_second[k] for k in sorted(per_log_second)]
    print(f"[{count} clients] server log, WS NEW per second: {by_second}")
    # Jitter: the delays drawn differ (all equal without it). The actual redial times also show
    # it, but they bunch whenever the busy machine starves the one process hosting every client.
    assert delay_share <= 0.4
    # The server takes the herd at its own pace: handshakes beyond max_handshakes wait their turn
    # (server/guard.py, HandshakeTurns) instead of being sent back to their backoff, so the
    # handshakes follow the redials (their peak is printed above) and none is refused. (The
    # refusals used to spread the arrivals further, at the cost of all being back later.)
    assert "too many handshakes" not in restarted.process.output()
    assert back_secs <= cap + margin


# -- 6. graceful stop under load ----------------------------------------------------------------


def test_sigterm_under_load_finishes_in_flight_refuses_new_and_exits_zero(harness: Harness) -> None:
    server = harness.server("-shutdown-grace", "10")
    held, steady = harness.new_token(), harness.new_token()
    harness.client(server, held)
    harness.client(server, steady)
    load = LoadGenerator(server.url, [steady], ["/echo/{i}", "/slow?secs=1&i={i}"],
                         threads=4).start()
    with ThreadPoolExecutor(3) as pool:
        try:
            wait_until(lambda: load.count("200") >= 10, timeout=30, what="a steady load")
            in_flight = [pool.submit(server.get, f"/slow?secs=2&n={n}", held, timeout=30)
                         for n in range(3)]
            wait_until(lambda: tunnel_of(server, held)["pending"] == 3, what="3 requests in flight")
            stopped_at = time.monotonic()
            server.process.signal(signal.SIGTERM)
            code = server.process.wait_exit(30)
            exited_secs = time.monotonic() - stopped_at
            wait_until(lambda: load.count("ConnectError", since=time.monotonic() - 0.1) >= 4,
                       timeout=10, what="refused connections after the exit")
        finally:
            outcomes = load.stop()
        held_results = [f.result(timeout=30) for f in in_flight]

    # The listener is closed once a connection is refused; it never reopens.
    settled = min(o.started for o in outcomes if o.started >= stopped_at and o.error == "ConnectError")
    before = [o for o in outcomes if o.started < stopped_at - 0.5]
    around = [o for o in outcomes if stopped_at - 0.5 <= o.started < settled]
    after = [o for o in outcomes if o.started >= settled]
    print(f"\n[SIGTERM] exit {code} after {exited_secs:.2f}s; first refusal "
          f"{settled - stopped_at:.3f}s after the signal; in flight: "
          f"{[r.status_code for r in held_results]}")
    print(f"[SIGTERM] before: {summarize(before)}\n[SIGTERM] around: {summarize(around)}\n"
          f"[SIGTERM] after: {summarize(after)}")
    late = [round(o.started - stopped_at, 3) for o in around if o.started >= stopped_at]
    print(f"[SIGTERM] sent after the signal, before the first refusal: {len(late)} at {late}")
    assert code == 0
    assert settled - stopped_at < 2.0
    assert [(r.status_code, r.text) for r in held_results] == [(200, "slow\n")] * 3
    assert_none_hung(outcomes)
    assert before and all(o.status in (200, 503) for o in before), summarize(before)
    assert all(o.status in (200, 503) or is_connection_error(o) for o in around), summarize(around)
    assert after and all(o.error == "ConnectError" or o.status == 503 for o in after), summarize(after)
    assert all(o.retry_after for o in outcomes if o.status == 503)
    assert exited_secs < 10  # the in-flight requests took 2 s; no need for the whole grace


def test_sigterm_with_many_idle_tunnels_closes_all_reconnects_exits_zero(harness: Harness) -> None:
    """A graceful stop with hundreds of idle tunnels (issue 7: 10,000 took over 10 s): the request
    in flight still finishes, every client gets a going-away Close and comes back to the restarted
    server, exit 0, pid file gone. The stop time is printed, bounded only loosely."""
    count = int(os.environ.get("WSTUNNEL_STOP_CLIENTS", "500"))
    pidfile = harness.directory / "srv.pid"
    server = harness.server("-pidfile", str(pidfile), "-shutdown-grace", "10")
    backend = harness.backend()
    tokens, log = start_many_clients(harness, server, backend, "st", count, 2.0)
    wait_until(lambda: metrics_clients(server) == count, timeout=120,
               what=f"{count} clients to register")

    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(server.get, "/slow?secs=2", tokens[0], timeout=30)
        wait_until(lambda: tunnel_of(server, tokens[0])["pending"] == 1, what="a request in flight")
        signalled_wall, signalled = time.time(), time.monotonic()
        server.process.signal(signal.SIGTERM)
        code = server.process.wait_exit(30)
        stop_secs = time.monotonic() - signalled
        response = in_flight.result(timeout=30)
    output = server.process.output()
    closed = re.search(r"Closed tunnels +pkg=WStunsrv tunnels=(\d+) answered=(\d+) secs=(\S+)", output)
    print(f"\n[{count} idle tunnels] SIGTERM to exit {stop_secs:.2f}s (2 s of it the request in "
          f"flight); {closed.group(0) if closed else 'no Closed tunnels line'}")
    assert code == 0
    assert not pidfile.exists()
    assert (response.status_code, response.text) == (200, "slow\n")
    assert "Stopped" in output
    assert closed is not None and int(closed.group(1)) == count
    assert stop_secs < 15

    restarted = harness.server(port=server.port)
    wait_until(lambda: metrics_clients(restarted) == count, timeout=60,
               what=f"all {count} clients back")
    # Each client saw the server's Close (1001, going away), not a bare drop, before redialling.
    going_away = {prefix for _, prefix, line in _events(log, "WS   RECONNECT", after=signalled_wall)
                  if "code=1001" in line and "server shutting down" in line}
    assert len(going_away) == count
    assert not re.search(r"st\d{5}[\w-]{2}", log.read_text(errors="replace"))
