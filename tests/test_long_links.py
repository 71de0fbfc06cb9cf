"""Protocol v2 across a long link: windows that grow with the link, memory that stays with the
consumer, no size limit on streams by default, fairness, and peers from before windows grew.

Real processes on loopback; the link is a relay that holds each direction's bytes 25 ms
(tests/support/links.py), a 50 ms round trip between wstunnel cli and wstunsrv. Growth is asserted
on the credit granted (/_status "flow", the cli's WS WINDOW lines), never on time; the one time
bound (a small request during a bulk transfer) is a multiple of the round trip with room for a
busy machine.
"""

from __future__ import annotations

import hashlib
import re
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.backend_app import big_body, big_body_sha256
from tests.support.harness import Harness, Server, wait_until
from tests.support.links import older_version, start_link

KiB, MiB = 1024, 1024 * 1024
# A body's first window on a tunnel that tunes its windows: what our client offers for request
# bodies as a tunnel opens, and what our server grants each response with its request.
FIRST_WINDOW = 2 * MiB
SLOW_ONE_WAY = 1.0  # seconds: the link on which a body's round trips are counted by the clock
ONE_WAY_MS = 25.0
ROUND_TRIP = 2 * ONE_WAY_MS / 1000
INITIAL_STREAM_WINDOW, INITIAL_TUNNEL_WINDOW = 256 * KiB, 4 * MiB
FIXED_WINDOWS = ("-max-stream-window", str(INITIAL_STREAM_WINDOW),
                 "-max-tunnel-window", str(INITIAL_TUNNEL_WINDOW))


def tunnel_over_link(harness: Harness, server_flags: tuple[str, ...] = (),
                     client_flags: tuple[str, ...] = (), *, server_tree: Path | None = None,
                     client_tree: Path | None = None, mb_per_s: float | None = None,
                     one_way_ms: float = ONE_WAY_MS) -> tuple[Server, str]:
    """A server, a client dialling it through the long link, and the token."""
    server = (harness.server(*server_flags) if server_tree is None
              else harness.server(*server_flags, cwd=server_tree))
    link = start_link(harness, server.port, one_way_ms, mb_per_s)
    token = harness.new_token()
    tree = {} if client_tree is None else {"cwd": client_tree}
    harness.client(f"ws://127.0.0.1:{link}", token, *client_flags, wait=False, **tree)
    server.wait_clients(token, 1, timeout=30)
    return server, token


def download_sha256(server: Server, token: str, size: int) -> str:
    digest = hashlib.sha256()
    with httpx.stream("GET", f"{server.url}/big?size={size}", headers={"X-Token": token},
                      timeout=120) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            digest.update(chunk)
    return digest.hexdigest()


def upload_sha256(server: Server, token: str, size: int) -> str:
    response = httpx.post(f"{server.url}/sink", headers={"X-Token": token},
                          content=big_body(size), timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["size"] == size
    return str(response.json()["sha256"])


def flow(server: Server) -> dict[str, int]:
    (tunnel,) = server.status()["tunnels"]
    (client,) = tunnel["clients"]
    return dict(client["flow"])


def agreed_request_windows(harness: Harness) -> list[int]:
    """The first window of request bodies each of the client's tunnels opened with (its WS
    CONNECTED lines; the server counts a tunnel once it sent its answer, which may still be on
    the link: so wait for the first)."""
    (client,) = [p for p in harness.processes if p.name == "cli"]

    def windows() -> list[int]:
        return [int(n) for n in re.findall(r"WS   CONNECTED .* request_window=(\d+)", client.output())]

    wait_until(windows, timeout=30, what="the client's WS CONNECTED line")
    return windows()


def client_windows(harness: Harness) -> list[int]:
    """The tunnel windows the client's WS WINDOW lines report, in order."""
    (client,) = [p for p in harness.processes if p.name == "cli"]
    return [int(n) for n in re.findall(r"WS   WINDOW .* tunnel=(\d+)", client.output())]


def test_32_mib_each_way_across_the_link_and_the_windows_grow(harness: Harness) -> None:
    server, token = tunnel_over_link(harness)
    size = 32 * MiB
    assert download_sha256(server, token, size) == big_body_sha256(size)
    grown = flow(server)  # downloads: srv receives, and widens what it grants the client
    assert grown["windows_widened"] > 0
    assert grown["widest_stream_window"] >= 4 * INITIAL_STREAM_WINDOW
    assert grown["tunnel_window"] > INITIAL_TUNNEL_WINDOW
    assert upload_sha256(server, token, size) == big_body_sha256(size)
    # Uploads: cli receives; its tunnel window grew past the protocol's, one line each time.
    windows = client_windows(harness)
    print(f"\n[long links] download: srv widened {grown['windows_widened']} times, widest stream "
          f"window {grown['widest_stream_window']}, tunnel window {grown['tunnel_window']}; "
          f"upload: cli tunnel windows {windows}")
    assert windows and windows == sorted(windows) and windows[-1] > INITIAL_TUNNEL_WINDOW


def test_fixed_windows_on_both_ends_grant_no_more_than_the_protocol(harness: Harness) -> None:
    """The limits at the protocol's windows make an end behave as one from before tuning."""
    server, token = tunnel_over_link(harness, FIXED_WINDOWS, FIXED_WINDOWS)
    size = 8 * MiB
    assert download_sha256(server, token, size) == big_body_sha256(size)
    assert upload_sha256(server, token, size) == big_body_sha256(size)
    fixed = flow(server)
    assert fixed["windows_widened"] == 0 and fixed["window_probes"] == 0
    assert fixed["tunnel_window"] == INITIAL_TUNNEL_WINDOW
    assert client_windows(harness) == []


@pytest.mark.parametrize("agreed", [True, False], ids=["2MiB-first-window", "protocol-first-window"])
def test_a_request_body_crosses_a_long_link_in_one_round_trip(harness: Harness, agreed: bool) -> None:
    """The client offers a 2 MiB first window for request bodies as its tunnel opens, and the
    server takes it: a 1.5 MiB upload across a 2 s round trip then takes one round trip (the
    body out, the answer back), where the protocol's 256 KiB first window takes two (the rest of
    the body waits for the grant of the first 256 KiB to come back). Limits at the protocol's
    windows make the client offer nothing: the contrast, in the same test."""
    server, token = tunnel_over_link(harness, (), () if agreed else FIXED_WINDOWS,
                                     one_way_ms=SLOW_ONE_WAY * 1000)
    first_window = FIRST_WINDOW if agreed else INITIAL_STREAM_WINDOW
    assert flow(server)["request_window"] == first_window
    assert agreed_request_windows(harness) == [first_window]
    size = 3 * MiB // 2
    start = time.monotonic()
    assert upload_sha256(server, token, size) == big_body_sha256(size)
    assert_round_trips("upload", first_window, time.monotonic() - start, 1 if agreed else 2)


@pytest.mark.parametrize("first", [True, False], ids=["2MiB-first-window", "protocol-first-window"])
def test_a_response_crosses_a_long_link_in_one_round_trip(harness: Harness, first: bool) -> None:
    """The server, which receives responses, grants each its 2 MiB first window with the
    request, on a tunnel that no transfer has widened yet: a 1.5 MiB download across a 2 s
    round trip takes one round trip (the request out, the response back), where the protocol's
    256 KiB first window takes two. Limits at the protocol's windows on the server: the
    contrast, in the same test."""
    server, token = tunnel_over_link(harness, () if first else FIXED_WINDOWS, (),
                                     one_way_ms=SLOW_ONE_WAY * 1000)
    first_window = FIRST_WINDOW if first else INITIAL_STREAM_WINDOW
    assert flow(server)["start_window"] == first_window
    size = 3 * MiB // 2
    start = time.monotonic()
    assert download_sha256(server, token, size) == big_body_sha256(size)
    assert_round_trips("download", first_window, time.monotonic() - start, 1 if first else 2)
    assert flow(server)["windows_widened"] == 0  # the first window did it, not the tuner


def assert_round_trips(what: str, first_window: int, elapsed: float, round_trips: int) -> None:
    """A 1.5 MiB body across the slow link took ``round_trips`` (one: with a round trip's room
    for a busy machine; two: at least, whatever the machine)."""
    print(f"\n[long links] 1.5 MiB {what}, {2 * SLOW_ONE_WAY:.0f} s round trip, first window "
          f"{first_window // KiB} KiB: {elapsed:.2f} s")
    if round_trips == 1:
        assert elapsed < 3 * SLOW_ONE_WAY, elapsed
    else:
        assert elapsed >= 4 * SLOW_ONE_WAY, elapsed


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_slow_reader_keeps_its_window_and_memory_bounded(harness: Harness) -> None:
    """An HTTP client reading at 100 KiB/s: its window does not grow past the first, so neither
    srv nor cli holds much of the download, however fast the backend and the link could go."""
    server, token = tunnel_over_link(harness)
    (srv,) = [p for p in harness.processes if p.name == "srv"]
    (cli,) = [p for p in harness.processes if p.name == "cli"]
    peaks = {"srv": 0.0, "cli": 0.0}
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
        sock.sendall(f"GET /big?size={1024 * MiB} HTTP/1.1\r\nHost: t\r\nX-Token: {token}\r\n\r\n"
                     .encode())
        received = 0
        started = time.monotonic()
        while time.monotonic() - started < 4.0:  # bounded: 4 s at 100 KiB/s
            chunk = sock.recv(10 * KiB)
            assert chunk, "the download ended early"
            received += len(chunk)
            peaks = {"srv": max(peaks["srv"], rss_mib(srv.pid)),
                     "cli": max(peaks["cli"], rss_mib(cli.pid))}
            time.sleep(0.1)  # the pace of a slow client, not a wait for a condition
        slow = flow(server)
    print(f"\n[long links] slow reader: {received} bytes in 4 s, peak RSS {peaks} MiB, "
          f"stream window {slow['widest_stream_window']}, buffered {slow['buffered']}")
    assert received < 2 * MiB
    assert slow["widest_stream_window"] == INITIAL_STREAM_WINDOW and slow["windows_widened"] == 0
    assert slow["start_window"] == FIRST_WINDOW and slow["buffered"] <= FIRST_WINDOW
    assert peaks["srv"] < 80 and peaks["cli"] < 80, peaks


def test_a_reader_that_stops_after_its_window_grew_leaves_at_most_that_window(
        harness: Harness) -> None:
    """A fast HTTP client grows its stream's window to the cap, then stops reading: srv holds
    what the window let the cli send, and no more (the cap is what a stopped consumer costs).
    The cap is set below the shipped 32 MiB, which a loopback reader's round trips need not
    reach."""
    cap = 8 * MiB
    server, token = tunnel_over_link(harness, ("-max-stream-window", str(cap)))
    (srv,) = [p for p in harness.processes if p.name == "srv"]
    before = rss_mib(srv.pid)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
        sock.sendall(f"GET /big?size={2048 * MiB} HTTP/1.1\r\nHost: t\r\nX-Token: {token}\r\n\r\n"
                     .encode())
        received = 0
        deadline = time.monotonic() + 60
        # Read at full speed until srv has widened the stream to the cap (bounded by bytes and time).
        while flow(server)["widest_stream_window"] < cap:
            assert received < 1536 * MiB and time.monotonic() < deadline, flow(server)
            for _ in range(128):
                chunk = sock.recv(256 * KiB)
                assert chunk, "the download ended early"
                received += len(chunk)
        # Stopped: the cli sends what credit it has left, then waits. Watched for 3 s (30
        # samples): an upper bound, which more time could only break.
        wait_until(lambda: flow(server)["buffered"] >= cap // 2, timeout=30,
                   what="srv to hold what the stopped reader left")
        buffered, held = 0, 0.0
        for _ in range(30):
            buffered = max(buffered, flow(server)["buffered"])
            held = max(held, rss_mib(srv.pid) - before)
            time.sleep(0.1)
    print(f"\n[long links] stopped reader: read {received // MiB} MiB, then srv held at most "
          f"{buffered} bytes (stream window cap {cap}), RSS +{held:.1f} MiB")
    assert buffered <= cap
    assert held < cap / MiB + 8, held


def timed_get(server: Server, token: str) -> float:
    started = time.monotonic()
    response = httpx.get(f"{server.url}/echo", headers={"X-Token": token}, timeout=30)
    assert response.status_code == 200
    return time.monotonic() - started


@pytest.mark.parametrize("mb_per_s", [None, 20.0], ids=["fast-link", "20MBps-link"])
def test_a_small_request_is_not_queued_behind_a_bulk_transfer(harness: Harness,
                                                              mb_per_s: float | None) -> None:
    """While a download runs and its window has grown, a small request answers in about a round
    trip plus its idle latency. On a link slower than the daemons (20 MB/s) the download backs
    its sender up; its frames then wait in the sender (the outbox's high-water mark, the
    socket's TCP_NOTSENT_LOWAT), not in line ahead of the small response: the kernel's send
    buffer alone could hold 4 MiB (0.2 s at that rate), a grown window 16 MiB. Without those
    two, the small request took 0.59 s here against a bound of 0.45 s."""
    server, token = tunnel_over_link(harness, mb_per_s=mb_per_s)
    idle = statistics.median(timed_get(server, token) for _ in range(5))
    done = threading.Event()

    def bulk() -> None:
        with httpx.stream("GET", f"{server.url}/big?size={4096 * MiB}", headers={"X-Token": token},
                          timeout=120) as response:
            for _chunk in response.iter_raw():
                if done.is_set():
                    return

    worker = threading.Thread(target=bulk, daemon=True)
    worker.start()
    try:
        wait_until(lambda: flow(server)["widest_stream_window"] >= 4 * INITIAL_STREAM_WINDOW,
                   timeout=30, what="the bulk transfer's window to grow")
        busy = statistics.median(timed_get(server, token) for _ in range(5))
    finally:
        done.set()
        worker.join(30)
    print(f"\n[long links] small request ({mb_per_s or 'unbounded'} MB/s link): idle "
          f"{idle:.3f} s, during a bulk transfer {busy:.3f} s")
    assert busy < idle + 3 * ROUND_TRIP + 0.2, (idle, busy)


def test_two_downloads_share_the_link(harness: Harness) -> None:
    server, token = tunnel_over_link(harness)
    download_sha256(server, token, 16 * MiB)  # the tunnel learns its windows first
    counts = [0, 0]
    first_done = threading.Event()

    def download(index: int) -> None:
        with httpx.stream("GET", f"{server.url}/big?size={96 * MiB}", headers={"X-Token": token},
                          timeout=120) as response:
            for chunk in response.iter_raw():
                counts[index] += len(chunk)
                if first_done.is_set():
                    return
        first_done.set()

    workers = [threading.Thread(target=download, args=(i,), daemon=True) for i in (0, 1)]
    for worker in workers:
        worker.start()
    assert first_done.wait(120), "neither download finished"
    shares = [count / sum(counts) for count in counts]
    for worker in workers:
        worker.join(30)
    print(f"\n[long links] two downloads: shares {[round(x, 3) for x in shares]}")
    assert min(shares) >= 0.4, shares


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_512_mib_down_and_256_mib_up_with_the_shipped_defaults(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    client = harness.client(server, token)
    down, up = 512 * MiB, 256 * MiB
    assert download_sha256(server, token, down) == big_body_sha256(down)
    assert upload_sha256(server, token, up) == big_body_sha256(up)
    peaks = {"srv": peak_rss_mib(server.process.pid), "cli": peak_rss_mib(client.process.pid)}
    print(f"\n[long links] 512 MiB down, 256 MiB up, shipped defaults: peak RSS {peaks} MiB")
    assert peaks["srv"] < 80 and peaks["cli"] < 80, peaks


@pytest.fixture
def fixed_windows_tree(tmp_path: Path) -> Iterator[Path]:
    tree = older_version(tmp_path / "older")
    if tree is None:
        pytest.skip("this checkout has no git history: no peer from before windows grew "
                    "(a clone with history has it)")
    yield tree


@pytest.mark.parametrize("older", ["client", "server"])
def test_a_peer_from_before_windows_grew(harness: Harness, fixed_windows_tree: Path,
                                        older: str) -> None:
    """The wire did not change: a new end widens what it receives, an old one never does, and
    transfers both ways go through either pairing."""
    trees = {"client_tree": fixed_windows_tree} if older == "client" else {
        "server_tree": fixed_windows_tree}
    server, token = tunnel_over_link(harness, **trees)
    size = 16 * MiB
    assert download_sha256(server, token, size) == big_body_sha256(size)
    assert upload_sha256(server, token, size) == big_body_sha256(size)
    if older == "client":  # our server widened what the old client may send it
        assert flow(server)["windows_widened"] > 0
        # The old client offered no first window for request bodies: the protocol's holds.
        assert flow(server)["request_window"] == INITIAL_STREAM_WINDOW
    else:  # the old server has no flow figures; our client widened what it receives
        assert client_windows(harness), "the new client never widened its window"
        # Our offer went unanswered: the client keeps the protocol's first window, as the
        # old server does (else the server's DATA would be refused as beyond a window).
        assert agreed_request_windows(harness) == [INITIAL_STREAM_WINDOW]
