"""A base path (issue 17): srv serves every endpoint under a prefix; the cli keeps the path of its
-tunnel URL (``wss://host/prefix`` dials ``/prefix/_tunnel``), long-poll included.

Real processes on loopback: srv with ``-base-path`` reached directly and through the shipped
nginx file with its locations moved under the prefix, as its comment says to.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from tests.support.harness import Harness, Server, free_port, raw_exchange, wait_until
from tests.support.nginx_frontend import (
    NEEDS_NGINX,
    SHIPPED_UPSTREAM,
    SITE,
    TRUST_NGINX,
    issue_certificates,
    start_nginx,
)
from tests.support.srv_tls import curl
from wstunnel.config import normalise_base_path

BASE = "/tunnels/wst"


def start_under_base(harness: Harness, *flags: str) -> Server:
    server = harness.server("-base-path", BASE, *flags, wait=False, port=free_port())
    wait_until(lambda: server.get(f"{BASE}/_health_check", timeout=2).status_code == 200,
               what="wstunnel srv to answer under its base path")
    return server


@pytest.mark.parametrize("transport", ["websocket", "longpoll"])
def test_everything_under_the_base_path(harness: Harness, transport: str) -> None:
    server = start_under_base(harness)
    token = harness.new_token()
    harness.client(f"{server.ws_url}{BASE}", token, "-transport", transport, wait=False)

    def status_under_base() -> dict:
        return server.get(f"{BASE}/_status", timeout=2).json()

    wait_until(lambda: status_under_base()["tunnels"], what="the client under the base path")
    output = harness.processes[-1].wait_output("WS   DIAL")
    dialled = [line for line in output.splitlines() if "WS   DIAL" in line]
    wanted = f"{BASE}/_tunnel" if transport == "websocket" else f"{BASE}/_tunnel/poll"
    assert dialled and all(wanted in line for line in dialled), dialled
    assert status_under_base()["tunnels"][0]["clients"][0]["transport"] == transport
    # Requests: X-Token under the prefix, and /_token/ paths; the backend sees the path without it.
    response = server.get(f"{BASE}/echo?q=1", token)
    assert response.status_code == 200 and response.json()["path"] == "/echo?q=1"
    assert server.get(f"{BASE}/_token/{token}/echo").json()["path"] == "/echo"
    assert server.get(BASE, token).text == "backend page /\n"  # the prefix alone is its root
    assert server.get(f"{BASE}?x=1", token).text == "backend page /\n"
    assert server.get(f"{BASE}/_health_check").text == "WSTUNSRV RUNNING\n"
    # Outside the prefix: nothing, the server's endpoints included.
    for outside in ("/_health_check", "/echo", f"{BASE}x/echo", "/tunnels"):
        answer = server.get(outside, token)
        assert answer.status_code == 404 and f"serves under {BASE}/" in answer.text, outside
    assert b" 404 " in raw_exchange(server.port, b"GET /_tunnel HTTP/1.1\r\nHost: x\r\n"
                                    b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n").split(b"\r\n")[0]


def test_base_path_normalised_and_checked() -> None:
    assert normalise_base_path("tunnels//wst/") == "/tunnels/wst"
    assert normalise_base_path("/") == ""
    assert normalise_base_path("") == ""
    for bad in ("/a/../b", "/./a", "/a\x00", "/a\x7f", "/a b", "/a%2e%2e", "/a?b", "/a#b"):
        with pytest.raises(ValueError):
            normalise_base_path(bad)


@pytest.mark.parametrize(("value", "says"), [
    ("/tunnels/../etc", "'.' or '..' segments"),
    ("/tunnels\u0007", "control character"),
])
def test_bad_base_path_exits_78_naming_the_file(tmp_path: Path, value: str, says: str) -> None:
    config = tmp_path / "wstunsrv.toml"
    config.write_text(tomli_w.dumps({"base_path": value}))
    done = subprocess.run([sys.executable, "-m", "wstunnel", "srv", "-config", str(config),
                           "-host", "127.0.0.1", "-port", str(free_port())],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 78, done.stderr
    assert f"{config}: key 'base_path': " in done.stderr and says in done.stderr, done.stderr
    assert "Listening" not in done.stderr


@NEEDS_NGINX
@pytest.mark.parametrize("transport", ["websocket", "longpoll"])
def test_base_path_behind_nginx(harness: Harness, tmp_path: Path, transport: str) -> None:
    server = start_under_base(harness, *TRUST_NGINX)
    certs = issue_certificates(tmp_path)
    nginx = start_nginx(harness, tmp_path / "nginx", SITE, certs, [
        (SHIPPED_UPSTREAM, f"server 127.0.0.1:{server.port};"),
        # As the shipped comment says: the two locations of the TLS server, under the prefix.
        ("location = /_tunnel {", f"location = {BASE}/_tunnel {{"),
        ("/_metrics.\n    location / {", f"/_metrics.\n    location {BASE}/ {{"),
    ])
    token = harness.new_token()
    client = harness.client(f"{nginx.wss_url}{BASE}", token, "-certfile", str(certs.ca_pem),
                            "-transport", transport, wait=False)
    wait_until(lambda: "WS   CONNECTED" in client.process.output(), timeout=30,
               what="the client through nginx under the base path")
    answer = curl(f"{nginx.https_url}{BASE}/echo?via=nginx", "-H", f"X-Token: {token}",
                  cacert=certs.ca_pem)
    assert answer.status == 200 and answer.json()["path"] == "/echo?via=nginx"
    # nginx's own answer outside the prefix (no location there).
    assert curl(f"{nginx.https_url}/echo", "-H", f"X-Token: {token}", cacert=certs.ca_pem).status == 404
    assert server.process.output().count("WS   NEW") == 1
