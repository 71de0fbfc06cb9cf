"""HTTP CONNECT proxy traversal: ask the proxy for a raw TCP tunnel to the tunnel server.

Which proxy: the ``proxy`` setting, else the first non-empty of ``HTTPS_PROXY``, ``https_proxy``,
``HTTP_PROXY``, ``http_proxy`` (as the original did), unless ``NO_PROXY``/``no_proxy`` names the
host. Credentials in the proxy URL (``http://user:pass@host:port``) go as HTTP Basic.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import h11
import trio

from wstunnel.errors import ProxyError
from wstunnel.tunnel.transport import ActivityStream

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")
MAX_RESPONSE_HEAD = 64 * 1024


@dataclass(frozen=True, slots=True)
class Proxy:
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> Proxy:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ProxyError("proxy must be an http://[user:pass@]host:port URL")
        return cls(
            host=parts.hostname,
            port=parts.port or 80,
            username=unquote(parts.username) if parts.username is not None else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    def __str__(self) -> str:
        # Never the password: this is what logs and errors show.
        user = f"{self.username}:***@" if self.username is not None else ""
        return f"http://{user}{self.host}:{self.port}"


def choose_proxy(configured: str | None, target_host: str,
                 environ: Mapping[str, str] | None = None) -> Proxy | None:
    environ = os.environ if environ is None else environ
    url = configured
    if not url:
        url = next((environ[name] for name in PROXY_VARIABLES if environ.get(name)), None)
        if url and _bypassed(target_host, environ.get("NO_PROXY") or environ.get("no_proxy") or ""):
            return None
    return Proxy.from_url(url) if url else None


def _bypassed(host: str, no_proxy: str) -> bool:
    host = host.lower().strip("[]")
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        entry = entry.lstrip(".")
        if host == entry or host.endswith("." + entry):
            return True
    return False


def connect_request(proxy: Proxy, host: str, port: int) -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.username is not None:
        secret = f"{proxy.username}:{proxy.password or ''}".encode()
        lines.append("Proxy-Authorization: Basic " + base64.b64encode(secret).decode())
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def traverse(stream: trio.abc.Stream, proxy: Proxy, host: str, port: int) -> trio.abc.Stream:
    """Send CONNECT on ``stream`` (already connected to the proxy); return the tunnelled stream."""
    await stream.send_all(connect_request(proxy, host, port))
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
    conn.send(h11.Request(method="CONNECT", target=f"{host}:{port}", headers=[("Host", host)]))
    conn.send(h11.EndOfMessage())
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProxyError(f"proxy {proxy} sent a malformed answer: {exc}") from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(MAX_RESPONSE_HEAD)
            if not data:
                raise ProxyError(f"proxy {proxy} closed the connection during CONNECT")
            conn.receive_data(bytes(data))
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            if not 200 <= event.status_code < 300:
                reason = event.reason.decode("latin-1")
                raise ProxyError(f"proxy {proxy} refused CONNECT: {event.status_code} {reason}")
            leftover, _closed = conn.trailing_data
            return ActivityStream(stream, bytes(leftover)) if leftover else stream
        raise ProxyError(f"proxy {proxy} answered CONNECT with {type(event).__name__}")
