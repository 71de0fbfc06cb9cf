"""wstunnel.framing: the v1 tunnel message format (SPEC §4), bytes only, no sockets."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wstunnel import framing
from wstunnel.errors import FramingError, HttpPayloadError, TunnelMessageError
from wstunnel.framing import (
    MAX_HEAD_SIZE,
    MAX_ID,
    Request,
    Response,
    encode_id,
    encode_request,
    encode_response,
    parse_request,
    parse_response,
    split_message,
)
from wstunnel.headers import Headers

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ---------------------------------------------------------------------------------

TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
# Names h11 gives a meaning to: random headers must not change the framing under test.
SPECIAL_NAMES = {b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect"}
VCHAR = "".join(chr(c) for c in range(0x21, 0x7F))
OBS_TEXT = "".join(chr(c) for c in range(0x80, 0x100))

ids = st.integers(min_value=0, max_value=MAX_ID)
tokens = st.text(alphabet=TCHAR, min_size=1, max_size=12).map(str.encode)
methods = st.one_of(
    st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"PROPFIND"]),
    tokens.filter(lambda m: m.upper() != b"CONNECT"),
)
targets = st.text(alphabet=VCHAR, max_size=40).map(lambda t: b"/" + t.encode())
header_names = tokens.filter(lambda n: n.lower() not in SPECIAL_NAMES)
# RFC 9110 field values: visible characters and obs-text, spaces and tabs only inside.
header_values = st.text(alphabet=VCHAR + OBS_TEXT + " \t", max_size=30).map(
    lambda v: v.encode("latin-1").strip(b" \t")
)
header_lists = st.lists(st.tuples(header_names, header_values), max_size=8)
bodies = st.one_of(st.just(b""), st.binary(max_size=300), st.binary(min_size=1, max_size=5000))
# Any reason phrase RFC 9112 allows, the empty one and odd ones included.
reasons = st.one_of(
    st.sampled_from([b"", b"OK", b"I'm a teapot", b"  spaced  ", b"\tTab", b"caf\xe9", b"%00 \x80\xff"]),
    st.text(alphabet=VCHAR + OBS_TEXT + " \t", max_size=30).map(lambda r: r.encode("latin-1")),
)
body_statuses = st.integers(min_value=200, max_value=599).filter(lambda s: s not in (204, 304))
stale_framing = st.lists(
    st.sampled_from([(b"Content-Length", b"999"), (b"Transfer-Encoding", b"chunked"),
                     (b"content-length", b"0")]),
    max_size=2,
)


def _expected_request_headers(request: Request) -> Headers:
    framing_names = (b"content-length", b"transfer-encoding")
    headers = [(k, v) for k, v in request.headers if k.lower() not in framing_names]
    if not any(k.lower() == b"host" for k, _ in headers):
        headers.insert(0, (b"Host", b""))
    if request.body or request.method not in (b"GET", b"HEAD", b"OPTIONS", b"DELETE"):
        headers.append((b"Content-Length", str(len(request.body)).encode()))
    return headers


def _chunked(body: bytes, sizes: list[int], extensions: list[bytes], trailers: Headers) -> bytes:
    """``body`` in chunked coding, cut at ``sizes``, with chunk extensions and trailer fields."""
    out, rest, i = [], body, 0
    while rest:
        size = max(1, sizes[i % len(sizes)]) if sizes else len(rest)
        chunk, rest = rest[:size], rest[size:]
        ext = extensions[i % len(extensions)] if extensions else b""
        out.append(b"%x%s\r\n%s\r\n" % (len(chunk), ext, chunk))
        i += 1
    out.append(b"0\r\n")
    out += [b"%s: %s\r\n" % (k, v) for k, v in trailers]
    out.append(b"\r\n")
    return b"".join(out)


# -- ids ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_id", "encoded"),
    [(0, b"0000"), (1, b"0001"), (19, b"0013"), (0xAB, b"00ab"), (0xBEEF, b"beef"), (MAX_ID, b"ffff")],
)
def test_encode_id_is_four_lowercase_hex_digits(request_id: int, encoded: bytes) -> None:
    assert encode_id(request_id) == encoded


@pytest.mark.parametrize("request_id", [-1, MAX_ID + 1, 1 << 20])
def test_encode_id_refuses_ids_that_do_not_fit(request_id: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        encode_id(request_id)


@given(ids, st.binary(max_size=50))
@FAST
def test_split_message_round_trips_every_id(request_id: int, payload: bytes) -> None:
    message = encode_id(request_id) + payload
    assert re.fullmatch(rb"[0-9a-f]{4}", message[:4])
    assert split_message(message) == (request_id, payload)


def test_split_message_accepts_uppercase_hex_like_the_original_reader() -> None:
    # We always write lowercase (%04x); the original reads with Fscanf("%04x"), which takes both.
    assert split_message(b"00ABxyz") == (0xAB, b"xyz")
    assert split_message(b"FFFF") == (0xFFFF, b"")
    assert split_message(b"BeEf") == (0xBEEF, b"")


def test_split_message_with_only_an_id_has_an_empty_payload() -> None:
    assert split_message(b"0013") == (19, b"")


@pytest.mark.parametrize("message", [b"", b"0", b"00", b"001"])
def test_split_message_too_short(message: bytes) -> None:
    with pytest.raises(TunnelMessageError, match="too short"):
        split_message(message)


@pytest.mark.parametrize(
    "message",
    [b"zzzzGET", b"00g1", b" 001GET", b"-001", b"+001", b"0x01", b"0_01", b"\x00\x00\x00\x01",
     b"GET / HTTP/1.1"],
)
def test_split_message_non_hex_id(message: bytes) -> None:
    with pytest.raises(TunnelMessageError, match="hex request id"):
        split_message(message)


def test_split_message_refuses_text_messages() -> None:
    with pytest.raises(TunnelMessageError, match="text message"):
        split_message("0001GET / HTTP/1.1\r\nHost: a\r\n\r\n")


def test_tunnel_message_errors_are_framing_errors() -> None:
    assert issubclass(TunnelMessageError, FramingError)
    assert issubclass(HttpPayloadError, FramingError)
    assert not issubclass(HttpPayloadError, TunnelMessageError)


# -- requests -----------------------------------------------------------------------------------


def test_encode_request_exact_bytes_without_body() -> None:
    request = Request(b"GET", b"/x?y=1", [(b"Host", b"example.com"), (b"X-Trace", b"a b")])
    assert encode_request(0x13, request) == (
        b"0013GET /x?y=1 HTTP/1.1\r\nHost: example.com\r\nX-Trace: a b\r\n\r\n"
    )


def test_encode_request_frames_the_body_by_content_length() -> None:
    request = Request(b"POST", b"/p", [(b"Host", b"h")], b"\x00\x01binary\xff")
    assert encode_request(1, request) == (
        b"0001POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 9\r\n\r\n\x00\x01binary\xff"
    )


def test_encode_request_replaces_stale_framing_headers() -> None:
    stale = [(b"Transfer-Encoding", b"chunked"), (b"content-length", b"99")]
    request = Request(b"PUT", b"/", [(b"Host", b"h"), *stale], b"abc")
    message = encode_request(2, request)
    assert b"chunked" not in message
    assert b"99" not in message
    assert message.endswith(b"Host: h\r\nContent-Length: 3\r\n\r\nabc")


@pytest.mark.parametrize(("method", "has_length"), [(b"GET", False), (b"HEAD", False), (b"OPTIONS", False),
                                                     (b"DELETE", False), (b"POST", True), (b"PUT", True)])
def test_encode_request_empty_body_content_length_only_where_a_body_is_expected(
    method: bytes, has_length: bool
) -> None:
    message = encode_request(3, Request(method, b"/", [(b"Host", b"h")]))
    assert (b"Content-Length: 0\r\n" in message) is has_length
    assert parse_request(split_message(message)[1]).body == b""


def test_encode_request_without_host_still_parses() -> None:
    # An HTTP/1.0 client may leave Host out; the tunnel always speaks HTTP/1.1, which needs one.
    message = encode_request(4, Request(b"GET", b"/old", []))
    assert message == b"0004GET /old HTTP/1.1\r\nHost: \r\n\r\n"
    assert parse_request(split_message(message)[1]) == Request(b"GET", b"/old", [(b"Host", b"")])


@given(
    request_id=ids,
    method=methods,
    target=targets,
    headers=header_lists,
    host=st.one_of(st.none(), header_values),
    host_at=st.integers(min_value=0, max_value=8),
    stale=stale_framing,
    body=bodies,
)
@FAST
def test_request_round_trip(
    request_id: int,
    method: bytes,
    target: bytes,
    headers: Headers,
    host: bytes | None,
    host_at: int,
    stale: Headers,
    body: bytes,
) -> None:
    headers = [*headers, *stale]
    if host is not None:
        headers.insert(min(host_at, len(headers)), (b"Host", host))
    request = Request(method, target, headers, body)
    got_id, payload = split_message(encode_request(request_id, request))
    assert got_id == request_id
    parsed = parse_request(payload)
    assert parsed.method == method
    assert parsed.target == target
    assert parsed.body == body
    assert parsed.headers == _expected_request_headers(request)


def test_parse_request_chunked_body_with_extensions_and_trailers() -> None:
    payload = (
        b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'3;name=value\r\nabc\r\n2;q="quoted ext"\r\nde\r\n0\r\nX-Checksum: 1\r\n\r\n'
    )
    parsed = parse_request(payload)
    assert parsed.body == b"abcde"
    assert parsed.headers == [(b"Host", b"h"), (b"Transfer-Encoding", b"chunked")]


def test_parse_request_keeps_header_case_and_order() -> None:
    payload = b"GET / HTTP/1.1\r\nx-lower: 1\r\nHost: h\r\nX-UPPER: 2\r\nx-lower: 3\r\n\r\n"
    assert parse_request(payload).headers == [
        (b"x-lower", b"1"), (b"Host", b"h"), (b"X-UPPER", b"2"), (b"x-lower", b"3")
    ]


def test_parse_request_head_of_exactly_max_head_size_is_accepted() -> None:
    start = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nX-Pad: "
    head = start + b"p" * (MAX_HEAD_SIZE - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == MAX_HEAD_SIZE
    parsed = parse_request(head + b"body")
    assert parsed.body == b"body"
    assert len(parsed.headers[-1][1]) == MAX_HEAD_SIZE - len(start) - 4


@pytest.mark.parametrize("body", [b"", b"body"])
def test_parse_request_head_over_max_head_size(body: bytes) -> None:
    start = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\nX-Pad: " % len(body)
    head = start + b"p" * (MAX_HEAD_SIZE - len(start) - 3) + b"\r\n\r\n"
    assert len(head) == MAX_HEAD_SIZE + 1
    with pytest.raises(HttpPayloadError, match="larger than"):
        parse_request(head + body)


CHUNKED_POST = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "incomplete"),
        (b"GET", "incomplete"),
        (b"GET / HTTP/1.1\r\nHost: h\r\n", "incomplete"),  # truncated head
        (b"GET / HTTP/1.1\r\nHost: h", "incomplete"),
        (b"NOT A REQUEST LINE AT ALL\r\n\r\n", "malformed"),
        (b"GET /\xff HTTP/1.1\r\nHost: h\r\n\r\n", "malformed"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "malformed"),  # a TLS hello
        (b"GET / HTTP/1.1\r\n\r\n", "Host"),  # HTTP/1.1 needs a Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "Host"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n", "malformed"),
        (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", "malformed"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", "malformed"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nshort", "shorter"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nlonger", "unexpected bytes"),
        (b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", "unexpected bytes"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: abc\r\n\r\n", "Content-Length"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", "Content-Length"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", "Transfer-Encoding"),
        (CHUNKED_POST + b"zz\r\nab\r\n0\r\n\r\n", "chunk"),  # size not hex
        (CHUNKED_POST + b"3\r\nabcdef\r\n0\r\n\r\n", "chunk"),  # data longer than its size
        (CHUNKED_POST + b"3\r\nabc\r\n", "shorter"),  # no last chunk
    ],
)
def test_parse_request_malformed(payload: bytes, message: str) -> None:
    with pytest.raises(HttpPayloadError, match=message):
        parse_request(payload)


# -- responses ----------------------------------------------------------------------------------


def test_encode_response_exact_bytes() -> None:
    response = Response(200, b"OK", [(b"X-One", b"1"), (b"Transfer-Encoding", b"chunked")], b"hi")
    assert encode_response(0x1F, response, request_method=b"GET") == (
        b"001fHTTP/1.1 200 OK\r\nX-One: 1\r\nContent-Length: 2\r\n\r\nhi"
    )


def test_encode_response_empty_reason_keeps_the_space() -> None:
    message = encode_response(5, Response(404, b"", [], b"nope"), request_method=b"GET")
    assert message.startswith(b"0005HTTP/1.1 404 \r\n")
    assert parse_response(split_message(message)[1]) == Response(
        404, b"", [(b"Content-Length", b"4")], b"nope"
    )


@given(
    request_id=ids,
    status=body_statuses,
    reason=reasons,
    headers=header_lists,
    stale=stale_framing,
    body=bodies,
    method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]),
)
@FAST
def test_response_round_trip(
    request_id: int, status: int, reason: bytes, headers: Headers, stale: Headers, body: bytes, method: bytes
) -> None:
    response = Response(status, reason, [*headers, *stale], body)
    got_id, payload = split_message(encode_response(request_id, response, request_method=method))
    assert got_id == request_id
    assert parse_response(payload, request_method=method) == Response(
        status, reason, [*headers, (b"Content-Length", str(len(body)).encode())], body
    )


@given(status=st.integers(min_value=200, max_value=599), headers=header_lists, body=bodies,
       length=st.one_of(st.none(), st.integers(min_value=0, max_value=10**9)))
@FAST
def test_response_to_head_has_no_body_but_keeps_content_length(
    status: int, headers: Headers, body: bytes, length: int | None
) -> None:
    if length is not None:
        headers = [*headers, (b"Content-Length", str(length).encode())]
    response = Response(status, b"X", [*headers, (b"Transfer-Encoding", b"chunked")], body)
    message = encode_response(7, response, request_method=b"HEAD")
    assert message.endswith(b"\r\n\r\n")  # nothing after the head
    parsed = parse_response(split_message(message)[1], request_method=b"HEAD")
    assert parsed == Response(status, b"X", headers, b"")


@pytest.mark.parametrize("status", [204, 304])
@pytest.mark.parametrize("method", [b"GET", b"POST"])
def test_bodyless_statuses_have_no_body(status: int, method: bytes) -> None:
    response = Response(status, b"R", [(b"ETag", b'"x"'), (b"Content-Length", b"42")], b"dropped")
    message = encode_response(8, response, request_method=method)
    assert b"dropped" not in message
    assert parse_response(split_message(message)[1], request_method=method) == Response(
        status, b"R", [(b"ETag", b'"x"'), (b"Content-Length", b"42")], b""
    )


@given(
    status=body_statuses,
    reason=reasons,
    headers=header_lists,
    body=bodies,
    sizes=st.lists(st.integers(min_value=1, max_value=700), max_size=5),
    extensions=st.lists(
        st.sampled_from([b"", b";a", b";a=1", b';name="quoted value"', b";x=y;z", b";ows=1 "]), max_size=3
    ),
    trailers=st.lists(st.tuples(header_names, header_values), max_size=3),
)
@FAST
def test_parse_response_chunked(
    status: int, reason: bytes, headers: Headers, body: bytes, sizes: list[int],
    extensions: list[bytes], trailers: Headers,
) -> None:
    head = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    head += b"".join(b"%s: %s\r\n" % h for h in headers) + b"Transfer-Encoding: chunked\r\n\r\n"
    parsed = parse_response(head + _chunked(body, sizes, extensions, trailers))
    # Trailers are not headers of the response: they never show up among them.
    assert parsed == Response(status, reason, [*headers, (b"Transfer-Encoding", b"chunked")], body)


@given(status=body_statuses, reason=reasons, headers=header_lists, body=bodies,
       version=st.sampled_from([b"1.0", b"1.1"]), close=st.booleans())
@FAST
def test_parse_response_framed_by_end_of_message(
    status: int, reason: bytes, headers: Headers, body: bytes, version: bytes, close: bool
) -> None:
    if close:
        headers = [*headers, (b"Connection", b"close")]
    head = b"HTTP/%s %d %s\r\n" % (version, status, reason) + b"".join(b"%s: %s\r\n" % h for h in headers)
    assert parse_response(head + b"\r\n" + body) == Response(status, reason, headers, body)


@given(status=body_statuses, body=bodies)
@FAST
def test_parse_response_framed_by_content_length(status: int, body: bytes) -> None:
    payload = b"HTTP/1.1 %d Whatever\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
    assert parse_response(payload).body == body


def test_parse_response_reason_phrases() -> None:
    for reason in [b"", b"OK", b"Totally Fine", b"\xe9t\xe9", b"with\ttab", b" leading"]:
        payload = b"HTTP/1.1 200 " + reason + b"\r\nContent-Length: 0\r\n\r\n"
        assert parse_response(payload).reason == reason
    # No space and no reason at all: some servers write just the code.
    assert parse_response(b"HTTP/1.1 200\r\nContent-Length: 1\r\n\r\nx") == Response(
        200, b"", [(b"Content-Length", b"1")], b"x"
    )


def test_parse_response_skips_informational_responses() -> None:
    payload = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
               b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    assert parse_response(payload, request_method=b"POST") == Response(
        201, b"Created", [(b"Content-Length", b"2")], b"ok"
    )


def test_parse_response_accepts_bare_newlines_and_trailing_whitespace() -> None:
    assert parse_response(b"HTTP/1.1 200 OK\nContent-Length: 1\n\nx").body == b"x"
    assert parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx\r\n").body == b"x"


def test_parse_response_head_of_exactly_max_head_size_is_accepted() -> None:
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: "
    head = start + b"p" * (MAX_HEAD_SIZE - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == MAX_HEAD_SIZE
    assert parse_response(head + b"ok").body == b"ok"


@pytest.mark.parametrize("informational", [b"", b"HTTP/1.1 100 Continue\r\n\r\n"])
def test_parse_response_head_over_max_head_size(informational: bytes) -> None:
    start = informational + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: "
    head = start + b"p" * (MAX_HEAD_SIZE - len(start) - 3) + b"\r\n\r\n"
    assert len(head) == MAX_HEAD_SIZE + 1
    with pytest.raises(HttpPayloadError, match="larger than"):
        parse_response(head + b"ok")


@pytest.mark.parametrize(
    ("payload", "method", "message"),
    [
        (b"", b"GET", "malformed"),
        (b"HTTP/1.1 200 OK\r\n", b"GET", "malformed"),  # truncated head
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1", b"GET", "malformed"),
        (b"garbage\r\n\r\n", b"GET", "malformed"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", b"GET", "malformed"),
        (b"HTTP/1.1 abc\r\n\r\n", b"GET", "malformed"),
        (b"HTTP/1.1 099 Low\r\n\r\n", b"GET", "malformed"),
        (b"HTTP/1.1 100 Continue\r\n\r\n", b"GET", "malformed"),  # no final response
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", b"GET", "malformed"),
        (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", b"GET", "malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort", b"GET", "complete message body"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nlonger", b"GET", "unexpected bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", b"HEAD", "unexpected bytes"),
        (b"HTTP/1.1 204 No Content\r\n\r\nbody", b"GET", "unexpected bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", b"GET", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", b"GET", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nab", b"GET", "Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", b"GET", "chunk"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n", b"GET", "chunk"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", b"GET", "chunked"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab", b"GET", "chunked"),
    ],
)
def test_parse_response_malformed(payload: bytes, method: bytes, message: str) -> None:
    with pytest.raises(HttpPayloadError, match=message):
        parse_response(payload, request_method=method)


# -- robustness ---------------------------------------------------------------------------------

SEEDS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;a=1\r\nabc\r\n0\r\nT: v\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nabc",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
]


@st.composite
def near_messages(draw: st.DrawFn) -> bytes:
    """A valid message with a few bytes inserted, deleted or changed: reaches deep into h11."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        pos = draw(st.integers(min_value=0, max_value=len(data)))
        op = draw(st.sampled_from(["insert", "delete", "change"]))
        if op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(min_value=1, max_value=5))]
        elif pos < len(data):
            data[pos] = draw(st.integers(min_value=0, max_value=255))
    return bytes(data)


@given(
    data=st.one_of(st.binary(max_size=200), near_messages()),
    method=st.sampled_from([b"GET", b"HEAD", b"POST", b"CONNECT"]),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_bytes_raise_only_framing_errors(data: bytes, method: bytes) -> None:
    for parse in (parse_request, lambda d: parse_response(d, request_method=method), split_message):
        try:
            result = parse(data)
        except FramingError:
            continue
        # Whatever is accepted comes back as the module's own types, never half-parsed junk.
        assert isinstance(result, Request | Response | tuple)


def test_module_exports_the_documented_limits() -> None:
    assert framing.ID_DIGITS == 4
    assert MAX_ID == 0xFFFF
    assert MAX_HEAD_SIZE >= 64 * 1024
