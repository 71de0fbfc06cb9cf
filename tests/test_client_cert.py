"""Client certificates (issue 17): srv asks for one signed by its CA, on /_tunnel or on every
request; the cli presents -client-cert/-client-key on wss:// (through a CONNECT proxy, over
long-poll too); behind nginx's ssl_verify_client the verified subject comes in a header srv
believes from its trusted proxies only. The subject shows in /_status and the WS NEW line.

Real processes on loopback, throwaway trustme CAs: one srv trusts, one it does not.
"""

from __future__ import annotations

import base64
import secrets
import socket
from pathlib import Path

import pytest

from tests.support.fronts import needs_tinyproxy, start_tinyproxy
from tests.support.harness import Client, Harness, raw_exchange, wait_until
from tests.support.nginx_frontend import NEEDS_NGINX, SHIPPED_UPSTREAM, SITE, Certificates, start_nginx
from tests.support.srv_tls import CertFiles, Pki, TlsServer, curl, start_tls_server

REQUIRE_TUNNEL = ("-require-client-cert", "tunnel")


def cert_flags(files: CertFiles) -> tuple[str, ...]:
    return ("-client-cert", str(files.cert), "-client-key", str(files.key))


def start_server(harness: Harness, pki: Pki, *flags: str) -> TlsServer:
    return start_tls_server(harness, pki.server_cert("localhost"), "-tls-client-ca",
                            str(pki.ca_pem), *flags, pki=pki)


def connected(client: Client) -> bool:
    return "WS   CONNECTED" in client.process.output()


def test_cli_without_a_wrong_and_the_right_certificate(harness: Harness, tmp_path: Path) -> None:
    pki, stranger = Pki(tmp_path / "pki"), Pki(tmp_path / "stranger", name="stranger")
    server = start_server(harness, pki, *REQUIRE_TUNNEL)
    token = harness.new_token()
    ca = ("-certfile", str(pki.ca_pem))

    bare = harness.client(server.wss_url, token, *ca, "-transport", "websocket", wait=False)
    wait_until(lambda: "handshake refused: HTTP 403" in bare.process.output(),
               what="the cli without a certificate to be refused")
    wrong = harness.client(server.wss_url, token, *ca, *cert_flags(stranger.client_cert("mallory")),
                           "-transport", "websocket", wait=False)
    wait_until(lambda: "TLS   REFUSE" in server.process.output(), what="the stranger's certificate refused")
    wait_until(lambda: "WS   RECONNECT" in wrong.process.output(), what="the stranger's cli to retry")
    right = harness.client(server.wss_url, token, *ca, *cert_flags(pki.client_cert("alice")),
                           wait=False)
    wait_until(lambda: server.clients(token), what="the certified cli to connect")

    [client] = server.clients(token)
    assert client["client_subject"].startswith("CN=alice,"), client
    server.process.wait_output(f'subject="{client["client_subject"]}"')  # the WS NEW line
    assert connected(right) and not connected(bare) and not connected(wrong)
    srv_log = server.process.output()
    assert 'WS   REFUSE   pkg=WStunsrv addr=127.0.0.1 err="no client certificate"' in srv_log
    refusal = next(line for line in srv_log.splitlines() if "TLS   REFUSE" in line)
    assert "certificate" in refusal.lower(), refusal
    # Requests need no certificate with require_client_cert = "tunnel".
    with server.http() as http:
        assert http.get("/echo", headers={"X-Token": token}).status_code == 200


@needs_tinyproxy
def test_certificate_through_a_connect_proxy_and_over_long_poll(harness: Harness,
                                                                tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    server = start_server(harness, pki, *REQUIRE_TUNNEL)
    proxy = start_tinyproxy(harness, tmp_path, server.tls_port)
    alice, bob = pki.client_cert("alice"), pki.client_cert("bob")
    token = harness.new_token()
    harness.client(server.wss_url, token, "-certfile", str(pki.ca_pem), *cert_flags(alice),
                   "-proxy", proxy.url(), "-transport", "websocket", wait=False)
    harness.client(server.wss_url, token, "-certfile", str(pki.ca_pem), *cert_flags(bob),
                   "-proxy", proxy.url(), "-transport", "longpoll", wait=False)
    wait_until(lambda: len(server.clients(token)) == 2, timeout=30, what="both clients")
    seen = {c["transport"]: c["client_subject"].split(",")[0] for c in server.clients(token)}
    assert seen == {"websocket": "CN=alice", "longpoll": "CN=bob"}
    assert proxy.log().count(f"CONNECT localhost:{server.tls_port} HTTP/1.1") >= 2
    with server.http() as http:
        assert http.get("/echo", headers={"X-Token": token}).status_code == 200


def test_every_request_needs_a_certificate_when_required_for_all(harness: Harness,
                                                                 tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    server = start_server(harness, pki, "-require-client-cert", "all")
    alice = pki.client_cert("alice")
    token = harness.new_token()
    harness.client(server.wss_url, token, "-certfile", str(pki.ca_pem), *cert_flags(alice),
                   wait=False)
    wait_until(lambda: server.clients(token, cert=alice), what="the certified cli")
    url = f"{server.https_url()}/echo"
    refused = curl(url, "-H", f"X-Token: {token}", cacert=pki.ca_pem)
    assert refused.status == 403 and b"client certificate" in refused.body
    assert curl(f"{server.https_url()}/_health_check", cacert=pki.ca_pem).status == 403
    allowed = curl(url, "-H", f"X-Token: {token}", "--cert", str(alice.cert), "--key",
                   str(alice.key), cacert=pki.ca_pem)
    assert allowed.status == 200 and allowed.json()["path"] == "/echo"
    # The plain listener has no certificates at all: everything there is refused.
    assert server.plain().get("/echo", token).status_code == 403


def _handshake(subject: str | None, token: str) -> bytes:
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    lines = ["GET /_tunnel HTTP/1.1", "Host: localhost", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
             f"Origin: {token}"]
    if subject is not None:
        lines.append(f"X-Client-Subject: {subject}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted", "trusted-proxy"])
def test_the_subject_header_is_believed_from_trusted_proxies_only(
        harness: Harness, tmp_path: Path, trusted: bool) -> None:
    pki = Pki(tmp_path / "pki")
    flags = ["-trusted-proxies", "127.0.0.1"] if trusted else []
    server = start_server(harness, pki, *REQUIRE_TUNNEL, *flags)
    assert server.plain_port is not None
    token = harness.new_token()
    answer = raw_exchange(server.plain_port, _handshake("CN=forged", token))
    status = int(answer.split(b" ", 2)[1])
    assert status == (101 if trusted else 403), answer[:200]


@NEEDS_NGINX
def test_nginx_ssl_verify_client_passes_the_subject(harness: Harness, tmp_path: Path) -> None:
    pki, stranger = Pki(tmp_path / "pki"), Pki(tmp_path / "stranger", name="stranger")
    server = harness.server("-trusted-proxies", "127.0.0.1", *REQUIRE_TUNNEL)
    leaf = pki.server_cert("localhost", "127.0.0.1")
    nginx = start_nginx(harness, tmp_path / "nginx", SITE, Certificates(pki.ca_pem, leaf.cert, leaf.key), [
        (SHIPPED_UPSTREAM, f"server 127.0.0.1:{server.port};"),
        # The shipped lines, switched on, with the test's CA.
        ("# ssl_client_certificate /etc/wstunnel/client-ca.pem;",
         f"ssl_client_certificate {pki.ca_pem};"),
        ("# ssl_verify_client optional;", "ssl_verify_client optional;"),
    ])
    token = harness.new_token()
    ca = ("-certfile", str(pki.ca_pem), "-transport", "websocket")
    bare = harness.client(nginx.wss_url, token, *ca, wait=False)
    wrong = harness.client(nginx.wss_url, token, *ca, *cert_flags(stranger.client_cert("mallory")),
                           wait=False)
    wait_until(lambda: "handshake refused: HTTP 403" in bare.process.output(),
               what="srv to refuse the cli without a certificate")
    wait_until(lambda: "handshake refused: HTTP 400" in wrong.process.output(),
               what="nginx to refuse the stranger's certificate")
    harness.client(nginx.wss_url, token, *ca, *cert_flags(pki.client_cert("alice")), wait=False)
    server.wait_clients(token, 1)
    [client] = server.status()["tunnels"][0]["clients"]
    assert client["client_subject"].startswith("CN=alice,"), client
    assert not connected(bare) and not connected(wrong)

    # A client that sends the header itself, through nginx, without a certificate: nginx
    # replaces it (with nothing), so srv still sees no subject.
    with socket.create_connection(("127.0.0.1", nginx.tls_port), timeout=15) as raw, \
            pki.context().wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(_handshake("CN=forged", harness.new_token()))
        assert tls.recv(4096).startswith(b"HTTP/1.1 403")
    answer = curl(f"{nginx.https_url}/echo", "-H", f"X-Token: {token}", "-H",
                  "X-Client-Subject: CN=forged", cacert=pki.ca_pem)
    assert answer.status == 200
    # Nor does the header reach a backend.
    assert "x-client-subject" not in {k.lower() for k, _ in answer.json()["headers"]}
