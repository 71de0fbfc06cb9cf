"""wstunnel.v2: protocol v2's frames, heads and stream/flow-control state machine, no sockets."""

from __future__ import annotations

import array
import random
import string
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as event_note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from wstunnel import http1, v2
from wstunnel.errors import (
    FramingError,
    HttpPayloadError,
    LocalProtocolError,
    ProtocolError,
    StreamClosedError,
    TunnelMessageError,
)
from wstunnel.headers import Headers
from wstunnel.v2 import (
    END_STREAM,
    INITIAL_STREAM_WINDOW,
    INITIAL_TUNNEL_WINDOW,
    MAX_FRAME_PAYLOAD,
    MAX_HEAD_SIZE,
    MAX_STREAM_ID,
    MAX_WINDOW,
    RESET_GRACE,
    Data,
    DataReceived,
    End,
    ErrorCode,
    Event,
    Frame,
    Head,
    RequestReceived,
    Reset,
    ResponseReceived,
    SendFrame,
    StreamEnded,
    StreamReset,
    StreamState,
    V2Connection,
    Window,
    WindowUpdated,
    _heads,  # the fast path and h11's, compared
    decode_frame,
    encode_frame,
    encode_trailers,
    parse_request_head,
    parse_response_head,
    parse_trailers,
    request_head,
    response_head,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ---------------------------------------------------------------------------------

TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
VCHAR = "".join(chr(c) for c in range(0x21, 0x7F))
OBS_TEXT = "".join(chr(c) for c in range(0x80, 0x100))

stream_ids = st.one_of(
    st.integers(min_value=1, max_value=MAX_STREAM_ID), st.sampled_from([1, 2, MAX_STREAM_ID])
)
tokens = st.text(alphabet=TCHAR, min_size=1, max_size=12).map(str.encode)
# Host is added when missing, Upgrade changes what a stream may carry: neither is random here.
# Names h11 checks the values of are not random either.
SPECIAL_NAMES = {b"host", b"upgrade", b"content-length", b"transfer-encoding"}
header_names = tokens.filter(lambda n: n.lower() not in SPECIAL_NAMES)
# RFC 9110 field values: visible characters and obs-text, spaces and tabs only inside.
header_values = st.text(alphabet=VCHAR + OBS_TEXT + " \t", max_size=30).map(
    lambda v: v.encode("latin-1").strip(b" \t")
)
header_lists = st.lists(st.tuples(header_names, header_values), max_size=8)
methods = st.one_of(
    st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]), tokens
)
targets = st.one_of(
    st.text(alphabet=VCHAR, max_size=40).map(lambda t: b"/" + t.encode()),
    st.sampled_from([b"*", b"http://example.com/x?y=1", b"example.com:443"]),
)
reasons = st.text(alphabet=VCHAR + OBS_TEXT + " \t", max_size=30).map(lambda r: r.encode("latin-1"))
payloads = st.one_of(
    st.binary(max_size=64),
    st.integers(min_value=0, max_value=MAX_FRAME_PAYLOAD).map(lambda n: bytes(i % 251 for i in range(n))),
    st.just(b"\x00" * MAX_FRAME_PAYLOAD),
)


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    headers = draw(header_lists)
    if draw(st.booleans()):
        headers.insert(draw(st.integers(0, len(headers))), (b"Host", draw(header_values)))
    return request_head(draw(methods), draw(targets), headers)


@st.composite
def response_heads(draw: st.DrawFn) -> bytes:
    status = draw(st.integers(min_value=100, max_value=999))
    return response_head(status, draw(reasons), draw(header_lists))


frames = st.one_of(
    st.builds(Head, stream_ids, st.one_of(request_heads(), response_heads()), st.booleans()),
    st.builds(Data, stream_ids, payloads.filter(bool), st.booleans()),
    st.builds(Data, stream_ids, st.just(b""), st.just(True)),
    st.builds(End, stream_ids, header_lists.map(encode_trailers)),
    st.builds(
        Window,
        st.one_of(st.just(0), stream_ids),
        st.one_of(st.integers(min_value=1, max_value=MAX_WINDOW), st.sampled_from([1, MAX_WINDOW])),
    ),
    st.builds(Reset, stream_ids, st.integers(min_value=0, max_value=0xFFFF), st.text(max_size=40)),
)


def header(type_: int, flags: int, stream: int) -> bytes:
    return struct.pack(">BBI", type_, flags, stream)


# -- constants ----------------------------------------------------------------------------------


def test_module_exports_the_documented_constants() -> None:
    assert v2.SUBPROTOCOL == "wstunnel.v2"
    assert v2.HEADER_SIZE == 6
    assert MAX_FRAME_PAYLOAD == 64 * 1024
    assert INITIAL_STREAM_WINDOW == 256 * 1024
    assert INITIAL_TUNNEL_WINDOW == 4 * 1024 * 1024
    assert MAX_WINDOW == 2**31 - 1
    assert END_STREAM == 0x01
    assert [int(c) for c in ErrorCode] == [1, 2, 3, 4, 5, 6]
    assert ErrorCode.REFUSED.name == "REFUSED"
    for name in v2.__all__:
        assert hasattr(v2, name), name


def test_error_hierarchy() -> None:
    assert issubclass(ProtocolError, TunnelMessageError)
    assert issubclass(TunnelMessageError, FramingError)
    assert not issubclass(LocalProtocolError, FramingError)
    assert not issubclass(StreamClosedError, FramingError | LocalProtocolError)


# -- frames: exact bytes and round trips ------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "wire"),
    [
        (Head(1, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", end_stream=True),
         b"\x01\x01\x00\x00\x00\x01GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        (Data(0x01020304, b"body"), b"\x02\x00\x01\x02\x03\x04body"),
        (Data(7, b"", end_stream=True), b"\x02\x01\x00\x00\x00\x07"),
        (End(7), b"\x03\x00\x00\x00\x00\x07"),
        (End(7, b"X-Sum: 1\r\n"), b"\x03\x00\x00\x00\x00\x07X-Sum: 1\r\n"),
        (Window(0, 65536), b"\x04\x00\x00\x00\x00\x00\x00\x01\x00\x00"),
        (Window(MAX_STREAM_ID, MAX_WINDOW), b"\x04\x00\xff\xff\xff\xff\x7f\xff\xff\xff"),
        (Reset(9, ErrorCode.BACKEND_ERROR, "dead"), b"\x05\x00\x00\x00\x00\x09\x00\x02dead"),
        (Reset(9, ErrorCode.CANCEL), b"\x05\x00\x00\x00\x00\x09\x00\x01"),
        (Reset(9, 7, "caf\u00e9"), b"\x05\x00\x00\x00\x00\x09\x00\x07caf\xc3\xa9"),
    ],
)
def test_exact_wire_bytes(frame: Frame, wire: bytes) -> None:
    assert encode_frame(frame) == wire
    assert decode_frame(wire) == frame


@given(frame=frames)
@FAST
def test_every_frame_round_trips(frame: Frame) -> None:
    message = encode_frame(frame)
    assert decode_frame(message) == frame
    assert decode_frame(bytearray(message)) == frame
    assert decode_frame(memoryview(message)) == frame
    assert struct.unpack_from(">I", message, 2)[0] == frame.stream


@given(stream=stream_ids, data=payloads, end=st.booleans())
@FAST
def test_data_round_trips_at_every_size(stream: int, data: bytes, end: bool) -> None:
    if not data:
        end = True
    assert decode_frame(encode_frame(Data(stream, data, end))) == Data(stream, data, end)


def test_largest_frames_round_trip() -> None:
    pad = b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: "
    head = pad + b"p" * (MAX_HEAD_SIZE - len(pad) - 4) + b"\r\n\r\n"
    assert len(head) == MAX_HEAD_SIZE
    assert decode_frame(encode_frame(Head(1, head))) == Head(1, head)
    assert parse_request_head(head)[2][-1][1] == b"p" * (MAX_HEAD_SIZE - len(pad) - 4)
    reason = "r" * (MAX_FRAME_PAYLOAD - 2)
    assert decode_frame(encode_frame(Reset(1, 1, reason))) == Reset(1, 1, reason)


def test_data_repr_leaves_the_payload_out() -> None:
    assert repr(Data(1, b"x" * 10000)) == "Data(stream=1, end_stream=False)"
    assert "xxx" not in repr(DataReceived(1, b"x" * 10000))


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (Head(0, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), "stream id 0"),
        (Data(MAX_STREAM_ID + 1, b"x"), "out of range"),
        (Data(-1, b"x"), "out of range"),
        (Window(-1, 1), "out of range"),
        (Head(1, b""), "HEAD payload of 0 bytes"),
        (Head(1, b"x" * (MAX_HEAD_SIZE + 1)), "HEAD payload"),
        (Data(1, b"x" * (MAX_FRAME_PAYLOAD + 1)), "DATA payload"),
        (Data(1, b""), "empty DATA without END_STREAM"),
        (End(1, b"x" * (MAX_HEAD_SIZE + 1)), "END payload"),
        (Window(1, 0), "increment 0"),
        (Window(1, MAX_WINDOW + 1), "increment"),
        (Reset(1, 0x10000), "code"),
        (Reset(1, -1), "code"),
        (Reset(1, 1, "r" * (MAX_FRAME_PAYLOAD - 1)), "RESET payload"),
    ],
)
def test_encode_frame_refuses_what_could_not_be_decoded(frame: Frame, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_frame(frame)


# -- frames: malformed input --------------------------------------------------------------------

GOOD_HEAD = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (b"", "too short"),
        (b"\x02\x00\x00\x00\x01", "too short"),  # 5 bytes
        (header(0, 0, 1), "unknown frame type 0"),
        (header(6, 0, 1), "unknown frame type 6"),
        (header(0xFF, 0, 1) + b"x", "unknown frame type 255"),
        (header(1, 0x02, 1) + GOOD_HEAD, "HEAD frame on stream 1 has unknown flags 0x02"),
        (header(2, 0x80, 1) + b"x", "unknown flags 0x80"),
        (header(2, 0xFF, 1) + b"x", "unknown flags 0xfe"),
        (header(3, END_STREAM, 1), "END frame on stream 1 has unknown flags 0x01"),
        (header(4, END_STREAM, 1) + b"\x00\x00\x00\x01", "WINDOW frame on stream 1 has unknown flags"),
        (header(5, END_STREAM, 1) + b"\x00\x01", "RESET frame on stream 1 has unknown flags"),
        (header(1, 0, 0) + GOOD_HEAD, "HEAD frame on stream 0"),
        (header(2, 0, 0) + b"x", "DATA frame on stream 0"),
        (header(3, 0, 0), "END frame on stream 0"),
        (header(5, 0, 0) + b"\x00\x01", "RESET frame on stream 0"),
        (header(1, 0, 1), "HEAD frame on stream 1 with 0 bytes"),
        (header(1, 0, 1) + b"x" * (MAX_HEAD_SIZE + 1), "HEAD frame on stream 1 with 262145 bytes"),
        (header(2, 0, 3), "empty DATA frame on stream 3 without END_STREAM"),
        (header(2, 0, 3) + b"x" * (MAX_FRAME_PAYLOAD + 1), "DATA frame on stream 3 with 65537 bytes"),
        (header(3, 0, 3) + b"x" * (MAX_HEAD_SIZE + 1), "END frame on stream 3 with"),
        (header(4, 0, 0), "WINDOW frame on stream 0 with 0 bytes"),
        (header(4, 0, 0) + b"\x00\x00\x01", "with 3 bytes"),
        (header(4, 0, 0) + b"\x00\x00\x00\x01\x00", "with 5 bytes"),
        (header(4, 0, 2) + b"\x00\x00\x00\x00", "WINDOW frame on stream 2 with increment 0"),
        (header(4, 0, 2) + b"\x80\x00\x00\x00", "increment 2147483648"),
        (header(4, 0, 2) + b"\xff\xff\xff\xff", "increment 4294967295"),
        (header(5, 0, 4), "RESET frame on stream 4 with 0 bytes"),
        (header(5, 0, 4) + b"\x00", "RESET frame on stream 4 with 1 bytes"),
        (header(5, 0, 4) + b"\x00\x01" + b"r" * (MAX_FRAME_PAYLOAD - 1), "with 65537 bytes"),
        (header(5, 0, 4) + b"\x00\x01\xff", "reason that is not UTF-8"),
        (header(5, 0, 4) + b"\x00\x01\xed\xa0\x80", "not UTF-8"),  # an encoded surrogate
        (header(5, 0, 4) + b"\x00\x01caf\xc3", "not UTF-8"),  # truncated sequence
    ],
)
def test_decode_frame_malformed(message: bytes, error: str) -> None:
    with pytest.raises(TunnelMessageError, match=error):
        decode_frame(message)


@pytest.mark.parametrize("message", ["\x02\x00\x00\x00\x00\x01x", "", None, 42, [2, 0, 0, 0, 0, 1, 120]])
def test_decode_frame_refuses_what_is_not_bytes(message: object) -> None:
    with pytest.raises(TunnelMessageError, match=r"text message|not bytes"):
        decode_frame(message)  # type: ignore[arg-type]


def test_decode_frame_reads_a_memoryview_of_any_format_as_its_bytes() -> None:
    words = array.array("H")
    words.frombytes(encode_frame(Data(1, b"ab")))
    assert decode_frame(memoryview(words)) == Data(1, b"ab")


SEEDS = [encode_frame(f) for f in (
    Head(1, GOOD_HEAD, True), Data(2, b"abc"), Data(2, b"", True), End(3, b"A: b\r\n"),
    Window(0, 1000), Reset(4, 2, "gone"),
)]


@st.composite
def near_frames(draw: st.DrawFn) -> bytes:
    """A valid frame with a few bytes inserted, deleted or changed."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        pos = draw(st.integers(min_value=0, max_value=len(data)))
        op = draw(st.sampled_from(["insert", "delete", "change"]))
        if op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(min_value=1, max_value=4))]
        elif pos < len(data):
            data[pos] = draw(st.integers(min_value=0, max_value=255))
    return bytes(data)


@given(data=st.one_of(st.binary(max_size=80), near_frames()))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_raise_only_tunnel_message_errors(data: bytes) -> None:
    try:
        frame = decode_frame(data)
    except TunnelMessageError:
        return
    # Whatever is accepted encodes back to the very same bytes: one wire form per frame.
    assert encode_frame(frame) == data


@given(data=st.one_of(st.binary(max_size=80), near_frames()), role=st.sampled_from(["server", "client"]))
@settings(max_examples=200, deadline=None)
def test_arbitrary_messages_raise_only_framing_errors_from_a_connection(data: bytes, role: str) -> None:
    conn = V2Connection(role)  # type: ignore[arg-type]
    if role == "server":
        conn.send_request(b"GET", b"/", [(b"Host", b"a")])
    try:
        events = conn.receive(data)
    except FramingError:
        return
    assert all(isinstance(e, RequestReceived | ResponseReceived | DataReceived | StreamEnded | StreamReset
                          | WindowUpdated | SendFrame) for e in events)


# -- heads and trailers -------------------------------------------------------------------------


def test_request_head_exact_bytes() -> None:
    assert request_head(b"GET", b"/x?y=1", [(b"Host", b"example.com"), (b"X-Trace", b"a b")]) == (
        b"GET /x?y=1 HTTP/1.1\r\nHost: example.com\r\nX-Trace: a b\r\n\r\n"
    )
    # An HTTP/1.0 client may leave Host out; the tunnel speaks HTTP/1.1, which needs one.
    assert request_head(b"GET", b"/", []) == b"GET / HTTP/1.1\r\nHost: \r\n\r\n"


def test_response_head_exact_bytes() -> None:
    assert response_head(200, b"OK", [(b"Content-Length", b"2")]) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
    )
    assert response_head(404, b"", []) == b"HTTP/1.1 404 \r\n\r\n"
    switching = response_head(101, b"Switching Protocols", [(b"Upgrade", b"websocket")])
    assert switching == b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"


def _built_or_refused(build: Callable[[], bytes]) -> bytes | str:
    try:
        return build()
    except ValueError:
        return "refused"


special_fields = st.lists(st.sampled_from([
    (b"Host", b"h"), (b"host", b""), (b"Content-Length", b"12"), (b"Content-Length", b"1, 1"),
    (b"Content-Length", b"0" * 19), (b"Transfer-Encoding", b"chunked"), (b"Upgrade", b"x"),
]), max_size=3)


@given(method=methods, target=targets, headers=header_lists, special=special_fields,
       kept=st.integers(0, 3))
@FAST
def test_a_request_read_from_a_head_is_written_alike_unread(
    method: bytes, target: bytes, headers: Headers, special: Headers, kept: int
) -> None:
    # request_head(parsed=True) skips reading its head back only where that reading would
    # return the same fields: the same bytes, or the same refusal, as the checked path.
    try:
        method, target, headers = parse_request_head(
            http1.head_bytes(http1.request_line(method, target), [*special, *headers]))
    except HttpPayloadError:
        return
    headers = headers[: len(headers) - kept]  # fields left out keep a read head read
    checked = _built_or_refused(lambda: request_head(method, target, headers))
    assert _built_or_refused(lambda: request_head(method, target, headers, parsed=True)) == checked


@given(status=st.integers(min_value=100, max_value=999), reason=reasons, headers=header_lists,
       special=special_fields)
@FAST
def test_a_response_read_from_a_head_is_written_alike_unread(
    status: int, reason: bytes, headers: Headers, special: Headers
) -> None:
    try:
        status, reason, headers = parse_response_head(
            http1.head_bytes(http1.status_line(status, reason), [*headers, *special]))
    except HttpPayloadError:
        return
    checked = _built_or_refused(lambda: response_head(status, reason, headers))
    assert _built_or_refused(lambda: response_head(status, reason, headers, parsed=True)) == checked


@given(method=methods, target=targets, headers=header_lists, host=st.one_of(st.none(), header_values),
       framing=st.sampled_from([[], [(b"Content-Length", b"12")], [(b"Transfer-Encoding", b"chunked")]]))
@FAST
def test_request_head_round_trip(
    method: bytes, target: bytes, headers: Headers, host: bytes | None, framing: Headers
) -> None:
    headers = [*headers, *framing]  # informational in v2: kept as they are
    if host is not None:
        headers = [(b"Host", host), *headers]
    head = request_head(method, target, headers)
    assert len(head) <= MAX_HEAD_SIZE
    expected = headers if host is not None else [(b"Host", b""), *headers]
    assert parse_request_head(head) == (method, target, expected)
    assert decode_frame(encode_frame(Head(1, head))) == Head(1, head)


@given(status=st.integers(min_value=100, max_value=999), reason=reasons, headers=header_lists)
@FAST
def test_response_head_round_trip(status: int, reason: bytes, headers: Headers) -> None:
    assert parse_response_head(response_head(status, reason, headers)) == (status, reason, headers)


@given(trailers=header_lists)
@FAST
def test_trailers_round_trip(trailers: Headers) -> None:
    block = encode_trailers(trailers)
    assert parse_trailers(block) == trailers
    assert (block == b"") is (not trailers)
    assert decode_frame(encode_frame(End(5, block))) == End(5, block)


def test_trailers_exact_bytes() -> None:
    assert encode_trailers([(b"X-Checksum", b"abc"), (b"grpc-status", b"0")]) == (
        b"X-Checksum: abc\r\ngrpc-status: 0\r\n"
    )
    assert encode_trailers([]) == b""
    assert parse_trailers(b"") == []


def test_head_of_exactly_max_head_size_parses_and_one_more_byte_does_not() -> None:
    start = b"HTTP/1.1 200 OK\r\nX-Pad: "
    head = start + b"p" * (MAX_HEAD_SIZE - len(start) - 4) + b"\r\n\r\n"
    assert parse_response_head(head)[0] == 200
    with pytest.raises(HttpPayloadError, match="larger than"):
        parse_response_head(head[:-4] + b"p\r\n\r\n")


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n", "first empty line"),  # truncated
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody", "first empty line"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", "first empty line"),
        (b"GET / HTTP/1.1\nHost: a\r\n\r\n", "bare CR or LF"),
        (b"GET / HTTP/1.1\r\nHost: a\n\r\n\r\n", "bare CR or LF"),
        (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", "bare CR or LF"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n folded\r\n\r\n", "folding"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\tfolded\r\n\r\n", "folding"),
        (b" GET / HTTP/1.1\r\nHost: a\r\n\r\n", "folding"),
        (b"\r\n\r\n", "no request line"),
        (b"GET / HTTP/1.0\r\nHost: a\r\n\r\n", "HTTP/1.0 request head"),
        (b"GET / HTTP/1.1\r\n\r\n", "Host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "Host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", "malformed"),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", "malformed"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", "malformed"),
        (b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\n\r\n", "malformed"),  # a response where a request belongs
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", "Content-Length"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"p" * MAX_HEAD_SIZE + b"\r\n\r\n", "larger than"),
    ],
)
def test_parse_request_head_malformed(head: bytes, message: str) -> None:
    with pytest.raises(HttpPayloadError, match=message):
        parse_request_head(head)


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"HTTP/1.1 200 OK\r\n", "first empty line"),
        (b"HTTP/1.1 200 OK\r\n\r\nbody", "first empty line"),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", "first empty line"),  # one head a frame
        (b"HTTP/1.1 200 OK\nX: 1\n\n", "bare CR or LF"),
        (b"HTTP/1.0 200 OK\r\n\r\n", "HTTP/1.0 response head"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed"),
        (b"HTTP/1.1 099 Low\r\n\r\n", "malformed"),
        (b"HTTP/1.1 abc\r\n\r\n", "malformed"),
        (b"garbage\r\n\r\n", "malformed"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "malformed"),  # a request where a response belongs
        (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "Content-Length"),
    ],
)
def test_parse_response_head_malformed(head: bytes, message: str) -> None:
    with pytest.raises(HttpPayloadError, match=message):
        parse_response_head(head)


# Heads built from pieces h11 treats specially, so the fast path must both take plain ones and hand
# every odd one to h11: the two paths must give the same answer, or the same error.
_HEAD_LINES = [
    b"Host: a", b"host:  a ", b"HOST:", b"Content-Length: 5", b"content-length: 05",
    b"Content-Length: 5, 5", b"Content-Length: 5,6", b"Content-Length: " + b"9" * 19,
    b"Content-Length: " + b"9" * 21, b"Content-Length: x", b"Transfer-Encoding: chunked",
    b"transfer-encoding: CHUNKED", b"Transfer-Encoding: gzip", b"Upgrade: websocket", b"X: a  b",
    b"X:", b"X: \xff\x80", b"X: a\x00", b"X: a\x0bb", b"X : a", b"X;: a", b": a", b"NoColon",
    b"X-\xe9: a", b"Connection: close", b"Expect: 100-continue",
]
_START_LINES = [
    b"GET / HTTP/1.1", b"GET /a?b HTTP/1.1", b"CONNECT example.com:443 HTTP/1.1", b"G\xe9T / HTTP/1.1",
    b"GET / HTTP/1.0", b"GET  / HTTP/1.1", b"GET / HTTP/2.0", b"GET /\x7f HTTP/1.1", b"",
    b"HTTP/1.1 200 OK", b"HTTP/1.1 101 Switching", b"HTTP/1.1 100", b"HTTP/1.1 204 ", b"HTTP/1.1 099 x",
    b"HTTP/1.1 999 \xff\tx", b"HTTP/1.0 200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 200 O\x00K",
]


def _outcome(parse: Callable[[bytes], object], head: bytes) -> object:
    try:
        return parse(head)
    except HttpPayloadError as exc:
        return ("error", str(exc))


@given(st.sampled_from(_START_LINES), st.lists(st.sampled_from(_HEAD_LINES), max_size=5))
@settings(max_examples=400, deadline=None)
def test_fast_head_parsing_agrees_with_h11(start: bytes, lines: list[bytes]) -> None:
    head = b"".join(line + b"\r\n" for line in [start, *lines]) + b"\r\n"
    assert _outcome(parse_request_head, head) == _outcome(
        lambda h: _heads._check_head(h, "request") or _heads._h11_request_head(h), head
    )
    assert _outcome(parse_response_head, head) == _outcome(
        lambda h: _heads._check_head(h, "response") or _heads._h11_response_head(h), head
    )


def test_plain_heads_take_the_fast_path() -> None:
    assert _heads._fast_request_head(b"GET /x HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\n") == (
        b"GET", b"/x", [(b"Host", b"a"), (b"X", b"1")]
    )
    assert _heads._fast_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n") == (
        200, b"OK", [(b"Content-Length", b"2")]
    )


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (b"X: 1", "each ending with CRLF"),
        (b"X: 1\r\n\r\n", "without an empty line"),
        (b"\r\n", "without an empty line"),
        (b"X: 1\r\n\r\nY: 2\r\n", "without an empty line"),
        (b"X: 1\nY: 2\r\n", "bare CR or LF"),
        (b"X: 1\r\n continued\r\n", "folding"),
        (b" X: 1\r\n", "folding"),
        (b"Bad Name: 1\r\n", "malformed trailers"),
        (b"NoColon\r\n", "malformed trailers"),
        (b"X: a\x00b\r\n", "malformed trailers"),
        (b"X: " + b"p" * MAX_HEAD_SIZE + b"\r\n", "larger than"),
    ],
)
def test_parse_trailers_malformed(block: bytes, message: str) -> None:
    with pytest.raises(HttpPayloadError, match=message):
        parse_trailers(block)


@pytest.mark.parametrize(
    "build",
    [
        lambda: request_head(b"GET", b"/ x", [(b"Host", b"a")]),
        lambda: request_head(b"G ET", b"/", []),
        lambda: request_head(b"GET", b"/", [(b"Host", b"a\r\nInjected: 1")]),
        lambda: request_head(b"GET", b"/", [(b"Bad Name", b"1")]),
        lambda: request_head(b"GET", b"/", [(b"X", b" padded ")]),  # would come back stripped
        lambda: response_head(200, b"OK\r\nInjected: 1", []),
        lambda: response_head(99, b"", []),
        lambda: response_head(1000, b"", []),
        lambda: encode_trailers([(b"X", b"a\nb")]),
        lambda: encode_trailers([(b"", b"v")]),
    ],
)
def test_head_builders_refuse_what_would_not_parse_back(build: object) -> None:
    with pytest.raises(ValueError):
        build()  # type: ignore[operator]


# -- the connection: helpers --------------------------------------------------------------------

HOST = [(b"Host", b"example.com")]
UPGRADE = [*HOST, (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]


def pair(**windows: int) -> tuple[V2Connection, V2Connection]:
    return V2Connection("server", **windows), V2Connection("client", **windows)


def deliver(conn: V2Connection, *frames: Frame) -> list[Event]:
    events: list[Event] = []
    for frame in frames:
        events += conn.receive(encode_frame(frame))
    return events


def open_stream(
    server: V2Connection, client: V2Connection, method: bytes = b"POST", headers: Headers = HOST,
    *, end_stream: bool = False,
) -> int:
    stream, head = server.send_request(method, b"/", headers, end_stream=end_stream)
    deliver(client, head)
    return stream


def respond(
    server: V2Connection, client: V2Connection, stream: int, status: int = 200, *, end_stream: bool = False
) -> list[Event]:
    return deliver(server, client.send_response(stream, status, b"R", [], end_stream=end_stream))


def send_all(sender: V2Connection, receiver: V2Connection, stream: int, data: bytes, *, end: bool = False
             ) -> int:
    frames, taken = sender.data_frames(stream, data, end_stream=end)
    deliver(receiver, *frames)
    return taken


# -- the connection: a whole exchange -----------------------------------------------------------


def test_request_and_response_with_bodies_and_trailers() -> None:
    server, client = pair()
    stream, head = server.send_request(b"POST", b"/up", [(b"Host", b"h"), (b"Content-Length", b"5")])
    assert stream == 1
    assert head == Head(1, b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n")
    assert client.receive(encode_frame(head)) == [
        RequestReceived(1, b"POST", b"/up", [(b"Host", b"h"), (b"Content-Length", b"5")])
    ]
    frames, taken = server.data_frames(1, b"hello")
    assert (frames, taken) == ([Data(1, b"hello")], 5)
    assert deliver(client, *frames) == [DataReceived(1, b"hello")]
    assert client.buffered_bytes == 5
    assert deliver(client, server.send_end(1, [(b"X-Sum", b"5")])) == [StreamEnded(1, [(b"X-Sum", b"5")])]
    assert server.stream_state(1) is StreamState.HALF_CLOSED_LOCAL
    assert client.stream_state(1) is StreamState.HALF_CLOSED_REMOTE

    assert deliver(server, client.send_response(1, 100, b"Continue", [])) == [
        ResponseReceived(1, 100, b"Continue", [])
    ]
    events = deliver(server, client.send_response(1, 200, b"OK", [(b"Content-Type", b"text/plain")]))
    assert events == [ResponseReceived(1, 200, b"OK", [(b"Content-Type", b"text/plain")])]
    assert not events[0].informational
    frames, _ = client.data_frames(1, b"world", end_stream=True)
    assert frames == [Data(1, b"world", end_stream=True)]
    assert deliver(server, *frames) == [DataReceived(1, b"world", end_stream=True), StreamEnded(1, [])]
    assert client.stream_state(1) is StreamState.CLOSED  # ended both ways, bytes still to consume
    assert client.consumed(1, 5) == []
    assert server.consumed(1, 5) == []
    assert server.stream_state(1) is client.stream_state(1) is StreamState.CLOSED
    assert server.buffered_bytes == client.buffered_bytes == 0
    assert (server._streams, client._streams) == ({}, {})  # closed streams cost nothing


def test_bodyless_request_and_response() -> None:
    server, client = pair()
    stream, head = server.send_request(b"GET", b"/", HOST, end_stream=True)
    assert decode_frame(encode_frame(head)).end_stream
    assert deliver(client, head) == [RequestReceived(stream, b"GET", b"/", HOST, end_stream=True),
                                     StreamEnded(stream, [])]
    assert server.stream_state(stream) is StreamState.HALF_CLOSED_LOCAL
    assert respond(server, client, stream, 204, end_stream=True) == [
        ResponseReceived(stream, 204, b"R", [], end_stream=True), StreamEnded(stream, [])
    ]
    assert server.stream_state(stream) is client.stream_state(stream) is StreamState.CLOSED


def test_stream_ids_increase_and_the_client_may_see_gaps() -> None:
    server, client = pair()
    assert [server.send_request(b"GET", b"/", HOST)[0] for _ in range(3)] == [1, 2, 3]
    assert deliver(client, Head(7, GOOD_HEAD))[0] == RequestReceived(7, b"GET", b"/", [(b"Host", b"a")])
    assert client.stream_state(5) is StreamState.CLOSED  # skipped: can never open now
    assert client.stream_state(8) is StreamState.IDLE


def test_streams_interleave_and_half_close_independently() -> None:
    server, client = pair()
    one, two = open_stream(server, client), open_stream(server, client)
    respond(server, client, two)
    assert deliver(server, *client.data_frames(two, b"2")[0]) == [DataReceived(two, b"2")]
    assert deliver(client, *server.data_frames(one, b"1")[0]) == [DataReceived(one, b"1")]
    assert deliver(client, server.send_end(two)) == [StreamEnded(two, [])]
    assert deliver(server, *client.data_frames(two, b"more")[0]) == [DataReceived(two, b"more")]
    assert client.stream_state(one) is StreamState.OPEN
    assert client.stream_state(two) is StreamState.HALF_CLOSED_REMOTE


def test_upgrade_switches_both_directions_to_raw_bytes() -> None:
    server, client = pair()
    stream = open_stream(server, client, b"GET", UPGRADE)
    with pytest.raises(LocalProtocolError, match="before its 101"):
        server.data_frames(stream, b"early")
    assert respond(server, client, stream, 101)[0].status == 101
    hello, hi = b"\x81\x05hello", b"\x81\x02hi"  # WebSocket frames, as far as we are concerned: bytes
    assert deliver(client, *server.data_frames(stream, hello)[0]) == [DataReceived(stream, hello)]
    assert deliver(server, *client.data_frames(stream, hi)[0]) == [DataReceived(stream, hi)]


def test_upgrade_refused_leaves_the_request_without_a_body() -> None:
    server, client = pair()
    stream = open_stream(server, client, b"GET", UPGRADE)
    respond(server, client, stream, 400)
    with pytest.raises(LocalProtocolError, match="upgrade request"):
        server.data_frames(stream, b"x")
    assert deliver(client, *server.data_frames(stream, b"", end_stream=True)[0]) == [StreamEnded(stream, [])]


@pytest.mark.parametrize(("method", "status"), [(b"HEAD", 200), (b"GET", 204), (b"GET", 304)])
def test_bodyless_responses_take_no_body_bytes_but_may_end_later(method: bytes, status: int) -> None:
    server, client = pair()
    stream = open_stream(server, client, method, end_stream=True)
    respond(server, client, stream, status)
    with pytest.raises(LocalProtocolError, match="response to HEAD, or in a 204 or 304"):
        client.data_frames(stream, b"x")
    with pytest.raises(LocalProtocolError, match="response to HEAD"):
        client.send_capacity(stream)
    assert deliver(server, client.send_end(stream)) == [StreamEnded(stream, [])]


# -- the connection: flow control ---------------------------------------------------------------


def test_data_frames_split_at_the_frame_size_and_stop_at_the_stream_window() -> None:
    server, client = pair()
    stream = open_stream(server, client)
    body = bytes(range(256)) * 1100  # 281,600 bytes: more than one stream window
    assert server.send_capacity(stream) == INITIAL_STREAM_WINDOW
    frames, taken = server.data_frames(stream, body, end_stream=True)
    assert taken == INITIAL_STREAM_WINDOW
    assert [len(f.data) for f in frames] == [MAX_FRAME_PAYLOAD] * (INITIAL_STREAM_WINDOW // MAX_FRAME_PAYLOAD)
    assert not any(f.end_stream for f in frames)  # not all of it fitted
    assert b"".join(f.data for f in frames) == body[:taken]
    assert server.send_capacity(stream) == 0
    assert server.data_frames(stream, body[taken:], end_stream=True) == ([], 0)
    events = deliver(client, *frames)
    assert client.buffered_bytes == taken
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) == taken
    with pytest.raises(ProtocolError, match="exceeds its window") as info:
        deliver(client, Data(stream, b"x"))
    assert info.value.stream == stream


def test_windows_are_granted_back_as_bytes_are_consumed_half_a_window_at_a_time() -> None:
    server, client = pair()
    stream = open_stream(server, client)
    deliver(client, *server.data_frames(stream, b"x" * INITIAL_STREAM_WINDOW)[0])
    half = INITIAL_STREAM_WINDOW // 2
    assert client.consumed(stream, half - 1) == []  # batched: nothing yet
    assert client.buffered_bytes == INITIAL_STREAM_WINDOW - half + 1
    grant = client.consumed(stream, 1)
    assert grant == [Window(stream, half)]
    assert deliver(server, *grant) == [WindowUpdated(stream, half)]
    assert server.send_capacity(stream) == half
    assert client.consumed(stream, 0) == []
    assert client.consumed(stream, half) == [Window(stream, half)]


def test_the_tunnel_window_caps_every_stream_together() -> None:
    server, client = pair(stream_window=1000, tunnel_window=2500)
    one, two, three = [open_stream(server, client) for _ in range(3)]
    assert [send_all(server, client, s, b"x" * 1000) for s in (one, two, three)] == [1000, 1000, 500]
    assert client.buffered_bytes == 2500  # never more than the tunnel window
    assert server.send_capacity(three) == 0
    with pytest.raises(ProtocolError, match="exceeds the tunnel window"):
        deliver(client, Data(three, b"x"))  # its stream window has room, the tunnel's has not
    # Consuming grants the stream at half its window, and the tunnel at half its own.
    assert client.consumed(one, 600) == [Window(one, 600)]
    assert client.consumed(one, 100) == []  # 300 of it still buffered: not drained either
    assert client.consumed(two, 600) == [Window(two, 600), Window(0, 1300)]
    deliver(server, Window(one, 600), Window(two, 600))
    assert server.send_capacity(one) == 0  # the tunnel window is still empty
    assert deliver(server, Window(0, 1300)) == [WindowUpdated(0, 1300)]
    assert [server.send_capacity(s) for s in (one, two, three)] == [600, 600, 500]


def test_credit_goes_back_when_the_application_has_taken_everything() -> None:
    """Once an eighth of a window is consumed and nothing is left buffered, the credit goes back
    without waiting for half: data that came as one burst must not leave half the window
    consumed but unacknowledged until the next burst (a long link would run at half speed)."""
    server, client = pair(stream_window=1000, tunnel_window=8000)
    stream = open_stream(server, client)
    assert send_all(server, client, stream, b"x" * 700) == 700
    assert client.consumed(stream, 100) == []  # 600 still buffered
    grants = client.consumed(stream, 600)
    assert grants == [Window(stream, 700)]  # drained
    deliver(server, *grants)
    assert send_all(server, client, stream, b"x" * 100) == 100
    assert client.consumed(stream, 100) == []  # drained, but under an eighth of the window
    assert send_all(server, client, stream, b"x" * 1000) == 900
    assert client.consumed(stream, 900) == [Window(stream, 1000), Window(0, 1700)]


def test_consumed_after_the_end_grants_the_tunnel_only() -> None:
    server, client = pair(stream_window=100, tunnel_window=100)
    stream = open_stream(server, client)
    send_all(server, client, stream, b"x" * 100, end=True)
    assert client.consumed(stream, 100) == [Window(0, 100)]  # no more DATA can come on the stream


def test_consumed_refuses_more_than_was_received() -> None:
    server, client = pair()
    stream = open_stream(server, client)
    send_all(server, client, stream, b"abc")
    with pytest.raises(LocalProtocolError, match="consumed 4 bytes, but only 3"):
        client.consumed(stream, 4)
    with pytest.raises(LocalProtocolError, match="never opened"):
        client.consumed(stream + 1, 1)
    with pytest.raises(ValueError, match="negative"):
        client.consumed(stream, -1)
    assert client.buffered_bytes == 3


@pytest.mark.parametrize(("stream", "message"), [(0, "overflows the tunnel window"),
                                                  (1, "overflows the window of stream 1")])
def test_windows_may_reach_2_31_minus_1_and_not_one_more(stream: int, message: str) -> None:
    server, client = pair()
    open_stream(server, client)
    deliver(server, Window(0, MAX_WINDOW - INITIAL_TUNNEL_WINDOW))
    deliver(server, Window(1, MAX_WINDOW - INITIAL_STREAM_WINDOW))
    assert server.send_capacity(1) == MAX_WINDOW
    with pytest.raises(ProtocolError, match=message):
        deliver(server, Window(stream, 1))
    assert server.send_capacity(1) == MAX_WINDOW


def test_window_on_a_stream_whose_sending_side_ended_is_ignored() -> None:
    server, client = pair()
    stream = open_stream(server, client, end_stream=True)
    assert deliver(server, Window(stream, MAX_WINDOW)) == []


# -- the connection: resets ---------------------------------------------------------------------


def test_reset_by_the_server_reaches_the_client_and_releases_its_buffer() -> None:
    server, client = pair(stream_window=1000, tunnel_window=1000)
    stream = open_stream(server, client)
    send_all(server, client, stream, b"x" * 800)
    frames = server.reset(stream, ErrorCode.CANCEL, "client went away")
    assert frames == [Reset(stream, ErrorCode.CANCEL, "client went away")]
    assert server.stream_state(stream) is StreamState.RESET
    events = deliver(client, *frames)
    # The 800 bytes will never be consumed: the tunnel credit comes straight back.
    assert events == [StreamReset(stream, 1, "client went away"), SendFrame(Window(0, 800))]
    assert client.buffered_bytes == 0
    assert client.stream_state(stream) is StreamState.RESET
    assert client.consumed(stream, 800) == []  # the application may not have heard yet
    with pytest.raises(StreamClosedError, match="reset \\(code 1\\)") as info:
        client.send_response(stream, 200, b"OK", [])
    assert (info.value.stream, info.value.code) == (stream, ErrorCode.CANCEL)
    with pytest.raises(StreamClosedError):
        client.data_frames(stream, b"x")
    with pytest.raises(StreamClosedError):
        client.send_capacity(stream)
    with pytest.raises(StreamClosedError):
        server.send_end(stream)
    assert client.reset(stream, ErrorCode.CANCEL) == []  # already over: nothing to send
    assert deliver(server, Window(0, 800)) == [WindowUpdated(0, 800)]


def test_reset_by_the_client_reaches_the_server() -> None:
    server, client = pair()
    stream = open_stream(server, client)
    respond(server, client, stream)
    send_all(client, server, stream, b"partial")
    frames = client.reset(stream, ErrorCode.BACKEND_ERROR, "backend died mid-body")
    assert deliver(server, *frames) == [StreamReset(stream, ErrorCode.BACKEND_ERROR, "backend died mid-body")]
    assert server.buffered_bytes == 0
    with pytest.raises(StreamClosedError):
        server.data_frames(stream, b"x")


def test_reset_releases_our_own_buffer_and_returns_the_credit() -> None:
    server, client = pair(stream_window=1000, tunnel_window=1000)
    stream = open_stream(server, client)
    send_all(server, client, stream, b"x" * 600)
    assert client.reset(stream, ErrorCode.TOO_LARGE) == [Reset(stream, 4, ""), Window(0, 600)]
    assert client.buffered_bytes == 0


def test_late_frames_after_our_reset_are_ignored_until_the_peer_ends() -> None:
    server, client = pair(stream_window=1000, tunnel_window=1000)
    stream = open_stream(server, client)
    # The client answers and streams a body while the server's RESET is on its way.
    in_flight = [client.send_response(stream, 200, b"OK", [])]
    in_flight += client.data_frames(stream, b"y" * 300)[0]
    in_flight += client.data_frames(stream, b"y" * 300)[0]
    in_flight.append(client.send_end(stream))
    reset = server.reset(stream, ErrorCode.CANCEL)
    events = deliver(server, *in_flight)
    # Nothing for the application; the tunnel credit the ignored DATA took comes straight back
    # (nothing is left buffered: each frame's credit at once).
    assert events == [SendFrame(Window(0, 300)), SendFrame(Window(0, 300))]
    assert server.buffered_bytes == 0
    # The peer's END closed its side: a frame after it is a broken peer again.
    with pytest.raises(ProtocolError, match=f"DATA frame on closed stream {stream}"):
        deliver(server, Data(stream, b"z"))
    assert deliver(client, *reset) == [StreamReset(stream, ErrorCode.CANCEL, "")]
    assert deliver(client, Window(stream, 5), Reset(stream, 1)) == []  # late ones: ignored


def test_late_frames_are_forgiven_only_for_the_last_reset_grace_streams() -> None:
    server, client = pair()
    first = open_stream(server, client)
    server.reset(first, ErrorCode.CANCEL)
    assert deliver(server, client.send_response(first, 200, b"OK", [])) == []
    for _ in range(RESET_GRACE):
        stream, _head = server.send_request(b"GET", b"/", HOST, end_stream=True)
        server.reset(stream, ErrorCode.CANCEL)
    with pytest.raises(ProtocolError, match=f"DATA frame on closed stream {first}"):
        deliver(server, Data(first, b"late"))
    assert deliver(server, Data(first + 1, b"late")) == []  # still remembered


def test_reset_and_window_on_closed_streams_are_ignored() -> None:
    server, client = pair()
    stream = open_stream(server, client, b"GET", end_stream=True)
    respond(server, client, stream, 204, end_stream=True)
    assert server.stream_state(stream) is StreamState.CLOSED
    assert deliver(server, Reset(stream, 1), Window(stream, 10)) == []
    assert deliver(client, Reset(stream, 1), Window(stream, 10)) == []
    assert server.reset(stream, ErrorCode.CANCEL) == []


def test_reset_of_a_never_opened_stream_is_a_local_error() -> None:
    server = V2Connection("server")
    with pytest.raises(LocalProtocolError, match="never opened"):
        server.reset(1, ErrorCode.CANCEL)
    with pytest.raises(ValueError, match="code"):
        server.reset(1, 0x10000)


# -- the connection: protocol errors from the peer ----------------------------------------------


@dataclass
class Setup:
    """A server and a client with stream 1 open (request sent, body open) and stream 3 closed."""

    server: V2Connection = field(default_factory=lambda: V2Connection("server"))
    client: V2Connection = field(default_factory=lambda: V2Connection("client"))

    def __post_init__(self) -> None:
        open_stream(self.server, self.client)  # 1: open
        two = open_stream(self.server, self.client, b"GET", end_stream=True)  # 2: reset by the peer
        deliver(self.server, *self.client.reset(two, ErrorCode.REFUSED))
        three = open_stream(self.server, self.client, b"GET", end_stream=True)  # 3: closed
        respond(self.server, self.client, three, 204, end_stream=True)
        open_stream(self.server, self.client, b"GET", UPGRADE)  # 4: upgrade request, no answer yet
        head = open_stream(self.server, self.client, b"HEAD", end_stream=True)  # 5: HEAD, answered
        respond(self.server, self.client, head, 200)
        done = open_stream(self.server, self.client)  # 6: the server's side has ended
        deliver(self.client, self.server.send_end(done))
        deliver(self.client, *self.server.reset(open_stream(self.server, self.client), 1))  # 7: reset


TO_CLIENT = [
    (Data(9, b"x"), ProtocolError, "DATA frame on stream 9, which was never opened"),
    (End(9), ProtocolError, "END frame on stream 9, which was never opened"),
    (Window(9, 1), ProtocolError, "WINDOW frame on stream 9, which was never opened"),
    (Reset(9, 1), ProtocolError, "RESET frame on stream 9, which was never opened"),
    (Head(1, GOOD_HEAD), ProtocolError, "second request HEAD on stream 1"),
    (Head(3, GOOD_HEAD), ProtocolError, "new stream ids must be above 7"),
    (Head(2, GOOD_HEAD), ProtocolError, "new stream ids must be above 7"),
    (Data(3, b"x"), ProtocolError, "DATA frame on closed stream 3"),
    (End(3), ProtocolError, "END frame on closed stream 3"),
    (Data(7, b"x"), ProtocolError, "DATA frame on closed stream 7"),  # after its own RESET
    (Data(6, b"x"), ProtocolError, "DATA frame on stream 6 after the end"),
    (End(6), ProtocolError, "END frame on stream 6 after the end"),
    (Data(5, b"x"), ProtocolError, "DATA frame on stream 5 after the end"),  # HEAD had END_STREAM
    (Data(4, b"x"), ProtocolError, "upgrade request before its 101"),
    (Data(1, b"x" * MAX_FRAME_PAYLOAD, True), None, None),  # fine: a control case
    (Window(1, MAX_WINDOW), ProtocolError, "overflows the window of stream 1"),
    (Window(0, MAX_WINDOW), ProtocolError, "overflows the tunnel window"),
    (Head(8, b"HTTP/1.1 200 OK\r\n\r\n"), HttpPayloadError, "stream 8: malformed HTTP request head"),
    (Head(8, b"GET / HTTP/1.1\r\nHost: a\r\n"), HttpPayloadError, "stream 8: .*first empty line"),
    (End(1, b"Bad Name: 1\r\n"), HttpPayloadError, "stream 1: malformed trailers"),
]

OK_HEAD = b"HTTP/1.1 200 OK\r\n\r\n"
TO_SERVER = [
    (Head(9, OK_HEAD), ProtocolError, "HEAD frame on stream 9: only the server side opens"),
    (Data(9, b"x"), ProtocolError, "never opened"),
    (Data(1, b"x"), ProtocolError, "DATA frame on stream 1 before the final response head"),
    (End(1), ProtocolError, "END frame on stream 1 before the final response head"),
    (Data(1, b"", True), ProtocolError, "before the final response head"),
    (Head(1, b"HTTP/1.1 100 Continue\r\n\r\n", True), ProtocolError, "informational 100 response with END_"),
    (Head(1, b"HTTP/1.1 101 Switching Protocols\r\n\r\n"), ProtocolError, "whose request has no Upgrade"),
    (Head(1, GOOD_HEAD), HttpPayloadError, "stream 1: malformed HTTP response head"),
    (Head(5, OK_HEAD), ProtocolError, "HEAD frame on stream 5 after the final response head"),
    (Data(5, b"x"), ProtocolError, "DATA frame on stream 5: body bytes in a response to HEAD"),
    (Data(5, b"", True), None, None),  # ending a bodyless response is fine
    (Head(3, OK_HEAD), ProtocolError, "HEAD frame on closed stream 3"),
    (Data(2, b"x"), ProtocolError, "DATA frame on closed stream 2"),  # after its own RESET
    (Head(7, OK_HEAD), None, None),  # we reset 7: its late HEAD is forgiven
    (Window(1, MAX_WINDOW), ProtocolError, "overflows the window of stream 1"),
]


def _snapshot(conn: V2Connection) -> tuple[object, ...]:
    streams = {k: (v.sending, v.receiving, v.send_window, v.receive_window, v.buffered, v.unacked)
               for k, v in conn._streams.items()}
    return (streams, conn._send_window, conn._receive_window, conn._buffered, conn._unacked,
            conn._last_id, dict(conn._gone))


@pytest.mark.parametrize(("frame", "error", "message"), TO_CLIENT)
def test_frames_the_client_must_refuse(
    frame: Frame, error: type[Exception] | None, message: str | None
) -> None:
    setup = Setup()
    before = _snapshot(setup.client)
    if error is None:
        deliver(setup.client, frame)
        return
    with pytest.raises(error, match=message) as info:
        deliver(setup.client, frame)
    if isinstance(info.value, ProtocolError) and frame.stream:
        assert info.value.stream == frame.stream
    assert _snapshot(setup.client) == before  # a refused frame changes nothing


@pytest.mark.parametrize(("frame", "error", "message"), TO_SERVER)
def test_frames_the_server_must_refuse(
    frame: Frame, error: type[Exception] | None, message: str | None
) -> None:
    setup = Setup()
    before = _snapshot(setup.server)
    if error is None:
        deliver(setup.server, frame)
        return
    with pytest.raises(error, match=message):
        deliver(setup.server, frame)
    assert _snapshot(setup.server) == before


def test_101_to_a_request_without_upgrade_is_refused_locally_too() -> None:
    server, client = pair()
    stream = open_stream(server, client, b"GET")
    with pytest.raises(LocalProtocolError, match="without Upgrade"):
        client.send_response(stream, 101, b"Switching Protocols", [])


@pytest.mark.parametrize(
    ("action", "error", "message"),
    [
        (lambda s, c: c.send_request(b"GET", b"/", HOST), LocalProtocolError, "only the server side opens"),
        (lambda s, c: s.send_response(1, 200, b"OK", []), LocalProtocolError, "only the client side"),
        (lambda s, c: c.send_response(1, 100, b"Continue", [], end_stream=True), LocalProtocolError,
         "informational response cannot end"),
        (lambda s, c: c.data_frames(1, b"x"), LocalProtocolError, "DATA before the final response head"),
        (lambda s, c: c.data_frames(1, b"", end_stream=True), LocalProtocolError, "before the final"),
        (lambda s, c: c.send_capacity(1), LocalProtocolError, "before the final response head"),
        (lambda s, c: c.send_end(1), LocalProtocolError, "END before the final response head"),
        (lambda s, c: c.send_response(5, 200, b"OK", []), LocalProtocolError, "head was already sent"),
        (lambda s, c: s.data_frames(6, b"x"), StreamClosedError, "our side has ended"),
        (lambda s, c: s.send_end(6), StreamClosedError, "our side has ended"),
        (lambda s, c: s.data_frames(3, b"x"), StreamClosedError, "stream 3 is closed"),
        (lambda s, c: s.data_frames(2, b"x"), StreamClosedError, "stream 2 was reset \\(code 6\\)"),
        (lambda s, c: s.data_frames(99, b"x"), LocalProtocolError, "stream 99 was never opened"),
        (lambda s, c: s.send_capacity(0), LocalProtocolError, "stream 0 was never opened"),
        (lambda s, c: s.send_end(1, [(b"Bad Name", b"x")]), ValueError, "malformed trailers"),
        (lambda s, c: s.send_request(b"GET", b"/ bad", HOST), ValueError, "malformed"),
    ],
)
def test_sending_what_the_protocol_forbids_fails_locally(
    action: object, error: type[Exception], message: str
) -> None:
    setup = Setup()
    before = (_snapshot(setup.server), _snapshot(setup.client))
    with pytest.raises(error, match=message):
        action(setup.server, setup.client)  # type: ignore[operator]
    assert (_snapshot(setup.server), _snapshot(setup.client)) == before


def test_stream_ids_run_out_at_u32() -> None:
    server = V2Connection("server")
    server._last_id = MAX_STREAM_ID - 1
    assert server.send_request(b"GET", b"/", HOST)[0] == MAX_STREAM_ID
    with pytest.raises(LocalProtocolError, match="used up"):
        server.send_request(b"GET", b"/", HOST)


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="role"):
        V2Connection("proxy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window"):
        V2Connection("server", stream_window=0)
    with pytest.raises(ValueError, match="window"):
        V2Connection("server", tunnel_window=MAX_WINDOW + 1)


# -- the connection: a model-based test ---------------------------------------------------------

SMALL_STREAM_WINDOW = 20_000  # small windows, so random sizes run them dry often
SMALL_TUNNEL_WINDOW = 50_000
POOL = random.Random(5).randbytes(1 << 20)
SIDES = ("server", "client")
TRAILER_SETS: list[Headers] = [[], [(b"X-Checksum", b"abc")], [(b"A", b"1"), (b"b", b"two words")]]


@dataclass
class View:
    """What one side knows of one stream."""

    sending: str = "head"  # "head" (no final head yet), "body", "ended"
    receiving: str = "head"
    reset: bool = False  # this side reset it or heard the peer's RESET
    local_reset: bool = False
    buffered: int = 0
    switched: bool = False  # a 101 was sent (client) or received (server)
    bodyless: bool = False  # the final response can have no body

    @property
    def closed(self) -> bool:
        return self.reset or (self.sending == self.receiving == "ended" and not self.buffered)


@dataclass
class ModelStream:
    upgrade: bool
    head_request: bool
    request: tuple[bytes, bytes, Headers]
    views: dict[str, View] = field(default_factory=lambda: {"server": View(), "client": View()})
    sent: dict[str, bytearray] = field(default_factory=lambda: {side: bytearray() for side in SIDES})
    received: dict[str, bytearray] = field(default_factory=lambda: {side: bytearray() for side in SIDES})
    granted: dict[str, int] = field(default_factory=lambda: {"server": 0, "client": 0})  # WINDOWs heard
    heads: list[int] = field(default_factory=list)  # statuses the client sent, in order
    heads_seen: int = 0
    trailers: dict[str, Headers] = field(default_factory=dict)


def other(side: str) -> str:
    return "client" if side == "server" else "server"


class TunnelMachine(RuleBasedStateMachine):
    """A server and a client V2Connection talking through two ordered queues (the WebSocket).

    The test drives both at random and checks each against a model of what it was told: every byte
    arrives once and in order, windows match the grants, credit is conserved, nothing is lost.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conns = {side: V2Connection(side, stream_window=SMALL_STREAM_WINDOW,  # type: ignore[arg-type]
                                         tunnel_window=SMALL_TUNNEL_WINDOW) for side in SIDES}
        self.wire: dict[str, deque[Frame]] = {side: deque() for side in SIDES}  # frames sent by side
        self.streams: dict[int, ModelStream] = {}
        self.sent_total = {side: 0 for side in SIDES}  # DATA bytes each side sent
        self.tunnel_granted = {side: 0 for side in SIDES}  # WINDOW(0) increments each side heard

    # -- helpers --

    def push(self, side: str, frames: list[Frame] | list[Window] | list[Data]) -> None:
        for frame in frames:
            # Through the real encoding, both ways, every time.
            self.wire[side].append(decode_frame(encode_frame(frame)))

    def candidates(self, wanted: Callable[[str, ModelStream, View], bool]) -> list[tuple[str, int]]:
        return [(side, sid) for sid, m in sorted(self.streams.items()) for side in SIDES
                if wanted(side, m, m.views[side])]

    def body_allowed(self, side: str, m: ModelStream) -> bool:
        view = m.views[side]
        if side == "server":
            return not m.upgrade or view.switched
        return not view.bodyless

    def expected_capacity(self, side: str, sid: int) -> int:
        m = self.streams[sid]
        stream = SMALL_STREAM_WINDOW + m.granted[side] - len(m.sent[side])
        tunnel = SMALL_TUNNEL_WINDOW + self.tunnel_granted[side] - self.sent_total[side]
        return min(stream, tunnel)

    @staticmethod
    def answerable(side: str, m: ModelStream, v: View) -> bool:
        return side == "client" and v.receiving != "head" and v.sending == "head" and not v.reset

    @staticmethod
    def sendable(side: str, m: ModelStream, v: View) -> bool:
        return v.sending == "body" and not v.reset

    @staticmethod
    def consumable(side: str, m: ModelStream, v: View) -> bool:
        return v.buffered > 0

    @staticmethod
    def resettable(side: str, m: ModelStream, v: View) -> bool:
        # The client can only reset the streams it has heard of.
        return not v.reset and (side == "server" or v.receiving != "head")

    # -- rules --

    @initialize(count=st.integers(1, 3))
    def start_with_open_streams(self, count: int) -> None:
        """A few streams with bodies flowing both ways from the first step: that is where flow
        control happens."""
        for _ in range(count):
            self.open_stream(b"POST", upgrade=False, end=False)
            self.deliver("server", len(self.wire["server"]))
            self.respond(-1, 200, end=False)
            self.deliver("client", len(self.wire["client"]))

    @rule(method=st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT"]), upgrade=st.booleans(),
          end=st.booleans())
    def open_stream(self, method: bytes, upgrade: bool, end: bool) -> None:
        headers = [*UPGRADE] if upgrade else [*HOST, (b"X-N", str(len(self.streams)).encode())]
        sid, head = self.conns["server"].send_request(method, b"/m", headers, end_stream=end)
        assert sid == max(self.streams, default=0) + 1
        m = self.streams[sid] = ModelStream(upgrade, method == b"HEAD", (method, b"/m", headers))
        m.views["server"].sending = "ended" if end else "body"
        self.push("server", [head])

    @precondition(lambda self: self.candidates(self.answerable))
    @rule(index=st.integers(0, 100), status=st.sampled_from([100, 103, 101, 200, 204, 304, 404, 500]),
          end=st.booleans())
    def respond(self, index: int, status: int, end: bool) -> None:
        choices = self.candidates(self.answerable)
        _, sid = choices[index % len(choices)]
        m, view = self.streams[sid], self.streams[sid].views["client"]
        final = status >= 200 or status == 101
        client = self.conns["client"]
        if (status == 101 and not m.upgrade) or (not final and end):
            with pytest.raises(LocalProtocolError):
                client.send_response(sid, status, b"R", [], end_stream=end)
            return
        head = client.send_response(sid, status, b"R", [(b"X-Status", str(status).encode())], end_stream=end)
        event_note(f"response {status}")
        m.heads.append(status)
        if final:
            view.sending = "ended" if end else "body"
            view.switched = status == 101
            view.bodyless = m.head_request or status in (204, 304)
        self.push("client", [head])

    @precondition(lambda self: self.candidates(self.sendable))
    @rule(index=st.integers(0, 100), size=st.integers(0, 100) | st.integers(10_000, 30_000),
          end=st.booleans())
    def send_data(self, index: int, size: int, end: bool) -> None:
        choices = self.candidates(self.sendable)
        side, sid = choices[index % len(choices)]
        m, conn = self.streams[sid], self.conns[side]
        capacity = 0
        if not self.body_allowed(side, m):
            size = 0  # only an empty ending is allowed
            if not end:
                return
        else:
            capacity = conn.send_capacity(sid)
            assert capacity == self.expected_capacity(side, sid)
            assert 0 <= capacity <= MAX_WINDOW
            if capacity < size:
                event_note("send_data: window too small")
        start = (sid * 7919 + (side == "client") * 104_729 + len(m.sent[side])) % (len(POOL) - 30_000)
        chunk = POOL[start : start + size]
        frames, taken = conn.data_frames(sid, chunk, end_stream=end)
        if size:
            assert taken == min(size, capacity)
        assert b"".join(f.data for f in frames) == chunk[:taken]
        assert all(0 < len(f.data) <= MAX_FRAME_PAYLOAD or f.end_stream for f in frames)
        assert [f.end_stream for f in frames] == [end and taken == size and i == len(frames) - 1
                                                 for i in range(len(frames))]
        m.sent[side] += chunk[:taken]
        self.sent_total[side] += taken
        if end and taken == size:
            m.views[side].sending = "ended"
        self.push(side, frames)

    @precondition(lambda self: self.candidates(self.sendable))
    @rule(index=st.integers(0, 100), trailers=st.sampled_from(TRAILER_SETS))
    def send_end(self, index: int, trailers: Headers) -> None:
        choices = self.candidates(self.sendable)
        side, sid = choices[index % len(choices)]
        end = self.conns[side].send_end(sid, trailers)
        self.streams[sid].views[side].sending = "ended"
        self.streams[sid].trailers[side] = trailers
        self.push(side, [end])

    @precondition(lambda self: self.candidates(self.consumable))
    @rule(index=st.integers(0, 100), fraction=st.sampled_from([1.0, 0.5, 0.1]) | st.floats(0.01, 1.0))
    def consume(self, index: int, fraction: float) -> None:
        choices = self.candidates(self.consumable)
        side, sid = choices[index % len(choices)]
        view = self.streams[sid].views[side]
        amount = max(1, int(view.buffered * fraction))
        frames = self.conns[side].consumed(sid, amount)
        assert all(isinstance(f, Window) and f.stream in (0, sid) for f in frames)
        if frames:
            event_note("consume: WINDOW granted")
        view.buffered -= amount
        self.push(side, frames)

    @precondition(lambda self: self.candidates(self.resettable))
    @rule(index=st.integers(0, 100), code=st.sampled_from(list(ErrorCode)), chance=st.integers(0, 2))
    def reset(self, index: int, code: ErrorCode, chance: int) -> None:
        if chance:
            return  # a reset ends a stream for good: keep them rarer than the other steps
        choices = self.candidates(self.resettable)
        side, sid = choices[index % len(choices)]
        view = self.streams[sid].views[side]
        frames = self.conns[side].reset(sid, code, "model")
        if view.closed:
            assert frames == []
            return
        assert frames[0] == Reset(sid, code, "model")
        assert all(isinstance(f, Window) and f.stream == 0 for f in frames[1:])
        view.reset = view.local_reset = True
        view.buffered = 0
        self.push(side, frames)
        assert self.conns[side].stream_state(sid) is StreamState.RESET

    @precondition(lambda self: self.wire["server"] or self.wire["client"])
    @rule(side=st.sampled_from(SIDES), count=st.integers(1, 8))
    def deliver(self, side: str, count: int) -> None:
        """Deliver the next frames one side sent to the other, in order."""
        if not self.wire[side]:
            side = other(side)
        receiver = other(side)
        for _ in range(min(count, len(self.wire[side]))):
            frame = self.wire[side].popleft()
            events = self.conns[receiver].receive(encode_frame(frame))
            self.check_events(receiver, frame, events)

    def check_events(self, side: str, frame: Frame, events: list[Event]) -> None:
        """Update the model with what ``side`` received, checking it was due."""
        sid = frame.stream
        m = self.streams.get(sid)
        view = m.views[side] if m else None
        if view is not None and view.closed and not isinstance(frame, Head):
            # Late frames for a stream this side finished or reset: ignored, credit returned.
            assert all(isinstance(e, SendFrame) for e in events), (frame, events)
            event_note(f"late {type(frame).__name__} ignored")
        for event in events:
            if isinstance(event, WindowUpdated) and event.stream == 0:
                self.tunnel_granted[side] += event.increment
                event_note("tunnel WINDOW")
                continue
            if isinstance(event, SendFrame):  # credit for bytes dropped: ignored DATA, or a reset buffer
                event_note(f"SendFrame after {type(frame).__name__}")
                assert isinstance(frame, Data | Reset)
                assert isinstance(event.frame, Window) and event.frame.stream == 0
                self.push(side, [event.frame])
                continue
            assert m is not None and view is not None
            if isinstance(event, RequestReceived):
                assert side == "client" and (event.method, event.target, event.headers) == m.request
                view.receiving = "body"
            elif isinstance(event, ResponseReceived):
                assert side == "server"
                assert event.status == m.heads[m.heads_seen]
                assert event.headers == [(b"X-Status", str(event.status).encode())]
                m.heads_seen += 1
                if not event.informational:
                    view.receiving = "body"
                    view.switched = event.status == 101
                    view.bodyless = m.head_request or event.status in (204, 304)
            elif isinstance(event, DataReceived):
                assert view.receiving == "body" and event.data
                received = m.received[side]
                received += event.data
                sent = m.sent[other(side)]
                assert received == sent[: len(received)], "bytes out of order, lost or duplicated"
                if m.upgrade and view.switched:
                    event_note("upgraded bytes")
                view.buffered += len(event.data)
            elif isinstance(event, StreamEnded):
                assert view.receiving == "body"
                view.receiving = "ended"
                # Everything the peer sent before its END has arrived, exactly once, in order.
                assert m.received[side] == m.sent[other(side)]
                assert event.trailers == m.trailers.get(other(side), [])
            elif isinstance(event, StreamReset):
                assert not view.reset and isinstance(frame, Reset)
                event_note("StreamReset")
                view.reset = True
                view.buffered = 0
            elif isinstance(event, WindowUpdated):
                m.granted[side] += event.increment

    @rule(side=st.sampled_from(SIDES), kind=st.sampled_from(["idle", "closed", "overflow", "too-much"]),
          chance=st.integers(0, 2))
    def inject_violation(self, side: str, kind: str, chance: int) -> None:
        """A broken peer: the frame is refused, and the connection is left exactly as it was."""
        if chance:
            return
        conn = self.conns[side]
        last = max(self.streams, default=0)
        if kind == "idle":
            frame: Frame = Data(last + 1, b"x")
        elif kind == "closed":
            # A stream this side closed normally (not by its own reset): nothing may arrive on it.
            choices = self.candidates(lambda s, m, v: s == side and v.closed and not v.local_reset)
            if not choices:
                return
            frame = End(choices[0][1])
        elif kind == "overflow":
            if not conn._send_window:
                return  # an empty window cannot overflow in one WINDOW frame
            frame = Window(0, MAX_WINDOW - conn._send_window + 1)
        else:
            # More than a window allows (or body bytes where none may go: also refused).
            choices = self.candidates(lambda s, m, v: s == side and v.receiving == "body" and not v.reset)
            if not choices:
                return
            sid = choices[0][1]
            limit = min(conn._receive_window, conn._streams[sid].receive_window)
            if limit >= MAX_FRAME_PAYLOAD:
                return
            frame = Data(sid, POOL[: limit + 1])
        before = _snapshot(conn)
        with pytest.raises(ProtocolError):
            conn.receive(encode_frame(frame))
        assert _snapshot(conn) == before
        event_note(f"violation refused: {kind}")

    # -- invariants --

    @invariant()
    def windows_stay_in_range_and_credit_is_conserved(self) -> None:
        for side in SIDES:
            conn, peer = self.conns[side], self.conns[other(side)]
            assert 0 <= conn._send_window <= MAX_WINDOW
            assert 0 <= conn._receive_window <= SMALL_TUNNEL_WINDOW
            for state in conn._streams.values():
                assert 0 <= state.send_window <= MAX_WINDOW
                assert 0 <= state.receive_window <= SMALL_STREAM_WINDOW
                assert 0 <= state.buffered <= state.buffered + state.unacked <= SMALL_STREAM_WINDOW
            # The bytes received and not yet consumed never exceed the tunnel window.
            assert 0 <= conn.buffered_bytes <= SMALL_TUNNEL_WINDOW
            assert conn.buffered_bytes == sum(m.views[side].buffered for m in self.streams.values())
            # Every byte of credit is somewhere: in the sender's window, on the wire as DATA, in the
            # receiver's buffer, consumed but not granted yet, or on the wire back as WINDOW(0).
            in_flight = sum(len(f.data) for f in self.wire[side] if isinstance(f, Data))
            back = self.wire[other(side)]
            grants = sum(f.increment for f in back if isinstance(f, Window) and not f.stream)
            credit = conn._send_window + in_flight + peer._buffered + peer._unacked + grants
            assert credit == SMALL_TUNNEL_WINDOW
            assert peer._receive_window == conn._send_window + in_flight + grants

    @invariant()
    def states_agree_with_the_model(self) -> None:
        for sid, m in self.streams.items():
            for side in SIDES:
                view, state = m.views[side], self.conns[side].stream_state(sid)
                if view.reset:
                    expected = StreamState.RESET
                elif side == "client" and view.receiving == "head":
                    expected = StreamState.IDLE  # the request is still on its way
                elif view.sending == view.receiving == "ended":
                    expected = StreamState.CLOSED
                elif view.sending == "ended":
                    expected = StreamState.HALF_CLOSED_LOCAL
                elif view.receiving == "ended":
                    expected = StreamState.HALF_CLOSED_REMOTE
                else:
                    expected = StreamState.OPEN
                assert state is expected, (sid, side, view)

    def teardown(self) -> None:
        # Let everything in flight arrive: then both sides agree on every stream nobody reset.
        while self.wire["server"] or self.wire["client"]:
            for side in SIDES:
                self.deliver(side, len(self.wire[side]))
        for m in self.streams.values():
            if not any(v.reset for v in m.views.values()):
                assert m.received["client"] == m.sent["server"]
                assert m.received["server"] == m.sent["client"]


TunnelMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_tunnel_model = TunnelMachine.TestCase


# -- batched messages (wstunnel.v2.batch) ---------------------------------------------------------


def test_a_batch_unpacks_to_its_frames_and_they_decode_as_alone() -> None:
    frames = [Head(1, b"GET / HTTP/1.1\r\n\r\n"), Data(1, b"x" * 1000, end_stream=True),
              v2.Window(0, 5), v2.Reset(3, 1, "gone")]
    encoded = [encode_frame(frame) for frame in frames]
    message = v2.pack_batch(encoded)
    assert len(message) == sum(4 + len(part) for part in encoded)
    entries = v2.unpack_batch(message)
    assert [bytes(entry) for entry in entries] == encoded
    assert [decode_frame(entry) for entry in entries] == frames
    assert isinstance(decode_frame(entries[1]).data, bytes)  # type: ignore[union-attr]


@pytest.mark.parametrize("message, problem", [
    (b"", "empty"),
    (b"\x00\x00\x00", "cut short"),
    (b"\x00\x00\x00\x05" + b"\x04\x00\x00\x00\x00", "does not fit"),  # shorter than a header
    (b"\x00\x00\x00\x0b" + b"\x04\x00\x00\x00\x00\x00\x00\x00\x00\x01", "does not fit"),  # past the end
    (encode_frame(Head(1, b"x")), "does not fit"),  # a plain v2 message is not a batch
])
def test_a_malformed_batch_is_a_tunnel_message_error(message: bytes, problem: str) -> None:
    with pytest.raises(TunnelMessageError, match=problem):
        v2.unpack_batch(message)


def test_a_text_batch_is_refused() -> None:
    with pytest.raises(TunnelMessageError, match="text message"):
        v2.unpack_batch("abc")


def test_the_largest_frames_fit_a_batch() -> None:
    largest = max(v2.MAX_HEAD_SIZE, v2.MAX_FRAME_PAYLOAD) + v2.HEADER_SIZE
    assert largest + 4 <= v2.MAX_BATCH_SIZE
    assert v2.BATCH_SUBPROTOCOL == "wstunnel.v2.batch"
