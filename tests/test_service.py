"""The service-manager side: sd_notify messages on a real datagram socket, and SIGHUP reloads.

A unix datagram socket stands in for systemd's notify socket: it is the whole sd_notify
protocol, so what arrives there is exactly what systemd would read. The full systemd run is in
test_systemd.py.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.support.harness import Harness, environ, wait_until
from wstunnel.service import ServiceNotifier


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                return self.messages

    def saw(self, line: str) -> bool:
        return any(line in message.splitlines() for message in self.drain())

    def saw_prefix(self, prefix: str) -> str | None:
        for message in self.drain():
            for line in message.splitlines():
                if line.startswith(prefix):
                    return line
        return None


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    try:
        yield sock
    finally:
        sock.sock.close()


def test_notifier_is_silent_outside_systemd() -> None:
    notifier = ServiceNotifier(environ={})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready("fine")  # must not raise


def test_notifier_speaks_sd_notify(notify_socket: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "2000000",
           "WATCHDOG_PID": str(os.getpid())}
    notifier = ServiceNotifier(environ=env)
    old = os.environ.get("NOTIFY_SOCKET")
    os.environ["NOTIFY_SOCKET"] = str(notify_socket.path)  # systemd-python reads the variable
    try:
        notifier.ready("listening")
        notifier.status("listening")  # unchanged: not sent again
        notifier.status("busy")
        notifier.reloading()
        notifier.reloaded()
        notifier.stopping()
    finally:
        if old is None:
            del os.environ["NOTIFY_SOCKET"]
        else:
            os.environ["NOTIFY_SOCKET"] = old
    messages = notify_socket.drain()
    assert messages[0].splitlines() == ["READY=1", "STATUS=listening"]
    assert messages[1] == "STATUS=busy"
    assert messages[2].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert messages[3].splitlines() == ["READY=1", "STATUS=busy"]
    assert messages[4].splitlines() == ["STOPPING=1", "STATUS=stopping"]
    assert notifier.watchdog_interval == pytest.approx(1.0)


def test_watchdog_interval_ignores_another_pids_watchdog() -> None:
    notifier = ServiceNotifier(environ={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000",
                                       "WATCHDOG_PID": "1"})
    assert notifier.watchdog_interval is None


async def test_watchdog_pings_from_the_loop(notify_socket: NotifySocket,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    notifier = ServiceNotifier(environ={"NOTIFY_SOCKET": str(notify_socket.path),
                                        "WATCHDOG_USEC": "200000"})
    with trio.move_on_after(0.35):
        await notifier.watchdog_forever()
    pings = [m for m in notify_socket.drain() if m == "WATCHDOG=1"]
    assert 2 <= len(pings) <= 5


def test_server_and_client_report_ready_and_status(harness: Harness, notify_socket: NotifySocket
                                                   ) -> None:
    env = environ(NOTIFY_SOCKET=str(notify_socket.path))
    server = harness.server(env=env)
    ready = wait_until(lambda: notify_socket.saw_prefix("STATUS=listening on"), what="READY")
    assert ready.endswith(f":{server.port}")
    token = harness.new_token()
    harness.client(server, token, env=env)
    connected = wait_until(lambda: notify_socket.saw_prefix("STATUS=connected to ws://"),
                           what="the client's connected status")
    assert "since" in connected
    server.process.stop()
    wait_until(lambda: notify_socket.saw_prefix("STATUS=reconnecting in"),
               what="the client's reconnecting status")
    assert notify_socket.saw("STOPPING=1")
    assert not any(token in m for m in notify_socket.drain())


def test_sighup_reloads_what_can_change_and_keeps_the_rest(harness: Harness) -> None:
    config = harness.directory / "srv.toml"
    config.write_text("max_requests_per_tunnel = 1\nhttptimeout = 60\n")
    server = harness.server("-config", str(config))
    token = harness.new_token()
    client = harness.client(server, token)
    assert client.process.stop() == 0
    server.wait_clients(token, 0)
    pidfile = harness.directory / "later.pid"
    # -port on the command line outranks the file: that change is not one at all.
    config.write_text(f'max_requests_per_tunnel = 3\nhttptimeout = 1\nport = 1\npidfile = "{pidfile}"\n')
    server.process.signal(signal.SIGHUP)
    line = wait_until(lambda: [ln for ln in server.process.output().splitlines() if "Reload" in ln],
                      what="the reload line")[-1]
    assert "changed=httptimeout,max_requests_per_tunnel " in line
    assert "restart_needed=pidfile" in line
    assert not pidfile.exists()
    # New httptimeout applies: a queued request with no client times out after ~1 s.
    assert server.get("/queued", token).status_code == 504
    config.write_text("nonsense = true\n")
    server.process.signal(signal.SIGHUP)
    wait_until(lambda: "kept running settings" in server.process.output(), what="a refused reload")
    assert server.get("/_health_check").status_code == 200


def test_client_reload_changes_the_allowed_x_hosts(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    backend = harness.backend()
    config = harness.directory / "cli.toml"
    config.write_text(f'server = "{backend.url}"\nregexp = "http://nowhere"\n')
    client = harness.client(server, token, "-config", str(config), backend=backend.url)
    assert server.get("/echo", token, headers={"X-Host": backend.url}).status_code == 403
    config.write_text(f'server = "{backend.url}"\nregexp = "http://127\\\\.0\\\\.0\\\\.1:[0-9]+"\n')
    client.process.signal(signal.SIGHUP)
    wait_until(lambda: "changed=regexp" in client.process.output(), what="the client's reload")
    assert server.get("/echo", token, headers={"X-Host": backend.url}).status_code == 200


def test_allowed_tokens_refuse_others_and_reload_revokes(harness: Harness) -> None:
    kept, dropped, stranger = harness.new_token(), harness.new_token(), harness.new_token()
    config = harness.directory / "srv.toml"
    config.write_text(f'allowed_tokens = ["{kept}", "{dropped}"]\n')
    config.chmod(0o600)
    server = harness.server("-config", str(config))
    harness.client(server, kept)
    revoked = harness.client(server, dropped)
    refused = harness.client(server, stranger, wait=False)
    wait_until(lambda: "403" in refused.process.output(), what="the stranger to be refused")
    assert server.clients(stranger) == 0
    assert server.get("/x", dropped).status_code == 200
    config.write_text(f'allowed_tokens = ["{kept}"]\n')
    server.process.signal(signal.SIGHUP)
    wait_until(lambda: "WS   REVOKE" in server.process.output(), what="the revocation")
    assert server.get("/x", dropped).status_code == 404
    assert server.get("/x", kept).status_code == 200
    wait_until(lambda: "403" in revoked.process.output(), what="the revoked client to be refused")
    assert all(token not in server.process.output() for token in (kept, dropped, stranger))
