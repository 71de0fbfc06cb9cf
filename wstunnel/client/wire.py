"""What the tunnel client sends its backends and what it reads back, as bytes: no sockets.

A backend's base URL parsed once (``parse_base``: where to connect, the Host header, the path
prefix), a request's head built and checked against HTTP/1.1's grammar (``Outgoing``), and the
common response head read without h11 (``fast_head``). ``wstunnel.client.origin`` does the I/O:
its pool writes these bytes and reads the answers.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import h11

from wstunnel import http1
from wstunnel.errors import InvalidURL, LocalRequestError
from wstunnel.headers import Headers

# httpcore's limit on a response head; h11's own default (16 KiB) refuses some real backends.
MAX_HEAD_SIZE = 100 * 1024
# Methods whose empty body is still declared (Content-Length: 0), as h11 and httpx send them.
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
_NO_BODY_STATUSES = frozenset({204, 304})
# Request headers h11 needs to see to read the response right: keep-alive and protocol switches.
_SLOW_PATH_HEADERS = frozenset({b"connection", b"upgrade"})


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str  # "http" or "https"
    host: str  # ASCII (IDNA), IPv6 literals without brackets
    port: int


@dataclass(frozen=True, slots=True)
class Target:
    """A backend base URL, parsed once: where to connect, the Host header, the path prefix."""

    origin: Origin
    host_header: bytes
    prefix: bytes


@functools.lru_cache(maxsize=256)
def parse_base(url: str) -> Target:
    """``http[s]://host[:port][/prefix]`` as a Target; InvalidURL if it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise InvalidURL(f"{url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidURL(f"{url!r}: not an http:// or https:// URL with a host")
    netloc = parts.netloc.rpartition("@")[2]  # userinfo is never sent
    try:
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
        host_header = netloc.encode("ascii") if netloc.isascii() else netloc.encode("idna")
    except UnicodeError as exc:
        raise InvalidURL(f"{url!r}: {exc}") from None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    prefix = quote(parts.path, safe="/%:@!$&'()*+,;=~").encode("ascii")
    return Target(Origin(parts.scheme, host, port), host_header, prefix)


class Outgoing:
    """A request's head as bytes, built and checked once even if it goes out twice.

    h11 cost ~35 µs per small exchange (issue 7: event objects, header normalisation, its state
    machine); writing the head ourselves against h11's own grammar costs a few. A response to a
    ``simple`` request (no Connection or Upgrade header, not CONNECT) is read on a fast path
    when it is the common case; anything else goes to h11, told the request's method and
    keep-alive/upgrade headers, so every unusual response is read exactly as before.
    """

    __slots__ = ("head", "length", "method", "simple", "special")

    def __init__(self, target: Target, method: bytes, path: bytes, headers: Headers,
                 body: bytes | AsyncIterable[bytes]) -> None:
        request_target = target.prefix + path
        try:
            http1.check_method(method)
            http1.check_target(request_target)
            http1.check_field(b"Host", target.host_header)
            for name, value in headers:
                http1.check_field(name, value)
        except http1.HeadError as exc:
            raise LocalRequestError(str(exc)) from None
        lines = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, request_target, target.host_header)]
        length: bytes | None = None
        special: Headers = []
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                normalized = http1.content_length(value)
                if normalized is None:
                    raise LocalRequestError("bad Content-Length")
                value = normalized
                if length is not None:
                    if value != length:
                        raise LocalRequestError("conflicting Content-Length headers")
                    continue  # as h11: one of identical Content-Length headers
                length = value
            elif lower == b"host":
                raise LocalRequestError("Found multiple Host: headers")
            elif lower == b"transfer-encoding":
                raise LocalRequestError("the request body's framing is the pool's: no Transfer-Encoding")
            elif lower in _SLOW_PATH_HEADERS:
                special.append((name, value))
            lines.append(b"%s: %s\r\n" % (name, value))
        # A streamed body's declared size, or None: chunked.
        self.length: int | None = None
        if isinstance(body, bytes | bytearray | memoryview):
            if length is not None:
                if int(length) != len(body):
                    raise LocalRequestError("body size differs from the declared Content-Length")
            elif body or method in _BODY_METHODS:
                lines.append(b"Content-Length: %d\r\n" % len(body))
        elif length is None:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        else:
            self.length = int(length)
        lines.append(b"\r\n")
        self.head = b"".join(lines)
        self.method = method
        self.special = special
        self.simple = not special and method != b"CONNECT"

    def parser(self) -> h11.Connection:
        """An h11 client that has "sent" this request: it reads the response as it would have."""
        h = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_SIZE)
        # The body is ours to frame, so h11 sees none; the headers that matter to the response
        # (keep-alive, a protocol switch) and the method (HEAD, CONNECT) are the request's.
        h.send(h11.Request(method=self.method, target=b"/", headers=[(b"Host", b"origin"), *self.special]))
        h.send(h11.EndOfMessage())
        return h


class ResponseHead:
    """A final response head (or a 101), from h11 or the fast path."""

    __slots__ = ("body", "headers", "http_version", "length", "reason", "status")

    def __init__(self, status: int, reason: bytes, headers: Headers, http_version: bytes,
                 length: int | None = None, body: bytes = b"") -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.http_version = http_version
        # The fast path's Content-Length and the body bytes read with the head; None: h11 reads.
        self.length = length
        self.body = body


def fast_head(data: bytes, method: bytes) -> tuple[ResponseHead, bool] | None:
    """The common response, parsed from the first bytes read: an HTTP/1.1 final head whole in
    ``data``, framed by Content-Length (or bodyless), no obs-fold, no Transfer-Encoding; and
    whether it allows keep-alive. None for anything else, which h11 then reads (and rejects,
    if it is bad): this accepts only what h11 accepts, and means by it what h11 does."""
    split = http1.split_head(data)
    if split is None:
        return None
    start, block, end = split
    line = http1.parse_status_line(start)
    if line is None or line[0] != b"1.1" or line[1] < 200:
        return None
    fields = http1.parse_fields(block)
    if fields is None:
        return None
    _version, status, reason = line
    headers: Headers = []
    length: bytes | None = None
    keep_alive = True
    for name, value in fields:
        lower = name.lower()
        if lower == b"content-length":
            normalized = http1.content_length(value)
            if normalized is None or (length is not None and normalized != length):
                return None
            value = normalized
            if length is not None:
                continue  # h11 keeps one of identical Content-Length headers
            length = value
        elif lower == b"transfer-encoding":
            return None
        elif lower == b"connection" and b"close" in [part.strip().lower() for part in value.split(b",")]:
            keep_alive = False
        headers.append((name, value))
    if method == b"HEAD" or status in _NO_BODY_STATUSES:
        size = 0
    elif length is None:
        return None  # read until close
    else:
        size = int(length)
    return ResponseHead(status, reason, headers, b"1.1", size, data[end:]), keep_alive
