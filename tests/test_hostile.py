"""Hostile input against a real ``wstunnel srv``: each attack gets its refusal, and the daemon
goes on serving a good tunnel the whole time."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest
import trio
import trio_websocket

from tests.support.harness import Harness, Server, raw_exchange, wait_until


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


@pytest.fixture
def guarded(harness: Harness) -> tuple[Server, str]:
    server = harness.server("-header-timeout", "2", "-failure-limit", "0")
    token = harness.new_token()
    harness.client(server, token)
    return server, token


def _still_serving(server: Server, token: str) -> None:
    assert server.get("/still-here", token).status_code == 200


@pytest.mark.parametrize(
    ("name", "data", "status"),
    [
        ("10,000 headers", b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 10_000 + b"\r\n", 431),
        ("64 KiB header", b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n", 431),
        ("smuggling: Content-Length and Transfer-Encoding",
         b"POST / HTTP/1.1\r\nHost: x\r\nX-Token: abcdefghijklmnopq\r\nContent-Length: 4\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /_status HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ("two Content-Lengths",
         b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde", 400),
        ("bad chunked coding",
         b"POST / HTTP/1.1\r\nHost: x\r\nX-Token: abcdefghijklmnopq\r\nTransfer-Encoding: chunked\r\n"
         b"\r\nzz\r\nhello\r\n0\r\n\r\n", 400),
        ("obsolete line folding", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n", 400),
        ("NUL in the target", b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ("garbage instead of a handshake", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 50, 400),
        ("tunnel handshake without WebSocket headers",
         b"GET /_tunnel HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         b"Origin: abcdefghijklmnopqrstuvwxyz\r\n\r\n", 400),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_malformed_requests_are_refused(guarded: tuple[Server, str], name: str, data: bytes,
                                        status: int) -> None:
    server, token = guarded
    assert _status(raw_exchange(server.port, data)) == status, name
    _still_serving(server, token)


def test_slowloris_on_the_head_and_on_the_body(guarded: tuple[Server, str]) -> None:
    server, token = guarded
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as head, \
            socket.create_connection(("127.0.0.1", server.port), timeout=15) as body:
        head.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        body.sendall(f"POST /echo HTTP/1.1\r\nHost: x\r\nX-Token: {token}\r\n"
                     "Content-Length: 100\r\n\r\nonly a little".encode())
        for sock in (head, body):
            # Trickle a byte now and then: it must not keep the connection alive forever.
            deadline = time.monotonic() + 10
            reply = b""
            while not reply and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    sock.sendall(b"a")
                sock.settimeout(0.5)
                try:
                    reply = sock.recv(65536)
                except TimeoutError:
                    continue
            assert _status(reply) == 408
    assert time.monotonic() - started < 12
    _still_serving(server, token)


def test_many_idle_connections_do_not_block_service(guarded: tuple[Server, str]) -> None:
    server, token = guarded
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(200)]
    try:
        _still_serving(server, token)
    finally:
        for sock in idle:
            sock.close()


async def test_tunnel_peer_attacks_lose_only_their_own_tunnel(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token)
    url = f"ws://127.0.0.1:{server.port}/_tunnel"

    async def attacker(name: str) -> str:
        bad = harness.new_token(f"bad-{name}-")
        async with trio_websocket.open_websocket_url(
            url, extra_headers=[("Origin", bad)], message_queue_size=0
        ) as ws:
            if name == "ping flood":
                with trio.fail_after(30):
                    for _ in range(2000):
                        await ws.ping()
                return "survived"
            with trio.fail_after(20):
                try:
                    if name == "duplicate response":
                        message = b"0001HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                        await ws.send_message(message)
                    elif name == "text message":
                        await ws.send_message("0001HTTP/1.1 200 OK\r\n\r\n")
                    elif name == "oversized message":
                        await ws.send_message(b"0001" + b"x" * (101 * 1024 * 1024))
                    while True:
                        await ws.get_message()
                except trio_websocket.ConnectionClosed as closed:
                    return f"closed {closed.reason.code}"

    results = {}
    for name in ("ping flood", "duplicate response", "text message", "oversized message"):
        results[name] = await attacker(name)
        status = await trio.to_thread.run_sync(lambda: server.get("/still-here", token).status_code)
        assert status == 200, name
    assert results["ping flood"] == "survived"
    assert results["duplicate response"] == "closed 1002"  # an id nobody asked for
    assert results["text message"] == "closed 1003"
    assert results["oversized message"] in ("closed 1009", "closed 1006")
    wait_until(lambda: server.clients(token) == 1, what="the good tunnel to be untouched")
