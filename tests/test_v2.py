"""Protocol v2 end to end: negotiation, streamed responses, backpressure and cancellation.

Real ``wstunnel srv`` and ``wstunnel cli`` processes; the backend for the streaming cases runs in
this process (a thread), so the test can read the exact moment the backend wrote an event, and see
its connection being closed by the tunnel client.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import h11
import httpx
import pytest
import trio
import trio_websocket

from tests.support.backend_app import body_pieces
from tests.support.harness import Harness, Server, free_port, wait_until
from tests.support.wire import (
    answer_forever,
    call,
    exchange,
    raw_client,
    raw_v1_server,
    start_client,
    start_server,
    wait_clients,
)
from wstunnel import v2
from wstunnel.v2 import BATCH_SUBPROTOCOL, SUBPROTOCOL

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
        self.upload_bytes = 0  # body bytes /sink has read so far
        self.upload_chunks: list[bytes] = []  # the first few chunks /sink read
        self.upload_cut = threading.Event()  # a /sink body ended before it was whole
        self.uploads_done = 0
        self.holding = 0  # /hold requests being held
        self.max_holding = 0
        self.release = threading.Event()  # lets every /hold request answer
        self.lock = threading.Lock()
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
                    elif url.path == "/trailers":
                        self._trailers()
                    else:
                        self._small()
                except (BrokenPipeError, ConnectionResetError):
                    if url.path == "/big":
                        backend.closed_early.set()
                    self.close_connection = True

            def do_POST(self) -> None:
                url = urlsplit(self.path)
                try:
                    if url.path == "/reject":
                        self._reject()
                    elif url.path == "/hold":
                        self._hold()
                    else:
                        self._sink()
                except (BrokenPipeError, ConnectionResetError):
                    backend.upload_cut.set()
                    self.close_connection = True

            do_PUT = do_POST

            def _sink(self) -> None:
                digest = hashlib.sha256()
                size = 0
                try:
                    for chunk in body_pieces(self):
                        digest.update(chunk)
                        size += len(chunk)
                        backend.upload_bytes = size
                        if len(backend.upload_chunks) < 8:
                            backend.upload_chunks.append(chunk)
                except EOFError:
                    backend.upload_cut.set()
                    self.close_connection = True
                    return
                backend.uploads_done += 1
                body = json.dumps({"size": size, "sha256": digest.hexdigest()}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _reject(self) -> None:
                """Refuse at once, without reading the body, and hang up (as servers do)."""
                body = b"too large\n"
                self.send_response(413)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True

            def _hold(self) -> None:
                with backend.lock:
                    backend.holding += 1
                    backend.max_holding = max(backend.max_holding, backend.holding)
                try:
                    backend.release.wait(30)
                    self._small()
                finally:
                    with backend.lock:
                        backend.holding -= 1

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

            def _trailers(self) -> None:
                """A chunked body with trailer fields, one of which may not be a trailer."""
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Trailer", "X-Checksum, Server-Timing")
                self.end_headers()
                for part in (b"first,", b"second"):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.write(b"0\r\nX-Checksum: sha256=abc\r\nServer-Timing: db;dur=53\r\n"
                                 b"Content-Length: 999\r\n\r\n")

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
    # Streamed bodies have no size limit by default (max_stream_size 0).
    server = harness.server()
    token = harness.new_token()
    client = harness.client(server, token, backend=backend.url)
    return server, token, client.process.pid


def protocols(server: Server, token: str) -> list[str]:
    for tunnel in server.status()["tunnels"]:
        if tunnel["token"] == token[:8] + "...":
            return sorted(client["protocol"] for client in tunnel["clients"])
    return []


def proc_status_mib(pid: int, field: str) -> float:
    """A memory figure of /proc/PID/status (VmRSS, VmHWM, ...), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no {field} for {pid}")


def rss_mib(pid: int) -> float:
    return proc_status_mib(pid, "VmRSS")


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


@pytest.mark.parametrize("offer", [(SUBPROTOCOL,), (BATCH_SUBPROTOCOL, SUBPROTOCOL)],
                         ids=["plain", "batched"])
async def test_a_raw_v2_client_gets_the_message_layout_it_offers(
    harness: Harness, offer: tuple[str, ...]
) -> None:
    """A client of the first v2 (one frame a message) keeps working; one that offers batching
    gets it: the server's frames come in batches, and a batch of ours is taken whole."""
    server = await start_server(harness)
    token = harness.new_token()
    batched = offer[0] == BATCH_SUBPROTOCOL
    with trio.fail_after(60):
        async with trio_websocket.open_websocket_url(
            f"{server.ws_url}/_tunnel", extra_headers=[(b"Origin", token.encode())],
            subprotocols=list(offer), connect_timeout=10, disconnect_timeout=5,
        ) as ws, trio.open_nursery() as nursery:
            assert ws.subprotocol == offer[0]
            await wait_clients(server, token, 1)
            reply = call(nursery, "GET", f"{server.url}/hello", headers={"X-Token": token})
            message = await ws.get_message()
            assert isinstance(message, bytes)
            frames = v2.unpack_batch(message) if batched else [message]
            conn = v2.V2Connection("client")
            events = [event for frame in frames for event in conn.receive(frame)]
            request = events[0]
            assert isinstance(request, v2.RequestReceived)
            assert (request.method, request.target) == (b"GET", b"/hello")
            answer = [conn.send_response(request.stream, 200, b"OK", [(b"Content-Length", b"3")])]
            answer += conn.data_frames(request.stream, b"hi\n", end_stream=True)[0]
            encoded = [v2.encode_frame(frame) for frame in answer]
            if batched:
                await ws.send_message(v2.pack_batch(encoded))
            else:
                for frame_message in encoded:
                    await ws.send_message(frame_message)
            response = await reply.result()
            assert (response.status_code, response.text) == (200, "hi\n")


async def test_our_cli_falls_back_to_v1_with_a_raw_v1_server(harness: Harness) -> None:
    token = harness.new_token()
    with trio.fail_after(45):
        async with raw_v1_server() as raw:
            await start_client(harness, raw, token)
            handshake, ws = await raw.next_tunnel()
            # Offered, batched first; the raw server ignores both.
            assert handshake.subprotocols == (BATCH_SUBPROTOCOL, SUBPROTOCOL)
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


# -- streamed uploads -----------------------------------------------------------------------------


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory since it started (VmHWM)."""
    return proc_status_mib(pid, "VmHWM")


def upload_body(size: int) -> Iterator[bytes]:
    for start in range(0, size, len(BLOCK)):
        yield BLOCK[: min(len(BLOCK), size - start)]


def http_connection(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=20)


def read_response(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """Status, head and body of one Content-Length response read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of a response body"
        body += chunk
    return int(head.split(b" ")[1]), head, body


def upload_head(path: str, token: str, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: example", f"X-Token: {token}", *extra, "", ""]
    return "\r\n".join(lines).encode()


def test_large_upload_streams_with_bounded_memory(
    harness: Harness, streaming_backend: StreamingBackend
) -> None:
    server, token, cli_pid = tunnel_to(harness, streaming_backend)
    size = 200 * MiB
    started = time.monotonic()
    response = httpx.post(f"{server.url}/sink", headers={"X-Token": token, "Content-Length": str(size)},
                          content=upload_body(size), timeout=60)
    elapsed = time.monotonic() - started
    peak = {"srv": peak_rss_mib(server.process.pid), "cli": peak_rss_mib(cli_pid)}
    print(f"\n200 MiB upload via v2 in {elapsed:.2f}s ({size / MiB / elapsed:.0f} MiB/s); peak RSS "
          f"(VmHWM) srv {peak['srv']:.0f} MiB, cli {peak['cli']:.0f} MiB")
    assert response.status_code == 200, response.text
    assert response.json() == {"size": size, "sha256": big_body_sha256(size)}
    assert peak["srv"] < 90 and peak["cli"] < 90


def test_chunked_upload_reaches_the_backend_as_it_arrives(
    harness: Harness, streaming_backend: StreamingBackend
) -> None:
    server, token, _ = tunnel_to(harness, streaming_backend)
    with http_connection(server) as sock:
        sock.sendall(upload_head("/sink", token, "Transfer-Encoding: chunked") + b"5\r\nfirst\r\n")
        # The backend has the first chunk while the rest is still with the HTTP client.
        wait_until(lambda: streaming_backend.upload_bytes == 5, what="the first chunk at the backend")
        assert streaming_backend.upload_chunks == [b"first"]
        sock.sendall(b"4\r\nrest\r\n0\r\n\r\n")
        status, _, body = read_response(sock)
    assert status == 200
    assert json.loads(body) == {"size": 9, "sha256": hashlib.sha256(b"firstrest").hexdigest()}


def test_expect_100_continue_on_a_streamed_upload(
    harness: Harness, streaming_backend: StreamingBackend
) -> None:
    server, token, _ = tunnel_to(harness, streaming_backend)
    body = BLOCK * 4  # 256 KiB: above the read-whole size, so streamed
    with http_connection(server) as sock:
        sock.sendall(upload_head("/sink", token, f"Content-Length: {len(body)}",
                                 "Expect: 100-continue"))
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        sock.sendall(body)
        status, _, answer = read_response(sock)
    assert status == 200
    assert json.loads(answer)["sha256"] == hashlib.sha256(body).hexdigest()


def test_backend_answering_before_the_upload_ends_closes_the_connection(
    harness: Harness, streaming_backend: StreamingBackend
) -> None:
    server, token, _ = tunnel_to(harness, streaming_backend)
    with http_connection(server) as sock:
        sock.sendall(upload_head("/reject", token, f"Content-Length: {64 * MiB}") + BLOCK * 16)
        status, head, body = read_response(sock)
        assert (status, body) == (413, b"too large\n")
        assert b"connection: close" in head.lower()
        # The rest of the body is not waited for: the server ends the connection.
        sock.settimeout(15)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(65536):
                pass
    assert server.get("/small", token).text == "small\n"


def test_http_client_hanging_up_mid_upload_cancels_the_backend_request(
    harness: Harness, streaming_backend: StreamingBackend
) -> None:
    server, token, _ = tunnel_to(harness, streaming_backend)
    with http_connection(server) as sock:
        sock.sendall(upload_head("/sink", token, f"Content-Length: {64 * MiB}") + BLOCK * 16)
        wait_until(lambda: streaming_backend.upload_bytes >= 512 * 1024, what="upload under way")
    assert streaming_backend.upload_cut.wait(10), "the backend request was never cancelled"
    assert server.get("/small", token).text == "small\n"


def test_stalled_upload_is_408_and_a_moving_one_outlives_httptimeout(
    harness: Harness, streaming_backend: StreamingBackend
) -> None:
    server = harness.server("-header-timeout", "1", "-httptimeout", "2")
    token = harness.new_token()
    harness.client(server, token, backend=streaming_backend.url)
    with http_connection(server) as sock:
        sock.sendall(upload_head("/sink", token, f"Content-Length: {4 * MiB}") + BLOCK)
        status, _, body = read_response(sock)  # nothing more is sent: it stalls
    assert status == 408, body
    assert streaming_backend.upload_cut.wait(10), "the backend still waits for the stalled body"
    # 3 s of steady progress, longer than httptimeout, with no gap of header_timeout.
    parts = 15
    with http_connection(server) as sock:
        sock.sendall(upload_head("/sink", token, f"Content-Length: {parts * len(BLOCK)}"))
        for _ in range(parts):
            sock.sendall(BLOCK)
            time.sleep(0.2)  # the HTTP client's pace, not a synchronisation
        status, _, body = read_response(sock)
    assert status == 200, body
    assert json.loads(body)["size"] == parts * len(BLOCK)


def test_upload_cut_by_a_lost_tunnel_is_502_not_replayed(
    harness: Harness, streaming_backend: StreamingBackend
) -> None:
    server, token, cli_pid = tunnel_to(harness, streaming_backend)
    with http_connection(server) as sock:
        # PUT is idempotent, but half its body is gone with the tunnel: it cannot be sent again.
        head = upload_head("/sink", token, f"Content-Length: {64 * MiB}").replace(b"POST", b"PUT", 1)
        sock.sendall(head + BLOCK * 16)
        wait_until(lambda: streaming_backend.upload_bytes >= 512 * 1024, what="upload under way")
        os.kill(cli_pid, signal.SIGKILL)
        status, _, body = read_response(sock)
    assert status == 502, body
    assert streaming_backend.uploads_done == 0


def test_upload_waits_in_the_queue_without_being_read_until_a_tunnel_comes(
    harness: Harness, streaming_backend: StreamingBackend
) -> None:
    server = harness.server()
    token = harness.new_token()
    client = harness.client(server, token, backend=streaming_backend.url)
    client.process.stop()
    server.wait_clients(token, 0)
    size = 64 * MiB
    result: dict[str, httpx.Response] = {}

    def upload() -> None:
        result["response"] = httpx.post(
            f"{server.url}/sink", headers={"X-Token": token, "Content-Length": str(size)},
            content=upload_body(size), timeout=60,
        )

    uploader = threading.Thread(target=upload, daemon=True)
    uploader.start()
    try:
        wait_until(lambda: server.status()["tunnels"][0]["pending"] == 1, what="the queued upload")
        queued_peak = peak_rss_mib(server.process.pid)
        harness.client(server, token, backend=streaming_backend.url)
    finally:
        uploader.join(60)
    assert result["response"].status_code == 200
    assert result["response"].json() == {"size": size, "sha256": big_body_sha256(size)}
    assert queued_peak < 90
    assert peak_rss_mib(server.process.pid) < 90


def test_streams_per_tunnel_are_capped_and_the_rest_wait(
    harness: Harness, streaming_backend: StreamingBackend
) -> None:
    server = harness.server("-max-streams-per-tunnel", "2")
    token = harness.new_token()
    harness.client(server, token, backend=streaming_backend.url)
    statuses: list[int] = []

    def hold() -> None:
        statuses.append(server.get("/hold", token, method="POST").status_code)

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: server.status()["tunnels"][0]["pending"] == 4, what="4 requests in")
        wait_until(lambda: streaming_backend.holding == 2, what="2 requests at the backend")
        assert server.status()["tunnels"][0]["clients"][0]["in_flight"] == 2
    finally:
        streaming_backend.release.set()
        for thread in threads:
            thread.join(30)
    assert statuses == [200] * 4
    assert streaming_backend.max_holding == 2


def test_chunked_upload_over_max_stream_size_is_413(
    harness: Harness, streaming_backend: StreamingBackend
) -> None:
    server = harness.server("-max-stream-size", str(MiB))
    token = harness.new_token()
    harness.client(server, token, backend=streaming_backend.url)
    # No Content-Length to refuse up front: the cap is met as the body streams.
    response = httpx.post(f"{server.url}/sink", headers={"X-Token": token},
                          content=upload_body(2 * MiB), timeout=30)
    assert response.status_code == 413
    assert response.headers["connection"] == "close"
    assert streaming_backend.upload_cut.wait(10), "the backend took a body over the cap as whole"
    assert streaming_backend.uploads_done == 0
    assert server.get("/small", token).text == "small\n"


def test_response_trailers_reach_the_http_client(harness: Harness,
                                                 streaming_backend: StreamingBackend) -> None:
    """A chunked backend response's trailers travel in the END frame and go out after the last
    chunk; fields that frame the message (Content-Length here) are not passed on."""
    server, token, _ = tunnel_to(harness, streaming_backend)
    client = h11.Connection(h11.CLIENT)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(client.send(h11.Request(method="GET", target="/trailers", headers=[
            ("Host", "tunnel"), ("X-Token", token), ("TE", "trailers")])))
        body, trailers, status = b"", [], 0
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                trailers = [(bytes(k), bytes(v)) for k, v in event.headers.raw_items()]
                break
    assert status == 200 and body == b"first,second"
    assert [(k.lower(), v) for k, v in trailers] == [
        (b"x-checksum", b"sha256=abc"), (b"server-timing", b"db;dur=53")]
