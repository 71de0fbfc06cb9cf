"""The nginx frontends we ship (``nginx/``), run for real with Debian's nginx.

* The directives whose effect a test cannot wait for (timeouts of 20 minutes and more, buffering,
  TLS settings, upgrades on every path, body and head limits) are read from the shipped files and
  checked against the server's own defaults. These need the files only: they run, and never
  skip, without nginx or curl; the tests that run a binary skip, saying which, when it is absent.
* ``wstunnel.conf``: ``wstunnel cli`` registers over ``wss://`` through nginx (``-certfile`` with
  a throwaway trustme CA); curl reaches the backend with ``X-Token`` and with ``/_token/`` paths;
  the server sees the real ``X-Forwarded-For`` chain; port 80 redirects; TLS 1.1 and weak ciphers
  are refused; large bodies pass both ways.
* ``wstunnel-cluster.conf``: three server instances, twenty tokens each with its own client; every
  request for a token is answered by that token's own tunnel; one instance restarted, its clients
  come back to it within the backoff cap.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.harness import Client, Harness, Server, wait_until
from tests.support.nginx_config import Block, parse_nginx, seconds, size_bytes
from tests.support.nginx_frontend import (
    CLUSTER_SITE,
    CURL,
    NEEDS_CURL,
    NEEDS_NGINX,
    SHIPPED_CLUSTER_PORTS,
    SHIPPED_UPSTREAM,
    SITE,
    TRUST_NGINX,
    Certificates,
    Nginx,
    check_config,
    choose_tokens,
    issue_certificates,
    placement,
    render_site,
    start_cluster,
    start_nginx,
)
from wstunnel.config import ClientSettings, ServerSettings

MiB = 1024 * 1024
# The largest ping timeout of the client and tunnel timeout of the server (both clamped to 600 s).
LONGEST_TUNNEL_SILENCE = 600.0
RECONNECT_CAP = 2.0  # -reconnect-max-delay of the cluster's clients


# ------------------------------------------------------------------------ the shipped files, read


def _servers(config: Block) -> tuple[Block, Block]:
    """(the TLS server block of the server's own name, the plain HTTP one)."""
    servers = [s for s in config.all("server") if s not in _wildcards(config)]
    tls = [s for s in servers if any("ssl" in listen.args for listen in s.all("listen"))]
    plain = [s for s in servers if s not in tls]
    assert len(tls) == 1 and len(plain) == 1, [s.all("listen") for s in servers]
    return tls[0], plain[0]


def _wildcards(config: Block) -> list[Block]:
    """The server blocks of host routing (``server_name *.domain``)."""
    return [s for s in config.all("server") if s.value("server_name")[0].startswith("*.")]


def _location(server: Block, *args: str) -> Block:
    return next(loc for loc in server.all("location") if loc.args == list(args))


def _tls_settings(server: Block) -> list[tuple[str, list[str]]]:
    return [(d.name, d.args) for d in server.children or []
            if d.name.startswith("ssl_") and not d.name.startswith("ssl_certificate")]


@pytest.mark.parametrize("shipped", [SITE, CLUSTER_SITE], ids=lambda p: p.name)
def test_shipped_directives(shipped: Path) -> None:
    config = parse_nginx(shipped.read_text())
    tls, plain = _servers(config)
    # TLS 1.2 and 1.3 only; AEAD suites with forward secrecy only; no OCSP, no tickets; HSTS.
    assert tls.value("ssl_protocols") == ["TLSv1.2", "TLSv1.3"]
    ciphers = tls.value("ssl_ciphers")[0].split(":")
    assert ciphers and all(c.startswith("ECDHE-") and ("GCM" in c or "CHACHA20" in c) for c in ciphers)
    assert tls.value("ssl_stapling") == ["off"]
    assert tls.value("ssl_session_tickets") == ["off"]
    hsts = tls.value("add_header")
    assert hsts[0] == "Strict-Transport-Security" and hsts[-1] == "always"
    assert int(re.search(r"max-age=(\d+)", hsts[1]).group(1)) >= 180 * 86400  # type: ignore[union-attr]
    # No body limit of nginx's own: the server streams bodies and says 413 itself past its cap.
    server_defaults = ServerSettings.model_fields
    assert tls.value("client_max_body_size") == ["0"]
    # HTTP/2 for browsers loading many assets (scripts/nginx_http2.py measures it), with a body
    # buffer that lets an HTTP/2 upload's window open wide enough to go as fast as HTTP/1.1.
    assert all(listen.args[-2:] == ["ssl", "http2"] for listen in tls.all("listen"))
    assert size_bytes(tls.value("client_body_buffer_size")[0]) >= MiB
    # Request heads as large as the server takes, in a single header line too.
    count, size = tls.value("large_client_header_buffers")
    assert size_bytes(size) >= server_defaults["max_header_size"].default and int(count) >= 2
    assert tls.value("gzip") == ["off"]  # Debian's nginx.conf has it on
    # Plain HTTP only redirects.
    assert _location(plain, "/").value("return") == ["301", "https://$host$request_uri"]

    maps = {m.args[1]: m for m in config.all("map")}
    # The operator's console is closed as shipped; tests/test_console.py opens it as the file says.
    assert _location(tls, "^~", "/_admin").value("return") == ["404"]
    [wildcard] = _wildcards(config)  # host routing: one location, every path the app's
    assert [loc.args for loc in wildcard.all("location")] == [["/"]]
    for location in [*tls.all("location"), *wildcard.all("location")]:
        if location.args == ["^~", "/_admin"]:
            continue
        where = f"{shipped.name} location {' '.join(location.args)}"
        assert location.value("proxy_buffering") == ["off"], where
        assert location.value("proxy_request_buffering") == ["off"], where
        assert location.value("proxy_http_version") == ["1.1"], where
        assert [d.args for d in location.all("proxy_ignore_client_abort")] in ([], [["off"]]), where
        headers = location.headers()
        assert headers["x-forwarded-for"] == "$proxy_add_x_forwarded_for", where
        assert headers["x-forwarded-proto"] == "$scheme", where
        assert headers["host"] == "$host", where
        # WebSocket handshakes pass on every path (the tunnel's own, and a browser's to an app
        # behind a tunnel): "Connection: upgrade" for them, nothing for other requests, which
        # keep their kept-alive connection to the server.
        assert headers["upgrade"] == "$http_upgrade", where
        upgrade_map = maps[headers["connection"]]
        assert upgrade_map.args[0] == "$http_upgrade", where
        assert upgrade_map.value("default") == ["upgrade"] and upgrade_map.value("") == [""], where
        assert len(upgrade_map.children or []) == 2, where

    tunnel = _location(tls, "=", "/_tunnel")
    # The tunnel must outlive the longest silence the client and the server allow it.
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        assert seconds(tunnel.value(directive)[0]) >= 6 * LONGEST_TUNNEL_SILENCE
    assert ClientSettings.model_fields["timeout"].default <= LONGEST_TUNNEL_SILENCE

    # Requests: nginx waits longer than the server does, so the server's 504 reaches the client;
    # and a browser's WebSocket, which the server closes after httptimeout of silence, is never
    # cut by nginx first.
    everything = _location(tls, "/")
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        assert seconds(everything.value(directive)[0]) > server_defaults["httptimeout"].default
    # Response heads of a web app with big cookies or policies (nginx's default: 4 KiB).
    assert size_bytes(everything.value("proxy_buffer_size")[0]) >= 64 * 1024

    upstream_name = tunnel.value("proxy_pass")[0].removeprefix("http://")
    assert everything.value("proxy_pass") == tunnel.value("proxy_pass")
    upstream = next(u for u in config.all("upstream") if u.args == [upstream_name])
    # Idle upstream connections go before the server's keep-alive limit closes them.
    assert seconds(upstream.value("keepalive_timeout")[0]) < 75
    wildcard_location = _location(wildcard, "/")
    assert wildcard_location.value("proxy_pass") == tunnel.value("proxy_pass")
    for directive in ("proxy_read_timeout", "proxy_send_timeout", "proxy_buffer_size"):
        assert wildcard_location.value(directive) == everything.value(directive), directive
    if shipped == CLUSTER_SITE:
        assert upstream.value("hash") == ["$wstunnel_token", "consistent"]
        assert [s.args[1:] for s in upstream.all("server")] == [["max_fails=0"]] * 3
        for location in [*tls.all("location"), wildcard_location]:
            if location.args != ["^~", "/_admin"]:  # closed: it proxies nothing
                assert location.value("proxy_next_upstream") == ["off"]


def test_both_files_share_the_tls_settings() -> None:
    site, _ = _servers(parse_nginx(SITE.read_text()))
    cluster, _ = _servers(parse_nginx(CLUSTER_SITE.read_text()))
    assert _tls_settings(site) == _tls_settings(cluster)
    assert _tls_settings(site)
    for shipped in (SITE, CLUSTER_SITE):  # and their host routing servers have them too
        [wildcard] = _wildcards(parse_nginx(shipped.read_text()))
        assert _tls_settings(wildcard) == _tls_settings(site)


@NEEDS_NGINX
@pytest.mark.parametrize("shipped", [SITE, CLUSTER_SITE], ids=lambda p: p.name)
def test_nginx_accepts_the_shipped_file(tmp_path: Path, shipped: Path) -> None:
    certs = issue_certificates(tmp_path)
    upstreams = ([(SHIPPED_UPSTREAM, SHIPPED_UPSTREAM)] if shipped == SITE else
                 [(f"server 127.0.0.1:{p} ", f"server 127.0.0.1:{p} ") for p in SHIPPED_CLUSTER_PORTS])
    text = render_site(shipped, tmp_path / "nginx", http_port=18080, tls_port=18443, certs=certs,
                       upstreams=upstreams)
    result = check_config(tmp_path / "nginx", text)
    assert result.returncode == 0, result.stderr
    assert "warn" not in result.stderr, result.stderr


# --------------------------------------------------------------------------- one server behind nginx


@dataclass
class Curl:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Frontend:
    nginx: Nginx
    server: Server
    client: Client
    curls: int = 0

    @property
    def token(self) -> str:
        return self.client.token

    def curl(self, path: str, *args: str, token: bool = False) -> Curl:
        """curl ``https://localhost:<port><path>`` trusting the test CA only."""
        self.curls += 1
        out = self.nginx.directory / f"curl-{self.curls}"
        argv = [CURL, "-sS", "--cacert", str(self.nginx.certs.ca_pem), "-o", f"{out}.body",
                "-D", f"{out}.head", "-w", "%{http_code}", *args]
        if token:
            argv += ["-H", f"X-Token: {self.token}"]
        result = subprocess.run([*argv, self.nginx.https_url + path], capture_output=True,
                                text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        head = Path(f"{out}.head").read_bytes().decode("latin-1").splitlines()
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])
                   if k}
        return Curl(int(result.stdout), headers, Path(f"{out}.body").read_bytes())


def _percent_encoded(token: str) -> str:
    return "".join(f"%{byte:02X}" for byte in token.encode())


def _no_token_in(text: str, harness: Harness) -> None:
    leaked = [t[:8] + "..." for t in harness.tokens if t in text]
    assert not leaked, f"whole tokens in nginx's logs: {leaked}"


@pytest.fixture
def frontend(harness: Harness, tmp_path: Path) -> Iterator[Frontend]:
    """A server behind nginx (the shipped wstunnel.conf), and a client registered through it."""
    certs = issue_certificates(tmp_path)
    server = harness.server(*TRUST_NGINX)
    nginx = start_nginx(harness, tmp_path / "nginx", SITE, certs,
                        [(SHIPPED_UPSTREAM, f"server 127.0.0.1:{server.port};")])
    token = harness.new_token("nginxfe-")
    client = harness.client(nginx.wss_url, token, "-certfile", str(certs.ca_pem), wait=False)
    server.wait_clients(token, 1)
    yield Frontend(nginx, server, client)
    _no_token_in(nginx.logs(), harness)


@NEEDS_NGINX
@NEEDS_CURL
def test_cli_registers_through_nginx_and_curl_gets_answers(frontend: Frontend) -> None:
    # The tunnel came through nginx: the server saw it from nginx's address.
    tunnel = next(t for t in frontend.server.status()["tunnels"] if t["token"] == frontend.token[:8] + "...")
    assert [c["address"] for c in tunnel["clients"]] == ["127.0.0.1"]
    frontend.client.process.wait_output(f"wss://localhost:{frontend.nginx.tls_port}")
    # The client's offer of a first window for request bodies crossed nginx, and the server's
    # answer came back through it (the client logs what was agreed).
    assert [c["flow"]["request_window"] for c in tunnel["clients"]] == [2 * 1024 * 1024]
    wait_until(lambda: "request_window=2097152" in frontend.client.process.output(),
               what="the client's WS CONNECTED line with the agreed request window")

    by_header = frontend.curl("/echo/by-header?x=1", token=True)
    assert by_header.status == 200, by_header.body
    assert by_header.json()["path"] == "/echo/by-header?x=1"
    assert by_header.headers["strict-transport-security"] == "max-age=63072000"

    by_path = frontend.curl(f"/_token/{frontend.token}/echo/by-path?y=2")
    assert by_path.status == 200, by_path.body
    assert by_path.json()["path"] == "/echo/by-path?y=2"

    encoded = frontend.curl(f"/_token/{_percent_encoded(frontend.token)}/echo/encoded")
    assert encoded.status == 200, encoded.body
    assert encoded.json()["path"] == "/echo/encoded"

    assert frontend.curl("/echo/no-token").status == 400
    health = frontend.curl("/_health_check")
    assert (health.status, health.body) == (200, b"WSTUNSRV RUNNING\n")


@NEEDS_NGINX
@NEEDS_CURL
def test_forwarded_for_chain(frontend: Frontend) -> None:
    # The HTTP client is 127.0.0.3 and claims to be 203.0.113.7: nginx appends the address it
    # saw, and the server, trusting nginx (127.0.0.1) only, takes that one as the client's.
    answer = frontend.curl("/echo/forwarded", "--interface", "127.0.0.3",
                           "-H", "X-Forwarded-For: 203.0.113.7", token=True)
    assert answer.status == 200, answer.body
    headers = {k.lower(): v for k, v in answer.json()["headers"]}
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.3, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"
    assert "x-token" not in headers
    line = wait_until(lambda: re.search(r"HTTP RCV .*url=/echo/forwarded\b.*",
                                        frontend.server.process.output()),
                      what="the server's HTTP RCV line").group(0)
    assert re.search(r'\baddr="?127\.0\.0\.3\b', line), line


@NEEDS_NGINX
def test_plain_http_redirects_to_https(frontend: Frontend) -> None:
    answer = httpx.get(f"http://127.0.0.1:{frontend.nginx.http_port}/some/page?q=1",
                       headers={"Host": "localhost"}, timeout=10)
    assert answer.status_code == 301
    assert answer.headers["location"] == "https://localhost/some/page?q=1"


def _handshake(nginx: Nginx, context: ssl.SSLContext) -> tuple[str, str]:
    """(protocol, cipher) nginx agreed to, or the ssl.SSLError it caused."""
    with socket.create_connection(("127.0.0.1", nginx.tls_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        return tls.version() or "", tls.cipher()[0]  # type: ignore[index]


def _context(certs: Certificates, version: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
    context = certs.client_context()
    if version < ssl.TLSVersion.TLSv1_2:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let OpenSSL offer TLS 1.1 at all
    if ciphers:
        context.set_ciphers(ciphers)
    context.minimum_version = context.maximum_version = version
    return context


@NEEDS_NGINX
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_versions_and_ciphers(frontend: Frontend) -> None:
    nginx, certs = frontend.nginx, frontend.nginx.certs
    shipped = parse_nginx(SITE.read_text())
    allowed_ciphers = _servers(shipped)[0].value("ssl_ciphers")[0].split(":")
    assert _handshake(nginx, _context(certs, ssl.TLSVersion.TLSv1_3))[0] == "TLSv1.3"
    protocol, cipher = _handshake(nginx, _context(certs, ssl.TLSVersion.TLSv1_2))
    assert protocol == "TLSv1.2" and cipher in allowed_ciphers
    # Refused by nginx (an alert from the server), not by our own OpenSSL before sending a byte,
    # although the http level of the configuration allows TLS 1.1, as Debian's does.
    with pytest.raises(ssl.SSLError) as refused:
        _handshake(nginx, _context(certs, ssl.TLSVersion.TLSv1_1))
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value
    with pytest.raises(ssl.SSLError) as weak:  # CBC without forward secrecy
        _handshake(nginx, _context(certs, ssl.TLSVersion.TLSv1_2, ciphers="AES128-SHA"))
    assert weak.value.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE", weak.value


@NEEDS_NGINX
@NEEDS_CURL
def test_large_bodies_pass(frontend: Frontend) -> None:
    upload = frontend.nginx.directory / "upload.bin"
    sent = bytes(range(256)) * (4 * 1024)  # 1 MiB
    upload.write_bytes(sent)
    posted = frontend.curl("/echo/upload", "--data-binary", f"@{upload}",
                           "-H", "Content-Type: application/octet-stream", token=True)
    assert posted.status == 200, posted.body[:200]
    assert posted.json()["body"].encode("latin-1") == sent

    size = 10 * MiB
    downloaded = frontend.curl(f"/_token/{frontend.token}/bytes?size={size}")
    assert downloaded.status == 200, downloaded.body[:200]
    assert len(downloaded.body) == size
    assert downloaded.body == bytes(i % 251 for i in range(size))


# ------------------------------------------------------------------------------------ the cluster


def _completed(servers: list[Server]) -> dict[str, list[tuple[int, int]]]:
    """token prefix -> [(instance, completed requests)]."""
    done: dict[str, list[tuple[int, int]]] = {}
    for index, server in enumerate(servers):
        for tunnel in server.status()["tunnels"]:
            done.setdefault(tunnel["token"], []).append((index, tunnel["completed"]))
    return done


def _ask_every_way(http: httpx.Client, token: str, marker: str) -> None:
    """A request for ``token`` by X-Token, by /_token/ path, and by a percent-encoded path."""
    for how, path, headers in (
        ("header", f"/echo/{marker}/header", {"X-Token": token}),
        ("path", f"/_token/{token}/echo/{marker}/path", {}),
        ("encoded", f"/_token/{_percent_encoded(token)}/echo/{marker}/encoded", {}),
    ):
        answer = http.get(path, headers=headers)
        assert answer.status_code == 200, f"{marker} by {how}: {answer.status_code} {answer.text}"
        assert answer.json()["path"] == f"/echo/{marker}/{how}"


def _markers_seen(client: Client) -> set[str]:
    return set(re.findall(r"\bWS +RCV .*url=/echo/(t\d\d)/", client.process.output()))


def _only_own_marker_seen(client: Client, marker: str) -> None:
    """The client logged receiving requests marked ``marker``, and none marked otherwise."""
    wait_until(lambda: _markers_seen(client) == {marker},
               what=f"{marker}'s requests, and only those, in its client's log")


@NEEDS_NGINX
def test_cluster_spreads_tokens_and_survives_a_restart(harness: Harness, tmp_path: Path) -> None:
    started = time.monotonic()
    certs, servers, nginx = start_cluster(harness, tmp_path)
    with httpx.Client(base_url=nginx.https_url, verify=certs.client_context(), timeout=30) as http:
        owners = choose_tokens(harness, http, servers, count=20)
        tokens = list(owners)
        markers = {token: f"t{i:02d}" for i, token in enumerate(tokens)}
        clients = {
            token: harness.client(nginx.wss_url, token, "-certfile", str(certs.ca_pem),
                                  "-reconnect-max-delay", f"{RECONNECT_CAP:g}", wait=False)
            for token in tokens
        }
        # Each tunnel (hashed by its Origin header) on the instance its requests are hashed to.
        expected = {token[:8] + "...": [(owners[token], 1)] for token in tokens}
        wait_until(lambda: placement(servers) == expected, timeout=60,
                   what="every client registered on its token's instance")
        registered = time.monotonic()

        for token in tokens:
            _ask_every_way(http, token, markers[token])
        # The path wins over X-Token, for nginx as for the server.
        a, b = next((a, b) for a in tokens for b in tokens if owners[a] != owners[b])
        answer = http.get(f"/_token/{a}/echo/{markers[a]}/priority", headers={"X-Token": b})
        assert answer.status_code == 200, answer.text
        # Every request reached its own tunnel, and only that one.
        for token, client in clients.items():
            _only_own_marker_seen(client, markers[token])
        asked = {token[:8] + "...": [(owners[token], 4 if token == a else 3)] for token in tokens}
        assert _completed(servers) == asked

        # Restart one instance on the same port; its clients must come back to it.
        victim = owners[tokens[0]]
        moved = [token for token in tokens if owners[token] == victim]
        servers[victim].process.stop()
        # Meanwhile nginx answers for its tokens itself, without trying another instance.
        assert http.get("/echo/down", headers={"X-Token": moved[0]}).status_code == 502
        servers[victim] = harness.server(*TRUST_NGINX, port=servers[victim].port)
        restarted = time.monotonic()
        wait_until(lambda: placement(servers) == expected, timeout=5 * RECONNECT_CAP,
                   what=f"the {len(moved)} clients of the restarted instance back on it")
        back_after = time.monotonic() - restarted
        for token in tokens:
            _ask_every_way(http, token, markers[token])
        for token, client in clients.items():
            _only_own_marker_seen(client, markers[token])

    # Stop the clients together (the harness would stop them one by one).
    for client in clients.values():
        client.process.signal(signal.SIGTERM)
    for client in clients.values():
        client.process.stop()
    _no_token_in(nginx.logs(), harness)
    print(f"\ncluster: 20 clients registered in {registered - started:.1f}s (from the start), "
          f"{len(moved)} back {back_after:.1f}s after the restart")
