"""End to end: a real ``wstunnel srv`` with real ``wstunnel cli`` processes and a real backend.

Covers the HTTP front (both token forms, the error table, malformed requests), the built-in
endpoints, queueing while a tunnel is down, several clients per token and the per-token limits.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import quote

import httpx
import pytest

from tests.support.harness import PYTHON, Harness, Server, free_port, raw_exchange, wait_until


def status_line(response: bytes) -> bytes:
    return response.split(b"\r\n", 1)[0]


def in_background(pool: ThreadPoolExecutor, server: Server, path: str, token: str,
                  **kwargs: object) -> Future[httpx.Response]:
    return pool.submit(server.get, path, token, **kwargs)


def test_health_check_is_exact(harness: Harness) -> None:
    server = harness.server()
    response = server.get("/_health_check")
    assert response.status_code == 200
    assert response.content == b"WSTUNSRV RUNNING\n"


@pytest.mark.both_transports
def test_request_with_x_token_reaches_backend_without_the_token(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token)
    response = server.get("/echo/a?x=1&y=2", token, headers={"X-Custom": "kept"})
    assert response.status_code == 200
    seen = response.json()
    assert seen["path"] == "/echo/a?x=1&y=2"
    names = {name.lower() for name, _ in seen["headers"]}
    assert "x-token" not in names
    assert ["X-Custom", "kept"] in seen["headers"]
    forwarded = dict((k.lower(), v) for k, v in seen["headers"])["x-forwarded-for"]
    assert forwarded == "127.0.0.1"


@pytest.mark.both_transports
def test_token_in_path_percent_encoded_with_query_kept(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token("my_b!g_$secret!!")
    harness.client(server, token)
    response = httpx.get(f"{server.url}/_token/{quote(token, safe='')}/echo/deep?q=1", timeout=30)
    assert response.status_code == 200
    assert response.json()["path"] == "/echo/deep?q=1"
    bare = httpx.get(f"{server.url}/_token/{quote(token, safe='')}?q=2", timeout=30)
    assert bare.status_code == 200
    assert bare.text == "backend page /\n"


@pytest.mark.both_transports
def test_post_body_and_binary_response_pass_through(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token)
    body = bytes(range(256)) * 40
    echoed = server.get("/echo", token, method="POST", content=body).json()
    assert echoed["method"] == "POST"
    assert echoed["body"].encode("latin-1") == body
    blob = server.get("/bytes?size=300000", token)
    assert blob.content == bytes(i % 251 for i in range(300000))


@pytest.mark.both_transports
def test_backend_chunked_redirect_and_gzip_are_passed_through(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token)
    assert server.get("/chunked", token).content == b"hello chunked world\n"
    redirect = server.get("/redirect", token, follow_redirects=False)
    assert redirect.status_code == 302
    assert redirect.headers["location"] == "/echo"
    with httpx.stream("GET", f"{server.url}/gzip", headers={"X-Token": token}, timeout=30) as raw:
        assert raw.headers["content-encoding"] == "gzip"
        wire = b"".join(raw.iter_raw())
    assert wire[:2] == b"\x1f\x8b"


@pytest.mark.parametrize(
    ("path", "headers", "status", "text"),
    [
        ("/page", {}, 400, "Missing X-Token header"),
        ("/_token/", {}, 400, "Malformed /_token/ path"),
        ("/_tunnel", {}, 400, None),
        ("/page", {"X-Token": "never-registered-token-1234"}, 404, "Tunnel not found"),
        ("/_token/short/page", {}, 404, "Tunnel not found"),
        ("/_token/%ZZbad-percent-token-1234/x", {}, 404, "Tunnel not found"),
    ],
)
def test_error_table_without_tunnel(harness: Harness, path: str, headers: dict[str, str],
                                    status: int, text: str | None) -> None:
    server = harness.server()
    response = httpx.get(f"{server.url}{path}", headers=headers, timeout=10)
    assert response.status_code == status
    if text is not None:
        assert response.text.strip() == text
    for value in headers.values():
        assert value not in response.text
    assert server.get("/_health_check").status_code == 200


@pytest.mark.both_transports
def test_backend_unreachable_is_502(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token, backend=f"http://127.0.0.1:{free_port()}")
    response = server.get("/anything", token)
    assert response.status_code == 502


@pytest.mark.both_transports
def test_http_timeout_is_504_and_request_leaves_the_queue(harness: Harness) -> None:
    server = harness.server("-httptimeout", "1")
    token = harness.new_token()
    harness.client(server, token)
    started = time.monotonic()
    response = server.get("/slow?secs=4", token)
    assert response.status_code == 504
    assert response.text.strip() == "Tunnel timeout"
    assert time.monotonic() - started < 3.5
    wait_until(lambda: _tunnel(server, token)["pending"] == 0, what="the timed-out request to leave")
    assert server.get("/fast", token).status_code == 200


@pytest.mark.both_transports
def test_queue_while_tunnel_down_then_served_by_restarted_client(harness: Harness) -> None:
    server = harness.server("-max-requests-per-tunnel", "2")
    token = harness.new_token()
    first = harness.client(server, token)
    assert first.process.stop() == 0
    server.wait_clients(token, 0)
    with ThreadPoolExecutor(2) as pool:
        queued = [in_background(pool, server, f"/echo/{i}", token) for i in range(2)]
        wait_until(lambda: _tunnel(server, token)["pending"] == 2, what="two queued requests")
        full = server.get("/echo/overflow", token)
        assert full.status_code == 503
        assert full.headers["retry-after"] == "1"
        harness.client(server, token)
        results = [future.result(timeout=30) for future in queued]
    assert [r.status_code for r in results] == [200, 200]
    assert sorted(r.json()["path"] for r in results) == ["/echo/0", "/echo/1"]


def test_idempotent_request_in_flight_is_retried_on_next_connection(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    doomed = harness.client(server, token)
    with ThreadPoolExecutor(1) as pool:
        future = in_background(pool, server, "/slow?secs=3", token)
        wait_until(lambda: _tunnel(server, token)["pending"] == 1, what="the request in flight")
        doomed.process.kill()
        server.wait_clients(token, 0)
        harness.client(server, token)
        response = future.result(timeout=30)
    assert response.status_code == 200
    assert response.text == "slow\n"


def test_non_idempotent_request_in_flight_fails_fast_with_502(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    doomed = harness.client(server, token)
    with ThreadPoolExecutor(1) as pool:
        future = in_background(pool, server, "/slow?secs=20", token, method="POST", content=b"x")
        wait_until(lambda: _tunnel(server, token)["pending"] == 1, what="the request in flight")
        started = time.monotonic()
        doomed.process.kill()
        response = future.result(timeout=15)
    assert response.status_code == 502
    assert time.monotonic() - started < 10


@pytest.mark.both_transports
def test_two_clients_share_one_token(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token)
    harness.client(server, token)
    assert server.clients(token) == 2
    with ThreadPoolExecutor(8) as pool:
        futures = [in_background(pool, server, "/slow?secs=0.3", token) for _ in range(16)]
        assert all(f.result(timeout=60).status_code == 200 for f in futures)
    completed = [client["answered"] for client in _tunnel(server, token)["clients"]]
    assert len(completed) == 2
    assert sum(completed) == 16
    assert min(completed) > 0


def test_max_clients_per_token_refuses_with_429(harness: Harness) -> None:
    server = harness.server("-max-clients-per-token", "1")
    token = harness.new_token()
    harness.client(server, token)
    extra = harness.client(server, token, wait=False)
    wait_until(lambda: "429" in extra.process.output(), what="the second client to be refused")
    assert server.clients(token) == 1
    assert extra.process.alive()
    assert server.get("/page", token).status_code == 200


def test_stats_keys_in_the_original_order_for_loopback(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token)
    assert server.get("/x", token).status_code == 200
    lines = server.get("/_stats").text.splitlines()
    keys = [line.split("=", 1)[0] for line in lines if line]
    assert keys == ["tunnels", "tunnel00_token", "tunnel00_req_pending", "tunnel00_tun_addr",
                    "tunnel00_idle_secs", "tunnel00_clients", "tunnel00_transports", "req_pending",
                    "dead_tunnels"]
    values = dict(line.split("=", 1) for line in lines if line)
    assert values["tunnels"] == "1"
    assert values["tunnel00_token"] == token[:8] + "..."
    assert values["tunnel00_tun_addr"].startswith("127.0.0.1")
    assert values["dead_tunnels"] == "0"


def test_stats_hide_details_from_remote_peers_behind_trusted_proxy(harness: Harness) -> None:
    server = harness.server("-trusted-proxies", "127.0.0.1")
    token = harness.new_token()
    harness.client(server, token)
    remote = server.get("/_stats", headers={"X-Forwarded-For": "10.1.2.3"}).text
    assert remote.splitlines() == ["tunnels=1", "More stats available when called from localhost..."]
    assert server.get("/_status", headers={"X-Forwarded-For": "10.1.2.3"}).status_code == 403
    spoof = httpx.get(f"{server.url}/_stats", headers={"X-Forwarded-For": "127.0.0.1"}, timeout=5)
    assert "tunnel00_token" in spoof.text
    echoed = server.get("/echo", token, headers={"X-Forwarded-For": "10.1.2.3"}).json()
    forwarded = dict((k.lower(), v) for k, v in echoed["headers"])["x-forwarded-for"]
    assert forwarded == "10.1.2.3, 127.0.0.1"


def test_untrusted_x_forwarded_for_is_not_believed(harness: Harness) -> None:
    server = harness.server()
    remote = server.get("/_stats", headers={"X-Forwarded-For": "10.1.2.3"}).text
    assert "dead_tunnels" in remote


def test_status_json_describes_tunnels_and_clients(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token)
    assert server.get("/status/500", token).status_code == 500
    assert server.get("/ok", token).status_code == 200
    document = server.status()
    assert document["version"]
    assert document["uptime_secs"] >= 0
    tunnel = _tunnel(server, token)
    assert tunnel["token"] == token[:8] + "..."
    assert tunnel["pending"] == 0
    assert tunnel["completed"] == 2
    (client,) = tunnel["clients"]
    assert client["address"].startswith("127.0.0.1")
    assert client["client_version"] == document["version"]
    assert client["answered"] == 2
    assert client["transport"] == "websocket"
    assert tunnel["errored"] == 0
    assert tunnel["last_activity"].endswith("Z")
    assert token not in json.dumps(document)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"THIS IS NOT HTTP\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
        (b"POST /x HTTP/1.1\r\nHost: x\r\nX-Token: t\r\nContent-Length: 999999999\r\n\r\n", b"413"),
    ],
)
def test_malformed_requests_get_4xx_and_server_keeps_serving(harness: Harness, data: bytes,
                                                             expected: bytes) -> None:
    server = harness.server("-max-header-size", "65536", "-max-stream-size", "1048576")
    reply = raw_exchange(server.port, data)
    assert status_line(reply).split(b" ")[1] == expected
    assert server.get("/_health_check").status_code == 200


def test_slow_request_head_gets_408(harness: Harness) -> None:
    server = harness.server("-header-timeout", "1")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        reply = sock.recv(65536)
    assert status_line(reply).split(b" ")[1] == b"408"
    assert server.get("/_health_check").status_code == 200


def test_request_body_over_cap_is_413_and_tunnel_survives(harness: Harness) -> None:
    # Over SMALL_BODY, so streamed: max_stream_size caps it (max_body_size caps only what is
    # held whole: a v1 tunnel's bodies, tests/test_wire_compat.py).
    server = harness.server("-max-stream-size", "100000")
    token = harness.new_token()
    harness.client(server, token)
    too_big = server.get("/echo", token, method="POST", content=b"x" * 100001)
    assert too_big.status_code == 413
    assert server.get("/echo", token, method="POST", content=b"x" * 1000).status_code == 200


@pytest.mark.both_transports
def test_response_body_over_client_cap_is_502_and_tunnel_survives(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token, "-max-stream-size", "100000")
    assert server.get("/bytes?size=200000", token).status_code == 502
    assert server.get("/bytes?size=1000", token).status_code == 200
    assert server.clients(token) == 1


@pytest.mark.both_transports
def test_graceful_stop_finishes_in_flight_request_and_removes_pidfile(harness: Harness) -> None:
    pidfile = harness.directory / "srv.pid"
    server = harness.server("-pidfile", str(pidfile), "-shutdown-grace", "10")
    assert int(pidfile.read_text()) == server.process.pid
    token = harness.new_token()
    client = harness.client(server, token)
    with ThreadPoolExecutor(1) as pool:
        future = in_background(pool, server, "/slow?secs=2", token)
        wait_until(lambda: _tunnel(server, token)["pending"] == 1, what="the request in flight")
        assert server.process.stop() == 0
        response = future.result(timeout=30)
    assert response.status_code == 200
    assert not pidfile.exists()
    wait_until(lambda: "WS   RECONNECT" in client.process.output() or "WS   DIAL" in
               client.process.output(), what="the client to notice")


def test_logfile_is_reopened_on_sighup(harness: Harness) -> None:
    logfile = harness.directory / "srv.log"
    server = harness.server("-logfile", str(logfile))
    token = harness.new_token()
    harness.tokens.add(token)
    wait_until(lambda: logfile.exists() and "Listening" in logfile.read_text(), what="the log file")
    rotated = logfile.with_suffix(".log.1")
    logfile.rename(rotated)
    server.process.signal(signal.SIGHUP)
    wait_until(logfile.exists, what="a new log file after SIGHUP")
    server.get("/after-rotation", token)
    wait_until(lambda: "HTTP RET" in logfile.read_text(), what="new lines in the new file")
    assert "HTTP RET" not in rotated.read_text()
    for path in (logfile, rotated):
        assert token not in path.read_text()


def test_log_lines_use_original_event_names_and_hide_token(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token)
    assert server.get("/logged", token).status_code == 200
    # A request's lines are written once the server has sent what it was sending: just after
    # the response, not before it.
    events = ("HTTP RCV", "WS   SND", "WS   RCV", "HTTP RET")

    def all_four() -> str | None:
        text = server.process.output()
        return text if all(event in text for event in events) else None

    text = wait_until(all_four, what="the request's four lines")
    prefix = f"token={token[:8]}..."
    for event in events:
        lines = [line for line in text.splitlines() if event in line]
        assert prefix in lines[-1]
        assert "pkg=WStunsrv" in lines[-1]


def test_bad_flag_exits_before_binding(harness: Harness) -> None:
    port = free_port()
    process = harness.start("srv", [PYTHON, "-m", "wstunnel", "srv", "-port", str(port),
                                    "-wstimeout", "soon"])
    assert process.wait_exit(30) != 0
    assert "wstimeout" in process.output()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_server_survives_many_bad_connections(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token)
    for junk in (b"\x00\x01\x02", b"GET", b"\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    assert server.get("/still", token).status_code == 200


def _tunnel(server: Server, token: str) -> dict:
    for tunnel in server.status()["tunnels"]:
        if tunnel["token"] == token[:8] + "...":
            return tunnel
    raise KeyError(token[:8])


def test_tunnel_address_behind_a_trusted_proxy_is_the_forwarded_one(harness: Harness) -> None:
    server = harness.server("-trusted-proxies", "127.0.0.1")
    token = harness.new_token()
    handshake = (
        "GET /_tunnel HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Origin: {token}\r\nX-Forwarded-For: 10.9.8.7\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(handshake)
        assert sock.recv(65536).startswith(b"HTTP/1.1 101 ")
        server.wait_clients(token, 1)
        (client,) = _tunnel(server, token)["clients"]
        assert client["address"] == "10.9.8.7"
        assert "tunnel00_tun_addr=10.9.8.7" in server.get("/_stats").text


@pytest.mark.parametrize("offer", ["lots", "1024"])
def test_a_request_window_offer_that_is_not_a_window_is_refused_with_400(harness: Harness,
                                                                        offer: str) -> None:
    server = harness.server()
    token = harness.new_token()
    handshake = (
        "GET /_tunnel HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: wstunnel.v2\r\nOrigin: {token}\r\n"
        f"X-Wstunnel-Request-Window: {offer}\r\n\r\n"
    ).encode()
    answer = raw_exchange(server.port, handshake)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert server.clients(token) == 0
    wait_until(lambda: "X-Wstunnel-Request-Window" in server.process.output(),
               what="the refusal's WS REFUSE line")
    harness.client(server, token)  # our client's own offer is taken
    assert server.get("/after", token).status_code == 200


def test_port_in_use_is_one_clear_line(harness: Harness) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        process = harness.start("srv", [PYTHON, "-m", "wstunnel", "srv", "-host", "127.0.0.1",
                                        "-port", str(port)])
        assert process.wait_exit(30) == 1
    output = process.output()
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in output
    assert "Traceback" not in output


def test_after_a_restart_requests_wait_for_their_returning_tunnel(harness: Harness) -> None:
    server = harness.server("-restart-grace", "0")
    token = harness.new_token()
    harness.client(server, token, "-reconnect-max-delay", "2")
    assert server.process.stop() == 0
    # The same port, as a restart under systemd would have it; now with the grace.
    restarted = harness.server("-restart-grace", "15", port=server.port)
    started = time.monotonic()
    response = restarted.get("/echo/after-restart", token)  # sent before the client is back
    assert response.status_code == 200
    assert response.json()["path"] == "/echo/after-restart"
    assert time.monotonic() - started < 15
    stranger = harness.new_token()
    refused = httpx.get(f"{restarted.url}/x", headers={"X-Token": stranger}, timeout=30)
    assert refused.status_code == 404  # nobody came for it within the grace
    assert time.monotonic() - started >= 14
