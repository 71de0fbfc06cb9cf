"""Tunnel framing, sans-I/O: bytes in, typed messages out; typed messages in, bytes out.

Protocol v1, the original WStunnel's (SPEC §4): every tunnel message is one binary WebSocket
message holding four hex digits, the request id, followed directly by a complete HTTP/1.1 request
(server to client) or response (client to server, same id). Bodies may be framed by
``Content-Length``, chunked coding, or, for responses only, by the end of the message.

Parsing leans on h11, the same parser as the HTTP front, so both accept the same dialect. We write
messages ourselves: always ``Content-Length`` framing, which every reader accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11

from wstunnel import http1
from wstunnel.errors import HttpPayloadError, TunnelMessageError
from wstunnel.headers import Headers, get, without

ID_DIGITS = 4
MAX_ID = 0xFFFF
# The highest id a server may assign. The original client reads the four digits into a signed
# 16-bit integer and drops the whole tunnel on "8000" and above (integer overflow), so ids stay
# within 1..0x7fff (the original server itself wraps at 32000). Any id is accepted on receipt.
MAX_ASSIGNED_ID = 0x7FFF
_HEX = frozenset(b"0123456789abcdefABCDEF")
# Large enough for any sane request head; the body cap is enforced by the callers.
MAX_HEAD_SIZE = 256 * 1024
# Statuses whose responses never carry a body, whatever their headers say.
_BODYLESS_STATUSES = frozenset({204, 304})


@dataclass(slots=True)
class Request:
    method: bytes
    target: bytes
    headers: Headers = field(default_factory=list)
    body: bytes = b""


@dataclass(slots=True)
class Response:
    status: int
    reason: bytes = b""
    headers: Headers = field(default_factory=list)
    body: bytes = b""


def encode_id(request_id: int) -> bytes:
    if not 0 <= request_id <= MAX_ID:
        raise ValueError(f"request id {request_id} out of range")
    return b"%04x" % request_id


def split_message(message: bytes | bytearray | str) -> tuple[int, bytes]:
    """Split a tunnel message into its request id and its HTTP payload."""
    if isinstance(message, str):
        raise TunnelMessageError("text message on the tunnel (only binary messages are allowed)")
    if len(message) < ID_DIGITS:
        raise TunnelMessageError(f"message of {len(message)} bytes is too short for an id")
    prefix = bytes(message[:ID_DIGITS])
    if not all(byte in _HEX for byte in prefix):
        raise TunnelMessageError(f"message does not start with a hex request id: {prefix!r}")
    return int(prefix, 16), bytes(memoryview(message)[ID_DIGITS:])  # one copy, as a slice was


def encode_request(request_id: int, request: Request) -> bytes:
    """One tunnel message carrying ``request`` with a ``Content-Length`` body."""
    headers = without(request.headers, (b"content-length", b"transfer-encoding"))
    if get(headers, b"host") is None:
        # HTTP/1.0 clients may omit Host, but we always write HTTP/1.1, which requires one (h11,
        # our own reader, refuses a request without it). Go's Request.Write sends an empty one too.
        headers.insert(0, (b"Host", b""))
    if request.body or request.method not in (b"GET", b"HEAD", b"OPTIONS", b"DELETE"):
        headers.append((b"Content-Length", b"%d" % len(request.body)))
    head = http1.head_bytes(http1.request_line(request.method, request.target), headers)
    return b"".join((encode_id(request_id), head, request.body))


def encode_response(request_id: int, response: Response, *, request_method: bytes) -> bytes:
    """One tunnel message carrying ``response``.

    The body is framed by ``Content-Length``. Responses to HEAD and bodyless statuses keep the
    backend's own ``Content-Length``, which describes the body a GET would have had.
    """
    bodyless = request_method == b"HEAD" or response.status in _BODYLESS_STATUSES
    if bodyless:
        headers = without(response.headers, (b"transfer-encoding",))
        body = b""
    else:
        headers = without(response.headers, (b"content-length", b"transfer-encoding"))
        headers.append((b"Content-Length", b"%d" % len(response.body)))
        body = response.body
    reason = response.reason or b""
    head = http1.head_bytes(http1.status_line(response.status, reason), headers)
    return b"".join((encode_id(request_id), head, body))


def _collect_body(conn: h11.Connection) -> tuple[bytes, bool]:
    """Drain Data events; return the body and whether EndOfMessage was seen."""
    chunks: list[bytes] = []
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(chunks), True
        else:
            return b"".join(chunks), False


def _receive_head(
    conn: h11.Connection, payload: bytes, *, eof: bool
) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
    """Feed ``payload`` to ``conn``; return the first event after any informational responses.

    h11 enforces ``max_incomplete_event_size`` only on a head whose end it has not seen yet, so
    handed a whole message at once it would take a head of any size. Feeding the first
    MAX_HEAD_SIZE bytes on their own makes a longer head (informational heads before it
    included) show up as incomplete, which we refuse.
    """
    view = memoryview(payload)  # slices without copying a body of up to max_body_size
    head, rest = view[:MAX_HEAD_SIZE], view[MAX_HEAD_SIZE:]
    if head:
        conn.receive_data(head)  # type: ignore[arg-type]
    if eof and not rest:
        conn.receive_data(b"")
    event = conn.next_event()
    while isinstance(event, h11.InformationalResponse):
        event = conn.next_event()
    if event is h11.NEED_DATA and rest:
        raise HttpPayloadError(f"HTTP head larger than {MAX_HEAD_SIZE} bytes")
    if rest:
        conn.receive_data(rest)  # type: ignore[arg-type]
        if eof:
            conn.receive_data(b"")  # the message ends here: a close-delimited body ends too
    return event


def _check_no_trailing(conn: h11.Connection) -> None:
    leftover, _closed = conn.trailing_data
    if leftover.strip():
        raise HttpPayloadError(f"{len(leftover)} unexpected bytes after the HTTP message")


def parse_request(payload: bytes) -> Request:
    """Parse the HTTP/1.1 request of a server-to-client message."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
    try:
        event = _receive_head(conn, payload, eof=False)
        if not isinstance(event, h11.Request):
            raise HttpPayloadError("incomplete HTTP request head")
        body, complete = _collect_body(conn)
        if not complete:
            raise HttpPayloadError("HTTP request body is shorter than its framing says")
    except h11.RemoteProtocolError as exc:
        raise HttpPayloadError(f"malformed HTTP request: {exc}") from None
    # A tunnel message holds exactly one request: anything after it is a broken peer.
    _check_no_trailing(conn)
    return Request(
        method=bytes(event.method),
        target=bytes(event.target),
        headers=[(bytes(k), bytes(v)) for k, v in event.headers.raw_items()],
        body=body,
    )


def parse_response(payload: bytes, *, request_method: bytes = b"GET") -> Response:
    """Parse the HTTP/1.1 response of a client-to-server message.

    ``request_method`` matters: a response to HEAD has no body whatever its headers say.
    Informational (1xx) responses before the final one are skipped.
    """
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_SIZE)
    conn.send(h11.Request(method=request_method, target="/", headers=[("Host", "tunnel")]))
    conn.send(h11.EndOfMessage())
    try:
        event = _receive_head(conn, payload, eof=True)
        if not isinstance(event, h11.Response):
            raise HttpPayloadError("incomplete HTTP response head")
        body, complete = _collect_body(conn)
    except h11.RemoteProtocolError as exc:
        raise HttpPayloadError(f"malformed HTTP response: {exc}") from None
    if not complete:
        raise HttpPayloadError("HTTP response body is shorter than its framing says")
    # As for requests: bytes beyond the framed body mean the peer is broken, not a longer body.
    _check_no_trailing(conn)
    return Response(
        status=event.status_code,
        reason=bytes(event.reason),
        headers=[(bytes(k), bytes(v)) for k, v in event.headers.raw_items()],
        body=body,
    )
