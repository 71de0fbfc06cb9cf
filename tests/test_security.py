"""End to end: tunnel passwords, the brake on token guessing, queue byte limits, and a whole
session searched for the whole token everywhere a user or an attacker could look."""

from __future__ import annotations

import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.support.harness import Harness, wait_until


def _passwords_file(harness: Harness, text: str) -> Path:
    path = harness.directory / "srv.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_tunnel_password_required_when_set(harness: Harness) -> None:
    token, open_token = harness.new_token(), harness.new_token()
    config = _passwords_file(harness, f'passwords = "{token}:hunter2-but-longer"\n')
    server = harness.server("-config", str(config))
    wrong = harness.client(server, token, "-password", "nope", wait=False)
    missing = harness.client(server, token, wait=False)
    for client in (wrong, missing):
        wait_until(lambda c=client: "HTTP 401" in c.process.output(), what="a 401 for the client")
    assert server.clients(token) == 0
    harness.client(server, token, "-password", "hunter2-but-longer")
    assert server.get("/x", token).status_code == 200
    harness.client(server, open_token)  # no password configured for it: none needed
    assert server.get("/x", open_token).status_code == 200
    for client in (wrong, missing):
        assert "hunter2" not in client.process.output()
    assert "hunter2" not in server.process.output()


def test_guessing_tokens_is_braked_per_address(harness: Harness) -> None:
    server = harness.server("-failure-limit", "5", "-failure-window", "60",
                            "-trusted-proxies", "127.0.0.1")
    token = harness.new_token()
    harness.client(server, token)
    guesser = {"X-Forwarded-For": "10.6.6.6"}
    for guess in range(5):
        response = server.get("/x", f"guess-{guess:02d}-abcdefghijkl", headers=dict(guesser))
        assert response.status_code == 404
    braked = server.get("/x", "guess-99-abcdefghijkl", headers=dict(guesser))
    assert braked.status_code == 429
    assert 1 <= int(braked.headers["retry-after"]) <= 60
    # Even the right token: answering it would say which guess was right.
    assert server.get("/x", token, headers=dict(guesser)).status_code == 429
    # Everyone else is served.
    assert server.get("/x", token, headers={"X-Forwarded-For": "10.7.7.7"}).status_code == 200
    assert server.get("/x", token).status_code == 200
    assert server.get("/_health_check", headers=dict(guesser)).status_code == 200


def test_failed_handshakes_count_too(harness: Harness) -> None:
    server = harness.server("-failure-limit", "3")
    handshake = (
        b"GET /_tunnel HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Origin: short\r\n\r\n"
    )
    statuses = []
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(handshake)
            statuses.append(sock.recv(65536).split(b" ", 2)[1])
    assert statuses == [b"400", b"400", b"400", b"429"]
    token = harness.new_token()
    refused = harness.client(server, token, wait=False)
    wait_until(lambda: "HTTP 429" in refused.process.output(), what="the braked client's 429")


def test_handshakes_over_the_limit_wait_their_turn_instead_of_a_503(harness: Harness) -> None:
    server = harness.server("-max-handshakes", "1")
    tokens = [harness.new_token() for _ in range(40)]

    def handshake(token: str) -> bytes:
        request = (
            b"GET /_tunnel HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Origin: " + token.encode() + b"\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.sendall(request)
            return sock.recv(65536).split(b" ", 2)[1]

    # Forty at once against one handshake at a time: before, most were told 503 and had to
    # come back later; now they queue (up to HANDSHAKE_WAIT) and all get in.
    with ThreadPoolExecutor(len(tokens)) as pool:
        statuses = list(pool.map(handshake, tokens))
    assert statuses == [b"101"] * len(tokens)
    assert "too many handshakes" not in server.process.output()


def test_queued_bytes_per_token_are_capped(harness: Harness) -> None:
    server = harness.server("-max-queued-bytes", "100000", "-max-requests-per-tunnel", "50")
    token = harness.new_token()
    first = harness.client(server, token)
    assert first.process.stop() == 0
    server.wait_clients(token, 0)
    # Small enough to be read whole before queueing (larger bodies stay with their HTTP client
    # while queued: test_v2's queued upload).
    body = b"x" * 60_000
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(server.get, "/echo", token, method="POST", content=body)
        wait_until(lambda: server.status()["tunnels"][0]["queued"] == 1, what="one queued request")
        over = server.get("/echo", token, method="POST", content=body)
        assert over.status_code == 503
        assert over.headers["retry-after"]
        harness.client(server, token)
        assert queued.result(timeout=30).status_code == 200


def test_whole_session_never_shows_the_whole_token(harness: Harness) -> None:
    token = harness.new_token("session-secret-")
    config = _passwords_file(harness, f'passwords = "{token}:pw-for-the-session"\n')
    server = harness.server("-config", str(config), "-httptimeout", "2")
    client = harness.client(server, token, "-password", "pw-for-the-session")
    seen: list[str] = []
    # Requests of every kind, good and bad, both token forms.
    seen.append(server.get("/echo", token).text)
    seen.append(httpx.get(f"{server.url}/_token/{token}/echo?x=1", timeout=30).text)
    seen.append(server.get("/status/500", token).text)
    seen.append(server.get("/slow?secs=4", token).text)  # 504
    seen.append(server.get("/x", token[:-1] + "!").text)  # 404 for a near miss
    seen.append(httpx.get(f"{server.url}/_token/{token[:10]}", timeout=10).text)
    # Every page the server shows.
    for page in ("/_status", "/_stats", "/_metrics", "/_health_check"):
        seen.append(server.get(page).text)
    # A reload and a client restart, then a graceful stop of both.
    server.process.signal(signal.SIGHUP)
    wait_until(lambda: "Reload" in server.process.output(), what="the reload")
    for process in (client.process, server.process):
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode(errors="replace")
        assert token not in cmdline
    seen.append(server.status().__repr__())
    assert client.process.stop() == 0
    assert server.process.stop() == 0
    # The harness scans both processes' logs after the test; here, everything they answered.
    assert all(token not in text for text in seen)
    assert all("pw-for-the-session" not in p.output() for p in harness.processes)
