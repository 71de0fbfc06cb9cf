"""The original Go WStunnel 1.0.7 as a live peer, for the interop tests.

The binary is no part of the project. On the team's machines and in CI it sits beside the clone
at ``../shared/reference/wstunnel-go-1.0.7``; ``WSTUNNEL_REFERENCE`` names another path. A clone
of one's own has no ``../shared``: there the tests that need the binary skip, saying where they
looked; with ``WSTUNNEL_REQUIRE_REFERENCE=1`` (set by ``.ci/run``) the same reason fails them, so
CI can never pass them by skipping.

Its processes start through the :class:`Harness` like ours: each is stopped when its test ends
and its log is searched for whole tokens. One thing is let through, the original server's own
defect (SPEC §5 is our fix of it): on every new tunnel it logs its registry entry, whole token
included (``rs="&{token:<token> lastID:...``). Only that field is skipped; the rest of its log is
searched like any other.

A :class:`Pairing` is one of the two interop set-ups (our srv with its cli, its srv with our cli)
behind one interface, so that a test runs unchanged against both.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

import httpx
import pytest

from tests.support.harness import Client, Harness, Server, free_port, wait_until

REFERENCE_ENV = "WSTUNNEL_REFERENCE"
REQUIRED_ENV = "WSTUNNEL_REQUIRE_REFERENCE"
VERSION = "1.0.7"
# Beside the clone (ROOT is the clone), as in CI and in the team's checkouts.
DEFAULT_PATH = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "wstunnel-go-1.0.7"

OUR_SRV = "our-srv+go-cli"
GO_SRV = "go-srv+our-cli"
PAIRINGS = (OUR_SRV, GO_SRV)

# The original server's registry entry, printed whole on each new tunnel: the token field of it.
_ORIGINAL_SERVER_LEAK = re.compile(r'(?<=rs="&\{token:)\S+')
_PENDING = re.compile(r"^req_pending=(\d+)$", re.MULTILINE)


def reference_binary() -> Path:
    """The original's binary; skips the calling test when it is missing, or fails it when
    ``WSTUNNEL_REQUIRE_REFERENCE=1``. A binary that is there but is not 1.0.7 always fails."""
    override = os.environ.get(REFERENCE_ENV, "")
    path = Path(override) if override else DEFAULT_PATH
    if not (path.is_file() and os.access(path, os.X_OK)):
        if override:
            reason = (f"the original WStunnel {VERSION} binary is not at {path} ({REFERENCE_ENV}); "
                      "CI provides it at ../shared/reference/wstunnel-go-1.0.7 beside the clone")
        else:
            reason = (f"the original WStunnel {VERSION} binary is not at {path}: it lives in "
                      "../shared beside the clone, which CI provides and a clone of one's own "
                      f"lacks (or set {REFERENCE_ENV} to a copy of it)")
        if os.environ.get(REQUIRED_ENV, "") not in ("", "0"):
            pytest.fail(f"{REQUIRED_ENV} is set and {reason}", pytrace=False)
        pytest.skip(reason)
    found = _version(path)
    if VERSION not in found:
        pytest.fail(f"{path} is not the original WStunnel {VERSION}: it says {found!r}", pytrace=False)
    return path


@cache
def _version(path: Path) -> str:
    done = subprocess.run([str(path), "version"], capture_output=True, text=True, timeout=30)
    return (done.stdout + done.stderr).strip()


@dataclass
class ReferenceServer(Server):
    """The original's ``srv``. It has no ``/_status``: its clients are counted from its log."""

    def status(self) -> dict:
        raise NotImplementedError("the original server has no /_status")

    def clients(self, token: str) -> int:
        prefix = f"token={token[:8]}..."
        opened = closed = 0
        for line in self.process.output().splitlines():
            if prefix not in line:
                continue
            if 'msg="WS new tunnel connection"' in line:
                opened += 1
            # Its tunnel writer logs one of these as it ends, after the reader saw the socket go.
            elif 'msg="WS closing on signal"' in line or 'msg="WS error causes retry"' in line:
                closed += 1
        return opened - closed


def start_server(harness: Harness, binary: Path, *flags: str) -> ReferenceServer:
    """The original's ``srv`` on 127.0.0.1, answering its health check."""
    # It cannot listen on port 0 and tell which port it got, so pick one; it exits at once when
    # the port was taken in between, and then another is tried.
    for _ in range(3):
        port = free_port()
        argv = [str(binary), "srv", "-host", "127.0.0.1", "-port", str(port), *flags]
        process = harness.start("go-srv", argv)
        process.tolerated_leak = _ORIGINAL_SERVER_LEAK
        server = ReferenceServer(process, port)
        wait_until(partial(_up_or_gone, server), what="the original srv to listen")
        if process.alive():
            return server
    raise AssertionError(f"the original srv did not start: {process.output()[-2000:]}")


def _up_or_gone(server: Server) -> bool:
    if not server.process.alive():
        return True
    response = httpx.get(f"{server.url}/_health_check", timeout=2)
    return response.status_code == 200 and response.text == "WSTUNSRV RUNNING\n"


def start_client(harness: Harness, binary: Path, server: Server | str, token: str, *flags: str,
                 backend: str | None = None) -> Client:
    """The original's ``cli`` (token on its command line: it has no other way to take one).
    Given a :class:`Server`, returns once that server counts one more client for the token."""
    tunnel = server.ws_url if isinstance(server, Server) else server
    argv = [str(binary), "cli", "-tunnel", tunnel, "-token", token, *flags]
    if backend is not None:
        argv += ["-server", backend]
    harness.tokens.add(token)
    before = server.clients(token) if isinstance(server, Server) else 0
    client = Client(harness.start("go-cli", argv), token)
    if isinstance(server, Server):
        server.wait_clients(token, before + 1)
    return client


def pending_requests(server: Server) -> int:
    """``req_pending`` of ``/_stats`` (queued or in flight), a key both servers print alike."""
    found = _PENDING.search(httpx.get(f"{server.url}/_stats", timeout=5).text)
    if found is None:
        raise ValueError("no req_pending= in /_stats")
    return int(found.group(1))


@dataclass
class Pairing:
    """One server and its clients for one token, one end ours and the other the original's."""

    name: str
    harness: Harness
    binary: Path
    server: Server
    token: str
    cli_flags: tuple[str, ...]
    backend: str | None
    clients: list[Client] = field(default_factory=list)

    @property
    def server_is_ours(self) -> bool:
        return self.name == OUR_SRV

    def start_client(self) -> Client:
        """One more client for the token, with the pairing's flags; returns once it is counted."""
        if self.server_is_ours:
            client = start_client(self.harness, self.binary, self.server, self.token,
                                  *self.cli_flags, backend=self.backend)
        else:
            # The original has no long-poll, whatever WSTUNNEL_TEST_TRANSPORT says.
            client = self.harness.client(self.server, self.token, "-transport", "websocket",
                                         *self.cli_flags, backend=self.backend)
        self.clients.append(client)
        return client

    def kill_clients(self) -> None:
        """SIGKILL every client; returns once the server has seen them go."""
        for client in self.clients:
            client.process.kill()
        self.server.wait_clients(self.token, 0)

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return self.server.get(path, self.token, **kwargs)

    def connections_made(self) -> int:
        """Tunnels the clients have opened, from their own logs."""
        marker = 'msg="WS   ready"' if self.server_is_ours else "WS   CONNECTED"
        return sum(c.process.output().count(marker) for c in self.clients)

    def responses_sent(self) -> int:
        """Backend responses the clients have sent into the tunnel, from their own logs."""
        marker = 'msg="HTTP responded"' if self.server_is_ours else "WS   SND"
        return sum(c.process.output().count(marker) for c in self.clients)


def open_pairing(harness: Harness, binary: Path, name: str, *, srv_flags: tuple[str, ...] = (),
                 cli_flags: tuple[str, ...] = (), backend: str | None = None) -> Pairing:
    """A server and one connected client of pairing ``name`` (one of PAIRINGS)."""
    if name == OUR_SRV:
        server = harness.server(*srv_flags)
    elif name == GO_SRV:
        server = start_server(harness, binary, *srv_flags)
    else:
        raise ValueError(f"no pairing {name!r}")
    pairing = Pairing(name, harness, binary, server, harness.new_token(), cli_flags, backend)
    pairing.start_client()
    return pairing
