"""End to end: the real ``wstunnel cli`` process, its backend choice, its files and its keepalive."""

from __future__ import annotations

import re
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support.harness import PYTHON, Harness, environ, free_port, wait_until


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def test_token_never_shows_in_the_process_table(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    client = harness.client(server, token)
    assert token not in _cmdline(client.process.pid)
    assert server.get("/ps", token).status_code == 200


def test_token_from_environment_and_config_file(harness: Harness) -> None:
    server = harness.server()
    env_token = harness.new_token()
    harness.client(server, "", env=environ(WSTUNCLI_TOKEN=env_token), wait=False)
    server.wait_clients(env_token, 1)
    file_token = harness.new_token()
    config = harness.directory / "cli.toml"
    config.write_text(f'token = "{file_token}"\ntunnel = "{server.ws_url}"\n'
                      f'server = "{harness.backend().url}"\n')
    config.chmod(0o600)
    harness.start("cli", [*_python_cli(), "-config", str(config)])
    server.wait_clients(file_token, 1)
    assert server.get("/env", env_token).status_code == 200
    assert server.get("/file", file_token).status_code == 200


@pytest.mark.both_transports
def test_x_host_must_match_the_whole_regexp(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    backend = harness.backend()
    harness.client(server, token, "-regexp", r"http://127\.0\.0\.1:[0-9]+", backend=None)
    allowed = server.get("/echo", token, headers={"X-Host": backend.url})
    assert allowed.status_code == 200
    names = {name.lower() for name, _ in allowed.json()["headers"]}
    assert "x-host" not in names and "x-token" not in names
    for refused in (backend.url + "/evil", "http://example.com", "x" + backend.url):
        response = server.get("/echo", token, headers={"X-Host": refused})
        assert response.status_code == 403, refused
    # Neither -server nor X-Host: nothing to forward to.
    assert server.get("/echo", token).status_code in (400, 403)


def test_default_server_used_when_x_host_absent_even_with_regexp(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    backend = harness.backend()
    harness.client(server, token, "-regexp", r"http://nothing\.example", backend=backend.url)
    assert server.get("/echo", token).json()["path"] == "/echo"
    assert server.get("/echo", token, headers={"X-Host": backend.url}).status_code == 403


@pytest.mark.both_transports
def test_statusfile_and_pidfile(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    statusfile = harness.directory / "status"
    pidfile = harness.directory / "cli.pid"
    client = harness.client(server, token, "-timeout", "3", "-statusfile", str(statusfile),
                            "-pidfile", str(pidfile))
    assert int(pidfile.read_text()) == client.process.pid
    text = wait_until(lambda: statusfile.exists() and statusfile.read_text(), what="the status file")
    unix = int(re.search(r"^Unix: (\d+)$", text, re.M).group(1))  # type: ignore[union-attr]
    stamp = re.search(r"^Time: (\S+)$", text, re.M).group(1)  # type: ignore[union-attr]
    assert abs(unix - time.time()) < 30
    parsed = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert int(parsed.timestamp()) == unix
    # Rewritten on every pong: pings go out every timeout/3 = 1 s.
    wait_until(lambda: statusfile.read_text() != text, what="the status file to be rewritten")
    assert client.process.stop() == 0
    assert not pidfile.exists()


def test_client_reconnects_with_backoff_when_server_comes_late(harness: Harness) -> None:
    port = free_port()
    token = harness.new_token()
    client = harness.client(f"ws://127.0.0.1:{port}", token, "-reconnect-max-delay", "2",
                            backend=harness.backend().url)
    wait_until(lambda: client.process.output().count("WS   RECONNECT") >= 3,
               what="three failed attempts")
    delays = [float(d) for d in re.findall(r"delay_secs=([0-9.]+)", client.process.output())]
    assert all(0 < d <= 2.0 for d in delays)
    server = harness.server(port=port)
    server.wait_clients(token, 1)
    assert server.get("/late", token).status_code == 200


@pytest.mark.both_transports
def test_client_drops_a_silent_server_and_comes_back(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    client = harness.client(server, token, "-timeout", "3")
    server.process.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: "WS   RECONNECT" in client.process.output(), timeout=20,
                   what="the client to give up on a server that does not answer pings")
    finally:
        server.process.signal(signal.SIGCONT)
    wait_until(lambda: server.get("/back", token).status_code == 200, timeout=30,
               what="the tunnel to work again")
    reconnects = [line for line in client.process.output().splitlines() if "WS   RECONNECT" in line]
    assert any("pong" in line.lower() or "timeout" in line.lower() for line in reconnects), reconnects


@pytest.mark.both_transports
def test_server_closes_a_silent_tunnel_after_wstimeout(harness: Harness) -> None:
    server = harness.server("-wstimeout", "3")
    token = harness.new_token()
    client = harness.client(server, token, "-timeout", "30")
    client.process.signal(signal.SIGSTOP)
    try:
        server.wait_clients(token, 0, timeout=20)
        assert "WS   TIMEOUT" in server.process.output()
    finally:
        client.process.signal(signal.SIGCONT)
    server.wait_clients(token, 1, timeout=60)


@pytest.mark.both_transports
def test_client_sigterm_closes_tunnel_and_exits_zero(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    client = harness.client(server, token)
    assert client.process.stop() == 0
    server.wait_clients(token, 0, timeout=5)
    output = client.process.output()
    assert "Stopped" in output
    assert "WS   DIAL" in output and output.count("WS   DIAL") == 1


def test_bad_client_config_names_the_problem(harness: Harness, tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('tunnel = "ws://127.0.0.1:1"\nserver = "http://x"\ntimeout = "soon"\n')
    token = harness.new_token()
    process = harness.start("cli", [*_python_cli(), "-config", str(config)],
                            env=environ(WSTUNCLI_TOKEN=token))
    assert process.wait_exit(30) != 0
    assert "timeout" in process.output() and str(config) in process.output()
    short = harness.start("cli", [*_python_cli(), "-tunnel", "ws://127.0.0.1:1", "-server",
                                  "http://x", "-token", "tooshort"])
    assert short.wait_exit(30) != 0
    assert "16" in short.output()


def test_backend_errors_come_back_as_they_are(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token)
    for code in (201, 204, 304, 404, 418, 500, 503):
        response = server.get(f"/status/{code}", token)
        assert response.status_code == code
    head = server.get("/bytes?size=5000", token, method="HEAD")
    assert head.status_code == 200
    assert head.headers["content-length"] == "5000"
    assert head.content == b""


def _python_cli() -> list[str]:
    return [PYTHON, "-m", "wstunnel", "cli"]
