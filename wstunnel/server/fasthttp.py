"""The front's fast path: a common request read, and its response written, without h11.

h11 cost the server ~20 % of its CPU per small request (event objects, header normalisation and
validation, its state machine, each step a Python call). Most requests are plain: HTTP/1.1, a Host,
no body or a small one already received whole, nothing about the connection or an upgrade. Those
:func:`read_simple_request` takes, with the grammar of ``wstunnel.http1`` (held to exactly what h11
accepts), and :class:`DirectEncoder` writes their responses when those are plain too (a final
status, a valid head, framed by one Content-Length or chunked). Anything else goes to h11 as
before: the front hands h11 the request's own bytes first (``HttpConnection._to_h11``), so h11 then
sees the same conversation it always did, and answers, refuses or closes exactly as it would have.

Both encoders give the bytes of a response's head, body chunks and end; the front's batching does
the writing (``outgoing.ResponseBatch``).
"""

from __future__ import annotations

from typing import Protocol

import h11

from wstunnel import http1
from wstunnel.headers import Headers

__all__ = [
    "FALLBACK", "DirectEncoder", "Encoder", "Fallback", "H11Encoder", "SimpleRequest",
    "read_simple_request",
]

# Request fields that take a request off the fast path: its framing or the connection's
# future are h11's to judge (chunked bodies, 100-continue, upgrades, keep-alive or close).
_NOT_SIMPLE = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"connection"})
_BLANKS = (0x20, 0x09)  # space, tab


class Fallback:
    """The request is not a simple one (or not whole yet in a way we handle): h11 reads it."""


FALLBACK = Fallback()
SimpleRequest = tuple[bytes, bytes, Headers, bytes, int]  # method, target, headers, body, size


def read_simple_request(buffer: bytes, max_body: int) -> SimpleRequest | Fallback | None:
    """A simple request at the start of ``buffer`` (not empty): method, target, headers (names as sent,
    values without outer blanks, as h11 gives them), body and the bytes it took; None while its
    head has not come whole; FALLBACK for anything else, including a body of more than
    ``max_body`` bytes or one not received whole yet."""
    if buffer[0] < 0x21:
        return FALLBACK  # a blank line (which h11 skips) or garbage (which h11 refuses at once)
    split = http1.split_head(buffer)
    if split is None:
        return None
    start, block, end = split
    line = http1.parse_request_line(start)
    if line is None or line[2] != b"1.1":
        return FALLBACK  # malformed (h11 says how), or HTTP/1.0's other keep-alive rules
    headers = http1.parse_fields(block)
    if headers is None:
        return FALLBACK
    hosts = 0
    length: bytes | None = None
    for name, value in headers:
        lower = name.lower()
        if lower == b"host":
            hosts += 1
        elif lower == b"content-length":
            if length is not None or not value.isdigit() or len(value) > 20:
                return FALLBACK  # h11's reading of repeated or odd lengths
            length = value
        elif lower in _NOT_SIMPLE:
            return FALLBACK
    if hosts != 1:
        return FALLBACK  # h11 refuses a request without one, or with two
    size = end
    body = b""
    if length is not None:
        declared = int(length)
        if declared > max_body:
            return FALLBACK
        size = end + declared
        if len(buffer) < size:
            return FALLBACK  # a body still arriving: h11 reads it, with its timeouts
        body = buffer[end:size]
    method, target, _version = line
    return method, target, headers, body, size


def _one_field_line(name: bytes, value: bytes) -> bool:
    """Whether ``name: value`` is one field line the block grammar can then check: no colon in
    the name and no line break in the value (either would split it into lines the grammar may
    take for others), no blank around the value (the grammar would take it for the line's
    optional whitespace; h11 refuses it)."""
    if b":" in name or b"\n" in value or b"\r" in value:
        return False
    return not value or (value[0] not in _BLANKS and value[-1] not in _BLANKS)


class Encoder(Protocol):
    """The bytes of one response to a request of this connection."""

    def head(self, status: int, reason: bytes, headers: Headers, *, parsed: bool = False) -> bytes:
        """The response head; h11.LocalProtocolError if it cannot be sent.

        ``parsed``: the reason and every field came out of a head read by wstunnel.http1's
        grammar or h11's (a tunnel client's HEAD) and were not changed but for fields left out or
        constant ones added: each is a field line already, and an encoder that would only check
        that again may skip it."""
        ...

    def data(self, chunk: bytes) -> bytes:
        """A body chunk as it goes on the wire; h11.LocalProtocolError past a Content-Length."""
        ...

    def end(self, trailers: Headers) -> bytes:
        """The end of the body; h11.LocalProtocolError if it is short of its Content-Length."""
        ...

    @property
    def chunked(self) -> bool:
        """The body goes in chunked coding (which alone can carry trailers)."""
        ...


class H11Encoder:
    """The response through h11, which knows the request (``Encoder``)."""

    __slots__ = ("conn", "length")

    def __init__(self, conn: h11.Connection, length: int | None) -> None:
        self.conn = conn
        self.length = length  # the head's Content-Length; None: chunked (or ended by closing)

    def head(self, status: int, reason: bytes, headers: Headers, *, parsed: bool = False) -> bytes:
        return self.conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""

    def data(self, chunk: bytes) -> bytes:
        return self.conn.send(h11.Data(data=chunk)) or b""

    def end(self, trailers: Headers) -> bytes:
        return self.conn.send(h11.EndOfMessage(headers=trailers)) or b""

    @property
    def chunked(self) -> bool:
        return self.length is None and self.conn.their_http_version == b"1.1"


class DirectEncoder:
    """A response to a simple request, written as h11 would write it (``Encoder``).

    For a final status (200 to 999) and a head that h11 would send unchanged (``framing`` says
    whether a response is one): ``length`` is its one Content-Length (0 for a bodyless status),
    or None, and then the body goes chunked, with ``Transfer-Encoding: chunked`` added last as
    h11 adds it. A head's checks are h11's: every field line's grammar."""

    __slots__ = ("_left", "length")

    def __init__(self, length: int | None) -> None:
        self.length = length
        self._left = length

    @staticmethod
    def framing(status: int, reason: bytes, headers: Headers) -> int | Fallback | None:
        """How a response with this head is framed if DirectEncoder writes it: its one
        Content-Length, or None (chunked); FALLBACK if h11 is to write it (an informational
        status, which h11 refuses here; a reason phrase outside the grammar, which h11 writes
        unchecked; a Host field, which h11 moves first; a Content-Length repeated or not a
        number, which h11 merges or refuses)."""
        if not 200 <= status <= 999 or http1.parse_status_line(b"HTTP/1.1 200 " + reason) is None:
            return FALLBACK
        length: int | None = None
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                if length is not None or not value.isdigit() or len(value) > 20:
                    return FALLBACK
                length = int(value)
            elif lower == b"host":
                return FALLBACK
        return length

    def head(self, status: int, reason: bytes, headers: Headers, *, parsed: bool = False) -> bytes:
        if parsed:
            # Every field a field line already (Encoder.head): the checks below were 4.3 of the
            # 4.9 µs a 7-field head took, at every request a tunnel answers.
            if self.length is None:
                headers = [*headers, (b"Transfer-Encoding", b"chunked")]
            return http1.head_bytes(b"HTTP/1.1 %d %s" % (status, reason), headers)
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        for name, value in headers:
            if not _one_field_line(name, value):
                raise h11.LocalProtocolError("illegal response header")
            parts += (name, b": ", value, b"\r\n")
        if self.length is None:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        block = b"".join(parts[1:])
        # What h11 checks of a head it sends: every field line (no CR, LF or NUL inside a value,
        # names that are tokens).
        if http1.parse_fields(block) is None:
            raise h11.LocalProtocolError("illegal response header")
        return parts[0] + block + b"\r\n"

    def data(self, chunk: bytes) -> bytes:
        if self._left is None:
            return b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunk else b""
        self._left -= len(chunk)
        if self._left < 0:
            raise h11.LocalProtocolError("Too much data for declared Content-Length")
        return chunk

    def end(self, trailers: Headers) -> bytes:
        if self._left is None:
            lines = [b"0\r\n"]
            for name, value in trailers:
                if not _one_field_line(name, value):
                    raise h11.LocalProtocolError("illegal trailer field")
                lines += (name, b": ", value, b"\r\n")
            lines.append(b"\r\n")
            if trailers and http1.parse_fields(b"".join(lines[1:-1])) is None:
                raise h11.LocalProtocolError("illegal trailer field")
            return b"".join(lines)
        if self._left:
            raise h11.LocalProtocolError("Too little data for declared Content-Length")
        if trailers:
            raise h11.LocalProtocolError("Content-Length and trailers don't mix")
        return b""

    @property
    def chunked(self) -> bool:
        return self.length is None
