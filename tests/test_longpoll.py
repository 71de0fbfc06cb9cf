"""The HTTPS long-poll transport end to end: real servers, clients, nginx and tinyproxy on loopback.

A representative part of the core matrix (tests/test_server.py, tests/test_client.py) runs over
long-poll too: those tests carry the ``both_transports`` mark (tests/conftest.py), and
``WSTUNNEL_TEST_TRANSPORT=longpoll pytest tests/test_server.py`` runs a whole module that way. This
module holds what only long-poll has: its endpoints and their checks, sessions that stop polling,
auto fallback behind a proxy that refuses upgrades, and proxies.
"""

from __future__ import annotations

import gc
import hashlib
import secrets
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.fronts import (
    PROXY_PASSWORD,
    Tinyproxy,
    TlsFront,
    listening,
    needs_tinyproxy,
    start_tinyproxy,
    start_tls_front,
)
from tests.support.harness import Client, Harness, Process, Server, free_port, wait_until
from tests.support.nginx_frontend import (
    SHIPPED_UPSTREAM,
    SITE,
    Certificates,
    choose_tokens,
    issue_certificates,
    nginx_argv,
    placement,
    render_site,
    start_cluster,
    write_config,
)
from wstunnel.client import longpoll
from wstunnel.tokens import Token
from wstunnel.tunnel.transport import ConnectionClosed

OPEN = "/_tunnel/poll/open"
POLL = "/_tunnel/poll"
SESSION = "X-Wstunnel-Session"
UPGRADE_LINES = (
    "        proxy_set_header Upgrade $http_upgrade;\n",
    "        proxy_set_header Connection $wstunnel_connection_upgrade;\n",
)


@pytest.fixture
def harness(harness: Harness) -> Harness:
    """The conftest harness, whose clients use long-poll unless a test names a transport."""
    harness.transport = "longpoll"
    return harness


# ------------------------------------------------------------------------------------------ helpers


def _tunnel(server: Server, token: str) -> dict:
    for tunnel in server.status()["tunnels"]:
        if tunnel["token"] == token[:8] + "...":
            return tunnel
    raise KeyError("token not registered")


def _transports(server: Server, token: str) -> list[str]:
    return sorted(client["transport"] for client in _tunnel(server, token)["clients"])


def _open(server: Server, token: str | None, **headers: str) -> httpx.Response:
    if token is not None:
        headers["Origin"] = token
    return httpx.post(f"{server.url}{OPEN}", headers=headers, timeout=10)


def _new_session(harness: Harness, server: Server, token: str) -> str:
    response = _open(server, token)
    assert response.status_code == 200, response.text
    sid = response.json()["session"]
    harness.tokens.add(sid)  # the leak scan looks for whole session ids in every log, too
    return sid


def _bytes_sha256(size: int) -> str:
    """The digest of tests/support/backend_app.py's /bytes?size=N body."""
    return hashlib.sha256(bytes(i % 251 for i in range(size))).hexdigest()


# ---------------------------------------------------------------------------- tunnelled requests


def test_small_large_post_and_concurrent_requests(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token("lpbasic-")
    client = harness.client(server, token)
    assert _transports(server, token) == ["longpoll"]
    client.process.wait_output("transport=longpoll")
    # The open agreed on a 2 MiB first window for request bodies, as a WebSocket handshake does.
    (polling,) = _tunnel(server, token)["clients"]
    assert polling["flow"]["request_window"] == 2 * 1024 * 1024
    wait_until(lambda: "request_window=2097152" in client.process.output(),
               what="the client's WS CONNECTED line with the agreed request window")

    small = server.get("/hello?x=1", token)
    assert small.status_code == 200 and small.text == "backend page /hello\n"

    body = secrets.token_bytes(300_000)
    echoed = server.get("/echo", token, method="POST", content=body)
    assert echoed.status_code == 200
    assert echoed.json()["body"].encode("latin-1") == body
    body = secrets.token_bytes(5 * 1024 * 1024)  # past the first window: more credit follows
    sunk = server.get("/sink", token, method="POST", content=body)
    assert sunk.status_code == 200
    assert sunk.json()["sha256"] == hashlib.sha256(body).hexdigest()

    size = 6 * 1024 * 1024 + 17  # many poll answers of at most 1 MiB each
    digest = hashlib.sha256()
    with httpx.stream("GET", f"{server.url}/bytes?size={size}", headers={"X-Token": token},
                      timeout=30) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            digest.update(chunk)
    assert digest.hexdigest() == _bytes_sha256(size)

    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(server.get, f"/echo/{i}", token) for i in range(64)]
        results = [future.result(timeout=60) for future in futures]
    assert [r.status_code for r in results] == [200] * 64
    assert [r.json()["path"] for r in results] == [f"/echo/{i}" for i in range(64)]
    stats = server.get("/_stats").text
    assert "tunnel00_transports=longpoll" in stats


def test_a_client_that_stops_polling_is_dropped_like_a_lost_tunnel(harness: Harness) -> None:
    """SIGSTOP: the session misses its polls; after wstimeout the server drops it, a POST in
    flight fails fast (502) and a GET in flight is retried once the client is back."""
    server = harness.server("-wstimeout", "3")
    token = harness.new_token("lpstop-")
    client = harness.client(server, token, "-timeout", "30")
    with ThreadPoolExecutor(2) as pool:
        post = pool.submit(server.get, "/slow?secs=20", token, method="POST", content=b"x")
        get = pool.submit(server.get, "/slow?secs=1", token)
        wait_until(lambda: client.process.output().count("WS   RCV") >= 2,
                   what="both requests to reach the client")
        client.process.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            response = post.result(timeout=20)
            assert response.status_code == 502, response.text
            assert time.monotonic() - stopped < 12
            wait_until(lambda: "WS   TIMEOUT" in server.process.output(), what="the drop logged")
            assert server.clients(token) == 0
            assert not get.done()  # waiting, queued for the next connection
        finally:
            client.process.signal(signal.SIGCONT)
        assert get.result(timeout=30).status_code == 200
    server.wait_clients(token, 1)
    closes = [line for line in server.process.output().splitlines() if "WS   CLOSE" in line]
    assert closes and "transport=longpoll" in closes[0] and "silent too long" in closes[0]


def test_two_clients_on_one_token_one_per_transport(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token("lpmixed-")
    websocket = harness.client(server, token, "-transport", "websocket")
    longpoll = harness.client(server, token)
    assert _transports(server, token) == ["longpoll", "websocket"]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(server.get, "/slow?secs=0.3", token) for _ in range(16)]
        assert all(f.result(timeout=60).status_code == 200 for f in futures)
    answered = {c["transport"]: c["answered"] for c in _tunnel(server, token)["clients"]}
    assert answered["websocket"] > 0 and answered["longpoll"] > 0
    assert sum(answered.values()) == 16
    stats = server.get("/_stats").text
    assert "tunnel00_transports=" in stats and "longpoll" in stats and "websocket" in stats
    assert "transport=websocket" in websocket.process.output()
    assert "transport=longpoll" in longpoll.process.output()


# ----------------------------------------------------------------------------- the endpoints


def test_session_open_checks_token_allowed_tokens_and_password(harness: Harness) -> None:
    token, other = harness.new_token("lpauth-"), harness.new_token("lpdeny-")
    config = harness.directory / "srv.toml"
    config.write_text(f'passwords = "{token}:pw-for-polling"\nallowed_tokens = ["{token}"]\n')
    config.chmod(0o600)
    server = harness.server("-config", str(config))
    assert _open(server, None).status_code == 400
    assert _open(server, "short").status_code == 400
    window = _open(server, token, **{"X-Wstunnel-Request-Window": "2 MiB"})
    assert window.status_code == 400 and "X-Wstunnel-Request-Window" in window.text
    assert _open(server, other).status_code == 403
    missing = _open(server, token)
    assert missing.status_code == 401 and "www-authenticate" in missing.headers
    wrong = _open(server, token, Authorization="Basic " + "eDp5")
    assert wrong.status_code == 401
    for response in (missing, wrong):
        assert token not in response.text

    refused = harness.client(server, token, wait=False)
    wait_until(lambda: "HTTP 401" in refused.process.output(), what="the client to log its 401")
    assert server.clients(token) == 0
    harness.client(server, token, "-password", "pw-for-polling")
    assert server.get("/after-auth", token).status_code == 200
    assert "pw-for-polling" not in server.process.output()


def test_unknown_sessions_bad_bodies_and_methods_get_4xx_and_the_server_keeps_serving(
        harness: Harness) -> None:
    server = harness.server("-failure-limit", "6", "-wstimeout", "6")  # polls held 3 s at most
    token = harness.new_token("lpbad-")
    guess = secrets.token_urlsafe(32)
    harness.tokens.add(guess)
    url = f"{server.url}{POLL}"
    for method in ("GET", "POST", "DELETE"):
        response = httpx.request(method, url, headers={SESSION: guess}, timeout=10)
        assert response.status_code == 404, (method, response.text)
        assert guess not in response.text and guess[:8] not in response.text
    assert httpx.get(url, timeout=10).status_code == 404  # no session header at all
    assert httpx.put(url, timeout=10).status_code == 405
    assert httpx.get(f"{server.url}{OPEN}", timeout=10).status_code == 405
    assert httpx.get(f"{server.url}/_tunnel/poll/elsewhere", timeout=10).status_code == 404

    sid = _new_session(harness, server, token)
    assert server.clients(token) == 1
    oversized = httpx.post(url, headers={SESSION: sid}, content=bytes(2 * 1024 * 1024 + 1),
                           timeout=10)
    assert oversized.status_code == 413

    def chunked_body() -> Iterator[bytes]:  # no length: the limit is found while reading
        for _ in range(40):
            yield bytes(64 * 1024)

    chunked = httpx.post(url, headers={SESSION: sid}, content=chunked_body(), timeout=10)
    assert chunked.status_code == 413
    quick = httpx.get(url, headers={SESSION: sid}, timeout=30)  # a poll of a live session
    assert quick.status_code == 200 and quick.headers["cache-control"] == "no-store"
    malformed = httpx.post(url, headers={SESSION: sid}, content=b"\x00\x00\x00\x09ab", timeout=10)
    assert malformed.status_code == 400
    server.wait_clients(token, 0)  # frames were lost: the session is over, as after a bad frame
    assert httpx.get(url, headers={SESSION: sid}, timeout=10).status_code == 404
    assert server.get("/_health_check").status_code == 200

    output = server.process.output()
    assert sid[:8] in output  # logged, as a prefix (the conftest scan fails on a whole id)
    # Guessing ids is a failure like guessing tokens: the brake stops the address.
    for _ in range(6):
        httpx.get(url, headers={SESSION: secrets.token_urlsafe(32)}, timeout=10)
    assert httpx.get(url, headers={SESSION: guess}, timeout=10).status_code == 429


def test_a_lost_poll_answer_is_sent_again_and_a_repeated_post_is_taken_once(
        harness: Harness) -> None:
    """Numbered batches: what a client must repeat after a proxy dropped its connection."""
    server = harness.server("-wstimeout", "3")  # polls are held 1.5 s at most
    token = harness.new_token("lpseq-")
    sid = _new_session(harness, server, token)
    url = f"{server.url}{POLL}"
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(server.get, "/never-answered", token, method="POST", content=b"x",
                              timeout=20)
        first = httpx.get(url, headers={SESSION: sid, "X-Wstunnel-Ack": "0"}, timeout=10)
        assert first.headers["x-wstunnel-seq"] == "1" and first.content  # the request's HEAD
        assert b"/never-answered" in first.content
        # Its answer "was lost": the client polls again acknowledging 0, and gets batch 1 again.
        again = httpx.get(url, headers={SESSION: sid, "X-Wstunnel-Ack": "0"}, timeout=10)
        assert (again.headers["x-wstunnel-seq"], again.content) == ("1", first.content)
        # The request's body may have come with its HEAD or after it, as batch 2: then that is
        # what this poll gets, and only the next one is empty.
        acked = "1"
        empty = httpx.get(url, headers={SESSION: sid, "X-Wstunnel-Ack": acked}, timeout=10)
        if empty.headers["x-wstunnel-seq"] == "2":
            assert empty.content, "batch 2 without frames"
            acked = "2"
            empty = httpx.get(url, headers={SESSION: sid, "X-Wstunnel-Ack": acked}, timeout=10)
        assert (empty.headers["x-wstunnel-seq"], empty.content) == (acked, b"")
        for seq in ("1", "1", "2"):  # a repeated POST is answered, and not taken twice
            posted = httpx.post(url, headers={SESSION: sid, "X-Wstunnel-Seq": seq}, content=b"",
                                timeout=10)
            assert posted.status_code == 204
        gap = httpx.post(url, headers={SESSION: sid, "X-Wstunnel-Seq": "4"}, content=b"", timeout=10)
        assert gap.status_code == 400  # POST 3 went missing: the session cannot go on
        server.wait_clients(token, 0)
        assert waiting.result(timeout=20).status_code == 502  # a POST: not retried
    assert server.get("/_health_check").status_code == 200


def test_a_client_closing_its_session_deletes_it(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token("lpdelete-")
    sid = _new_session(harness, server, token)
    url = f"{server.url}{POLL}"
    assert httpx.delete(url, headers={SESSION: sid}, timeout=10).status_code == 204
    server.wait_clients(token, 0)
    assert httpx.post(url, headers={SESSION: sid}, content=b"", timeout=10).status_code == 404
    server.process.wait_output("client closed the session")


def test_the_clients_requests_leave_nothing_for_the_cycle_collector(harness: Harness) -> None:
    """httpx's Response and its stream refer to each other; the transport unbinds them, so
    that each POST and poll is freed by reference counting as soon as it is read. Else some
    forty objects a request wait for the collector, and the client's memory swings with its
    timing (tests/test_stream_leaks.py measures that memory)."""
    server = harness.server()
    token = harness.new_token("lpcycles-")
    rounds = 40

    async def main() -> int:
        http = longpoll.http_client(proxy=None, context=None, timeout=10)
        async with http, trio.open_nursery() as nursery:
            transport = await longpoll.connect(
                nursery, http, server.url, token=Token(token),
                headers=[(b"Origin", token.encode())], request_timeout=10)
            harness.tokens.add(transport.sid.reveal())
            for _ in range(3):  # the pool's connections, opened once
                await transport.ping()
            gc.collect()
            gc.disable()
            try:
                for _ in range(rounds):
                    await transport.ping()  # one POST and its answer
                found = gc.collect()
            finally:
                gc.enable()
            await transport.aclose()
            nursery.cancel_scope.cancel()
        return found

    found = trio.run(main)
    assert found < rounds, f"{found} objects in cycles after {rounds} POSTs"


def test_a_closed_client_session_lets_go_of_the_frames_it_did_not_send() -> None:
    """Its tasks' tracebacks can keep a transport that ended by an error alive until the
    collector's oldest generation runs; what it had queued (up to SEND_HIGH_WATER) must not
    wait with it."""

    async def main() -> None:
        async with longpoll.http_client(proxy=None, context=None, timeout=2) as http:
            # Nothing listens there: the DELETE that says goodbye fails, as for a dead server.
            transport = longpoll.LongPollTransport(http, f"http://127.0.0.1:{free_port()}",
                                                   "sid-" + secrets.token_hex(8), poll_wait=1,
                                                   timeout=2)
            for _ in range(3):
                await transport.send_message(b"x" * 100_000)
            assert transport.queued_bytes == 300_000
            await transport.aclose(1006, "server unreachable")
            assert transport.queued_bytes == 0
            with pytest.raises(ConnectionClosed):
                await transport.send_message(b"late")

    trio.run(main)


# ------------------------------------------------------------------------ auto behind nginx


def _site_without_upgrade(directory: Path) -> Path:
    """The shipped site file, minus the two lines that pass WebSocket upgrades on."""
    text = SITE.read_text()
    for line in UPGRADE_LINES:
        assert line in text, f"the shipped nginx file no longer contains {line!r}"
        text = text.replace(line, "")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "wstunnel-no-upgrade.conf"
    path.write_text(text)
    return path


def _run_nginx(harness: Harness, directory: Path, shipped: Path, certs: Certificates,
               server: Server, http_port: int, tls_port: int) -> Process:
    site = render_site(shipped, directory, http_port=http_port, tls_port=tls_port, certs=certs,
                       upstreams=[(SHIPPED_UPSTREAM, f"server 127.0.0.1:{server.port};")])
    conf = write_config(directory, site)
    process = harness.start("nginx", nginx_argv(directory, conf))
    wait_until(lambda: listening(process, tls_port), timeout=10, what="nginx to listen")
    return process


def _fallbacks(client: Client) -> int:
    return client.process.output().count("falling back to long-poll")


def test_auto_falls_back_behind_nginx_without_upgrade_and_returns_to_websocket(
        harness: Harness, tmp_path: Path) -> None:
    # wstimeout 3: the session cut when the first nginx stops is dropped soon (no DELETE could
    # reach the server), as a WebSocket cut without a Close frame would be.
    server = harness.server("-trusted-proxies", "127.0.0.1", "-wstimeout", "3")
    certs = issue_certificates(tmp_path)
    http_port, tls_port = free_port(), free_port()
    blocking = _run_nginx(harness, tmp_path / "nginx-a", _site_without_upgrade(tmp_path), certs,
                          server, http_port, tls_port)
    token = harness.new_token("lpauto-")
    client = harness.client(f"wss://localhost:{tls_port}", token, "-transport", "auto",
                            "-certfile", str(certs.ca_pem), "-websocket-retry", "1",
                            "-reconnect-max-delay", "1", wait=False)
    server.wait_clients(token, 1)
    assert _transports(server, token) == ["longpoll"]
    client.process.wait_output("HTTP 400; falling back to long-poll")
    via_nginx = httpx.get(f"https://localhost:{tls_port}/through-nginx",
                          headers={"X-Token": token}, verify=certs.client_context(), timeout=30)
    assert via_nginx.status_code == 200 and "/through-nginx" in via_nginx.text
    # Now and then it tries the WebSocket again, and falls back again while nginx refuses.
    wait_until(lambda: _fallbacks(client) >= 2, what="a second try of the WebSocket")
    assert "TRY WEBSOCKET" in client.process.output()

    blocking.stop()
    _run_nginx(harness, tmp_path / "nginx-b", SITE, certs, server, http_port, tls_port)
    wait_until(lambda: _transports(server, token) == ["websocket"], timeout=20,
               what="the client back on the WebSocket through the shipped nginx config")
    via_nginx = httpx.get(f"https://localhost:{tls_port}/on-websocket",
                          headers={"X-Token": token}, verify=certs.client_context(), timeout=30)
    assert via_nginx.status_code == 200


def test_longpoll_through_nginx_buffering_whole_requests_and_responses(
        harness: Harness, tmp_path: Path) -> None:
    """Each poll answer is complete and bounded, so a proxy that buffers it whole passes it."""
    text = SITE.read_text()
    for old, new in (("proxy_buffering off;", "proxy_buffering on;"),
                     ("proxy_request_buffering off;", "proxy_request_buffering on;")):
        assert old in text, f"the shipped nginx file no longer contains {old!r}"
        text = text.replace(old, new)
    buffering = tmp_path / "wstunnel-buffering.conf"
    buffering.write_text(text)
    server = harness.server("-trusted-proxies", "127.0.0.1")
    certs = issue_certificates(tmp_path)
    tls_port = free_port()
    _run_nginx(harness, tmp_path / "nginx", buffering, certs, server, free_port(), tls_port)
    token = harness.new_token("lpbuffer-")
    harness.client(f"wss://localhost:{tls_port}", token, "-certfile", str(certs.ca_pem),
                   wait=False)
    server.wait_clients(token, 1)
    size = 3 * 1024 * 1024
    download = server.get(f"/bytes?size={size}", token)
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == _bytes_sha256(size)
    body = secrets.token_bytes(500_000)
    echoed = server.get("/echo", token, method="POST", content=body)
    assert echoed.status_code == 200 and echoed.json()["body"].encode("latin-1") == body
    assert _transports(server, token) == ["longpoll"]
    (polling,) = _tunnel(server, token)["clients"]  # the offer and its answer crossed nginx
    assert polling["flow"]["request_window"] == 2 * 1024 * 1024


def test_longpoll_sessions_stay_on_their_instance_behind_the_cluster_config(
        harness: Harness, tmp_path: Path) -> None:
    """nginx/wstunnel-cluster.conf hashes X-Token for /_tunnel/poll: each session's requests
    must all reach the instance that holds the session, the one its token's requests reach."""
    certs, servers, nginx = start_cluster(harness, tmp_path)
    with httpx.Client(base_url=nginx.https_url, verify=certs.client_context(), timeout=30) as http:
        owners = choose_tokens(harness, http, servers, count=len(servers))
        for token in owners:
            harness.client(nginx.wss_url, token, "-certfile", str(certs.ca_pem), wait=False)
        expected = {token[:8] + "...": [(owner, 1)] for token, owner in owners.items()}
        wait_until(lambda: placement(servers) == expected, timeout=30,
                   what="every long-poll client registered on its token's instance")
        for token in owners:
            for n in range(3):  # several polls and posts per session, all on one instance
                answer = http.get(f"/echo/{n}", headers={"X-Token": token})
                assert answer.status_code == 200, answer.text
    assert all(server.clients(token) in (0, 1) for server in servers for token in owners)
    assert "Unknown long-poll session" not in "".join(s.process.output() for s in servers)


# ---------------------------------------------------------------------------------- proxies


@pytest.fixture
def tls_front(harness: Harness, tmp_path: Path) -> TlsFront:
    return start_tls_front(harness, tmp_path)


@pytest.fixture
def checked_proxy_logs(harness: Harness) -> Iterator[list[Tinyproxy]]:
    proxies: list[Tinyproxy] = []
    yield proxies
    for proxy in proxies:
        for secret in [*harness.tokens, PROXY_PASSWORD]:
            assert secret not in proxy.log(), "a secret in the tinyproxy log"


@needs_tinyproxy
def test_longpoll_over_https_through_a_connect_proxy(
        harness: Harness, tls_front: TlsFront, tmp_path: Path,
        checked_proxy_logs: list[Tinyproxy]) -> None:
    proxy = start_tinyproxy(harness, tmp_path, tls_front.port)
    checked_proxy_logs.append(proxy)
    token = harness.new_token("lpconnect-")
    harness.client(tls_front.url, token, "-certfile", str(tls_front.ca_pem), "-proxy", proxy.url(),
                   wait=False)
    tls_front.server.wait_clients(token, 1)
    assert _transports(tls_front.server, token) == ["longpoll"]
    response = tls_front.server.get("/via-connect", token)
    assert response.status_code == 200 and "/via-connect" in response.text
    assert f"CONNECT localhost:{tls_front.port}" in proxy.log(), proxy.log()


@needs_tinyproxy
def test_longpoll_over_http_through_a_forwarding_proxy(
        harness: Harness, tmp_path: Path, checked_proxy_logs: list[Tinyproxy]) -> None:
    server = harness.server()
    proxy = start_tinyproxy(harness, tmp_path, free_port())  # CONNECT to nothing useful
    checked_proxy_logs.append(proxy)
    token = harness.new_token("lpforward-")
    harness.client(server, token, "-proxy", proxy.url())
    response = server.get("/via-forwarding", token)
    assert response.status_code == 200 and "/via-forwarding" in response.text
    log = proxy.log()
    assert f"http://127.0.0.1:{server.port}/_tunnel/poll" in log, log
    assert f"CONNECT 127.0.0.1:{server.port}" not in log
