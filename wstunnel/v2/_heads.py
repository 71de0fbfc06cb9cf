"""HEAD and END payloads of protocol v2: HTTP/1.1 heads and trailer blocks, built and checked.

Same text as v1's heads, with stricter line rules (CRLF only, no folding, one empty line that ends
the head), so that a head is exactly the text its sender wrote. Parsed with h11's rules.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TypeVar

import h11

from wstunnel import http1
from wstunnel.errors import HttpPayloadError
from wstunnel.framing import MAX_HEAD_SIZE
from wstunnel.headers import Headers, get

__all__ = [
    "encode_trailers",
    "parse_request_head",
    "parse_response_head",
    "parse_trailers",
    "request_head",
    "response_head",
]

T = TypeVar("T")
_CRLF = b"\r\n"
_BLANK_LINE = b"\r\n\r\n"

def _check_lines(text: bytes, what: str) -> None:
    """CRLF line ends only, no obsolete folding: h11 would accept both, but then a head would not
    be the exact text its sender wrote, nor end unambiguously."""
    if text.count(b"\r") != text.count(_CRLF) or text.count(b"\n") != text.count(_CRLF):
        raise HttpPayloadError(f"{what} has a bare CR or LF (every line must end with CRLF)")
    if b"\r\n " in text or b"\r\n\t" in text or text[:1] in (b" ", b"\t"):
        raise HttpPayloadError(f"{what} uses obsolete line folding")


def _check_head(head: bytes, what: str) -> None:
    if len(head) > MAX_HEAD_SIZE:
        raise HttpPayloadError(f"HTTP {what} head larger than {MAX_HEAD_SIZE} bytes")
    _check_lines(head, f"HTTP {what} head")
    if head.find(_BLANK_LINE) != len(head) - len(_BLANK_LINE):
        raise HttpPayloadError(f"HTTP {what} head must end at its first empty line (CRLF CRLF)")


def _raw_headers(event: h11.Request | h11.Response | h11.InformationalResponse | h11.EndOfMessage) -> Headers:
    return [(bytes(k), bytes(v)) for k, v in event.headers.raw_items()]


# The fast path for heads. Every request costs four head parses (each side checks the head it builds
# by parsing it again, and the peer parses it), and a throwaway h11.Connection per parse made that
# ~13 us for a request head and ~35 us for a response head: 10-20 % of each daemon's CPU per 1 KiB
# GET. Plain heads are read with wstunnel.http1 instead (~3-6 us); a head the fast path is not sure
# about (Transfer-Encoding, an odd Content-Length, no single Host, another version, anything that
# does not match) goes to h11 as before, so the results and the error messages stay h11's.
# tests/test_v2_sansio.py checks both paths agree.

# h11 rewrites a Content-Length it accepts only when it is a list ("5, 5") or has more than its
# 20 digits allowed; a plain short number passes through unchanged.
_PLAIN_LENGTH_RE = re.compile(rb"[0-9]{1,18}")


def _fast_fields(block: bytes, *, request: bool) -> Headers | None:
    """The header fields of ``block`` (field lines, each ending with CRLF) as h11 would return
    them, or None to leave the head to h11."""
    headers = http1.parse_fields(block)
    if headers is None or not _plain(headers, request=request):
        return None
    return headers


def _plain(headers: Headers, *, request: bool) -> bool:
    """Whether h11 would read these fields as they are: its rules for the three fields it
    minds (the rest of the fast path's reading is the grammar's)."""
    hosts = lengths = 0
    for name, value in headers:
        size = len(name)  # only three names matter, and only their lengths are checked per line
        if size == 4 and name.lower() == b"host":
            hosts += 1
        elif size == 14 and name.lower() == b"content-length":
            lengths += 1
            if lengths > 1 or _PLAIN_LENGTH_RE.fullmatch(value) is None:
                return False
        elif size == 17 and name.lower() == b"transfer-encoding":
            return False  # h11 lowercases it and refuses codings other than chunked
    # h11 refuses an HTTP/1.1 request without exactly one Host
    return not request or hosts == 1


def _fast_request_head(head: bytes) -> tuple[bytes, bytes, Headers] | None:
    """``parse_request_head``'s answer for a checked (``_check_head``) plain head, or None."""
    start, _, block = head[: -len(_CRLF)].partition(_CRLF)
    line = http1.parse_request_line(start)
    if line is None or line[2] != b"1.1":
        return None
    headers = _fast_fields(block, request=True)
    if headers is None:
        return None
    return line[0], line[1], headers


def _fast_response_head(head: bytes) -> tuple[int, bytes, Headers] | None:
    """``parse_response_head``'s answer for a checked (``_check_head``) plain head, or None."""
    start, _, block = head[: -len(_CRLF)].partition(_CRLF)
    line = http1.parse_status_line(start)
    if line is None or line[0] != b"1.1":
        return None
    _version, status, reason = line
    if status < 100:
        return None  # h11 has no event for it: its error message it is
    headers = _fast_fields(block, request=False)
    if headers is None:
        return None
    return status, reason, headers


def _read_head(head: bytes, what: str, fast: Callable[[bytes], T | None],
               slow: Callable[[bytes], T]) -> T:
    """A head checked for v2's line rules, read on the fast path, or by h11 when it declines."""
    head = bytes(head)
    _check_head(head, what)
    parsed = fast(head)
    return parsed if parsed is not None else slow(head)


def parse_request_head(head: bytes) -> tuple[bytes, bytes, Headers]:
    """``(method, target, headers)`` of a HEAD payload from the server; HttpPayloadError if malformed."""
    return _read_head(head, "request", _fast_request_head, _h11_request_head)


def _h11_request_head(head: bytes) -> tuple[bytes, bytes, Headers]:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
    event = _h11_head(conn, head, "request")
    assert isinstance(event, h11.Request)
    return bytes(event.method), bytes(event.target), _raw_headers(event)


def _h11_head(conn: h11.Connection, head: bytes, what: str
              ) -> h11.Request | h11.Response | h11.InformationalResponse:
    """The head h11 reads from ``head``, as ``conn`` expects it; HttpPayloadError if malformed."""
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise HttpPayloadError(f"malformed HTTP {what} head: {exc}") from None
    if not isinstance(event, h11.Request | h11.Response | h11.InformationalResponse):
        raise HttpPayloadError(f"incomplete HTTP {what} head")
    if event.http_version != b"1.1":
        raise HttpPayloadError(f"HTTP/{event.http_version.decode()} {what} head (HTTP/1.1 only)")
    return event


def parse_response_head(head: bytes) -> tuple[int, bytes, Headers]:
    """``(status, reason, headers)`` of a HEAD payload from the client; HttpPayloadError if malformed.

    Informational heads (1xx) parse too: each is a HEAD frame of its own.
    """
    return _read_head(head, "response", _fast_response_head, _h11_response_head)


def _h11_response_head(head: bytes) -> tuple[int, bytes, Headers]:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_SIZE)
    # h11 accepts a 101 only after a request proposing an upgrade; whether this stream's request
    # did is V2Connection's business.
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "t"), ("Upgrade", "x")]))
    conn.send(h11.EndOfMessage())
    event = _h11_head(conn, head, "response")
    assert isinstance(event, h11.Response | h11.InformationalResponse)  # a client reads no requests
    return event.status_code, bytes(event.reason), _raw_headers(event)


def request_head(method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]], *,
                 parsed: bool = False) -> bytes:
    """The HEAD payload for a request; ValueError if it would not parse.

    As in v1, a request without ``Host`` (an HTTP/1.0 client's) gets an empty one: the tunnel
    speaks HTTP/1.1, which requires it.

    ``parsed``: the method, the target and every field came out of a head read by
    wstunnel.http1's grammar or h11's (the HTTP client's request, at srv), unchanged but for
    fields left out, or added from such values and constants (X-Forwarded-For): each is a
    field line already, and the head is not read back when its fields are plain (``_plain``)
    and it is not too large. That reading back was most of what building a head cost.
    """
    headers = list(headers)
    if get(headers, b"host") is None:
        headers.insert(0, (b"Host", b""))
    head = http1.head_bytes(http1.request_line(method, target), headers)
    if parsed and len(head) <= MAX_HEAD_SIZE and _plain(headers, request=True):
        return head
    try:
        read_back = parse_request_head(head)
    except HttpPayloadError as exc:
        raise ValueError(str(exc)) from None
    if read_back != (method, target, headers):  # e.g. spaces around a value, which h11 strips
        raise ValueError(f"request head does not survive a round trip: {head!r}")
    return head


def response_head(status: int, reason: bytes, headers: Iterable[tuple[bytes, bytes]], *,
                  parsed: bool = False) -> bytes:
    """The HEAD payload for a response (final or 1xx); ValueError if it would not parse.

    ``parsed``: as for ``request_head``, the reason and the fields as read from a head (the
    backend's response, at cli)."""
    if not 100 <= status <= 999:
        raise ValueError(f"status {status} out of range")
    headers = list(headers)
    head = http1.head_bytes(http1.status_line(status, reason), headers)
    if parsed and len(head) <= MAX_HEAD_SIZE and _plain(headers, request=False):
        return head
    try:
        read_back = parse_response_head(head)
    except HttpPayloadError as exc:
        raise ValueError(str(exc)) from None
    if read_back != (status, reason, headers):
        raise ValueError(f"response head does not survive a round trip: {head!r}")
    return head


def encode_trailers(trailers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The END payload for ``trailers`` (empty for none); ValueError if it would not parse."""
    trailers = list(trailers)
    if not trailers:
        return b""
    block = b"".join(b"%s: %s\r\n" % (name, value) for name, value in trailers)
    try:
        parsed = parse_trailers(block)
    except HttpPayloadError as exc:
        raise ValueError(str(exc)) from None
    if parsed != trailers:
        raise ValueError(f"trailers do not survive a round trip: {block!r}")
    return block


# h11 parses trailer fields at the end of a chunked body: we hand it one holding only our block.
_TRAILER_PREFIX = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"


def parse_trailers(block: bytes) -> Headers:
    """The trailer fields of an END payload; HttpPayloadError if malformed."""
    block = bytes(block)
    if not block:
        return []
    if len(block) > MAX_HEAD_SIZE:
        raise HttpPayloadError(f"trailers larger than {MAX_HEAD_SIZE} bytes")
    if not block.endswith(_CRLF) or _BLANK_LINE in block or block.startswith(_CRLF):
        raise HttpPayloadError("trailers must be header lines each ending with CRLF, without an empty line")
    _check_lines(block, "trailers")
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_SIZE + len(_TRAILER_PREFIX))
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "t")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(_TRAILER_PREFIX + block + _CRLF)
    try:
        conn.next_event()  # the Response we made up
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise HttpPayloadError(f"malformed trailers: {exc}") from None
    if not isinstance(event, h11.EndOfMessage):  # pragma: no cover - the checks above rule it out
        raise HttpPayloadError("incomplete trailers")
    return _raw_headers(event)


class OnStream:
    """Name the stream in a malformed head's or trailers' error (a class: a generator-based
    context manager costs a few microseconds, on every head)."""

    __slots__ = ("stream",)

    def __init__(self, stream: int) -> None:
        self.stream = stream

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: object) -> None:
        if isinstance(error, HttpPayloadError):
            raise HttpPayloadError(f"stream {self.stream}: {error}") from None
