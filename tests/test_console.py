"""The operator's console, ``/_admin/``: a real srv with real clients (the original v1 binary, ours
over the WebSocket and over long-poll), its page in Debian's Chromium, its JSON API and event
stream, its actions, and who may reach it (loopback, trusted proxies, a password over TLS from a
network namespace's address).

Screenshots of the page are kept in each test's directory (``screenshots/``).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import httpx

from tests.support import netns
from tests.support.browser import NEEDS_CHROMIUM, chromium
from tests.support.console import (
    ConsolePage,
    act,
    event_stream,
    read_until,
    state,
    tunnel_row,
)
from tests.support.harness import PYTHON, ROOT, Harness, Server, environ, free_port, wait_until
from tests.support.nginx_frontend import (
    NEEDS_NGINX,
    SHIPPED_UPSTREAM,
    SITE,
    issue_certificates,
    nginx_argv,
    render_site,
    write_config,
)
from tests.support.reference import reference_binary
from tests.support.reference import start_client as start_original_client
from wstunnel.server.audit import safe_path
from wstunnel.tokens import Token

PASSWORD = "correct horse battery staple"


def console_server(harness: Harness, tmp_path: Path, *flags: str, port: int | None = None) -> Server:
    return harness.server("-state-file", str(tmp_path / "state.json"), *flags, port=port)


def logged(server: Server, pattern: str) -> int:
    """How many lines of the server's log match ``pattern`` (event names are padded)."""
    return len(re.findall(pattern, server.process.output()))


def csrf_of(server: Server) -> str:
    response = state(server.url)
    assert response.status_code == 200, response.text
    return str(response.json()["csrf_token"])


def no_whole_token(harness: Harness, *texts: str | bytes) -> None:
    for text in texts:
        blob = text.decode("latin-1") if isinstance(text, bytes) else text
        leaked = [token[:8] for token in harness.tokens if token in blob]
        assert not leaked, f"whole tokens {leaked} in {blob[:200]!r}..."



# -- the page, in a browser ----------------------------------------------------------------------


@NEEDS_CHROMIUM
def test_page_lists_every_kind_of_client_and_shows_requests_live(harness: Harness,
                                                                 tmp_path: Path) -> None:
    original = reference_binary()
    server = console_server(harness, tmp_path)
    backend = harness.backend()
    v1 = harness.new_token("origv1--")  # each prefix, 8 characters, names its client
    ws = harness.new_token("ourws---")
    lp = harness.new_token("ourlp---")
    start_original_client(harness, original, server, v1, backend=backend.url)
    harness.client(server, ws, "-transport", "websocket")
    harness.client(server, lp, "-transport", "longpoll")

    with chromium(tmp_path / "browser") as driver:
        page = ConsolePage(driver, server.url, tmp_path / "screenshots")
        page.open()
        cards = wait_until(lambda: (c := page.cards()) and all(
            len(c.get(t[:8] + "...", {}).get("clients", [])) == 1 for t in (v1, ws, lp)) and c,
            timeout=30, what="a card with its client for each token")
        kinds = {token: [(c["protocol"], c["transport"]) for c in cards[token[:8] + "..."]["clients"]]
                 for token in (v1, ws, lp)}
        assert kinds == {v1: [("v1", "websocket")], ws: [("v2", "websocket")],
                         lp: [("v2", "longpoll")]}
        ws_client = cards[ws[:8] + "..."]["clients"][0]["text"]
        assert "127.0.0.1" in ws_client and "WebSocket" in ws_client
        assert "long-poll" in cards[lp[:8] + "..."]["clients"][0]["text"]
        body = page.body_text()
        assert "listening" in body.lower() and f"127.0.0.1:{server.port}" in body
        fits = "return document.documentElement.scrollWidth <= window.innerWidth"
        assert driver.execute_script(fits), "the page is wider than the window"
        page.screenshot("console-clients.png")

        # Live, without a reload: a marker set in this page must still be there at the end.
        driver.execute_script("window.stillTheSamePage = 'yes'")
        for token in (v1, ws, lp):
            assert server.get("/echo/hello", token).status_code == 200
        for token in (v1, ws, lp):
            page.wait_card(token, lambda c: c["completed"] == 1 and "Last OK 200 OK" in c["text"],
                           f"{token[:8]}'s request to show")
        slow = threading.Thread(target=server.get, args=("/slow?secs=4", ws), daemon=True)
        slow.start()
        in_flight = wait_until(lambda: [row for row in page.table("#inflight") if "/slow" in row[2]],
                               timeout=15, what="the slow request in the in-flight list")
        assert in_flight[0][1] == "GET" and in_flight[0][3] == ws[:8] + "..."
        assert in_flight[0][4] == "127.0.0.1" and in_flight[0][2] == "/slow?..."
        page.screenshot("console-in-flight.png")
        slow.join(timeout=30)
        page.wait_card(ws, lambda c: c["completed"] == 2, "the slow request to complete")
        wait_until(lambda: not page.table("#inflight"), timeout=10, what="the in-flight list to empty")

        assert server.get("/status/503", lp).status_code == 503
        errors = wait_until(lambda: page.table("#errors"), timeout=10, what="the error to show")
        assert errors[0][1:4] == ["503", "Service Unavailable", lp[:8] + "..."]
        assert errors[0][4] == "GET /status/503"
        page.wait_card(lp, lambda c: "Last error 503 Service Unavailable" in c["text"],
                       "the last error on the card")
        assert driver.execute_script("return window.stillTheSamePage") == "yes"
        assert page.dataset("snapshots") == "1"  # one stream, never reopened
        assert int(page.dataset("updates")) >= 3
        page.screenshot("console-live.png")
        no_whole_token(harness, page.source(), page.body_text())

        # A phone's width: one column, nothing wider than the screen.
        driver.set_window_size(390, 844)
        wait_until(lambda: driver.execute_script(fits), timeout=10,
                   what="the page to fit a phone's width")
        page.screenshot("console-phone.png")


@NEEDS_CHROMIUM
def test_actions_from_the_page_disconnect_block_unblock_drain(harness: Harness, tmp_path: Path) -> None:
    server = console_server(harness, tmp_path)
    token = harness.new_token("blockme-")
    other = harness.new_token("keepme--")
    harness.client(server, token, "-reconnect-max-delay", "1")
    harness.client(server, other)
    with chromium(tmp_path / "browser") as driver:
        page = ConsolePage(driver, server.url, tmp_path / "screenshots")
        page.open()
        page.wait_card(token, lambda c: len(c["clients"]) == 1, "the card with its client")

        # Disconnect: the client goes, and comes back on its own.
        page.click(token, "disconnect", confirm=True)
        wait_until(lambda: "disconnected (1 client(s))" in page.message(), timeout=10,
                   what="the page to say it disconnected")
        wait_until(lambda: "ADMIN DISCONNECT" in server.process.output(), what="the log line")
        assert 'by="127.0.0.1 (loopback)"' in server.process.output()
        wait_until(lambda: logged(server, rf"WS   NEW +pkg=WStunsrv token={token[:8]}") == 2,
                   timeout=20, what="the client to come back")

        # Block: the next request gets 403, and the page says so.
        page.click(token, "block", confirm=True)
        card = page.wait_card(token, lambda c: c["blocked"], "the card to show the token blocked")
        assert "BLOCKED" in card["text"].upper()
        response = server.get("/after-block", token)
        assert response.status_code == 403
        assert response.text == "Token blocked on this server\n"
        page.wait_card(token, lambda c: "Last error 403 Token blocked on this server" in c["text"]
                       and c["errored"] == 1, "the 403 on the card")
        wait_until(lambda: any(row[0] == token[:8] + "..." for row in page.table("#blocked")),
                   timeout=10, what="the blocked list to name the token")
        assert "blocked: its requests now get 403" in page.message()
        page.screenshot("console-blocked.png")
        server.wait_clients(token, 0)
        wait_until(lambda: 'err="token blocked"' in server.process.output(), timeout=20,
                   what="the client's redial to be refused")
        assert server.get("/", other).status_code == 200  # another token is not touched

    # The block survives a restart: the new process refuses the token it has never seen.
    server.process.stop()
    state_file = tmp_path / "state.json"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    saved = state_file.read_text()
    assert token[:8] + "..." in saved and '"by": "127.0.0.1 (loopback)"' in saved
    no_whole_token(harness, saved)
    again = console_server(harness, tmp_path, port=server.port)  # where the client redials
    assert again.get("/after-restart", token).status_code == 403
    wait_until(lambda: 'err="token blocked"' in again.process.output(), timeout=20,
               what="the client's redial to be refused after the restart")
    assert again.clients(token) == 0

    with chromium(tmp_path / "browser-again") as driver:
        page = ConsolePage(driver, again.url, tmp_path / "screenshots")
        page.open()
        # Unblock, from the list of blocked tokens (the new process has no tunnel for it).
        wait_until(lambda: page.table("#blocked"), timeout=10, what="the blocked list")
        page.press("#blocked button[data-action='unblock']")
        wait_until(lambda: "unblocked" in page.message(), timeout=10, what="the page to say unblocked")
        again.wait_clients(token, 1, timeout=30)
        page.wait_card(token, lambda c: not c["blocked"] and len(c["clients"]) == 1,
                       "the client back on the page")
        assert again.get("/after-unblock", token).status_code == 200
        assert "ADMIN UNBLOCK" in again.process.output()

        # Drain: no more requests for tokens, tunnels closed, the console still live.
        page.press("#drain", confirm=True)
        wait_until(lambda: driver.execute_script("return !document.getElementById('draining').hidden"),
                   timeout=10, what="the page to say draining")
        drained = again.get("/after-drain", token)
        assert drained.status_code == 503 and drained.headers["retry-after"] == "5"
        again.wait_clients(token, 0, timeout=20)
        wait_until(lambda: driver.execute_script(
            "return document.getElementById('f-clients').innerText") == "0", timeout=20,
            what="the page to count no client")
        assert logged(again, r'ADMIN DRAIN +pkg=WStunsrv by="127.0.0.1 \(loopback\)" result=started') == 1
        assert again.get("/_health_check").status_code == 200
        page.screenshot("console-drained.png")


# -- the API and the event stream --------------------------------------------------------------


def test_api_and_stream_carry_the_state_and_never_a_whole_token(harness: Harness,
                                                               tmp_path: Path) -> None:
    server = console_server(harness, tmp_path)
    token = harness.new_token("apitoken")
    harness.client(server, token)
    with event_stream(server) as (sock, stream):
        events = read_until(sock, stream, lambda e: e, timeout=15, what="the snapshot")
        name, snapshot = events[0]
        assert name == "snapshot" and snapshot["csrf_token"]
        assert snapshot["viewer"] == {"address": "127.0.0.1", "access": "loopback"}
        assert tunnel_row(snapshot, token)["clients"][0]["transport"] in ("websocket", "longpoll")
        # A token in X-Token and one after /_token/ (in the backend's own path or query it would
        # be in the logs too: test_paths_shown_hold_no_token_nor_query), an unknown token, a
        # backend error.
        began = time.monotonic()
        assert server.get("/echo/x?t=1", token).status_code == 200
        assert server.get(f"/_token/{token}/echo/y").status_code == 200
        unknown = harness.new_token("unknown-")
        assert server.get(f"/_token/{unknown}/nothing").status_code == 404
        assert server.get("/status/502", token).status_code == 502
        events = read_until(sock, stream, lambda e: sum(len(d.get("errors", [])) for _, d in e) >= 2,
                            timeout=15, what="updates with both errors")
        updates = [data for name, data in events if name == "update"]
        # Batched: at most two updates a second, however many requests.
        assert 1 <= len(updates) <= (time.monotonic() - began) / 0.5 + 2
        errors = [error for update in updates for error in update.get("errors", [])]
        assert [(e["status"], e["token"]) for e in errors] == [(404, unknown[:8] + "..."),
                                                                 (502, token[:8] + "...")]
        rows = [row for update in updates for row in update.get("tunnels", [])]
        assert rows[-1]["completed"] == 3 and rows[-1]["last_error"]["status"] == 502
        document = state(server.url)
        assert document.headers["content-type"] == "application/json"
        assert document.headers["cache-control"] == "no-store"
        row = tunnel_row(document.json(), token)
        assert row["last_success"]["status"] == 200
        assert row["last_success"]["client_address"] == "127.0.0.1"
        assert document.json()["server"]["requests_total"] == 4
        pages = [httpx.get(f"{server.url}/_admin/{name}", timeout=10)
                 for name in ("", "console.css", "console.js")]
        assert all(p.status_code == 200 for p in pages)
        assert "default-src 'none'" in pages[0].headers["content-security-policy"]
        no_whole_token(harness, bytes(stream.raw), document.text, *(p.text for p in pages))


def test_actions_need_the_csrf_token_from_the_same_site(harness: Harness, tmp_path: Path) -> None:
    server = console_server(harness, tmp_path)
    token = harness.new_token()
    harness.client(server, token)
    tunnel_id = tunnel_row(state(server.url).json(), token)["id"]
    path = f"tunnels/{tunnel_id}/disconnect"
    csrf = csrf_of(server)
    assert act(server.url, path).status_code == 403  # no token
    assert act(server.url, path, "0" * 64).status_code == 403  # a wrong one
    evil = act(server.url, path, csrf, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "Cross-site" in evil.json()["error"]
    cross = act(server.url, path, csrf, headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403
    assert server.clients(token) == 1  # none of them did anything
    assert httpx.get(f"{server.url}/_admin/api/{path}", timeout=10).status_code == 405
    assert act(server.url, "tunnels/" + "f" * 32 + "/block", csrf).status_code == 404
    same = act(server.url, path, csrf, headers={"Origin": server.url})
    assert same.status_code == 200 and same.json() == {"ok": True, "id": tunnel_id, "clients": 1}
    # Unblocking what is not blocked, blocking twice: said plainly.
    assert act(server.url, f"tunnels/{tunnel_id}/unblock", csrf).status_code == 409


def test_a_block_that_cannot_be_saved_changes_nothing(harness: Harness, tmp_path: Path) -> None:
    server = harness.server("-state-file", str(tmp_path / "missing" / "state.json"))
    token = harness.new_token()
    harness.client(server, token)
    tunnel_id = tunnel_row(state(server.url).json(), token)["id"]
    refused = act(server.url, f"tunnels/{tunnel_id}/block", csrf_of(server))
    assert refused.status_code == 500
    assert "missing/state.json" in refused.json()["error"] and "nothing changed" in refused.json()["error"]
    assert server.get("/", token).status_code == 200
    assert server.clients(token) == 1
    assert not tunnel_row(state(server.url).json(), token)["blocked"]


def test_a_broken_state_file_stops_the_start_naming_it(harness: Harness, tmp_path: Path) -> None:
    broken = tmp_path / "state.json"
    broken.write_text('{"version": 1, "blocked": [')
    process = harness.start("srv", [PYTHON, "-m", "wstunnel", "srv", "-host", "127.0.0.1", "-port",
                                    "0", "-state-file", str(broken)])
    assert process.wait_exit(30) == 78
    assert f"{broken}: not a wstunnel state file" in process.output()
    assert "Listening" not in process.output()


# -- who may come in -----------------------------------------------------------------------------


def test_addresses_beyond_loopback_and_trusted_proxies_are_refused(harness: Harness,
                                                                  tmp_path: Path) -> None:
    server = console_server(harness, tmp_path, "-trusted-proxies", "127.0.0.1")
    outsider = {"X-Forwarded-For": "198.51.100.7"}
    for path in ("", "console.js", "api/state", "api/events"):
        refused = httpx.get(f"{server.url}/_admin/{path}", headers=outsider, timeout=10)
        assert refused.status_code == 403, path
        assert "admin_password" in refused.json()["error"]
    assert act(server.url, "drain", csrf_of(server), headers=outsider).status_code == 403
    # The trusted proxy relaying a loopback client, or a trusted address, gets in.
    assert state(server.url, headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 200
    # DNS rebinding: a direct request naming another host is refused; an IP, localhost, in.
    rebound = state(server.url, headers={"Host": f"evil.example:{server.port}"})
    assert rebound.status_code == 403 and "DNS rebinding" in rebound.json()["error"]
    assert state(server.url, headers={"Host": f"localhost:{server.port}"}).status_code == 200
    assert not server.process.output().count("ADMIN")


def _curl_in(namespace: netns.Netns, *argv: str) -> tuple[int, str]:
    """curl run inside the namespace: status code and body."""
    result = subprocess.run(namespace.wrap(["curl", "-s", "-m", "15", "-w", "\n%{http_code}", *argv]),
                            capture_output=True, text=True, timeout=30, check=False)
    body, _, code = result.stdout.rpartition("\n")
    return int(code or 0), body


def test_a_peer_on_another_network_is_refused(harness: Harness, tmp_path: Path,
                                              namespace: netns.Netns) -> None:
    config = tmp_path / "wstunsrv.toml"
    config.write_text("")
    config.chmod(0o640)
    server = harness.server("-host", "0.0.0.0", "-config", str(config), "-state-file",
                            str(tmp_path / "state.json"), "-failure-limit", "3")
    url = f"http://{namespace.host_address}:{server.port}/_admin/api/state"
    code, body = _curl_in(namespace, url)
    assert code == 403 and "localhost and trusted proxies only" in body
    assert state(server.url).status_code == 200  # loopback still gets in

    # With a password: log in first (and over HTTPS, which this plain request is not).
    set_password(config)
    server.process.signal(signal.SIGHUP)
    wait_until(lambda: "changed=admin_password" in server.process.output(), what="the reload")
    code, body = _curl_in(namespace, url)
    assert code == 401 and "Log in first" in body
    login = ["-X", "POST", "-H", "Content-Type: application/json",
             f"http://{namespace.host_address}:{server.port}/_admin/api/login"]
    code, body = _curl_in(namespace, "--data", json.dumps({"password": PASSWORD}), *login)
    assert code == 403 and "HTTPS" in body


# -- a password, over TLS, through the shipped nginx file --------------------------------------


def set_password(config: Path) -> None:
    done = subprocess.run([PYTHON, "-m", "wstunnel", "admin", "passwd", "-stdin", str(config)],
                          input=PASSWORD + "\n", capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env=environ(), check=False)
    assert done.returncode == 0, done.stderr
    assert f"Set admin_password in {config}" in done.stdout


def opened_admin_location(site: str, allowed: str) -> str:
    """The site with its /_admin location opened as its comment says: ``return 404;`` gone,
    the other lines uncommented, ``allow`` set to ``allowed``."""
    start = site.index("    location ^~ /_admin {")
    end = site.index("\n    }", start)
    lines = []
    for line in site[start:end].splitlines():
        stripped = line.strip()
        if stripped == "return 404;":
            continue
        if stripped.startswith("# ") and stripped[2:].split(" ")[0] in (
                "allow", "deny", "proxy_pass", "proxy_http_version", "proxy_set_header",
                "proxy_buffering", "proxy_read_timeout"):
            line = line.replace("# ", "", 1)
        lines.append(line)
    block = "\n".join(lines)
    assert "proxy_pass http://wstunsrv;" in block and "\n        deny all;" in block
    assert "192.0.2.0/24" in block
    return site[:start] + block.replace("192.0.2.0/24", allowed) + site[end:]


@NEEDS_CHROMIUM
@NEEDS_NGINX
def test_remote_login_over_tls_in_a_browser(harness: Harness, tmp_path: Path,
                                            namespace: netns.Netns) -> None:
    config = tmp_path / "wstunsrv.toml"
    config.write_text('trusted_proxies = ["127.0.0.1"]\n')
    config.chmod(0o640)
    set_password(config)
    server = harness.server("-config", str(config), "-state-file", str(tmp_path / "state.json"),
                            "-failure-limit", "3")
    token = harness.new_token("remote--")
    harness.client(server, token)

    # nginx with the shipped file, its console location opened for the namespace's network,
    # listening on this host's side of the veth pair: the browser's address is not loopback.
    certs = issue_certificates(tmp_path)
    directory = tmp_path / "nginx"
    http_port, tls_port = free_port(), free_port()
    site = render_site(SITE, directory, http_port=http_port, tls_port=tls_port, certs=certs,
                       upstreams=[(SHIPPED_UPSTREAM, f"server 127.0.0.1:{server.port};")])
    site = site.replace(f"listen 127.0.0.1:{tls_port} ", f"listen {namespace.host_address}:{tls_port} ")
    site = opened_admin_location(site, f"{namespace.host_address}/32")
    conf = write_config(directory, site)
    nginx = harness.start("nginx", nginx_argv(directory, conf))

    def listening() -> bool:
        assert nginx.alive(), nginx.output()
        with socket.create_connection((namespace.host_address, tls_port), timeout=2):
            return True

    wait_until(listening, timeout=15, what="nginx to listen")
    url = f"https://{namespace.host_address}:{tls_port}"
    verify = certs.client_context()
    verify.check_hostname = False  # the certificate names localhost; this is its IP on the veth
    assert httpx.get(f"{url}/_admin/api/state", verify=verify, timeout=10).status_code == 401

    with chromium(tmp_path / "browser", trust=[certs.cert_pem]) as driver:
        page = ConsolePage(driver, url, tmp_path / "screenshots")
        page.open(live=False)
        wait_until(lambda: driver.execute_script("return !document.getElementById('login').hidden"),
                   timeout=20, what="the login form")
        page.screenshot("console-login.png")
        field = driver.find_element("id", "password")
        field.send_keys("not the password")
        driver.find_element("css selector", "#login-form button").click()
        wait_until(lambda: "Wrong password" in driver.find_element("id", "login-message").text,
                   timeout=20, what="the wrong password refused")
        field.clear()
        field.send_keys(PASSWORD)
        driver.find_element("css selector", "#login-form button").click()
        wait_until(lambda: page.live_text() == "live", timeout=30, what="the console after the login")
        card = page.wait_card(token, lambda c: len(c["clients"]) == 1, "the tunnel")
        assert card["clients"][0]["protocol"] == "v2"
        assert driver.execute_script("return !document.getElementById('logout').hidden")
        page.click(token, "disconnect", confirm=True)
        wait_until(lambda: "disconnected" in page.message(), timeout=15, what="the action to work")
        who = f'by="{namespace.host_address} (password, session 1)"'
        wait_until(lambda: who in server.process.output(), what="the action logged with its author")
        page.screenshot("console-remote.png")
        cookie = driver.get_cookie("wstunnel_console")
        assert cookie and cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
        assert cookie["path"] == "/_admin/"

    address = re.escape(namespace.host_address)
    assert logged(server, rf'ADMIN LOGIN +pkg=WStunsrv addr={address} result="wrong password"') == 1
    assert logged(server, rf"ADMIN LOGIN +pkg=WStunsrv addr={address} session=1 result=ok") == 1
    assert PASSWORD not in server.process.output()
    # The brake: failure_limit 3, one wrong password from the browser and two more here, then
    # even the right one is refused, with Retry-After.
    with httpx.Client(base_url=url, verify=verify, timeout=30) as http:
        for _ in range(2):
            assert http.post("/_admin/api/login", json={"password": "nope"}).status_code == 401
        braked = http.post("/_admin/api/login", json={"password": PASSWORD})
        assert braked.status_code == 429 and int(braked.headers["retry-after"]) >= 1
        assert http.get("/_admin/api/state").status_code == 429


@NEEDS_NGINX
def test_the_shipped_nginx_file_keeps_the_console_closed(harness: Harness, tmp_path: Path) -> None:
    server = console_server(harness, tmp_path, "-trusted-proxies", "127.0.0.1")
    certs = issue_certificates(tmp_path)
    directory = tmp_path / "nginx"
    http_port, tls_port = free_port(), free_port()
    site = render_site(SITE, directory, http_port=http_port, tls_port=tls_port, certs=certs,
                       upstreams=[(SHIPPED_UPSTREAM, f"server 127.0.0.1:{server.port};")])
    nginx = harness.start("nginx", nginx_argv(directory, write_config(directory, site)))

    def listening() -> bool:
        assert nginx.alive(), nginx.output()
        with socket.create_connection(("127.0.0.1", tls_port), timeout=2):
            return True

    wait_until(listening, timeout=15, what="nginx to listen")
    with httpx.Client(base_url=f"https://localhost:{tls_port}", verify=certs.client_context(),
                      timeout=10) as http:
        for path in ("/_admin", "/_admin/", "/_admin/api/state"):
            assert http.get(path).status_code == 404, path
        assert http.get("/_health_check").status_code == 200
    assert "/_admin" not in server.process.output()


# -- wstunnel admin passwd -------------------------------------------------------------------


def test_admin_passwd_writes_a_hash_the_server_takes(tmp_path: Path) -> None:
    config = tmp_path / "wstunsrv.toml"
    shipped = (ROOT / "etc" / "wstunnel" / "wstunsrv.toml").read_text()
    config.write_text(shipped)
    config.chmod(0o644)
    set_password(config)
    text = config.read_text()
    assert PASSWORD not in text
    lines = [line for line in text.splitlines() if line.startswith("admin_password = ")]
    assert len(lines) == 1 and lines[0].startswith('admin_password = "scrypt$ln=17,r=8,p=1$')
    # Below its commented sample, the rest of the file as it was.
    assert text.replace(lines[0] + "\n", "") == shipped
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    set_password(config)  # again: replaced, not added
    assert sum(line.startswith("admin_password") for line in config.read_text().splitlines()) == 1
    check = subprocess.run([PYTHON, "-m", "wstunnel", "config", "check", str(config)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT, env=environ(),
                           check=False)
    assert check.returncode == 0, check.stderr
    assert "scrypt" not in check.stdout  # a secret: redacted

    short = subprocess.run([PYTHON, "-m", "wstunnel", "admin", "passwd", "-stdin", str(config)],
                           input="short\n", capture_output=True, text=True, timeout=60, cwd=ROOT,
                           env=environ(), check=False)
    assert short.returncode == 2 and "at least 12 characters" in short.stderr


def test_a_password_in_clear_in_the_config_stops_the_server(tmp_path: Path) -> None:
    config = tmp_path / "wstunsrv.toml"
    config.write_text(f'admin_password = "{PASSWORD}"\n')
    config.chmod(0o640)
    done = subprocess.run([PYTHON, "-m", "wstunnel", "srv", "-config", str(config), "-port", "0",
                           "-host", "127.0.0.1"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env=environ(), check=False)
    assert done.returncode == 78
    assert f"{config}: key 'admin_password': is not a password hash" in done.stderr
    assert PASSWORD not in done.stderr


def test_paths_shown_hold_no_token_nor_query() -> None:
    secret = "s3cr3t-t0ken-for-the-path-test"
    token = Token(secret)
    assert safe_path(f"/echo/{secret}/x?t={secret}".encode(), token) == "/echo/s3cr3t-t.../x?..."
    assert safe_path(f"/_token/{secret}/page".encode(), token) == "/_token/s3cr3t-t.../page"
    assert safe_path(b"/" + b"a" * 200, token) == "/" + "a" * 76 + "..."


def test_the_cost_script_runs(tmp_path: Path) -> None:
    """scripts/console_cost.py, tiny: its figures come out, with the feed's own counts moving."""
    out = tmp_path / "cost.json"
    done = subprocess.run([PYTHON, str(ROOT / "scripts" / "console_cost.py"), "--smoke", "--json",
                           str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=environ(), check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    assert figures["tunnels"] == 20
    assert figures["page_load"]["snapshot_bytes"] > 20 * 200
    assert figures["page_load"]["bytes_received"] > figures["page_load"]["snapshot_bytes"]
    assert figures["updates_under_requests"]["updates"] >= 1
    assert figures["updates_under_requests"]["ticks"] >= figures["updates_under_requests"]["updates"]
