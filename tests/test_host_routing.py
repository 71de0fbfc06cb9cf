"""Host routing (issue 17): ``<label>.<domain>`` reaches a tunnel without X-Token.

Real processes on loopback: srv with ``host_domains``, our cli (and the original's, which learns
nothing new for token hosts), a backend; curl with ``--resolve`` for both modes (the label is the
token; the label is a name srv maps to a token, optionally behind Basic credentials kept as
hashes); a real Chromium with a host-resolver rule loading an app with absolute paths over srv's
own TLS. The harness's leak check covers the tokens and the Basic password in every log.
"""

from __future__ import annotations

import base64
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.browser import NEEDS_CHROMIUM, chromium, load_page
from tests.support.harness import PYTHON, SUPPORT, Harness, Server, free_port, wait_until
from tests.support.nginx_frontend import (
    CLUSTER_SITE,
    NEEDS_NGINX,
    SHIPPED_CLUSTER_PORTS,
    SHIPPED_UPSTREAM,
    SITE,
    TRUST_NGINX,
    Certificates,
    start_nginx,
)
from tests.support.reference import reference_binary, start_client
from tests.support.srv_tls import TEST_DOMAIN, Pki, curl, start_tls_server
from wstunnel.config import ServerSettings
from wstunnel.hostnames import Credential
from wstunnel.server.hosts import HostRouting

PASSWORD = "pw-" + secrets.token_hex(8)  # distinctive: found in a log, it leaked


def host_token(harness: Harness) -> str:
    """A token that is a DNS label (what `wstunnel token new -host-label` makes)."""
    token = secrets.token_hex(16)
    harness.tokens.add(token)
    return token


def start_app(harness: Harness) -> str:
    """tests/support/absolute_app.py; returns its URL."""
    port = free_port()
    harness.start("app", [PYTHON, str(SUPPORT / "absolute_app.py"), str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(url + "/", timeout=2).status_code == 200, what="the app")
    return url


def routed(server: Server, label: str, path: str, *args: str) -> tuple[int, dict, bytes]:
    answer = curl(f"http://{label}.{TEST_DOMAIN}:{server.port}{path}", *args,
                  resolve=f"{label}.{TEST_DOMAIN}")
    return answer.status, answer.headers, answer.body


# -- the rules, without processes -------------------------------------------------------------


def test_which_hosts_route_and_to_what() -> None:
    token = "a" * 20
    settings = ServerSettings(host_domains=["*.WST.test."], host_names={"app": "t" * 20},
                              host_credentials=[f"app={Credential.make('alice', PASSWORD)}"])
    hosts = HostRouting(settings)
    assert hosts.enabled
    match = hosts.match(f"{token}.wst.test".encode())
    assert match is not None and match.token is not None and match.token.reveal() == token
    assert match.named is None
    # Case, a port and a final dot do not matter; the label is lowercased as browsers send it.
    for host in (b"AAAAAAAAAAAAAAAAAAAA.Wst.Test:8443", b"aaaaaaaaaaaaaaaaaaaa.wst.test."):
        found = hosts.match(host)
        assert found is not None and found.token is not None and found.token.reveal() == token
    named = hosts.match(b"app.wst.test")
    assert named is not None and named.named is not None and named.named.name == "app"
    assert named.token is not None and named.token.reveal() == "t" * 20
    assert [c.user for c in named.named.credentials] == [b"alice"]
    # Not <label>.<domain>: routed as before.
    for host in (b"wst.test", b"a.b.wst.test", b"x.other.test", b"[::1]:80", b"127.0.0.1:80",
                 b"", None, b".wst.test"):
        assert hosts.match(host) is None, host
    # Only names, when labels are not tokens.
    only_names = HostRouting(settings.model_copy(update={"host_tokens": False}))
    unknown = only_names.match(f"{token}.wst.test".encode())
    assert unknown is not None and unknown.token is None
    assert not HostRouting(ServerSettings()).enabled


async def test_credentials_checked_once_then_remembered() -> None:
    settings = ServerSettings(host_domains=["wst.test"], host_names={"app": "t" * 20},
                              host_credentials=[f"app={Credential.make('alice', PASSWORD)}"])
    hosts = HostRouting(settings)
    match = hosts.match(b"app.wst.test")
    assert match is not None and match.named is not None

    def basic(user: str, password: str) -> bytes:
        return b"Basic " + base64.b64encode(f"{user}:{password}".encode())

    assert await hosts.authorized(match.named, basic("alice", PASSWORD))
    assert not await hosts.authorized(match.named, basic("alice", PASSWORD + "x"))
    assert not await hosts.authorized(match.named, basic("bob", PASSWORD))
    assert not await hosts.authorized(match.named, None)
    assert not await hosts.authorized(match.named, b"Bearer abc")
    # Remembered: a browser's next requests cost a look-up, not another scrypt.
    before = trio.current_time()
    for _ in range(50):
        assert await hosts.authorized(match.named, basic("alice", PASSWORD))
    assert trio.current_time() - before < 0.5


@pytest.mark.parametrize(("text", "key", "says"), [
    ('host_domains = ["wst.test"]\nhost_names = { App = "%s" }\n', "host_names", "lowercase DNS label"),
    ('host_names = "app=short"\n', "host_names", "shorter than 16"),
    ('host_names = "app%s"\n', "host_names", "entry 1 is not name=token"),
    ('host_names = "app=%s"\n'
     'host_credentials = ["wiki=alice:scrypt$14$8$1$AAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA"]\n',
     "host_credentials", "'wiki' is not one of host_names"),
    ('host_names = "app=%s"\nhost_credentials = ["app=alice:plaintext"]\n',
     "host_credentials", "the hash is not scrypt"),
    ('host_domains = ["wst_test.example"]\n', "host_domains", "is not a domain name"),
])
def test_bad_host_settings_exit_78_naming_file_and_key(tmp_path: Path, text: str, key: str,
                                                       says: str) -> None:
    token = secrets.token_urlsafe(24)
    config = tmp_path / "wstunsrv.toml"
    config.write_text(text.replace("%s", token) if "%s" in text else text)
    config.chmod(0o600)
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "wstunnel", "srv", "-config", str(config),
                           "-host", "127.0.0.1", "-port", str(port)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 78, done.stderr
    assert f"{config}: key '{key}'" in done.stderr and says in done.stderr, done.stderr
    assert token not in done.stderr + done.stdout
    assert "Listening" not in done.stderr  # refused before binding a port


# -- curl --resolve, plain HTTP -----------------------------------------------------------------


def test_token_host_reaches_the_tunnel_without_x_token(harness: Harness) -> None:
    server = harness.server("-host-domains", TEST_DOMAIN)
    token = host_token(harness)
    harness.client(server, token)
    backend = harness.backend()

    status, _, body = routed(server, token, "/echo?via=host")
    assert status == 200, body
    seen = httpx.Response(200, content=body).json()
    assert seen["path"] == "/echo?via=host"  # the target as the browser sent it
    headers = {k.lower(): v for k, v in seen["headers"]}
    # The Host the backend sees follows the existing rules: the -server's (X-Host's, if allowed).
    assert headers["host"] == f"127.0.0.1:{backend.port}"
    assert "x-token" not in headers
    # The app owns every path of its host, the server's own endpoints' names included.
    status, _, body = routed(server, token, "/_status")
    assert (status, body) == (200, b"backend page /_status\n")
    assert server.get("/_status").json()["tunnels"]  # on the server's own name: srv's status
    # Upper case (curl sends Host as typed; browsers lowercase it) routes the same.
    assert routed(server, token.upper(), "/x")[0] == 200
    # A label that is no registered token: 404 as for an unknown X-Token.
    other = secrets.token_hex(16)
    status, _, body = routed(server, other, "/x")
    assert (status, body) == (404, b"Tunnel not found\n")
    # Other names, and the bare domain, route as before: X-Token still works there.
    assert server.get("/echo", token).status_code == 200
    assert curl(f"http://{TEST_DOMAIN}:{server.port}/echo", "-H", f"X-Token: {token}",
                resolve=TEST_DOMAIN).status == 200
    assert curl(f"http://{TEST_DOMAIN}:{server.port}/echo", resolve=TEST_DOMAIN).status == 400
    server.process.wait_output(f"token={token[:8]}...")


def test_named_host_with_basic_credentials(harness: Harness, tmp_path: Path) -> None:
    # Its name goes in the URL, not it; but it must be a DNS label for the check below that
    # it is no label here (a token of new_token's may start with '-': curl then fails).
    token = host_token(harness)
    harness.tokens.add(PASSWORD)  # must appear in no log either
    credential = Credential.make("alice", PASSWORD)
    config = tmp_path / "wstunsrv.toml"
    config.write_text(f'host_domains = ["{TEST_DOMAIN}"]\nhost_tokens = false\n'
                      f'host_names = {{ app = "{token}" }}\n'
                      f'host_credentials = ["app={credential}"]\n')
    config.chmod(0o600)
    server = harness.server("-config", str(config))
    harness.client(server, token)

    status, headers, _ = routed(server, "app", "/echo")
    assert status == 401
    assert headers["www-authenticate"] == 'Basic realm="app", charset="UTF-8"'
    assert routed(server, "app", "/echo", "-u", f"alice:{PASSWORD}x")[0] == 401
    assert routed(server, "app", "/echo", "-u", f"mallory:{PASSWORD}")[0] == 401
    status, _, body = routed(server, "app", "/echo?n=1", "-u", f"alice:{PASSWORD}")
    assert status == 200, body
    seen = httpx.Response(200, content=body).json()
    assert seen["path"] == "/echo?n=1"
    # The tunnel's credentials are srv's: the app never sees them.
    assert "authorization" not in {k.lower() for k, _ in seen["headers"]}
    # Labels are names only here: the token as a label, or an unknown name, is not found.
    assert routed(server, token.lower(), "/echo")[0] == 404
    assert routed(server, "wiki", "/echo")[0] == 404
    assert 'HTTP AUTH     pkg=WStunsrv host=app addr=127.0.0.1 err="wrong credentials"' in \
        server.process.output()

    # A reload takes a new name (and drops the credentials) without a restart.
    config.write_text(f'host_domains = ["{TEST_DOMAIN}"]\nhost_tokens = false\n'
                      f'host_names = {{ app = "{token}", docs = "{token}" }}\n')
    server.process.signal(signal.SIGHUP)
    wait_until(lambda: routed(server, "docs", "/echo")[0] == 200, what="the reloaded names")
    assert routed(server, "app", "/echo")[0] == 200
    server.process.wait_output("Reload", "host_names")


def test_original_cli_behind_a_token_host(harness: Harness) -> None:
    """The cli learns nothing for token hosts: the original's works unchanged."""
    binary = reference_binary()
    server = harness.server("-host-domains", TEST_DOMAIN)
    token = host_token(harness)
    start_client(harness, binary, server, token, backend=harness.backend().url)
    status, _, body = routed(server, token, "/echo?from=original")
    assert status == 200, body
    assert httpx.Response(200, content=body).json()["path"] == "/echo?from=original"


# -- over srv's own TLS: curl, and a real browser -----------------------------------------------


def test_both_modes_over_srv_tls_with_curl(harness: Harness, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    leaf = pki.server_cert(TEST_DOMAIN, f"*.{TEST_DOMAIN}", "localhost")
    token, named_token = host_token(harness), harness.new_token()
    server = start_tls_server(harness, leaf, "-host-domains", TEST_DOMAIN,
                              "-host-names", f"app={named_token}", pki=pki, plain=False)
    harness.client(server.wss_url, token, "-certfile", str(pki.ca_pem), wait=False)
    harness.client(server.wss_url, named_token, "-certfile", str(pki.ca_pem), wait=False)
    wait_until(lambda: server.clients(token) and server.clients(named_token),
               what="both tunnels over wss://")
    for label in (token, "app"):
        host = f"{label}.{TEST_DOMAIN}"
        answer = curl(f"https://{host}:{server.tls_port}/echo?tls=1", "-v", resolve=host,
                      cacert=pki.ca_pem)
        assert answer.status == 200, answer.body
        assert answer.json()["path"] == "/echo?tls=1"


@NEEDS_CHROMIUM
def test_browser_loads_an_app_with_absolute_paths_by_host_name(harness: Harness,
                                                               tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    leaf = pki.server_cert(f"*.{TEST_DOMAIN}", "localhost")
    token, named_token = host_token(harness), harness.new_token()
    harness.tokens.add(PASSWORD)
    server = start_tls_server(
        harness, leaf, "-host-domains", TEST_DOMAIN, "-host-names", f"app={named_token}",
        "-host-credentials", f"app={Credential.make('alice', PASSWORD)}", pki=pki, plain=False)
    app = start_app(harness)
    for each in (token, named_token):
        harness.client(server.wss_url, each, "-certfile", str(pki.ca_pem), backend=app,
                       wait=False)
    wait_until(lambda: server.clients(token) and server.clients(named_token),
               what="both tunnels over wss://")
    rules = f"--host-resolver-rules=MAP *.{TEST_DOMAIN} 127.0.0.1"
    with chromium(tmp_path / "browser", trust=[leaf.cert], arguments=[rules]) as browser:
        # (a) the token is the host name.
        url = f"https://{token}.{TEST_DOMAIN}:{server.tls_port}/"
        results = load_page(browser, url, tmp_path / "token-host.png")
        failed = {name: c["detail"] for name, c in results["checks"].items() if not c["ok"]}
        assert not failed and len(results["checks"]) == 4, failed
        assert results["host"] == f"{token}.{TEST_DOMAIN}:{server.tls_port}"
        assert "x-token" not in results["api_headers"]

        # (b) a name, behind Basic credentials (the 401 without them is curl's test above: a
        # headless browser would sit on its login prompt), which the browser sends with every
        # request, as it does once someone has typed them in.
        url = f"https://app.{TEST_DOMAIN}:{server.tls_port}/"
        browser.execute_cdp_cmd("Network.enable", {})
        authorization = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                                {"headers": {"Authorization": authorization}})
        results = load_page(browser, url, tmp_path / "named-host.png")
        failed = {name: c["detail"] for name, c in results["checks"].items() if not c["ok"]}
        assert not failed and len(results["checks"]) == 4, failed
        assert "authorization" not in results["api_headers"]


# -- the shipped nginx files' wildcard server ---------------------------------------------------


@NEEDS_NGINX
@pytest.mark.parametrize("shipped", [SITE, CLUSTER_SITE], ids=lambda p: p.name)
def test_the_wildcard_server_of_the_shipped_nginx_files(harness: Harness, tmp_path: Path,
                                                        shipped: Path) -> None:
    pki = Pki(tmp_path / "pki")
    leaf = pki.server_cert("localhost", "127.0.0.1", f"*.{TEST_DOMAIN}")
    token, named_token = host_token(harness), harness.new_token()
    flags = ("-host-domains", TEST_DOMAIN, "-host-names", f"app={named_token}", *TRUST_NGINX)
    cluster = shipped == CLUSTER_SITE
    servers = [harness.server(*flags) for _ in (SHIPPED_CLUSTER_PORTS if cluster else [0])]
    replacements = [("server_name *.tunnel.example.com;", f"server_name *.{TEST_DOMAIN};")]
    if cluster:
        replacements += [(f"server 127.0.0.1:{shipped_port} ", f"server 127.0.0.1:{server.port} ")
                         for shipped_port, server in zip(SHIPPED_CLUSTER_PORTS, servers, strict=True)]
        # The cluster's hash: the test's domain, and the named host's token, as its comments say.
        replacements += [
            ("\\.tunnel\\.example\\.com$", "\\.wst\\.test$"),
            ('# app.tunnel.example.com    "the-token-that-app-stands-for";',
             f'app.{TEST_DOMAIN}    "{named_token}";'),
        ]
    else:
        replacements.append((SHIPPED_UPSTREAM, f"server 127.0.0.1:{servers[0].port};"))
    nginx = start_nginx(harness, tmp_path / "nginx", shipped,
                        Certificates(pki.ca_pem, leaf.cert, leaf.key), replacements)
    for each in (token, named_token):
        harness.client(nginx.wss_url, each, "-certfile", str(pki.ca_pem), wait=False)
    wait_until(lambda: all(sum(s.clients(t) for s in servers) == 1 for t in (token, named_token)),
               timeout=30, what="both tunnels through nginx")

    referer = f"https://{token}.{TEST_DOMAIN}/page"
    for label, want in ((token, token), ("app", named_token)):
        host = f"{label}.{TEST_DOMAIN}"
        # Several requests each: with the cluster's hash, every one must reach the one instance
        # that holds the tunnel (another instance answers 404 at once: restart_grace 0).
        for n in range(5):
            answer = curl(f"https://{host}:{nginx.tls_port}/echo?n={n}", "-H", f"Referer: {referer}",
                          resolve=host, cacert=pki.ca_pem)
            assert answer.status == 200, (label, answer.body)
            assert answer.json()["path"] == f"/echo?n={n}"
        owners = [i for i, s in enumerate(servers) if s.clients(want)]
        assert len(owners) == 1
    # The access log of these hosts keeps no whole token: not in the host, not in the Referer.
    access = nginx.access_log.read_text()
    assert f"https://{token[:8]}....{TEST_DOMAIN}/page" in access
    assert token not in access and named_token not in access
