"""Protocol v2 end to end: negotiation, streamed responses, backpressure and cancellation.

Real ``wstunnel srv`` and ``wstunnel cli`` processes; the backend for the streaming cases runs in
this process (a thread), so the test can read the exact moment the backend wrote an event, and see
its connection being closed by the tunnel client.
"""

from __future__ import annotations

import hashlib
import random
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import trio

from tests.harness import Harness, Server, free_port, wait_until
from tests.test_wire_compat import (
    answer_forever,
    exchange,
    raw_client,
    raw_v1_server,
    start_client,
    start_server,
    wait_clients,
)
from wstunnel.framing_v2 import SUBPROTOCOL

MiB = 1024 * 1024
BLOCK = random.Random(5).randbytes(64 * 1024)  # the /big body repeats it


def big_body_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for start in range(0, size, len(BLOCK)):
        digest.update(BLOCK[: min(len(BLOCK), size - start)])
    return digest.hexdigest()


class StreamingBackend:
    """A backend that writes progressively and notices when its client goes away."""

    def __init__(self) -> None:
        self.event_writes: list[float] = []  # monotonic time each SSE event was written
        self.closed_early = threading.Event()  # a /big client hung up mid-body
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: with Nagle on, the second waits ~40 ms for
            # the client's delayed ACK, which would swamp the latencies measured here.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                try:
                    if url.path == "/sse":
                        self._sse(int(query.get("n", "5")), float(query.get("gap", "0.2")))
                    elif url.path == "/big":
                        self._big(int(query["size"]))
                    elif url.path == "/die":
                        self._die(int(query["size"]), chunked="chunked" in query)
                    else:
                        self._small()
                except (BrokenPipeError, ConnectionResetError):
                    if url.path == "/big":
                        backend.closed_early.set()
                    self.close_connection = True

            def _small(self) -> None:
                body = b"small\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _sse(self, count: int, gap: float) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
                for index in range(count):
                    if index:
                        time.sleep(gap)  # the backend's pace, not a synchronisation
                    event = b"data: event %d\n\n" % index
                    backend.event_writes.append(time.monotonic())
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            def _big(self, size: int) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                sent = 0
                while sent < size:
                    part = BLOCK[: min(len(BLOCK), size - sent)]
                    self.wfile.write(part)
                    sent += len(part)

            def _die(self, size: int, *, chunked: bool) -> None:
                """Promise ``size`` bytes, send a third of them, then drop the connection."""
                self.send_response(200)
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(size))
                self.end_headers()
                part = BLOCK[: size // 3]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def streaming_backend() -> Iterator[StreamingBackend]:
    backend = StreamingBackend()
    backend.thread.start()
    try:
        yield backend
    finally:
        backend.server.shutdown()
        backend.server.server_close()


def tunnel_to(harness: Harness, backend: StreamingBackend) -> tuple[Server, str, int]:
    server = harness.server()
    token = harness.new_token()
    # The cli still caps response bodies (100 MiB by default); these downloads go beyond.
    client = harness.client(server, token, "-max-body-size", str(4096 * MiB), backend=backend.url)
    return server, token, client.process.pid


def protocols(server: Server, token: str) -> list[str]:
    for tunnel in server.status()["tunnels"]:
        if tunnel["token"] == token[:8] + "...":
            return sorted(client["protocol"] for client in tunnel["clients"])
    return []


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for {pid}")


# -- negotiation ----------------------------------------------------------------------------------


async def test_our_cli_speaks_v2_and_a_raw_v1_client_v1_on_one_token(harness: Harness) -> None:
    server = await start_server(harness)
    token = harness.new_token()
    with trio.fail_after(60):
        await trio.to_thread.run_sync(lambda: harness.client(server, token))
        async with raw_client(server, token) as ws, trio.open_nursery() as nursery:
            assert ws.subprotocol is None  # nothing offered, nothing picked
            seen: list[tuple[str, int]] = []
            nursery.start_soon(answer_forever, ws, "raw-v1", seen)
            await wait_clients(server, token, 2)
            assert await trio.to_thread.run_sync(protocols, server, token) == ["v1", "v2"]
            clients = (await trio.to_thread.run_sync(server.status))["tunnels"][0]["clients"]
            assert {c["transport"] for c in clients} == {"websocket"}
            # Both connections pull from the token's one queue: each gets some of the requests.
            bodies = set()
            async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
                for _ in range(20):
                    response = await http.get(f"{server.url}/page", headers={"X-Token": token})
                    assert response.status_code == 200
                    bodies.add(response.text)
                    if len(bodies) == 2:
                        break
            assert bodies == {"raw-v1", "backend page /page\n"}
            nursery.cancel_scope.cancel()


async def test_our_cli_falls_back_to_v1_with_a_raw_v1_server(harness: Harness) -> None:
    token = harness.new_token()
    with trio.fail_after(45):
        async with raw_v1_server() as raw:
            await start_client(harness, raw, token)
            handshake, ws = await raw.next_tunnel()
            assert handshake.subprotocols == (SUBPROTOCOL,)  # offered; the raw server ignores it
            assert ws.subprotocol is None
            response = await exchange(ws, 7, b"GET /bytes?size=3000 HTTP/1.1\r\nHost: h\r\n\r\n")
            assert response.status == 200
            assert response.body == bytes(i % 251 for i in range(3000))


# -- streamed responses ---------------------------------------------------------------------------


def test_large_download_streams_with_bounded_memory(
    harness: Harness, streaming_backend: StreamingBackend
) -> None:
    server, token, cli_pid = tunnel_to(harness, streaming_backend)
    assert protocols(server, token) == ["v2"]
    size = 50 * MiB
    pids = {"srv": server.process.pid, "cli": cli_pid}
    before = {name: rss_mib(pid) for name, pid in pids.items()}
    peak = dict(before)
    digest = hashlib.sha256()
    received = 0
    started = time.monotonic()
    with httpx.stream("GET", f"{server.url}/big?size={size}", headers={"X-Token": token},
                      timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == str(size)
        for chunk in response.iter_raw():
            digest.update(chunk)
            received += len(chunk)
            if received % (2 * MiB) < len(chunk):  # sample every ~2 MiB
                for name, pid in pids.items():
                    peak[name] = max(peak[name], rss_mib(pid))
    elapsed = time.monotonic() - started
    print(f"\n50 MiB via v2 in {elapsed:.2f}s ({size / MiB / elapsed:.0f} MiB/s); RSS MiB "
          f"srv {before['srv']:.0f} -> peak {peak['srv']:.0f}, cli {before['cli']:.0f} -> peak "
          f"{peak['cli']:.0f} (v1 would hold the 50 MiB body whole at each end)")
    assert received == size
    assert digest.hexdigest() == big_body_sha256(size)
    assert peak["srv"] < 80 and peak["cli"] < 80
    assert peak["srv"] - before["srv"] < 25 and peak["cli"] - before["cli"] < 25


def test_server_sent_events_arrive_one_by_one(
    harness: Harness, streaming_backend: StreamingBackend
) -> None:
    server, token, _ = tunnel_to(harness, streaming_backend)
    count = 6
    latencies: list[float] = []
    buffer = b""
    with httpx.stream("GET", f"{server.url}/sse?n={count}&gap=0.2", headers={"X-Token": token},
                      timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        for chunk in response.iter_raw():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                index = len(latencies)
                assert event == b"data: event %d" % index
                # It came through on its own, before the backend wrote the next one.
                assert len(streaming_backend.event_writes) == index + 1
                latencies.append(time.monotonic() - streaming_backend.event_writes[index])
    print(f"\nSSE event latencies (ms): {[round(x * 1000, 1) for x in latencies]}")
    assert len(latencies) == count
    assert max(latencies) < 0.15


def test_http_client_hanging_up_cancels_the_backend_request(
    harness: Harness, streaming_backend: StreamingBackend
) -> None:
    server, token, _ = tunnel_to(harness, streaming_backend)
    with httpx.stream("GET", f"{server.url}/big?size={1024 * MiB}", headers={"X-Token": token},
                      timeout=30) as response:
        received = 0
        for chunk in response.iter_raw():
            received += len(chunk)
            if received >= 2 * MiB:
                break
    assert received >= 2 * MiB
    hung_up = time.monotonic()
    assert streaming_backend.closed_early.wait(10), "the backend connection was never closed"
    print(f"\nbackend saw the hang-up {time.monotonic() - hung_up:.2f}s after the HTTP client")
    # The tunnel is fine afterwards.
    assert server.get("/small", token).text == "small\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_backend_dying_mid_body_aborts_the_response(
    harness: Harness, streaming_backend: StreamingBackend, framing: str
) -> None:
    server, token, _ = tunnel_to(harness, streaming_backend)
    query = "size=3000000" + ("&chunked=1" if framing == "chunked" else "")
    received = 0
    url = f"{server.url}/die?{query}"
    # Never a clean, truncated 200: the HTTP client must see the body break.
    with pytest.raises(httpx.HTTPError), \
            httpx.stream("GET", url, headers={"X-Token": token}, timeout=30) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += len(chunk)
    assert 0 < received < 3000000
    assert server.get("/small", token).text == "small\n"


def test_small_requests_keep_flowing_during_a_large_download(
    harness: Harness, streaming_backend: StreamingBackend
) -> None:
    server, token, _ = tunnel_to(harness, streaming_backend)
    headers = {"X-Token": token}

    def latencies(http: httpx.Client, count: int = 20) -> list[float]:
        figures = []
        for _ in range(count):
            started = time.monotonic()
            assert http.get(f"{server.url}/small", headers=headers).text == "small\n"
            figures.append(time.monotonic() - started)
        return figures

    with httpx.Client(timeout=30) as http:
        idle = statistics.median(latencies(http))
        progress = {"bytes": 0}
        stop = threading.Event()

        def download() -> None:
            with httpx.stream("GET", f"{server.url}/big?size={2048 * MiB}", headers=headers,
                              timeout=30) as response:
                for chunk in response.iter_raw():
                    progress["bytes"] += len(chunk)
                    if stop.is_set():
                        return

        downloader = threading.Thread(target=download, daemon=True)
        downloader.start()
        try:
            wait_until(lambda: progress["bytes"] > 8 * MiB, what="the download to get going")
            before = progress["bytes"]
            busy = statistics.median(latencies(http))
            moved = progress["bytes"] - before
        finally:
            stop.set()
            downloader.join(30)
    print(f"\nsmall GET median: idle {idle * 1000:.1f} ms, during download {busy * 1000:.1f} ms "
          f"({busy / idle:.1f}x); {moved / MiB:.0f} MiB downloaded meanwhile")
    assert moved > 0, "the download stalled while small requests ran"
    assert busy < 10 * idle


def test_request_bodies_heads_and_refusals_over_v2(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token)
    assert protocols(server, token) == ["v2"]
    # A body of several DATA frames and more than one stream window (256 KiB).
    body = bytes(range(256)) * 4096  # 1 MiB
    response = server.get("/echo/up", token, method="POST", content=body)
    assert response.status_code == 200
    assert response.json()["body"].encode("latin-1") == body
    assert server.get("/bytes?size=5", token, method="HEAD").headers["content-length"] == "5"
    assert server.get("/status/204", token).status_code == 204
    assert server.get("/chunked", token).content == b"hello chunked world\n"
    # Answered by the tunnel client itself, before any backend head: a whole response.
    refused = server.get("/x", token, headers={"X-Host": "http://elsewhere.example"})
    assert refused.status_code == 403
    client = server.status()["tunnels"][0]["clients"][0]
    assert client["answered"] == 5 and client["in_flight"] == 0


def test_unreachable_backend_is_502_over_v2(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token, backend=f"http://127.0.0.1:{free_port()}")
    response = server.get("/anything", token)
    assert response.status_code == 502
    assert "Backend unreachable" in response.text
