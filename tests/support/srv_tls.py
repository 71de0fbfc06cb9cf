"""wstunnel srv with its own TLS listener, and the throwaway certificates the tests give it.

    pki = Pki(tmp_path)                               # a trustme CA, files in tmp_path
    leaf = pki.server_cert("localhost", "*.wst.test") # chain + key (0600), as srv reads them
    alice = pki.client_cert("alice")                  # for -client-cert / -client-key
    server = start_tls_server(harness, leaf, "-tls-client-ca", str(pki.ca_pem))

The server listens on a plain port and a TLS port (``-port 0 -tls-port 0``, both logged), or on
the TLS port alone (``plain=False``); it is up once its health check answers over HTTPS.
"""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
import tempfile
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import trustme

from tests.support.harness import PYTHON, Harness, Process, Server, wait_until

CURL = shutil.which("curl") or "/usr/bin/curl"
TEST_DOMAIN = "wst.test"  # host routing's domain in the tests; --resolve / resolver rules map it
_LISTENING = re.compile(r"Listening +pkg=WStunsrv port=(\d+) host=\S+( tls=yes)?")


@dataclass(frozen=True)
class CertFiles:
    cert: Path  # the chain, leaf first
    key: Path


@dataclass
class Pki:
    """A throwaway CA; its certificates are written under ``directory``."""

    directory: Path
    name: str = "ca"
    ca: trustme.CA = field(default_factory=trustme.CA)
    _serial: count[int] = field(default_factory=count)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_pem = self.directory / f"{self.name}.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))

    def _write(self, leaf: trustme.LeafCert, stem: str) -> CertFiles:
        n = next(self._serial)
        files = CertFiles(self.directory / f"{self.name}-{stem}-{n}.pem",
                          self.directory / f"{self.name}-{stem}-{n}.key")
        with files.cert.open("wb") as chain:
            for blob in leaf.cert_chain_pems:
                chain.write(blob.bytes())
        files.key.touch(mode=0o600)  # a private key readable by others is refused
        leaf.private_key_pem.write_to_path(str(files.key))
        return files

    def server_cert(self, *names: str) -> CertFiles:
        return self._write(self.ca.issue_cert(*names), "server")

    def client_cert(self, common_name: str) -> CertFiles:
        # cryptography 51 refuses a certificate with an empty subjectAltName, which is what
        # trustme writes when given no identity; a client certificate carries its holder's
        # e-mail address there, and the tests look only at the subject's CN.
        leaf = self.ca.issue_cert(f"{common_name}@clients.test", common_name=common_name)
        return self._write(leaf, f"client-{common_name}")

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_pem))


@dataclass
class TlsServer:
    process: Process
    tls_port: int
    plain_port: int | None
    pki: Pki

    def https_url(self, host: str = "localhost") -> str:
        return f"https://{host}:{self.tls_port}"

    @property
    def wss_url(self) -> str:
        return f"wss://localhost:{self.tls_port}"

    def http(self, cert: CertFiles | None = None) -> httpx.Client:
        context = self.pki.context()
        if cert is not None:
            context.load_cert_chain(str(cert.cert), str(cert.key))
        return httpx.Client(base_url=self.https_url(), verify=context, timeout=30)

    def plain(self) -> Server:
        """The plain listener as the harness's Server (status, clients, get)."""
        assert self.plain_port is not None, "this server has no plain listener"
        return Server(self.process, self.plain_port)

    def status(self, cert: CertFiles | None = None) -> dict:
        """/_status, on the plain port if there is one; over TLS with ``cert`` if given."""
        if self.plain_port is not None and cert is None:
            return self.plain().status()
        with self.http(cert) as http:
            return http.get("/_status").json()

    def clients(self, token: str, cert: CertFiles | None = None) -> list[dict]:
        for tunnel in self.status(cert)["tunnels"]:
            if tunnel["token"] == token[:8] + "...":
                return tunnel["clients"]
        return []


def listening_ports(output: str) -> tuple[int | None, int | None]:
    """(plain port, TLS port) from srv's Listening lines, None where there is none."""
    plain = secure = None
    for port, tls in _LISTENING.findall(output):
        if tls:
            secure = int(port)
        else:
            plain = int(port)
    return plain, secure


def start_tls_server(harness: Harness, cert: CertFiles, *flags: str, pki: Pki,
                     plain: bool = True, wait: bool = True) -> TlsServer:
    """srv with ``cert`` on a TLS listener (beside a plain one unless ``plain`` is False)."""
    argv = [PYTHON, "-m", "wstunnel", "srv", "-host", "127.0.0.1", "-port", "0",
            "-restart-grace", "0", "-tls-cert", str(cert.cert), "-tls-key", str(cert.key)]
    if plain:
        argv += ["-tls-port", "0"]
    process = harness.start("srv", [*argv, *flags])

    def ports() -> tuple[int | None, int | None] | None:
        assert process.alive(), f"srv exited:\n{process.output()}"
        found = listening_ports(process.output())
        return found if found[1] is not None and (found[0] is not None or not plain) else None

    plain_port, tls_port = wait_until(ports, what="wstunnel srv to log its ports")
    assert tls_port is not None
    server = TlsServer(process, tls_port, plain_port, pki)
    if wait:
        def answers() -> bool:
            with server.http() as http:  # any answer (a 403 without a client certificate too)
                return http.get("/_health_check").status_code > 0
        wait_until(answers, what="wstunnel srv to answer over TLS")
    return server


@dataclass
class CurlAnswer:
    status: int
    headers: dict[str, str]  # lowercase names, the last value of each
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def curl(url: str, *args: str, resolve: str | None = None, cacert: Path | None = None,
         timeout: float = 30) -> CurlAnswer:
    """Debian's curl on ``url``; ``resolve``: the host name to send to 127.0.0.1 (curl's
    ``--resolve``: the name still goes in Host and in the TLS SNI)."""
    port = urlsplit(url).port or (443 if url.startswith("https:") else 80)
    argv = [CURL, "-sS", "--max-time", str(timeout), *args]
    if resolve is not None:
        argv += ["--resolve", f"{resolve}:{port}:127.0.0.1"]
    if cacert is not None:
        argv += ["--cacert", str(cacert)]
    with tempfile.TemporaryDirectory() as directory:
        head, body = Path(directory) / "head", Path(directory) / "body"
        done = subprocess.run([*argv, "-D", str(head), "-o", str(body), url], capture_output=True,
                              text=True, timeout=timeout + 10, check=False)
        assert done.returncode == 0, f"curl {url}: {done.returncode} {done.stderr}"
        # (bytes: read_text would turn the CRLFs into newlines)
        blocks = head.read_bytes().decode("latin-1").strip().split("\r\n\r\n")  # 100, then the rest
        status_line, *fields = blocks[-1].split("\r\n")
        headers = {}
        for line in fields:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return CurlAnswer(int(status_line.split()[1]), headers, body.read_bytes())
