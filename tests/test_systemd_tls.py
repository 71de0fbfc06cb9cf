"""srv's own TLS under the shipped unit (issue 17), in a real systemd: the unit as shipped runs
HTTPS with a certificate readable by the wstunnel user only, a client connects over wss://,
``systemctl reload`` swaps in a renewed certificate while requests stream through the tunnel
(none failing, the client never reconnecting), a broken certificate file stops a start with 78
naming the file, and the unit's hardening score stays at or below 2.0 with TLS on.

The container is tests/support/systemd_container.py's (a throwaway Debian 12 root booted with
systemd-nspawn); the checkout and its virtualenv come in read-only. The tests need root and a
working systemd-nspawn; elsewhere they skip with the reason, or fail with
WSTUNNEL_REQUIRE_CONTAINER_TESTS set.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.support.harness import ROOT, wait_until
from tests.support.srv_tls import CertFiles, Pki
from tests.support.systemd_container import Container, Unavailable, booted, preflight

SERVER_UNIT_FILE = ROOT / "systemd" / "wstunsrv.service"
CLIENT_UNIT_FILE = ROOT / "systemd" / "wstuncli@.service"
SRV = "wstunsrv.service"
CLI = "wstuncli@demo.service"
SRV_CONFIG = "/etc/wstunnel/wstunsrv.toml"
CLI_CONFIG = "/etc/wstunnel/wstuncli.d/demo.toml"
TLS_DIR = "/etc/wstunnel/tls"
CA = "/etc/wstunnel/ca.pem"
BACKEND_PORT = 9000
PLAIN_PORT, TLS_PORT = 8080, 8443
MAX_EXPOSURE = 2.0
RELOAD_REQUESTS = 300  # curl requests in the stream around the reload
HIDDEN_BY_SANDBOX = ("/tmp", "/var/tmp", "/home", "/root", "/run/user")


def _unavailable(reason: str) -> None:
    print(f"systemd container tests cannot run: {reason}", file=sys.stderr)
    if os.environ.get("WSTUNNEL_REQUIRE_CONTAINER_TESTS"):
        pytest.fail(f"systemd container tests must run here: {reason}")
    pytest.skip(f"systemd container unavailable: {reason}")


class Box:
    """The container with the units, a TLS server configuration and a backend."""

    def __init__(self, container: Container, pki: Pki) -> None:
        self.c = container
        self.pki = pki
        self.token = f"tls_{secrets.token_urlsafe(24)}"
        self.page = f"backend page {secrets.token_hex(8)}\n"
        self.server_config = (
            f'host = "127.0.0.1"\nport = {PLAIN_PORT}\ntls_port = {TLS_PORT}\n'
            f'tls_cert = "{TLS_DIR}/fullchain.pem"\ntls_key = "{TLS_DIR}/privkey.pem"\n'
        )

    def install_certificate(self, files: CertFiles) -> None:
        """As a certbot deploy hook would: root:wstunnel, the key 0640."""
        self.c.write(f"{TLS_DIR}/fullchain.pem", files.cert.read_text(), mode="0644",
                     owner="root:wstunnel")
        self.c.write(f"{TLS_DIR}/privkey.pem", files.key.read_text(), mode="0640",
                     owner="root:wstunnel")

    def install(self, first: CertFiles) -> None:
        c = self.c
        c.run("useradd", "--system", "--user-group", "--no-create-home",
              "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "wstunnel")
        c.run("ln", "-sf", str(ROOT / ".venv" / "bin" / "wstunnel"), "/usr/bin/wstunnel")
        c.run("install", "-m", "0644", str(SERVER_UNIT_FILE), str(CLIENT_UNIT_FILE),
              "/etc/systemd/system/")
        c.run("install", "-d", "-m", "0755", "/etc/wstunnel")
        c.run("install", "-d", "-m", "0750", "-o", "root", "-g", "wstunnel", TLS_DIR,
              "/etc/wstunnel/wstuncli.d")
        self._checkout_visibility()
        c.write(CA, self.pki.ca_pem.read_text())
        self.install_certificate(first)
        c.write(SRV_CONFIG, self.server_config)
        c.write(CLI_CONFIG, f'token = "{self.token}"\ntunnel = "wss://127.0.0.1:{TLS_PORT}"\n'
                            f'certfile = "{CA}"\nserver = "http://127.0.0.1:{BACKEND_PORT}"\n',
                mode="0640", owner="root:wstunnel")
        c.run("install", "-d", "/srv/www")
        c.write("/srv/www/hello.txt", self.page)
        c.systemctl("daemon-reload")
        c.run("systemd-run", "--unit=wst-backend.service", "--property=WorkingDirectory=/srv/www",
              "/usr/bin/python3", "-m", "http.server", "--bind", "127.0.0.1", str(BACKEND_PORT))
        c.systemctl("start", SRV, CLI)
        wait_until(lambda: c.show(CLI, "StatusText")["StatusText"].startswith("connected to"),
                   timeout=60, what="wstuncli@demo to connect over wss://")

    def _checkout_visibility(self) -> None:
        hidden = [p for p in HIDDEN_BY_SANDBOX if Path(p) == ROOT or Path(p) in ROOT.parents]
        if not hidden:
            return
        lines = ["[Service]", f"BindReadOnlyPaths={ROOT}"]
        if not hidden[0].startswith(("/tmp", "/var/tmp")):
            lines.insert(1, "ProtectHome=tmpfs")
        for unit in ("wstunsrv.service", "wstuncli@.service"):
            self.c.run("install", "-d", f"/etc/systemd/system/{unit}.d")
            self.c.write(f"/etc/systemd/system/{unit}.d/00-test-checkout.conf", "\n".join(lines) + "\n")

    def curl_argv(self, path: str = "/hello.txt") -> list[str]:
        return ["curl", "-sS", "--max-time", "20", "--cacert", CA, "-H", f"X-Token: {self.token}",
                f"https://127.0.0.1:{TLS_PORT}{path}"]

    def served_subject(self) -> str:
        """The ``subject:`` curl reports for the certificate a new connection gets."""
        result = self.c.run(*self.curl_argv(), "-v", "-o", "/dev/null", check=False)
        found = re.search(r"subject: (.*)", result.stderr)
        assert found, result.stderr
        return found.group(1).strip()


def _subject_of(files: CertFiles) -> str:
    """What curl prints as the subject of ``files``' certificate (trustme's OU tells each apart)."""
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    return next(a.value for a in cert.subject
                if a.oid == x509.NameOID.ORGANIZATIONAL_UNIT_NAME)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    reason = preflight()
    if reason:
        _unavailable(reason)
    binds = [ROOT]
    venv = (ROOT / ".venv").resolve()
    if ROOT not in venv.parents:
        binds.append(venv)
    pki = Pki(tmp_path_factory.mktemp("pki"))
    name = f"wst-tls-{os.getpid()}-{secrets.token_hex(3)}"
    started = time.monotonic()
    try:
        with booted(name, binds) as container:
            setup = Box(container, pki)
            setup.install(pki.server_cert("localhost", "127.0.0.1"))
            yield setup
            print(f"\nsystemd container {name}: {'; '.join(container.notes)}; "
                  f"{time.monotonic() - started:.0f}s in all", file=sys.stderr)
    except Unavailable as exc:
        _unavailable(str(exc))


def test_tls_through_the_unit_and_its_hardening(box: Box) -> None:
    c = box.c
    assert c.run(*box.curl_argv()).stdout == box.page
    assert c.run("curl", "-sS", "--cacert", CA, f"https://127.0.0.1:{TLS_PORT}/_health_check"
                 ).stdout == "WSTUNSRV RUNNING\n"
    assert c.run("curl", "-sS", f"http://127.0.0.1:{PLAIN_PORT}/_health_check").stdout == \
        "WSTUNSRV RUNNING\n"
    assert c.show(CLI, "StatusText")["StatusText"].startswith(f"connected to wss://127.0.0.1:{TLS_PORT}")
    # Same unit file, TLS on: the score of the running unit stays where it was.
    result = c.run("systemd-analyze", "security", "--no-pager", SRV, check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert found, result.stdout + result.stderr
    print(f"\n{SRV} with TLS on: exposure {found.group(1)}")
    assert float(found.group(1)) <= MAX_EXPOSURE


def test_systemctl_reload_swaps_the_certificate_under_requests(box: Box) -> None:
    c = box.c
    pids = {unit: c.show(unit, "MainPID")["MainPID"] for unit in (SRV, CLI)}
    connected_since = c.show(CLI, "StatusText")["StatusText"]
    cursor = c.journal_cursor()
    renewed = box.pki.server_cert("localhost", "127.0.0.1")
    # A stream of requests, each on a new TLS connection, from inside the container.
    codes = "/run/reload-codes"

    def answered() -> list[str]:
        return c.run("cat", codes, check=False).stdout.split()

    loop = (f": > {codes}; i=0; while [ $i -lt {RELOAD_REQUESTS} ]; do "
            f"curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 20 --cacert {CA} "
            f"-H 'X-Token: {box.token}' https://127.0.0.1:{TLS_PORT}/hello.txt >> {codes}; "
            "i=$((i+1)); done")
    stream = subprocess.Popen(["nsenter", "-t", str(c.leader), "-a", "--", "/bin/sh", "-c", loop],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: len(answered()) >= 50, timeout=60, what="50 requests before the reload")
        box.install_certificate(renewed)
        before = len(answered())
        c.systemctl("reload", SRV)
        during = len(answered()) - before  # answered while systemctl reload ran
        stream.wait(180)
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.wait()
    codes_seen = answered()
    failed = [code for code in codes_seen if code != "200"]
    print(f"\nsystemctl reload under {len(codes_seen)} curl requests: {during} answered while it "
          f"ran, {len(failed)} failed")
    assert len(codes_seen) == RELOAD_REQUESTS and failed == []
    lines = c.messages(unit=SRV, after=cursor)
    assert any("TLS   CERT" in m and "renewed=yes" in m for m in lines), lines
    assert box.served_subject().find(_subject_of(renewed)) >= 0
    # Nothing restarted, the tunnel never dropped.
    assert {unit: c.show(unit, "MainPID")["MainPID"] for unit in (SRV, CLI)} == pids
    assert c.show(CLI, "StatusText")["StatusText"] == connected_since
    assert not [m for m in c.messages(unit=CLI, after=cursor) if "RECONNECT" in m]


def test_a_broken_certificate_stops_a_start_with_78(box: Box) -> None:
    c = box.c
    c.write(f"{TLS_DIR}/privkey.pem", "not a key\n", mode="0640", owner="root:wstunnel")
    try:
        started = c.systemctl("restart", SRV, check=False)
        assert started.returncode != 0
        state = c.show(SRV, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
        assert state == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "78",
                         "NRestarts": "0"}, state
        expected = f"{SRV_CONFIG}: key 'tls_key': {TLS_DIR}/privkey.pem holds no PEM private key"
        assert any(expected in m for m in c.messages(unit=SRV)), expected
    finally:
        box.install_certificate(box.pki.server_cert("localhost", "127.0.0.1"))
        c.systemctl("reset-failed", SRV, check=False)
        c.systemctl("start", SRV)
