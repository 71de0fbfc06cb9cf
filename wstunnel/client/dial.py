"""Open the tunnel's byte stream: TCP (from a chosen source port), a CONNECT proxy, then TLS."""

from __future__ import annotations

import errno
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import trio

from wstunnel import tls
from wstunnel.client import proxy as proxies
from wstunnel.errors import DialError
from wstunnel.tunnel.sockets import DirectSocketStream
from wstunnel.tunnel.transport import tune_tunnel_socket


@dataclass(frozen=True, slots=True)
class TunnelAddress:
    secure: bool
    host: str
    port: int
    resource: str  # the path the WebSocket handshake asks for: <tunnel path>/_tunnel

    @classmethod
    def from_url(cls, url: str) -> TunnelAddress:
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        if not parts.hostname:
            raise DialError(f"tunnel URL has no host: {url}")
        path = parts.path.rstrip("/")
        return cls(secure, parts.hostname, parts.port or (443 if secure else 80), f"{path}/_tunnel")

    @property
    def host_header(self) -> str:
        default = 443 if self.secure else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'wss' if self.secure else 'ws'}://{self.host_header}"


def ssl_context(*, certfile: Path | None, insecure: bool, client_cert: Path | None = None,
                client_key: Path | None = None) -> ssl.SSLContext:
    """The tunnel's TLS: ``certfile``'s CAs too, and ``client_cert`` for a server that asks."""
    try:
        return tls.client_context(client_cert, client_key, cafile=certfile, insecure=insecure)
    except tls.TLSFileError as exc:
        raise DialError(str(exc)) from None


async def _connect_from_ports(host: str, port: int, source_ports: list[int]) -> trio.SocketStream:
    """Connect from the first free port of ``source_ports`` (for firewalls that filter them)."""
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    if not infos:
        raise DialError(f"cannot resolve {host}")
    busy: OSError | None = None
    unreachable: OSError | None = None
    for family, type_, proto, _canon, address in infos:  # e.g. ::1 then 127.0.0.1 for localhost
        for source_port in source_ports:
            sock = trio.socket.socket(family, type_, proto)
            try:
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
                await sock.bind(("::" if family == trio.socket.AF_INET6 else "0.0.0.0", source_port))
                await sock.connect(address)
            except OSError as exc:
                sock.close()
                if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                    busy = exc
                    continue
                unreachable = exc
                break  # this address does not answer: try the next one
            except BaseException:
                sock.close()
                raise
            return trio.SocketStream(sock)
    if unreachable is not None:
        raise unreachable
    raise DialError(f"no free source port among {len(source_ports)} configured: {busy}")


async def open_stream(
    address: TunnelAddress,
    *,
    proxy: proxies.Proxy | None,
    source_ports: list[int],
    context: ssl.SSLContext | None,
) -> tuple[trio.abc.Stream, trio.SocketStream]:
    """The stream to speak WebSocket on, and the TCP socket beneath it (for addresses)."""
    hop_host, hop_port = (proxy.host, proxy.port) if proxy else (address.host, address.port)
    if source_ports:
        tcp = await _connect_from_ports(hop_host, hop_port, source_ports)
    else:
        tcp = await trio.open_tcp_stream(hop_host, hop_port)
    stream: trio.abc.Stream = DirectSocketStream(tcp)
    try:
        tune_tunnel_socket(tcp.socket)
        if proxy is not None:
            stream = await proxies.traverse(stream, proxy, address.host, address.port)
        if address.secure:
            assert context is not None
            tls = trio.SSLStream(stream, context, server_hostname=address.host,
                                 https_compatible=True)
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                # trio hides the reason (e.g. CERTIFICATE_VERIFY_FAILED) in __cause__.
                cause = exc.__cause__ or "connection lost"
                raise DialError(f"TLS handshake with {address.host_header} failed: {cause}") from exc
            stream = tls
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream, tcp
