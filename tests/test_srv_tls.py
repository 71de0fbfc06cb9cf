"""TLS on srv itself (issue 17): HTTPS and wss:// without a frontend.

Real processes on loopback with a throwaway trustme CA: the TLS listener alone or beside the plain
one, TLS 1.2 and 1.3 only, ALPN http/1.1; configuration errors exit 78 naming the file and key
before a port is bound; a renewed certificate swapped in by SIGHUP while requests stream through
the tunnel, none failing and the tunnel kept; the original's cli against a srv with every option
of the issue off.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support.harness import Harness, free_port, wait_until
from tests.support.reference import reference_binary, start_client
from tests.support.srv_tls import CertFiles, Pki, TlsServer, curl, start_tls_server

RELOAD_MAX_REQUESTS = 4000  # the load loops' bounds, in count...
RELOAD_MAX_SECS = 90.0  # ... and in time
LOAD_THREADS = 2  # of each kind


def handshake(server: TlsServer, *, version: ssl.TLSVersion | None = None,
              alpn: list[str] | None = None) -> ssl.SSLSocket:
    context = server.pki.context()
    if version is not None:
        context.minimum_version = context.maximum_version = version
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    raw = socket.create_connection(("127.0.0.1", server.tls_port), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


def served_certificate(server: TlsServer) -> bytes:
    with handshake(server) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def leaf_der(files: CertFiles) -> bytes:
    text = files.cert.read_text()
    first = text[: text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return ssl.PEM_cert_to_DER_cert(first)


def test_tls_listener_alone(harness: Harness, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    server = start_tls_server(harness, pki.server_cert("localhost"), pki=pki, plain=False)
    assert server.plain_port is None
    token = harness.new_token()
    harness.client(server.wss_url, token, "-certfile", str(pki.ca_pem), wait=False)
    wait_until(lambda: server.clients(token), what="the client over wss://")
    with server.http() as http:
        response = http.get("/echo", headers={"X-Token": token})
        assert response.status_code == 200 and response.json()["path"] == "/echo"
    answer = curl(f"{server.https_url()}/_token/{token}/echo", cacert=pki.ca_pem)
    assert answer.status == 200 and answer.json()["path"] == "/echo"
    # Plain HTTP on the TLS port gets no HTTP answer.
    with socket.create_connection(("127.0.0.1", server.tls_port), timeout=10) as raw:
        raw.sendall(b"GET /_health_check HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"WSTUNSRV" not in raw.recv(4096)


def test_tls_versions_ciphers_and_alpn(harness: Harness, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    server = start_tls_server(harness, pki.server_cert("localhost"), pki=pki, plain=False)
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        with handshake(server, version=version) as tls:
            assert tls.version() == version.name.replace("v1_", "v1.")
            cipher = tls.cipher()[0]
            assert "GCM" in cipher or "CHACHA20" in cipher, cipher
            if version is ssl.TLSVersion.TLSv1_2:
                assert cipher.startswith("ECDHE-"), cipher  # forward secrecy
    # Older versions are refused (OpenSSL lets this client offer them at its lowest level).
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # Python deprecates the very versions we check are refused
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", server.tls_port), timeout=10) as raw, \
            pytest.raises(ssl.SSLError):
        old.wrap_socket(raw, server_hostname="localhost")
    # ALPN: HTTP/1.1, the one protocol the front speaks, even to a client that prefers h2.
    with handshake(server, alpn=["h2", "http/1.1"]) as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"
    answer = curl(f"{server.https_url()}/_health_check", "--http2", cacert=pki.ca_pem)
    assert answer.status == 200 and answer.body == b"WSTUNSRV RUNNING\n"
    assert server.process.alive()


def test_plain_and_tls_listeners_at_once(harness: Harness, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    server = start_tls_server(harness, pki.server_cert("localhost"), pki=pki)
    assert server.plain_port is not None and server.plain_port != server.tls_port
    token = harness.new_token()
    plain = server.plain()
    harness.client(plain, token)  # ws:// on the plain port
    harness.client(server.wss_url, token, "-certfile", str(pki.ca_pem), wait=False)
    plain.wait_clients(token, 2)
    assert plain.get("/echo", token).status_code == 200
    with server.http() as http:
        assert http.get("/echo", headers={"X-Token": token}).status_code == 200


# -- configuration errors: 78, the file and the key, no port bound -------------------------------


def _pair(pki: Pki) -> CertFiles:
    return pki.server_cert("localhost")


@pytest.mark.parametrize("case", ["missing-cert", "not-a-cert", "key-mismatch", "key-readable",
                                  "key-alone", "port-without-cert", "ca-without-cert",
                                  "require-without-ca"])
def test_tls_config_errors_exit_78_before_listening(tmp_path: Path, case: str) -> None:
    pki = Pki(tmp_path / "pki")
    good, other = _pair(pki), _pair(pki)
    lines: dict[str, str] = {"tls_cert": str(good.cert), "tls_key": str(good.key)}
    key, says = {
        "missing-cert": ("tls_cert", "cannot read"),
        "not-a-cert": ("tls_cert", "holds no PEM certificate"),
        "key-mismatch": ("tls_key", "does not match the certificate"),
        "key-readable": ("tls_key", "readable by other users"),
        "key-alone": ("tls_key", "tls_cert and tls_key go together"),
        "port-without-cert": ("tls_port", "needs tls_cert"),
        "ca-without-cert": ("tls_client_ca", "needs tls_cert"),
        "require-without-ca": ("require_client_cert", "needs tls_client_ca"),
    }[case]
    if case == "missing-cert":
        lines["tls_cert"] = str(tmp_path / "nowhere.pem")
    elif case == "not-a-cert":
        lines["tls_cert"] = str(good.key)
    elif case == "key-mismatch":
        lines["tls_key"] = str(other.key)
    elif case == "key-readable":
        good.key.chmod(0o644)
    elif case == "key-alone":
        del lines["tls_cert"]
    elif case == "port-without-cert":
        lines = {"tls_port": "8443"}
    elif case == "ca-without-cert":
        lines = {"tls_client_ca": str(pki.ca_pem)}
    elif case == "require-without-ca":
        lines["require_client_cert"] = "tunnel"
    config = tmp_path / "wstunsrv.toml"
    config.write_text("".join(f'{name} = {value if value.isdigit() else repr(value)}\n'
                              for name, value in lines.items()).replace("'", '"'))
    port = free_port()
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "wstunnel", "srv", "-config", str(config),
                           "-host", "127.0.0.1", "-port", str(port), "-log-target", "stderr"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 78, done.stderr
    assert f"{config}: key '{key}': " in done.stderr and says in done.stderr, done.stderr
    assert "Listening" not in done.stderr
    assert time.monotonic() - started < 30
    # A flag names itself instead.
    flagged = subprocess.run([sys.executable, "-m", "wstunnel", "srv", "-port", str(port),
                              "-tls-cert", str(tmp_path / "nowhere.pem"), "-tls-key", str(good.key)],
                             capture_output=True, text=True, timeout=60, check=False)
    assert flagged.returncode == 78
    assert "flag -tls-cert: cannot read" in flagged.stderr, flagged.stderr


# -- renewal by reload, under load ----------------------------------------------------------------


@dataclass
class Load:
    """Requests through the tunnel over HTTPS, from threads that open a new connection (a new
    TLS handshake) per request and threads on a kept-alive connection. Bounded in count and time."""

    url: str
    token: str
    context: ssl.SSLContext
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    times: list[float] = field(default_factory=list)  # when each request was answered
    failures: list[str] = field(default_factory=list)
    certificates: set[bytes] = field(default_factory=set)  # leaf certificates new connections saw

    def _record(self, ok: bool, what: str) -> None:
        with self.lock:
            if ok:
                self.times.append(time.monotonic())
            else:
                self.failures.append(what)

    def _new_connections(self, deadline: float) -> None:
        while not self.stop.is_set() and time.monotonic() < deadline and self.count() < RELOAD_MAX_REQUESTS:
            try:
                with httpx.Client(verify=self.context, timeout=30) as http:
                    response = http.get(self.url, headers={"X-Token": self.token})
                    stream = response.extensions["network_stream"]
                    der = stream.get_extra_info("ssl_object").getpeercert(True)
                with self.lock:
                    self.certificates.add(der)
                self._record(response.status_code == 200, f"new connection: {response.status_code}")
            except Exception as exc:  # any failure is counted, none ends the loop
                self._record(False, f"new connection: {exc!r}")

    def _kept_alive(self, deadline: float) -> None:
        with httpx.Client(verify=self.context, timeout=30) as http:
            while not self.stop.is_set() and time.monotonic() < deadline \
                    and self.count() < RELOAD_MAX_REQUESTS:
                try:
                    response = http.get(self.url, headers={"X-Token": self.token})
                    self._record(response.status_code == 200, f"kept alive: {response.status_code}")
                except Exception as exc:
                    self._record(False, f"kept alive: {exc!r}")

    def count(self) -> int:
        with self.lock:
            return len(self.times) + len(self.failures)

    def between(self, start: float, end: float) -> int:
        with self.lock:
            return sum(1 for t in self.times if start <= t <= end)

    def threads(self) -> list[threading.Thread]:
        deadline = time.monotonic() + RELOAD_MAX_SECS
        return [threading.Thread(target=loop, args=(deadline,), daemon=True)
                for loop in (self._new_connections, self._kept_alive) * LOAD_THREADS]


def _install(files: CertFiles, cert: Path, key: Path) -> None:
    """As certbot renews: new files, then renamed over the old names."""
    for source, target in ((files.key, key), (files.cert, cert)):
        temporary = target.with_suffix(".new")
        shutil.copyfile(source, temporary)
        temporary.chmod(0o600)
        temporary.replace(target)


def test_reload_swaps_a_renewed_certificate_without_dropping_anything(
        harness: Harness, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    first, renewed = pki.server_cert("localhost"), pki.server_cert("localhost")
    cert, key = tmp_path / "live" / "fullchain.pem", tmp_path / "live" / "privkey.pem"
    cert.parent.mkdir()
    _install(first, cert, key)
    config = tmp_path / "wstunsrv.toml"
    config.write_text(f'tls_cert = "{cert}"\ntls_key = "{key}"\n')
    server = start_tls_server(harness, CertFiles(cert, key), "-config", str(config), pki=pki)
    plain = server.plain()
    token = harness.new_token()
    client = harness.client(server.wss_url, token, "-certfile", str(pki.ca_pem), wait=False)
    plain.wait_clients(token, 1)
    assert served_certificate(server) == leaf_der(first)

    load = Load(f"{server.https_url()}/echo", token, pki.context())
    slow: dict[str, object] = {}

    def slow_request() -> None:  # in flight across the swap
        with httpx.Client(verify=pki.context(), timeout=60) as http:
            response = http.get(f"{server.https_url()}/slow?secs=3", headers={"X-Token": token})
            slow["status"] = response.status_code

    threads = [*load.threads(), threading.Thread(target=slow_request, daemon=True)]
    for thread in threads[:-1]:
        thread.start()
    try:
        wait_until(lambda: load.count() >= 100, timeout=60, what="100 requests before the reload")
        threads[-1].start()
        wait_until(lambda: 'url="/slow?secs=3"' in server.process.output(),
                   what="the slow request in flight")
        _install(renewed, cert, key)
        signalled = time.monotonic()
        server.process.signal(signal.SIGHUP)
        wait_until(lambda: "renewed=yes" in server.process.output(), what="the renewed certificate")
        swapped = time.monotonic()
        before = load.count()
        wait_until(lambda: load.count() >= before + 100 and leaf_der(renewed) in load.certificates,
                   timeout=60, what="100 more requests, new connections on the renewed certificate")
    finally:
        load.stop.set()
        for thread in threads:
            if thread.ident is not None:  # started
                thread.join(60)
    assert served_certificate(server) == leaf_der(renewed)
    total, during = load.count(), load.between(signalled, swapped)
    print(f"\nreload under load: {total} requests in all, {during} answered between SIGHUP and "
          f"the renewed certificate ({(swapped - signalled) * 1000:.0f} ms), "
          f"{len(load.failures)} failed; new connections saw {len(load.certificates)} certificates")
    assert load.failures == [], load.failures[:5]
    assert load.certificates == {leaf_der(first), leaf_der(renewed)}
    assert slow.get("status") == 200
    # The tunnel was never dropped: one connection, from the start.
    assert client.process.output().count("WS   CONNECTED") == 1
    assert server.process.output().count("WS   NEW") == 1
    fingerprint = hashlib.sha256(leaf_der(renewed)).hexdigest()[:16]
    assert f"sha256={fingerprint} renewed=yes" in server.process.output()

    # A renewal gone wrong (a key that is not a key) keeps the running certificate.
    key.write_text("not a key\n")
    server.process.signal(signal.SIGHUP)
    wait_until(lambda: "kept running settings" in server.process.output(), what="the refused reload")
    assert served_certificate(server) == leaf_der(renewed)
    with server.http() as http:
        assert http.get("/echo", headers={"X-Token": token}).status_code == 200


# -- the original's cli, against a srv with every new option off ---------------------------------


def test_original_cli_against_a_srv_with_every_option_off(harness: Harness) -> None:
    binary = reference_binary()
    server = harness.server()
    token = harness.new_token()
    start_client(harness, binary, server, token, backend=harness.backend().url)
    response = server.get("/echo?from=original", token)
    assert response.status_code == 200 and response.json()["path"] == "/echo?from=original"
    assert server.get(f"/_token/{token}/echo").json()["path"] == "/echo"
    client = server.status()["tunnels"][0]["clients"][0]
    assert client["protocol"] == "v1" and client["client_subject"] is None
