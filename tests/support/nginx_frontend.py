"""Runs Debian's nginx with the configuration files we ship in ``nginx/``, for the end-to-end tests.

The site file is the shipped one with the lines its comments mark ``CHANGE`` (ports, host name,
certificate, upstream addresses) and its log paths replaced by plain string substitution, so what
is tested is what users install. Every substitution must find its text: when the shipped file
changes, the test says which line it no longer finds instead of silently testing something else.

The surrounding ``nginx.conf`` stands in for Debian's: the site goes into the ``http`` block,
which also carries Debian's weak http-level TLS defaults that the site must override.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from tests.support.harness import ROOT, Harness, Process, Server, free_port, wait_until

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CURL = shutil.which("curl") or "/usr/bin/curl"
# Only tests that run a binary skip without it; those that read the shipped files never do.
NEEDS_NGINX = pytest.mark.skipif(not Path(NGINX).exists(),
                                 reason=f"{NGINX} not installed (scripts/setup installs nginx-light)")
NEEDS_CURL = pytest.mark.skipif(not Path(CURL).exists(),
                                reason=f"{CURL} not installed (scripts/setup installs curl)")
SHIPPED = ROOT / "nginx"
SITE = SHIPPED / "wstunnel.conf"
CLUSTER_SITE = SHIPPED / "wstunnel-cluster.conf"
# The placeholders of the shipped files, as they stand there.
SHIPPED_UPSTREAM = "server 127.0.0.1:8080;"
SHIPPED_CLUSTER_PORTS = (8081, 8082, 8083)
# The servers behind nginx believe its X-Forwarded-For.
TRUST_NGINX = ("-trusted-proxies", "127.0.0.1")

MAIN_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
    # As Debian's /etc/nginx/nginx.conf has them: the site must override these.
    ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;
    ssl_prefer_server_ciphers on;
    gzip on;
    access_log {dir}/access-other.log;
    client_body_temp_path {dir}/temp/body;
    proxy_temp_path {dir}/temp/proxy;
    fastcgi_temp_path {dir}/temp/fastcgi;
    uwsgi_temp_path {dir}/temp/uwsgi;
    scgi_temp_path {dir}/temp/scgi;
    include {site};
}}
"""


@dataclass
class Certificates:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_pem))


def issue_certificates(directory: Path) -> Certificates:
    """A throwaway CA, and a certificate it signed for ``localhost`` and 127.0.0.1."""
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    paths = Certificates(directory / "ca.pem", directory / "localhost.pem", directory / "localhost.key")
    ca.cert_pem.write_to_path(str(paths.ca_pem))
    leaf.private_key_pem.write_to_path(str(paths.key_pem))
    with paths.cert_pem.open("wb") as chain:  # leaf first, then intermediates: a "fullchain.pem"
        for blob in leaf.cert_chain_pems:
            chain.write(blob.bytes())
    return paths


def substitute(text: str, replacements: Sequence[tuple[str, str]]) -> str:
    """``text`` with each ``old`` replaced by ``new``; every ``old`` must occur."""
    for old, new in replacements:
        assert old in text, f"the shipped nginx file no longer contains {old!r}"
        text = text.replace(old, new)
    return text


@dataclass
class Nginx:
    process: Process
    directory: Path
    http_port: int
    tls_port: int
    certs: Certificates
    site_text: str

    @property
    def https_url(self) -> str:
        return f"https://localhost:{self.tls_port}"

    @property
    def wss_url(self) -> str:
        return f"wss://localhost:{self.tls_port}"

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    @property
    def error_log(self) -> Path:
        return self.directory / "error.log"

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.access_log, self.error_log)
                       if p.exists())


def render_site(shipped: Path, directory: Path, *, http_port: int, tls_port: int,
                certs: Certificates, upstreams: Sequence[tuple[str, str]]) -> str:
    """The shipped site file with our ports, certificate, log paths and upstream servers."""
    text = shipped.read_text()
    # The TLS listener as shipped, with or without its http2 flag (kept as it is).
    tls_listen = next(line.strip() for line in text.splitlines()
                      if line.strip().startswith("listen 443 ssl"))
    tls_listen = tls_listen[: tls_listen.index(";") + 1]
    return substitute(text, [
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        (tls_listen, tls_listen.replace("listen 443 ", f"listen 127.0.0.1:{tls_port} ")),
        # One IPv4 address is enough here; the IPv6 lines are the same apart from the address.
        ("listen [::]:80;", "# (IPv6 listener removed by the test)"),
        (tls_listen.replace("443", "[::]:443"), "# (IPv6 listener removed by the test)"),
        ("server_name tunnel.example.com;", "server_name localhost;"),
        ("/etc/letsencrypt/live/tunnel.example.com/fullchain.pem", str(certs.cert_pem)),
        ("/etc/letsencrypt/live/tunnel.example.com/privkey.pem", str(certs.key_pem)),
        ("/var/log/nginx/wstunnel.access.log", str(directory / "access.log")),
        ("/var/log/nginx/wstunnel.error.log", str(directory / "error.log")),
        *upstreams,
    ])


def write_config(directory: Path, site_text: str) -> Path:
    """nginx.conf (including the rendered site) in ``directory``; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "temp").mkdir(exist_ok=True)
    site = directory / "site.conf"
    site.write_text(site_text)
    conf = directory / "nginx.conf"
    conf.write_text(MAIN_CONF.format(dir=directory, site=site))
    return conf


def nginx_argv(directory: Path, conf: Path, *extra: str) -> list[str]:
    # -e: the error log nginx uses before it has read the configuration (not /var/log/nginx).
    return [NGINX, "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log"), *extra]


def check_config(directory: Path, site_text: str) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on the site; the caller looks at returncode and output."""
    conf = write_config(directory, site_text)
    return subprocess.run(nginx_argv(directory, conf, "-t"), capture_output=True, text=True,
                          timeout=30, check=False)


def _accepting(process: Process, port: int) -> bool:
    assert process.alive(), f"nginx exited early:\n{process.output()}"
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def start_nginx(harness: Harness, directory: Path, shipped: Path, certs: Certificates,
                upstreams: Sequence[tuple[str, str]]) -> Nginx:
    """nginx running the shipped ``shipped`` file, stopped with the harness's other processes."""
    http_port, tls_port = free_port(), free_port()
    site_text = render_site(shipped, directory, http_port=http_port, tls_port=tls_port,
                            certs=certs, upstreams=upstreams)
    conf = write_config(directory, site_text)
    process = harness.start("nginx", nginx_argv(directory, conf))
    for port in (http_port, tls_port):
        wait_until(lambda port=port: _accepting(process, port), timeout=10, what="nginx to listen")
    return Nginx(process, directory, http_port, tls_port, certs, site_text)


# -- the shipped cluster file: three instances, tokens spread by nginx's hash ------------------


def owners_by_log(servers: list[Server], token: str) -> list[int]:
    """The servers that logged a request for ``token`` (by its 8-character prefix)."""
    marker = f"token={token[:8]}..."
    owners = [i for i, server in enumerate(servers) if marker in server.process.output()]
    assert len(owners) <= 1, f"{marker} on servers {owners}"
    return owners


def start_cluster(harness: Harness, tmp_path: Path,
                  *server_flags: str) -> tuple[Certificates, list[Server], Nginx]:
    """A backend, one server per upstream of the shipped cluster file, and nginx built from it."""
    certs = issue_certificates(tmp_path)
    harness.backend()
    servers = [harness.server(*TRUST_NGINX, *server_flags) for _ in SHIPPED_CLUSTER_PORTS]
    nginx = start_nginx(harness, tmp_path / "nginx", CLUSTER_SITE, certs, [
        (f"server 127.0.0.1:{shipped} ", f"server 127.0.0.1:{server.port} ")
        for shipped, server in zip(SHIPPED_CLUSTER_PORTS, servers, strict=True)
    ])
    return certs, servers, nginx


def choose_tokens(harness: Harness, http: httpx.Client, servers: list[Server],
                   count: int) -> dict[str, int]:
    """``count`` tokens, each with the instance nginx hashes it to, every instance with some.

    Where a token lands depends on the instances' ports, which change from run to run; asking
    nginx (a request for an unknown token, logged by the instance that got it) and picking
    tokens to fill every instance makes the spread certain instead of merely likely.
    """
    per_instance = -(-count // len(servers))
    chosen: dict[str, int] = {}
    for n in range(count * 10):
        if len(chosen) == count:
            break
        token = harness.new_token(f"nginx{n:03d}")  # the prefix, 8 characters, names it in logs
        assert http.get("/probe", headers={"X-Token": token}).status_code == 404
        # (a list, as instance 0 would not do for wait_until)
        [owner] = wait_until(lambda token=token: owners_by_log(servers, token), timeout=10,
                             what="the instance that got the probe to log it")
        if sum(1 for o in chosen.values() if o == owner) < per_instance:
            chosen[token] = owner
    assert len(chosen) == count, "could not spread the tokens over every instance"
    return chosen


def placement(servers: list[Server]) -> dict[str, list[tuple[int, int]]]:
    """token prefix -> [(instance, clients)] for every instance that knows the token."""
    placement: dict[str, list[tuple[int, int]]] = {}
    for index, server in enumerate(servers):
        for tunnel in server.status()["tunnels"]:
            placement.setdefault(tunnel["token"], []).append((index, len(tunnel["clients"])))
    return placement


# -- one deployment or another, for tests that compare them ------------------------------------

ROUTES = ("direct", "nginx", "cluster")


@dataclass
class Deployment:
    """wstunnel srv reached directly ("direct"), through the shipped wstunnel.conf ("nginx"), or
    through wstunnel-cluster.conf in front of three instances ("cluster")."""

    route: str
    servers: list[Server]
    nginx: Nginx | None = None

    @property
    def url(self) -> str:
        return self.nginx.https_url if self.nginx else self.servers[0].url

    @property
    def tunnel_url(self) -> str:
        return self.nginx.wss_url if self.nginx else self.servers[0].ws_url

    @property
    def certs(self) -> Certificates | None:
        return self.nginx.certs if self.nginx else None

    def client_flags(self) -> list[str]:
        return ["-certfile", str(self.nginx.certs.ca_pem)] if self.nginx else []

    def verify(self) -> ssl.SSLContext | bool:
        """httpx's ``verify`` for :attr:`url`."""
        return self.nginx.certs.client_context() if self.nginx else True

    def connect(self, timeout: float = 20) -> socket.socket:
        """A connection to :attr:`url` (TLS through nginx, offering HTTP/1.1 only), for requests
        written by hand."""
        port = self.nginx.tls_port if self.nginx else self.servers[0].port
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if not self.nginx:
            return raw
        return self.nginx.certs.client_context().wrap_socket(raw, server_hostname="localhost")

    def clients(self, token: str) -> int:
        return sum(server.clients(token) for server in self.servers)

    def wait_clients(self, token: str, count: int, timeout: float = 30) -> None:
        wait_until(lambda: self.clients(token) == count, timeout=timeout,
                   what=f"{count} client(s) on the token, on any instance")


def deploy(harness: Harness, directory: Path, route: str, *server_flags: str) -> Deployment:
    """The backend, and wstunnel srv as ``route`` (one of :data:`ROUTES`) puts it."""
    harness.backend()
    if route == "cluster":
        _, servers, nginx = start_cluster(harness, directory, *server_flags)
        return Deployment(route, servers, nginx)
    server = harness.server(*TRUST_NGINX, *server_flags)
    if route == "direct":
        return Deployment(route, [server])
    nginx = start_nginx(harness, directory / "nginx", SITE, issue_certificates(directory),
                        [(SHIPPED_UPSTREAM, f"server 127.0.0.1:{server.port};")])
    return Deployment(route, [server], nginx)
