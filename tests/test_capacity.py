"""Capacity (issue 20): the open-files limit raised at start, and grace at that limit.

First the reserve logic of ``wstunnel.server.capacity`` on its own: where the high-water mark
sits, which paths the reserve is for, one warning line per interval, the oldest silent connection
dropped at the ceiling. Then real daemons on loopback started under a low open-files limit
(util-linux's ``prlimit``): the soft limit raised to the hard one and logged; a server past its
high-water mark answering tunnels and requests 503 with Retry-After while its own endpoints keep
answering, with no traceback, and taking tunnels again once clients leave; a flood of silent
connections that does not keep the health check out; a client short of descriptors answering 503
through the tunnel. The installed service (5,000 tunnels under ``systemctl start wstunsrv``, then a
low ``LimitNOFILE`` drop-in) is tests/test_capacity_deb.py's.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import secrets
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import trio

from tests.support.harness import PYTHON, ROOT, Harness, Server, wait_until
from wstunnel.logs import EventLogger
from wstunnel.server import capacity
from wstunnel.server.capacity import FileBudget, is_reserved, reserve_for

MANY_CLIENTS = ROOT / "tests" / "support" / "many_clients.py"


# --- The reserve logic ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    """The lines of a logger of its own, as EventLogger writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.logger = logging.getLogger(f"wstunnel-test-capacity-{secrets.token_hex(4)}")

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")

    def capacity(self) -> list[str]:
        return [line for line in self.lines if "Capacity" in line]


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    handler.logger.propagate = False
    handler.logger.setLevel(logging.INFO)
    handler.logger.addHandler(handler)
    try:
        yield handler
    finally:
        handler.logger.removeHandler(handler)


def _budget(lines: Lines, clock: Clock, *, limit: int = 300, others: int = 20,
            counted: list[int | None] | None = None) -> FileBudget:
    counts = counted if counted is not None else [None]
    return FileBudget(limit, EventLogger("WStunsrv", lines.logger), others=others,
                      count=lambda: counts[-1], clock=clock)


def test_reserve_grows_with_the_limit_within_bounds() -> None:
    assert reserve_for(300) == 32  # at least 32
    assert reserve_for(1024) == 32
    assert reserve_for(4096) == 64  # 1/64 of the limit
    assert reserve_for(65536) == 1024
    assert reserve_for(1_048_576) == 1024  # at most 1,024


def test_the_reserve_is_for_the_servers_own_endpoints() -> None:
    for path in (b"/_health_check", b"/_stats", b"/_status", b"/_metrics", b"/_admin",
                 b"/_admin/", b"/_admin/tokens"):
        assert is_reserved(path), path
    for path in (b"/_tunnel", b"/_tunnel/poll/open", b"/_tunnel/poll", b"/", b"/_administer",
                 b"/_token/abcdefghijklmnop/_status", b"/_health_check/x", b"/page"):
        assert not is_reserved(path), path


def test_connections_past_the_high_water_mark_are_limited(lines: Lines) -> None:
    budget = _budget(lines, Clock(), limit=300, others=20)
    assert (budget.high_water, budget.ceiling) == (268, 292)
    assert budget.capacity() == 248
    limited = [budget.admit() for _ in range(250)]
    assert limited == [False] * 248 + [True] * 2
    assert budget.in_use == 270 and budget.over_high_water() and not budget.at_ceiling()
    for _ in range(22):
        budget.admit()
    assert budget.at_ceiling()
    for _ in range(25):
        budget.release()
    assert not budget.over_high_water()
    assert budget.admit() is False  # below the mark again: served as ever


def test_refusals_say_so_once_per_interval_then_that_capacity_is_back(lines: Lines) -> None:
    clock = Clock()
    budget = _budget(lines, clock, limit=300, others=20)
    for _ in range(249):
        budget.admit()
    refusal = budget.refuse()
    assert refusal.status == 503
    assert (b"Retry-After", b"5") in refusal.headers
    for _ in range(99):
        clock.now += 0.05
        budget.refuse()
    budget.report()  # within the interval: nothing more
    assert len(budget_lines := lines.capacity()) == 1, budget_lines
    assert budget_lines[0].startswith("WARNING Capacity")
    assert "state=refusing refused=1 open_files=269 limit=300 high_water=268 retry_after=5" \
        in budget_lines[0]
    clock.now += capacity.WARN_INTERVAL
    budget.report()  # the 99 the rate limit held back
    assert "refused=99" in lines.capacity()[-1]
    for _ in range(30):
        budget.release()
    budget.report()  # the last line is not an interval old yet
    assert len(lines.capacity()) == 2
    clock.now += capacity.WARN_INTERVAL
    budget.report()
    assert lines.capacity()[-1].startswith("INFO Capacity")
    assert "state=back" in lines.capacity()[-1] and "refused=100" in lines.capacity()[-1]
    clock.now += capacity.WARN_INTERVAL
    budget.report()  # back is said once
    assert len(lines.capacity()) == 3
    assert budget.refused == 100


def test_counting_afresh_puts_what_is_not_a_connection_on_others(lines: Lines) -> None:
    counted: list[int | None] = [12]
    budget = _budget(lines, Clock(), limit=1024, others=10, counted=counted)
    budget.settle()  # listening: 12 open for good
    for _ in range(5):
        budget.admit()
    counted.append(40)
    budget.resample()
    assert (budget.others, budget.in_use) == (35, 40)
    counted.append(None)  # /proc unreadable (no descriptor to list it with): keep the count
    budget.resample()
    assert budget.others == 35
    # Connections whose sockets are closed but not yet uncounted: the listing comes up short,
    # and the server's own descriptors are not taken for free room.
    counted.append(9)
    budget.resample()
    assert budget.others == 12
    counted.append(40)
    budget.resample()
    snapshot = budget.snapshot()
    assert snapshot.as_dict() == {"in_use": 40, "limit": 1024, "high_water": 992,
                                  "refusing": False, "refused": 0}
    far, near = budget.resample_interval(), None
    for _ in range(992 - 32 - 40):
        budget.admit()
    near = budget.resample_interval()
    assert (far, near) == (capacity.RESAMPLE_INTERVAL, capacity.RESAMPLE_NEAR_MARK)


async def test_at_the_ceiling_the_oldest_silent_connection_makes_room(lines: Lines) -> None:
    budget = _budget(lines, Clock(), limit=300, others=20)
    scopes = [trio.CancelScope() for _ in range(3)]
    ended: list[int] = []

    async def silent_connection(index: int, *,
                                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                                ) -> None:
        budget.admit()
        budget.waiting_for_head(scopes[index])
        task_status.started()
        try:
            with scopes[index]:
                await trio.sleep_forever()
        finally:
            budget.head_received(scopes[index])
            ended.append(index)
            budget.release()

    async with trio.open_nursery() as nursery:
        for index in range(3):  # one after the other: trio runs start_soon's in any order
            await nursery.start(silent_connection, index)
        budget.head_received(scopes[0])  # the oldest has sent its head: it is served, not dropped
        budget.connections += budget.ceiling - budget.in_use  # the rest of the way up
        assert budget.at_ceiling()
        began = trio.current_time()
        await budget.wait_for_room()
        assert ended == [1], "not the oldest silent connection"
        assert trio.current_time() - began < capacity.RESAMPLE_NEAR_MARK
        assert not budget.at_ceiling()
        assert any("state=paused" in line for line in lines.capacity())
        nursery.cancel_scope.cancel()


# --- Real daemons under a low limit -----------------------------------------------------------


def _server(harness: Harness, nofile: str, *flags: str) -> Server:
    """``wstunnel srv`` started under ``prlimit --nofile=SOFT:HARD``, on a port it picks."""
    argv = ["prlimit", f"--nofile={nofile}", "--", PYTHON, "-m", "wstunnel", "srv",
            "-host", "127.0.0.1", "-port", "0", "-restart-grace", "0", *flags]
    process = harness.start("srv", argv)
    found = wait_until(lambda: re.search(r"Listening +pkg=WStunsrv port=(\d+)", process.output()),
                       what="wstunnel srv to log its port")
    server = Server(process, int(found.group(1)))
    wait_until(lambda: server.get("/_health_check", timeout=2).status_code == 200,
               what="wstunnel srv to listen")
    return server


def _limits(output: str) -> dict[str, str]:
    line = next(line for line in output.splitlines() if " Limits " in line)
    return dict(re.findall(r"(\w+)=(\S+)", line))


def _no_trouble(output: str) -> None:
    assert "Traceback" not in output, output[-3000:]
    assert "Too many open files" not in output and "EMFILE" not in output, output[-3000:]


def _handshake(port: int, token: str) -> bytes:
    """A tunnel client's WebSocket handshake on a new connection; the answer's head and body."""
    request = (f"GET /_tunnel HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               f"Sec-WebSocket-Version: 13\r\nOrigin: {token}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_daemons_raise_their_soft_limit_to_the_hard_one_and_log_it(harness: Harness) -> None:
    server = _server(harness, "256:4096")
    limits = _limits(server.process.output())
    assert (limits["open_files"], limits["raised_from"]) == ("4096", "256")
    # 4,096 less a reserve of 64 less what the process holds anyway (a dozen or so).
    assert 4000 <= int(limits["connections"]) < 4096 - 64, limits
    assert int(limits["listen_backlog"]) > 0
    files = server.status()["open_files"]
    assert (files["limit"], files["high_water"], files["refusing"]) == (4096, 4032, False)
    assert 5 < files["in_use"] < 64
    metrics = server.get("/_metrics").text
    assert re.search(r"^process_max_fds 4096$", metrics, re.M)
    assert re.search(r"^wstunnel_open_files_high_water 4032$", metrics, re.M)
    assert re.search(r"^process_open_fds \d+$", metrics, re.M)

    token = harness.new_token()
    argv = ["prlimit", "--nofile=200:2048", "--", PYTHON, "-m", "wstunnel", "cli",
            "-tunnel", server.ws_url, "-server", harness.backend().url]
    client = harness.start("cli", [*argv, "-token", token])
    server.wait_clients(token, 1)
    assert server.get("/echo", token).status_code == 200
    limits = _limits(client.output())
    assert (limits["open_files"], limits["raised_from"], limits["max_concurrent_requests"]) == \
        ("2048", "200", "100")
    assert "WARN Limits" not in client.output()

    # A client whose max_concurrent_requests cannot fit says so at start.
    crowded = harness.start("cli", ["prlimit", "--nofile=64:64", "--", *argv[3:],
                                    "-max-concurrent-requests", "500", "-token", harness.new_token()])
    line = wait_until(lambda: re.search(r"WARN Limits .*", crowded.output()), what="the warning")
    assert "open_files=64 needed=532" in line.group(0), line.group(0)


def test_server_at_its_limit_refuses_with_503_and_keeps_answering_its_endpoints(
        harness: Harness) -> None:
    server = _server(harness, "100:100")
    room = int(_limits(server.process.output())["connections"])  # about 57: 100 - 32 - its own
    backend = harness.backend()
    count = room + 25
    tokens = [f"cap{i:03d}" + secrets.token_urlsafe(18) for i in range(count)]
    harness.tokens.update(tokens)
    token_file = harness.directory / "tokens"
    token_file.touch(0o600)
    token_file.write_text("".join(t + "\n" for t in tokens))
    log = harness.directory / "many-clients.log"
    many = harness.start("many", [PYTHON, str(MANY_CLIENTS), server.ws_url, backend.url,
                                  str(token_file), str(log), "-reconnect-max-delay", "2"])
    began = time.monotonic()

    def refused_and_full() -> bool:
        text = log.read_text(errors="replace") if log.exists() else ""
        return "handshake refused: HTTP 503" in text and \
            len(server.status()["tunnels"]) >= room - 4

    wait_until(refused_and_full, timeout=60, what="the server full, and clients refused 503")
    status = server.status()
    connected = [t["token"] for t in status["tunnels"]]
    # "room" was counted at start: a descriptor or two of the start-up may have closed since.
    assert room - 4 <= len(connected) <= room + 4, (len(connected), room)
    assert status["open_files"]["refusing"] is True
    assert status["open_files"]["in_use"] >= status["open_files"]["high_water"] == 68

    # Past the mark: a tunnel handshake and a request for a token (each on a new connection)
    # get 503 with Retry-After and the reason; the server's own endpoints answer as ever.
    answer = _handshake(server.port, tokens[-1])
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert b"\r\nRetry-After: 5\r\n" in answer and b"Server at capacity" in answer, answer
    some = next(t for t in tokens if t[:8] + "..." in connected)
    response = server.get("/echo", some)
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "5"
    assert "open files" in response.text
    for _ in range(5):
        started = time.monotonic()
        assert server.get("/_health_check", timeout=5).text == "WSTUNSRV RUNNING\n"
        assert time.monotonic() - started < 2
    assert re.search(r"^wstunnel_capacity_refusals_total [1-9]\d*$",
                     server.get("/_metrics").text, re.M)

    # The clients leave: capacity comes back by itself, and a new client tunnels.
    many.stop()
    wait_until(lambda: "Capacity      pkg=WStunsrv state=back" in server.process.output(),
               timeout=capacity.WARN_INTERVAL + 3 * capacity.RESAMPLE_NEAR_MARK + 10,
               what="the server to say capacity is back")
    assert server.status()["open_files"]["refusing"] is False
    late = harness.new_token()
    harness.client(server, late)
    assert server.get("/echo", late).status_code == 200
    elapsed = time.monotonic() - began

    output = server.process.output()
    _no_trouble(output)
    warnings = [line for line in output.splitlines() if "WARN Capacity" in line]
    assert 1 <= len(warnings) <= elapsed / capacity.WARN_INTERVAL + 2, warnings
    assert all("reason=" in line for line in warnings), warnings
    assert server.process.alive()
    print(f"\n[capacity] limit 100: {len(connected)} tunnels of {count} clients (room {room}); "
          f"{len(warnings)} warning line(s) in {elapsed:.0f}s")


def test_a_flood_of_silent_connections_does_not_keep_the_health_check_out(
        harness: Harness) -> None:
    server = _server(harness, "100:100")
    flood = []
    try:
        for _ in range(150):  # past the limit: the rest wait in the kernel's listen queue
            flood.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        wait_until(lambda: "state=paused" in server.process.output(), what="the accept loop to pause")
        started = time.monotonic()
        assert server.get("/_health_check", timeout=10).status_code == 200
        waited = time.monotonic() - started
        # Well before the silent connections' own 5 s head timeout would have made room.
        assert waited < capacity.LIMITED_HEADER_TIMEOUT - 1, waited
        assert server.status()["open_files"]["refusing"] is True
    finally:
        for sock in flood:
            sock.close()
    wait_until(lambda: not server.status()["open_files"]["refusing"], timeout=45,
               what="the silent connections to be gone")
    _no_trouble(server.process.output())
    assert server.process.alive()
    print(f"\n[capacity] health check through 150 silent connections at limit 100: {waited:.2f}s")


def test_client_short_of_descriptors_answers_503_through_the_tunnel(harness: Harness) -> None:
    server = harness.server("-max-requests-per-tunnel", "200")
    backend = harness.backend()
    token = harness.new_token()
    # 48 descriptors: a dozen for the process itself, the rest for backend connections; 100
    # requests at once would need 100.
    client = harness.start("cli", ["prlimit", "--nofile=48:48", "--", PYTHON, "-m", "wstunnel",
                                   "cli", "-tunnel", server.ws_url, "-server", backend.url,
                                   "-token", token])
    server.wait_clients(token, 1)
    assert "WARN Limits" in client.output()

    def fetch(_: int) -> httpx.Response:
        return server.get("/slow?secs=3", token, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(max_workers=90) as pool:
        responses = list(pool.map(fetch, range(90)))
    statuses = sorted({r.status_code for r in responses})
    refused = [r for r in responses if r.status_code == 503]
    assert statuses == [200, 503], statuses
    for response in refused:
        assert response.headers["Retry-After"] == "5"
        assert "Tunnel client out of open files" in response.text
    # Descriptors came back: the same request alone is served.
    assert server.get("/slow?secs=0", token).status_code == 200
    output = client.output()
    _no_trouble(output)
    warnings = [line for line in output.splitlines() if "WARN Capacity" in line]
    assert 1 <= len(warnings) <= 2, warnings
    assert "no descriptor for a backend connection" in warnings[0]
    assert client.alive()
    print(f"\n[capacity] client at 48 files: {len(responses) - len(refused)} served, "
          f"{len(refused)} refused 503")
