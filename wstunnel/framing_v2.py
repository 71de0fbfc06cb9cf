"""Tunnel framing, protocol v2, sans-I/O: streamed, multiplexed HTTP with flow control.

Wire format
===========

Negotiation. The side that opens the WebSocket (``wstunnel cli``, the *client*) offers the WebSocket
subprotocol ``wstunnel.v2`` (SUBPROTOCOL); the side that receives HTTP requests (``wstunnel srv``,
the *server*) selects it. Without it both speak protocol v1 (``wstunnel.framing``).

Batching. A client may also offer ``wstunnel.v2.batch`` (BATCH_SUBPROTOCOL), first; a server that
knows it selects it over ``wstunnel.v2``. The frames and their rules are the same; only the
messages carrying them differ (see Messages). Each side then sends, in one message, the frames
it has ready: one WebSocket message, one socket write and one wake-up of the peer's reader for a
burst of frames, where plain v2 pays for each frame.

Messages. Every tunnel message is one *binary* WebSocket message (a text message is a protocol
error). With ``wstunnel.v2`` it holds exactly one frame. With ``wstunnel.v2.batch`` it holds one
or more *entries*, each a u32 big-endian length, then that many bytes holding one frame as plain v2
would send it; a message is at most MAX_BATCH_SIZE (1 MiB) bytes and a frame is never split across
messages; an entry shorter than a frame header or running past the message's end is a protocol
error. A frame is a 6-byte header, then the payload, which runs to the end of the message (or of
its entry; its length is that length minus 6)::

    +--------+--------+--------+--------+--------+--------+=========...
    |  type  | flags  |      stream id (u32, big-endian)  | payload
    +--------+--------+--------+--------+--------+--------+=========...

=====  ======  ===============================================================================
type   name    payload
=====  ======  ===============================================================================
1      HEAD    One HTTP/1.1 head: a request line (server to client) or a status line (client to
               server), header lines, then the empty line; every line ends with CRLF (no bare CR
               or LF, no obsolete line folding), the head ends at its first empty line, which is
               the end of the payload. The version is always ``HTTP/1.1``. 1 to MAX_HEAD_SIZE
               (256 KiB) bytes. Same text as v1's heads; checked with h11, like the HTTP front.
2      DATA    Body bytes, 0 to MAX_FRAME_PAYLOAD (64 KiB); empty only with END_STREAM.
3      END     The trailer block: ``Name: value`` lines each ending with CRLF, *without* the final
               empty line; empty for no trailers. At most MAX_HEAD_SIZE bytes. Ends the sender's
               side of the stream.
4      WINDOW  u32 big-endian increment, 1 to 2^31-1. Stream 0 means the whole tunnel.
5      RESET   u16 big-endian error code, then a UTF-8 reason (may be empty); at most
               MAX_FRAME_PAYLOAD bytes in all. Aborts the stream in both directions.
=====  ======  ===============================================================================

Flags: END_STREAM (0x01), allowed on HEAD and DATA only, ends the sender's side of the stream, as if
an empty END followed. Any other bit set, or END_STREAM on another type, is a protocol error. Stream
0 is only valid for WINDOW. Unknown types are protocol errors. There is no ping (WebSocket has one)
and no goaway (a WebSocket close ends the tunnel and every stream on it).

Streams. Only the server opens streams: a HEAD carrying a request, on a new id. Ids are u32 >= 1,
strictly increasing on a tunnel and never reused (they need not be consecutive; an id skipped is
closed). The client answers on the same id: any number of informational heads (1xx except 101),
then one final head (>= 200, or 101), then DATA frames, then END (or END_STREAM). Each direction
ends on its own (half-close): a request body may still flow while the response streams back.

* The final response to a HEAD request, and a 204 or 304 response, carry no body bytes.
* An *upgrade request* has an ``Upgrade`` header. The server sends no body bytes on it until the
  final response has arrived. If that is ``101 Switching Protocols``, DATA in both directions is the
  upgraded byte stream (WebSocket, say) until each side's END; otherwise the server sends no body
  bytes at all and just ends its side. (So a server forwarding an upgrade request that has a body,
  like curl's ``Upgrade: h2c`` POST, drops the ``Upgrade`` header first.) A 101 answering a request
  without ``Upgrade`` is a protocol error.
* ``Content-Length`` and ``Transfer-Encoding`` in heads describe the original message: bodies are
  delimited by END only, and whoever forwards a message re-frames it.

Reset. RESET aborts both directions of a stream at once; either side may send it at any time for an
open stream (a RESET for a stream that has already closed at the sender is not sent). Codes:

==  ==============  ==========================================================================
1   CANCEL          The HTTP client went away, or the caller gave up on the stream.
2   BACKEND_ERROR   The backend failed (refused the connection, died mid-body): the client's
                    response must be aborted, never passed on truncated.
3   PROTOCOL_ERROR  The stream's content broke a rule (the tunnel itself stays up).
4   TOO_LARGE       A head or body exceeded a configured limit.
5   TIMEOUT         The stream stalled for longer than the activity timeout.
6   REFUSED         The request was not processed at all (an unroutable host, say; a plain 403
                    response is the usual answer, though); safe to retry.
==  ==============  ==========================================================================

Other codes are accepted and mean the same as CANCEL, so codes may be added later.

Late frames. A frame sent just before the peer's RESET (or END) arrived is not an error:

* WINDOW and RESET frames for a stream that is no longer open are ignored, always.
* After we reset a stream, the peer's HEAD, DATA and END frames for it are ignored until its END
  (or END_STREAM) arrives or until we have reset RESET_GRACE (1024) more streams, whichever comes
  first; their DATA still counts against the tunnel window, and is credited back at once. Anything
  else for a closed stream (a frame after the peer's own END or RESET, or on a never-opened id) is a
  protocol error.

Flow control, like HTTP/2's. Each side may send DATA bytes only within two send windows granted
by the other: one per stream (INITIAL_STREAM_WINDOW, 256 KiB, at the stream's start) and one for the
tunnel (INITIAL_TUNNEL_WINDOW, 4 MiB, at the tunnel's start), in each direction. Every DATA payload
byte takes from both; HEAD, END, WINDOW and RESET take nothing. A WINDOW frame adds its increment to
the stream's window (or the tunnel's, for stream 0). The receiver sends WINDOW as its application
*consumes* bytes, not as they arrive, so a slow reader stops its sender, and the bytes buffered on a
tunnel never exceed the tunnel window; this module grants once half a window has been consumed.
A receiver may also grant more than it consumed, to widen a window. DATA beyond a window, or a WINDOW
taking a window above 2^31-1, is a protocol error. WINDOW frames for streams whose sending side has
ended are ignored.

Any protocol error is fatal to the tunnel: close the WebSocket (code 1002).

API
===

``encode_frame``/``decode_frame`` turn the frame dataclasses into bytes and back; the head and
trailer helpers build and parse HEAD and END payloads. ``V2Connection`` is one end of a tunnel: it
tracks every stream's state and both windows, builds the frames to send (``send_request``,
``send_response``, ``data_frames``, ``send_end``, ``reset``, ``consumed``) and turns received
messages into events (``receive``). Frames must reach the WebSocket in the order the calls made
them (put them on one outbound queue without a checkpoint in between), or a frame may follow the
RESET that ended its stream.
"""

from __future__ import annotations

import enum
import re
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import h11

from wstunnel.errors import (
    HttpPayloadError,
    LocalProtocolError,
    ProtocolError,
    StreamClosedError,
    TunnelMessageError,
)
from wstunnel.framing import MAX_HEAD_SIZE
from wstunnel.headers import Headers, get

__all__ = [
    "BATCH_ENTRY_OVERHEAD",
    "BATCH_SUBPROTOCOL",
    "END_STREAM",
    "HEADER_SIZE",
    "INITIAL_STREAM_WINDOW",
    "INITIAL_TUNNEL_WINDOW",
    "MAX_BATCH_SIZE",
    "MAX_FRAME_PAYLOAD",
    "MAX_HEAD_SIZE",
    "MAX_STREAM_ID",
    "MAX_WINDOW",
    "RESET_GRACE",
    "SUBPROTOCOL",
    "Data",
    "DataReceived",
    "End",
    "ErrorCode",
    "Event",
    "Frame",
    "FrameType",
    "Head",
    "RequestReceived",
    "Reset",
    "ResponseReceived",
    "Role",
    "SendFrame",
    "StreamEnded",
    "StreamReset",
    "StreamState",
    "V2Connection",
    "Window",
    "WindowUpdated",
    "decode_frame",
    "encode_frame",
    "encode_trailers",
    "pack_batch",
    "parse_request_head",
    "parse_response_head",
    "parse_trailers",
    "request_head",
    "response_head",
    "unpack_batch",
]

SUBPROTOCOL = "wstunnel.v2"
BATCH_SUBPROTOCOL = "wstunnel.v2.batch"
HEADER_SIZE = 6
MAX_FRAME_PAYLOAD = 64 * 1024
INITIAL_STREAM_WINDOW = 256 * 1024
INITIAL_TUNNEL_WINDOW = 4 * 1024 * 1024
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**32 - 1
MAX_CODE = 0xFFFF
END_STREAM = 0x01
# How many of our own resets we remember to excuse the peer's frames still in flight: far more than
# can be reset within one round trip, and only an int and a small record each.
RESET_GRACE = 1024
# The largest message a peer may send: one frame, a HEAD or END of MAX_HEAD_SIZE at most.
MAX_MESSAGE_SIZE = HEADER_SIZE + max(MAX_HEAD_SIZE, MAX_FRAME_PAYLOAD)
# The largest batched message; the largest frame and its length always fit.
MAX_BATCH_SIZE = 1024 * 1024
_ENTRY_LENGTH = struct.Struct(">I")
# What each frame adds to a batched message: its length.
BATCH_ENTRY_OVERHEAD = _ENTRY_LENGTH.size

_HEADER = struct.Struct(">BBI")
_WINDOW = struct.Struct(">I")
_CODE = struct.Struct(">H")
_CRLF = b"\r\n"
_BLANK_LINE = b"\r\n\r\n"
# Statuses whose responses never carry a body, whatever their headers say.
_BODYLESS_STATUSES = frozenset({204, 304})


class FrameType(enum.IntEnum):
    HEAD = 1
    DATA = 2
    END = 3
    WINDOW = 4
    RESET = 5


_FRAME_TYPES = {int(kind): kind for kind in FrameType}
_ALLOWED_FLAGS = {kind: END_STREAM if kind in (FrameType.HEAD, FrameType.DATA) else 0
                  for kind in FrameType}


class ErrorCode(enum.IntEnum):
    CANCEL = 1
    BACKEND_ERROR = 2
    PROTOCOL_ERROR = 3
    TOO_LARGE = 4
    TIMEOUT = 5
    REFUSED = 6


# -- frames -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Head:
    stream: int
    head: bytes
    end_stream: bool = False


@dataclass(frozen=True, slots=True)
class Data:
    stream: int
    data: bytes = field(repr=False)  # up to 64 KiB: too much for a log line
    end_stream: bool = False


@dataclass(frozen=True, slots=True)
class End:
    stream: int
    trailers: bytes = b""


@dataclass(frozen=True, slots=True)
class Window:
    stream: int
    increment: int


@dataclass(frozen=True, slots=True)
class Reset:
    stream: int
    code: int
    reason: str = ""


Frame = Head | Data | End | Window | Reset


def _check_stream(frame: Frame) -> None:
    low = 0 if isinstance(frame, Window) else 1
    if not low <= frame.stream <= MAX_STREAM_ID:
        raise ValueError(f"stream id {frame.stream} out of range for {type(frame).__name__.upper()}")


def encode_frame(frame: Frame) -> bytes:
    """The tunnel message carrying ``frame``; ValueError if the frame could not be decoded again."""
    _check_stream(frame)
    if isinstance(frame, Head):
        if not 1 <= len(frame.head) <= MAX_HEAD_SIZE:
            raise ValueError(f"HEAD payload of {len(frame.head)} bytes (1 to {MAX_HEAD_SIZE} allowed)")
        flags = END_STREAM if frame.end_stream else 0
        return _HEADER.pack(FrameType.HEAD, flags, frame.stream) + frame.head
    if isinstance(frame, Data):
        if len(frame.data) > MAX_FRAME_PAYLOAD:
            raise ValueError(f"DATA payload of {len(frame.data)} bytes (at most {MAX_FRAME_PAYLOAD})")
        if not frame.data and not frame.end_stream:
            raise ValueError("empty DATA without END_STREAM")
        flags = END_STREAM if frame.end_stream else 0
        return _HEADER.pack(FrameType.DATA, flags, frame.stream) + frame.data
    if isinstance(frame, End):
        if len(frame.trailers) > MAX_HEAD_SIZE:
            raise ValueError(f"END payload of {len(frame.trailers)} bytes (at most {MAX_HEAD_SIZE})")
        return _HEADER.pack(FrameType.END, 0, frame.stream) + frame.trailers
    if isinstance(frame, Window):
        if not 1 <= frame.increment <= MAX_WINDOW:
            raise ValueError(f"WINDOW increment {frame.increment} out of range (1 to {MAX_WINDOW})")
        return _HEADER.pack(FrameType.WINDOW, 0, frame.stream) + _WINDOW.pack(frame.increment)
    if isinstance(frame, Reset):
        if not 0 <= frame.code <= MAX_CODE:
            raise ValueError(f"RESET code {frame.code} out of range (0 to {MAX_CODE})")
        payload = _CODE.pack(frame.code) + frame.reason.encode()
        if len(payload) > MAX_FRAME_PAYLOAD:
            raise ValueError(f"RESET payload of {len(payload)} bytes (at most {MAX_FRAME_PAYLOAD})")
        return _HEADER.pack(FrameType.RESET, 0, frame.stream) + payload
    raise TypeError(f"not a frame: {frame!r}")


def decode_frame(message: bytes | bytearray | memoryview | str) -> Frame:
    """The frame in one tunnel message; TunnelMessageError if it breaks the wire format.

    Only the frame's structure is checked here; the HTTP text of HEAD and END payloads is checked by
    ``parse_request_head``/``parse_response_head``/``parse_trailers`` (V2Connection calls them),
    since which head is allowed depends on the direction.
    """
    if isinstance(message, str):
        raise TunnelMessageError("text message on the tunnel (only binary messages are allowed)")
    if not isinstance(message, bytes | bytearray | memoryview):
        raise TunnelMessageError(f"tunnel message of type {type(message).__name__}, not bytes")
    if isinstance(message, memoryview):  # an entry of a batch: one copy, of the payload only
        message = message.cast("B")
    if len(message) < HEADER_SIZE:
        raise TunnelMessageError(f"message of {len(message)} bytes is too short for a frame header")
    type_, flags, stream = _HEADER.unpack_from(message)
    payload = bytes(message[HEADER_SIZE:])
    # A table, not FrameType(type_): an enum call and .name cost more than the rest of a small
    # frame's decoding, for every frame.
    kind = _FRAME_TYPES.get(type_)
    if kind is None:
        raise TunnelMessageError(f"unknown frame type {type_} on stream {stream}")
    unknown = flags & ~_ALLOWED_FLAGS[kind]
    if unknown:
        raise TunnelMessageError(
            f"{kind.name} frame on stream {stream} has unknown flags 0x{unknown:02x}"
        )
    end_stream = bool(flags & END_STREAM)
    if stream == 0 and kind is not FrameType.WINDOW:
        raise TunnelMessageError(f"{kind.name} frame on stream 0 (only WINDOW may use stream 0)")
    size = len(payload)
    if kind is FrameType.HEAD:
        if not 1 <= size <= MAX_HEAD_SIZE:
            raise TunnelMessageError(
                f"HEAD frame on stream {stream} with {size} bytes (1 to {MAX_HEAD_SIZE})"
            )
        return Head(stream, payload, end_stream)
    if kind is FrameType.DATA:
        if size > MAX_FRAME_PAYLOAD:
            raise TunnelMessageError(
                f"DATA frame on stream {stream} with {size} bytes (at most {MAX_FRAME_PAYLOAD})"
            )
        if not size and not end_stream:
            raise TunnelMessageError(f"empty DATA frame on stream {stream} without END_STREAM")
        return Data(stream, payload, end_stream)
    if kind is FrameType.END:
        if size > MAX_HEAD_SIZE:
            raise TunnelMessageError(
                f"END frame on stream {stream} with {size} bytes (at most {MAX_HEAD_SIZE})"
            )
        return End(stream, payload)
    if kind is FrameType.WINDOW:
        if size != _WINDOW.size:
            raise TunnelMessageError(f"WINDOW frame on stream {stream} with {size} bytes (exactly 4)")
        (increment,) = _WINDOW.unpack(payload)
        if not 1 <= increment <= MAX_WINDOW:
            raise TunnelMessageError(
                f"WINDOW frame on stream {stream} with increment {increment} (1 to {MAX_WINDOW})"
            )
        return Window(stream, increment)
    # RESET
    if not _CODE.size <= size <= MAX_FRAME_PAYLOAD:
        raise TunnelMessageError(
            f"RESET frame on stream {stream} with {size} bytes (2 to {MAX_FRAME_PAYLOAD})"
        )
    (code,) = _CODE.unpack_from(payload)
    try:
        reason = payload[_CODE.size :].decode()
    except UnicodeDecodeError:
        raise TunnelMessageError(f"RESET frame on stream {stream} with a reason that is not UTF-8") from None
    return Reset(stream, code, reason)


def pack_batch(frames: Iterable[bytes]) -> bytes:
    """One batched message holding ``frames`` (encoded frames; their total within MAX_BATCH_SIZE)."""
    pack = _ENTRY_LENGTH.pack
    return b"".join([part for frame in frames for part in (pack(len(frame)), frame)])


def unpack_batch(message: bytes | bytearray | memoryview | str) -> list[memoryview]:
    """The frames of one batched message, each still to decode; TunnelMessageError if its entries
    do not add up."""
    if isinstance(message, str):
        raise TunnelMessageError("text message on the tunnel (only binary messages are allowed)")
    view = memoryview(message).cast("B")
    if not view:
        raise TunnelMessageError("empty batch message")
    frames: list[memoryview] = []
    offset, size = 0, len(view)
    while offset < size:
        if size - offset < _ENTRY_LENGTH.size:
            raise TunnelMessageError(f"batch entry at byte {offset} is cut short")
        (length,) = _ENTRY_LENGTH.unpack_from(view, offset)
        start = offset + _ENTRY_LENGTH.size
        offset = start + length
        if length < HEADER_SIZE or offset > size:
            raise TunnelMessageError(
                f"batch entry of {length} bytes at byte {start - _ENTRY_LENGTH.size} does not fit"
            )
        frames.append(view[start:offset])
    return frames


# -- heads and trailers -------------------------------------------------------------------------


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


def _start_head(start_line: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    parts = [start_line, _CRLF]
    for name, value in headers:
        parts += (name, b": ", value, _CRLF)
    parts.append(_CRLF)
    return b"".join(parts)


def _raw_headers(event: h11.Request | h11.Response | h11.InformationalResponse | h11.EndOfMessage) -> Headers:
    return [(bytes(k), bytes(v)) for k, v in event.headers.raw_items()]


# The fast path for heads. Every request costs four head parses (each side checks the head it builds
# by parsing it again, and the peer parses it), and a throwaway h11.Connection per parse made that
# ~13 us for a request head and ~35 us for a response head: 10-20 % of each daemon's CPU per 1 KiB
# GET. Plain heads are matched here with h11's own compiled grammar instead (~3-6 us); a head the
# fast path is not sure about (Transfer-Encoding, an odd Content-Length, no single Host, another
# version, anything that does not match) goes to h11 as before, so the results and the error
# messages stay h11's. tests/test_framing_v2.py checks both paths agree.
try:
    from h11._abnf import header_field as _FIELD_GRAMMAR
    from h11._readers import request_line_re as _REQUEST_LINE_RE
    from h11._readers import status_line_re as _STATUS_LINE_RE
except ImportError:  # pragma: no cover - a future h11 moved them: every head takes h11's path
    _FIELD_GRAMMAR = _REQUEST_LINE_RE = _STATUS_LINE_RE = None
# Every field line of a head at once, with h11's grammar for one (its groups made plain): one
# regex call for the block instead of one per line (a third of the fast path's cost). Once the
# block matches, each line is ``name:`` then the value between optional blanks, so partition and
# strip find exactly what h11's groups would.
_FIELDS_RE = (
    re.compile(b"(?:" + re.sub(r"\(\?P<[a-z_]+>", "(?:", _FIELD_GRAMMAR).encode("ascii")
               + rb"\r\n)*")
    if _FIELD_GRAMMAR is not None else None
)
# h11 rewrites a Content-Length it accepts only when it is a list ("5, 5") or has more than its
# 20 digits allowed; a plain short number passes through unchanged.
_PLAIN_LENGTH_RE = re.compile(rb"[0-9]{1,18}")


def _fast_fields(block: bytes, *, request: bool) -> Headers | None:
    """The header fields of ``block`` (field lines, each ending with CRLF) as h11 would return
    them, or None to leave the head to h11."""
    if _FIELDS_RE is None:  # pragma: no cover
        return None
    if block and _FIELDS_RE.fullmatch(block) is None:
        return None
    headers: Headers = []
    hosts = lengths = 0
    for line in block.split(_CRLF)[:-1]:
        name, _, value = line.partition(b":")
        value = value.strip(b" \t")
        size = len(name)  # only three names matter, and only their lengths are checked per line
        if size == 4 and name.lower() == b"host":
            hosts += 1
        elif size == 14 and name.lower() == b"content-length":
            lengths += 1
            if lengths > 1 or _PLAIN_LENGTH_RE.fullmatch(value) is None:
                return None
        elif size == 17 and name.lower() == b"transfer-encoding":
            return None  # h11 lowercases it and refuses codings other than chunked
        headers.append((name, value))
    if request and hosts != 1:
        return None  # h11 refuses an HTTP/1.1 request without exactly one Host
    return headers


def _fast_request_head(head: bytes) -> tuple[bytes, bytes, Headers] | None:
    """``parse_request_head``'s answer for a checked (``_check_head``) plain head, or None."""
    if _REQUEST_LINE_RE is None:  # pragma: no cover
        return None
    start, _, block = head[: -len(_CRLF)].partition(_CRLF)
    match = _REQUEST_LINE_RE.fullmatch(start)
    if match is None or match.group("http_version") != b"1.1":
        return None
    headers = _fast_fields(block, request=True)
    if headers is None:
        return None
    return match.group("method"), match.group("target"), headers


def _fast_response_head(head: bytes) -> tuple[int, bytes, Headers] | None:
    """``parse_response_head``'s answer for a checked (``_check_head``) plain head, or None."""
    if _STATUS_LINE_RE is None:  # pragma: no cover
        return None
    start, _, block = head[: -len(_CRLF)].partition(_CRLF)
    match = _STATUS_LINE_RE.fullmatch(start)
    if match is None or match.group("http_version") != b"1.1":
        return None
    status = int(match.group("status_code"))
    if status < 100:
        return None  # h11 has no event for it: its error message it is
    headers = _fast_fields(block, request=False)
    if headers is None:
        return None
    return status, match.group("reason") or b"", headers


def parse_request_head(head: bytes) -> tuple[bytes, bytes, Headers]:
    """``(method, target, headers)`` of a HEAD payload from the server; HttpPayloadError if malformed."""
    head = bytes(head)
    _check_head(head, "request")
    parsed = _fast_request_head(head)
    if parsed is not None:
        return parsed
    return _h11_request_head(head)


def _h11_request_head(head: bytes) -> tuple[bytes, bytes, Headers]:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise HttpPayloadError(f"malformed HTTP request head: {exc}") from None
    if not isinstance(event, h11.Request):
        raise HttpPayloadError("incomplete HTTP request head")
    if event.http_version != b"1.1":
        raise HttpPayloadError(f"HTTP/{event.http_version.decode()} request head (HTTP/1.1 only)")
    return bytes(event.method), bytes(event.target), _raw_headers(event)


def parse_response_head(head: bytes) -> tuple[int, bytes, Headers]:
    """``(status, reason, headers)`` of a HEAD payload from the client; HttpPayloadError if malformed.

    Informational heads (1xx) parse too: each is a HEAD frame of its own.
    """
    head = bytes(head)
    _check_head(head, "response")
    parsed = _fast_response_head(head)
    if parsed is not None:
        return parsed
    return _h11_response_head(head)


def _h11_response_head(head: bytes) -> tuple[int, bytes, Headers]:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_SIZE)
    # h11 accepts a 101 only after a request proposing an upgrade; whether this stream's request
    # did is V2Connection's business.
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "t"), ("Upgrade", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise HttpPayloadError(f"malformed HTTP response head: {exc}") from None
    if not isinstance(event, h11.Response | h11.InformationalResponse):
        raise HttpPayloadError("incomplete HTTP response head")
    if event.http_version != b"1.1":
        raise HttpPayloadError(f"HTTP/{event.http_version.decode()} response head (HTTP/1.1 only)")
    return event.status_code, bytes(event.reason), _raw_headers(event)


def request_head(method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The HEAD payload for a request; ValueError if it would not parse.

    As in v1, a request without ``Host`` (an HTTP/1.0 client's) gets an empty one: the tunnel
    speaks HTTP/1.1, which requires it.
    """
    headers = list(headers)
    if get(headers, b"host") is None:
        headers.insert(0, (b"Host", b""))
    head = _start_head(b"%s %s HTTP/1.1" % (method, target), headers)
    try:
        parsed = parse_request_head(head)
    except HttpPayloadError as exc:
        raise ValueError(str(exc)) from None
    if parsed != (method, target, headers):  # e.g. spaces around a value, which h11 strips
        raise ValueError(f"request head does not survive a round trip: {head!r}")
    return head


def response_head(status: int, reason: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The HEAD payload for a response (final or 1xx); ValueError if it would not parse."""
    if not 100 <= status <= 999:
        raise ValueError(f"status {status} out of range")
    headers = list(headers)
    head = _start_head(b"HTTP/1.1 %d %s" % (status, reason), headers)
    try:
        parsed = parse_response_head(head)
    except HttpPayloadError as exc:
        raise ValueError(str(exc)) from None
    if parsed != (status, reason, headers):
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


# -- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A new stream (client side only). A StreamEnded follows at once if ``end_stream``."""

    stream: int
    method: bytes
    target: bytes
    headers: Headers
    end_stream: bool = False


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """A response head (server side only): 1xx informational ones first, then the final one."""

    stream: int
    status: int
    reason: bytes
    headers: Headers
    end_stream: bool = False

    @property
    def informational(self) -> bool:
        return self.status < 200 and self.status != 101


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Body bytes. Pass ``len(data)`` to ``consumed`` once the application has taken them."""

    stream: int
    data: bytes = field(repr=False)
    end_stream: bool = False


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer's side of the stream ended (END, or END_STREAM on the HEAD or DATA before)."""

    stream: int
    trailers: Headers


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer reset the stream: stop both directions; its buffered bytes are already released."""

    stream: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """The send window of ``stream`` grew (stream 0: the tunnel's, so every stream's capacity)."""

    stream: int
    increment: int


@dataclass(frozen=True, slots=True)
class SendFrame:
    """A frame the connection owes the peer on its own: WINDOW credit for bytes it dropped."""

    frame: Frame


Event = (
    RequestReceived | ResponseReceived | DataReceived | StreamEnded | StreamReset | WindowUpdated | SendFrame
)


# -- the connection -----------------------------------------------------------------------------

Role = Literal["server", "client"]


class StreamState(enum.Enum):
    IDLE = "idle"  # never opened
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"  # we ended our side; the peer may still send
    HALF_CLOSED_REMOTE = "half-closed (remote)"  # the peer ended its side; we may still send
    CLOSED = "closed"
    RESET = "reset"


class _Phase(enum.Enum):
    HEAD = "before the final head"
    BODY = "open"
    ENDED = "ended"


@dataclass(slots=True, eq=False)
class _Stream:
    id: int
    sending: _Phase
    receiving: _Phase
    send_window: int
    receive_window: int
    unacked: int = 0  # consumed but not yet granted back
    buffered: int = 0  # received but not yet consumed
    upgrade: bool = False  # the request has Upgrade: a 101 may answer it
    switched: bool = False  # a 101 answered it: DATA is the upgraded byte stream
    head_request: bool = False  # a HEAD request: its response has no body
    bodyless_response: bool = False


@dataclass(slots=True)
class _Gone:
    """A reset stream, remembered for a while."""

    code: int
    peer_may_send: bool  # we reset it before the peer's END: its HEAD/DATA/END may still arrive


class _OnStream:
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




def _wants_upgrade(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return get(headers, b"upgrade") is not None


class V2Connection:
    """One end of a v2 tunnel: stream states and flow control, no I/O.

    ``role`` is "server" for the side that receives HTTP requests and opens streams (``srv``),
    "client" for the side that answers them (``cli``). The window sizes are the protocol's; both
    ends must use the same, and only tests change them.

    Methods that send return the frames to send, in order; ``receive`` returns events. A peer's
    violation raises a FramingError (ProtocolError, TunnelMessageError or HttpPayloadError) and
    leaves the connection as it was; close the tunnel. Sending what the protocol forbids raises
    LocalProtocolError (a bug); sending on a stream that has ended or was reset raises
    StreamClosedError (a race with the peer's RESET, usually).
    """

    def __init__(
        self,
        role: Role,
        *,
        stream_window: int = INITIAL_STREAM_WINDOW,
        tunnel_window: int = INITIAL_TUNNEL_WINDOW,
    ) -> None:
        if role not in ("server", "client"):
            raise ValueError(f"role must be 'server' or 'client', not {role!r}")
        for window in (stream_window, tunnel_window):
            if not 1 <= window <= MAX_WINDOW:
                raise ValueError(f"window {window} out of range (1 to {MAX_WINDOW})")
        self.role: Role = role
        self._initial_stream_window = stream_window
        self._initial_tunnel_window = tunnel_window
        # Grant credit back once half a window is consumed: few WINDOW frames, and the sender still
        # has at least the other half to keep sending while the grant travels.
        self._stream_threshold = max(1, stream_window // 2)
        self._tunnel_threshold = max(1, tunnel_window // 2)
        self._send_window = tunnel_window
        self._receive_window = tunnel_window
        self._unacked = 0
        self._buffered = 0
        self._streams: dict[int, _Stream] = {}
        self._last_id = 0  # the highest stream id opened so far (sent by a server, received by a client)
        self._gone: OrderedDict[int, _Gone] = OrderedDict()

    # -- queries --------------------------------------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet consumed, every stream together: at most the tunnel window."""
        return self._buffered

    def send_capacity(self, stream: int) -> int:
        """How many body bytes ``stream`` may send now; 0 means wait for WindowUpdated."""
        state = self._sendable(stream)
        self._check_body_allowed(state, nonempty=True)
        return min(state.send_window, self._send_window)

    def stream_state(self, stream: int) -> StreamState:
        """Where ``stream`` stands, as far as this side knows (RESET only while remembered)."""
        state = self._streams.get(stream)
        if state is None:
            if stream > self._last_id or stream < 1:
                return StreamState.IDLE
            return StreamState.RESET if stream in self._gone else StreamState.CLOSED
        sent, received = state.sending is _Phase.ENDED, state.receiving is _Phase.ENDED
        if sent and received:
            return StreamState.CLOSED  # ended both ways; kept until its buffered bytes are consumed
        if sent:
            return StreamState.HALF_CLOSED_LOCAL
        return StreamState.HALF_CLOSED_REMOTE if received else StreamState.OPEN

    # -- sending --------------------------------------------------------------------------------

    def send_request(
        self,
        method: bytes,
        target: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        *,
        end_stream: bool = False,
    ) -> tuple[int, Head]:
        """Open a stream with a request (server side only): its new id and the HEAD to send."""
        if self.role != "server":
            raise LocalProtocolError("only the server side opens streams")
        if self._last_id >= MAX_STREAM_ID:
            raise LocalProtocolError("stream ids are used up: open a new tunnel")
        headers = list(headers)
        head = request_head(method, target, headers)
        stream = self._last_id + 1
        self._last_id = stream
        self._streams[stream] = _Stream(
            id=stream,
            sending=_Phase.ENDED if end_stream else _Phase.BODY,
            receiving=_Phase.HEAD,
            send_window=self._initial_stream_window,
            receive_window=self._initial_stream_window,
            upgrade=_wants_upgrade(headers),
            head_request=method == b"HEAD",
        )
        return stream, Head(stream, head, end_stream)

    def send_response(
        self,
        stream: int,
        status: int,
        reason: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        *,
        end_stream: bool = False,
    ) -> Head:
        """A response head (client side only): any 1xx first, then the final one (>= 200 or 101)."""
        if self.role != "client":
            raise LocalProtocolError("only the client side sends responses")
        state = self._sendable(stream)
        if state.sending is not _Phase.HEAD:
            raise LocalProtocolError(f"stream {stream}: the final response head was already sent")
        final = status >= 200 or status == 101
        if not final and end_stream:
            raise LocalProtocolError(f"stream {stream}: an informational response cannot end the stream")
        if status == 101 and not state.upgrade:
            raise LocalProtocolError(f"stream {stream}: 101 Switching Protocols to a request without Upgrade")
        head = response_head(status, reason, headers)
        if final:
            self._final_response(state, status, end_stream=end_stream, sent=True)
        return Head(stream, head, end_stream)

    def data_frames(
        self, stream: int, data: bytes | bytearray | memoryview, *, end_stream: bool = False
    ) -> tuple[list[Data], int]:
        """DATA frames for as much of ``data`` as the windows allow, and how many bytes they took.

        ``end_stream`` applies only once all of ``data`` fits; until then call again with the rest
        after a WindowUpdated. Empty ``data`` with ``end_stream`` ends the stream at once.
        """
        state = self._sendable(stream)
        self._check_body_allowed(state, nonempty=bool(data))
        taken = min(len(data), state.send_window, self._send_window)
        view = memoryview(data)[:taken]
        frames = [
            Data(stream, bytes(view[start : start + MAX_FRAME_PAYLOAD]))
            for start in range(0, taken, MAX_FRAME_PAYLOAD)
        ]
        state.send_window -= taken
        self._send_window -= taken
        if end_stream and taken == len(data):
            if frames:
                frames[-1] = Data(stream, frames[-1].data, end_stream=True)
            else:
                frames.append(Data(stream, b"", end_stream=True))
            state.sending = _Phase.ENDED
            self._forget_if_done(state)
        return frames, taken

    def send_end(self, stream: int, trailers: Iterable[tuple[bytes, bytes]] = ()) -> End:
        """End our side of ``stream``, with trailers if any."""
        state = self._sendable(stream)
        if state.sending is _Phase.HEAD:
            raise LocalProtocolError(f"stream {stream}: END before the final response head")
        block = encode_trailers(trailers)
        state.sending = _Phase.ENDED
        self._forget_if_done(state)
        return End(stream, block)

    def reset(self, stream: int, code: int, reason: str = "") -> list[Frame]:
        """Abort ``stream`` both ways: the RESET to send (none if the stream is already closed),
        and any WINDOW credit for its buffered bytes, which are dropped."""
        if not 0 <= code <= MAX_CODE:
            raise ValueError(f"RESET code {code} out of range")
        state = self._streams.get(stream)
        if state is None:
            if stream < 1 or stream > self._last_id:
                raise LocalProtocolError(f"stream {stream} was never opened")
            return []  # closed or reset already: nothing left to abort
        frames: list[Frame] = [Reset(stream, code, reason)]
        del self._streams[stream]
        frames += self._drop_buffered(state)
        self._remember(stream, _Gone(code, peer_may_send=state.receiving is not _Phase.ENDED))
        return frames

    def consumed(self, stream: int, amount: int) -> list[Window]:
        """The application took ``amount`` received bytes of ``stream``: WINDOW frames to send.

        Bytes of a stream that was reset meanwhile are ignored: they were released with it.
        """
        if amount < 0:
            raise ValueError(f"consumed a negative amount ({amount})")
        state = self._streams.get(stream)
        if state is None:
            if 1 <= stream <= self._last_id:
                return []
            raise LocalProtocolError(f"stream {stream} was never opened")
        if amount > state.buffered:
            raise LocalProtocolError(
                f"stream {stream}: consumed {amount} bytes, but only {state.buffered} are buffered"
            )
        state.buffered -= amount
        self._buffered -= amount
        frames: list[Window] = []
        if state.receiving is not _Phase.ENDED:  # no more DATA can come: no point in stream credit
            state.unacked += amount
            if state.unacked >= self._stream_threshold:
                frames.append(Window(stream, state.unacked))
                state.receive_window += state.unacked
                state.unacked = 0
        frames += self._credit_tunnel(amount)
        self._forget_if_done(state)
        return frames

    # -- receiving ------------------------------------------------------------------------------

    def receive(self, message: bytes | bytearray | memoryview | str) -> list[Event]:
        """The events one tunnel message brings; a FramingError if the peer broke the protocol."""
        frame = decode_frame(message)
        if isinstance(frame, Window):
            return self._on_window(frame)
        if isinstance(frame, Reset):
            return self._on_reset(frame)
        if isinstance(frame, Head):
            if self.role == "client":
                return self._on_request(frame)
            return self._on_response(frame)
        if isinstance(frame, Data):
            return self._on_data(frame)
        return self._on_end(frame)

    def _on_window(self, frame: Window) -> list[Event]:
        stream, increment = frame.stream, frame.increment
        if stream == 0:
            if self._send_window + increment > MAX_WINDOW:
                raise ProtocolError(
                    f"WINDOW of {increment} overflows the tunnel window ({self._send_window})"
                )
            self._send_window += increment
            return [WindowUpdated(0, increment)]
        state = self._streams.get(stream)
        if state is None:
            if stream > self._last_id:
                raise ProtocolError(f"WINDOW frame on stream {stream}, which was never opened", stream)
            return []  # the peer granted before it saw the stream close
        if state.sending is _Phase.ENDED:
            return []
        if state.send_window + increment > MAX_WINDOW:
            raise ProtocolError(
                f"WINDOW of {increment} overflows the window of stream {stream} ({state.send_window})", stream
            )
        state.send_window += increment
        return [WindowUpdated(stream, increment)]

    def _on_reset(self, frame: Reset) -> list[Event]:
        stream = frame.stream
        state = self._streams.get(stream)
        if state is None:
            if stream > self._last_id:
                raise ProtocolError(f"RESET frame on stream {stream}, which was never opened", stream)
            return []  # it crossed our own END or RESET
        del self._streams[stream]
        events: list[Event] = [StreamReset(stream, frame.code, frame.reason)]
        events += [SendFrame(window) for window in self._drop_buffered(state)]
        self._remember(stream, _Gone(frame.code, peer_may_send=False))
        return events

    def _on_request(self, frame: Head) -> list[Event]:
        stream = frame.stream
        if stream in self._streams:
            raise ProtocolError(f"second request HEAD on stream {stream}", stream)
        if stream <= self._last_id:
            raise ProtocolError(
                f"request HEAD on stream {stream}: new stream ids must be above {self._last_id}", stream
            )
        with _OnStream(stream):
            method, target, headers = parse_request_head(frame.head)
        self._last_id = stream
        self._streams[stream] = _Stream(
            id=stream,
            sending=_Phase.HEAD,
            receiving=_Phase.ENDED if frame.end_stream else _Phase.BODY,
            send_window=self._initial_stream_window,
            receive_window=self._initial_stream_window,
            upgrade=_wants_upgrade(headers),
            head_request=method == b"HEAD",
        )
        events: list[Event] = [RequestReceived(stream, method, target, headers, frame.end_stream)]
        if frame.end_stream:
            events.append(StreamEnded(stream, []))
        return events

    def _on_response(self, frame: Head) -> list[Event]:
        stream = frame.stream
        if stream > self._last_id:
            raise ProtocolError(f"HEAD frame on stream {stream}: only the server side opens streams", stream)
        state = self._live(frame)
        if state is None:
            return []
        if state.receiving is not _Phase.HEAD:
            raise ProtocolError(f"HEAD frame on stream {stream} after the final response head", stream)
        with _OnStream(stream):
            status, reason, headers = parse_response_head(frame.head)
        final = status >= 200 or status == 101
        if not final and frame.end_stream:
            raise ProtocolError(f"informational {status} response with END_STREAM on stream {stream}", stream)
        if status == 101 and not state.upgrade:
            raise ProtocolError(
                f"101 Switching Protocols on stream {stream}, whose request has no Upgrade", stream
            )
        events: list[Event] = [ResponseReceived(stream, status, reason, headers, frame.end_stream)]
        if final:
            self._final_response(state, status, end_stream=frame.end_stream, sent=False)
        if frame.end_stream:
            events.append(StreamEnded(stream, []))
        return events

    def _on_data(self, frame: Data) -> list[Event]:
        stream, size = frame.stream, len(frame.data)
        state = self._live(frame)
        if state is None:
            # DATA the peer sent before it saw our RESET: it took from the tunnel window all the
            # same, so check it and give the credit straight back.
            if size > self._receive_window:
                raise self._tunnel_overrun(stream, size)
            self._receive_window -= size
            return [SendFrame(window) for window in self._credit_tunnel(size)]
        if state.receiving is _Phase.HEAD:
            raise ProtocolError(f"DATA frame on stream {stream} before the final response head", stream)
        if state.receiving is _Phase.ENDED:
            raise ProtocolError(f"DATA frame on stream {stream} after the end of the stream", stream)
        if size:
            reason = self._body_forbidden(state, sending=False)
            if reason:
                raise ProtocolError(f"DATA frame on stream {stream}: {reason}", stream)
        if size > state.receive_window:
            raise ProtocolError(
                f"DATA of {size} bytes on stream {stream} exceeds its window ({state.receive_window})", stream
            )
        if size > self._receive_window:
            raise self._tunnel_overrun(stream, size)
        state.receive_window -= size
        self._receive_window -= size
        state.buffered += size
        self._buffered += size
        events: list[Event] = []
        if size:
            events.append(DataReceived(stream, frame.data, frame.end_stream))
        if frame.end_stream:
            state.receiving = _Phase.ENDED
            events.append(StreamEnded(stream, []))
            self._forget_if_done(state)
        return events

    def _on_end(self, frame: End) -> list[Event]:
        stream = frame.stream
        state = self._live(frame)
        if state is None:
            return []
        if state.receiving is _Phase.HEAD:
            raise ProtocolError(f"END frame on stream {stream} before the final response head", stream)
        if state.receiving is _Phase.ENDED:
            raise ProtocolError(f"END frame on stream {stream} after the end of the stream", stream)
        with _OnStream(stream):
            trailers = parse_trailers(frame.trailers)
        state.receiving = _Phase.ENDED
        self._forget_if_done(state)
        return [StreamEnded(stream, trailers)]

    # -- helpers --------------------------------------------------------------------------------

    def _live(self, frame: Head | Data | End) -> _Stream | None:
        """The open stream a HEAD, DATA or END from the peer is for, or None to ignore the frame."""
        stream = frame.stream
        state = self._streams.get(stream)
        if state is not None:
            return state
        name = type(frame).__name__.upper()
        if stream > self._last_id:
            raise ProtocolError(f"{name} frame on stream {stream}, which was never opened", stream)
        gone = self._gone.get(stream)
        if gone is None or not gone.peer_may_send:
            raise ProtocolError(f"{name} frame on closed stream {stream}", stream)
        if isinstance(frame, End) or frame.end_stream:
            gone.peer_may_send = False  # its side is over: anything after this is an error
        return None


    def _tunnel_overrun(self, stream: int, size: int) -> ProtocolError:
        window = self._receive_window
        message = f"DATA of {size} bytes on stream {stream} exceeds the tunnel window ({window})"
        return ProtocolError(message, stream)

    def _sendable(self, stream: int) -> _Stream:
        state = self._streams.get(stream)
        if state is None:
            if stream < 1 or stream > self._last_id:
                raise LocalProtocolError(f"stream {stream} was never opened")
            gone = self._gone.get(stream)
            if gone is not None:
                raise StreamClosedError(f"stream {stream} was reset (code {gone.code})", stream, gone.code)
            raise StreamClosedError(f"stream {stream} is closed", stream)
        if state.sending is _Phase.ENDED:
            raise StreamClosedError(f"stream {stream}: our side has ended", stream)
        return state

    def _body_forbidden(self, state: _Stream, *, sending: bool) -> str | None:
        """Why body bytes may not flow this way on ``state`` now, or None if they may."""
        requests = sending == (self.role == "server")  # does this direction carry the request?
        if requests:
            if state.upgrade and not state.switched:
                return "body bytes on an upgrade request before its 101 Switching Protocols"
        elif state.bodyless_response:
            return "body bytes in a response to HEAD, or in a 204 or 304 response"
        return None

    def _check_body_allowed(self, state: _Stream, *, nonempty: bool) -> None:
        if state.sending is _Phase.HEAD:
            raise LocalProtocolError(f"stream {state.id}: DATA before the final response head")
        if nonempty:
            reason = self._body_forbidden(state, sending=True)
            if reason:
                raise LocalProtocolError(f"stream {state.id}: {reason}")

    def _final_response(self, state: _Stream, status: int, *, end_stream: bool, sent: bool) -> None:
        state.switched = status == 101
        state.bodyless_response = state.head_request or status in _BODYLESS_STATUSES
        phase = _Phase.ENDED if end_stream else _Phase.BODY
        if sent:
            state.sending = phase
        else:
            state.receiving = phase
        self._forget_if_done(state)

    def _credit_tunnel(self, amount: int) -> list[Window]:
        self._unacked += amount
        if self._unacked < self._tunnel_threshold:
            return []
        increment, self._unacked = self._unacked, 0
        self._receive_window += increment
        return [Window(0, increment)]

    def _drop_buffered(self, state: _Stream) -> list[Window]:
        """Release what a reset stream had buffered: the application will never consume it."""
        dropped, state.buffered = state.buffered, 0
        self._buffered -= dropped
        return self._credit_tunnel(dropped) if dropped else []

    def _forget_if_done(self, state: _Stream) -> None:
        if state.sending is _Phase.ENDED and state.receiving is _Phase.ENDED and not state.buffered:
            del self._streams[state.id]

    def _remember(self, stream: int, gone: _Gone) -> None:
        self._gone[stream] = gone
        while len(self._gone) > RESET_GRACE:
            self._gone.popitem(last=False)
