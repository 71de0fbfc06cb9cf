"""What the tests put in front of a server: a tinyproxy (HTTP CONNECT with Basic auth) and a TLS
terminator (tests/support/tls_terminator.py) with a throwaway trustme CA."""

from __future__ import annotations

import secrets
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.support.harness import PYTHON, SUPPORT, Harness, Process, Server, free_port, wait_until

TINYPROXY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
PROXY_USER = "tunneluser"
# Distinctive enough that finding it in a log can only mean it leaked.
PROXY_PASSWORD = "pw-" + secrets.token_hex(8)

needs_tinyproxy = pytest.mark.skipif(not Path(TINYPROXY).exists(), reason="tinyproxy not installed")


def listening(process: Process, port: int) -> bool:
    """Whether ``process`` (still alive) accepts connections on 127.0.0.1:``port``."""
    assert process.alive(), f"{process.name} exited early:\n{process.output()}"
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


@dataclass
class Tinyproxy:
    process: Process
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def url(self, user: str | None = PROXY_USER, password: str = PROXY_PASSWORD) -> str:
        credentials = f"{user}:{password}@" if user is not None else ""
        return f"http://{credentials}127.0.0.1:{self.port}"

    def connects_to(self, port: int) -> int:
        return self.log().count(f"CONNECT 127.0.0.1:{port} HTTP/1.1")


def start_tinyproxy(harness: Harness, directory: Path, connect_port: int) -> Tinyproxy:
    """tinyproxy with Basic auth: CONNECT to ``connect_port`` only; plain requests forwarded."""
    port = free_port()
    log_path = directory / "tinyproxy-own.log"
    conf = directory / "tinyproxy.conf"
    conf.write_text(
        f"Port {port}\nListen 127.0.0.1\nTimeout 120\nMaxClients 20\nSyslog Off\n"
        f'LogFile "{log_path}"\nLogLevel Info\nPidFile "{directory / "tinyproxy.pid"}"\n'
        f"BasicAuth {PROXY_USER} {PROXY_PASSWORD}\n"
        # With any ConnectPort line, CONNECT is allowed to the listed ports only.
        f"ConnectPort {connect_port}\n"
    )
    process = harness.start("tinyproxy", [TINYPROXY, "-d", "-c", str(conf)])
    wait_until(lambda: listening(process, port), what="tinyproxy to listen")
    return Tinyproxy(process, port, log_path)


def issue_certificate(directory: Path) -> tuple[Path, Path]:
    """A CA and a certificate for ``localhost`` / 127.0.0.1: (CA PEM, key + chain PEM)."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca_pem, chain_pem = directory / "ca.pem", directory / "localhost.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain_pem))
    return ca_pem, chain_pem


@dataclass
class TlsFront:
    server: Server
    port: int
    ca_pem: Path

    @property
    def url(self) -> str:
        return f"wss://localhost:{self.port}"


def start_tls_front(harness: Harness, directory: Path) -> TlsFront:
    """A server behind tests/support/tls_terminator.py, whose certificate is signed by a trustme CA."""
    server = harness.server()
    ca_pem, chain_pem = issue_certificate(directory)
    port = free_port()
    process = harness.start("tls", [PYTHON, str(SUPPORT / "tls_terminator.py"),
                                    str(port), str(server.port), str(chain_pem)])
    wait_until(lambda: listening(process, port), timeout=10, what="the TLS terminator to listen")
    return TlsFront(server, port, ca_pem)
