"""The front's fast path against h11, with generated requests and responses: a request it takes,
h11 reads the same way (and would take whole, with nothing more); a response it writes, h11
writes byte for byte, and one h11 refuses to write, it refuses too."""

from __future__ import annotations

import h11
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wstunnel import http1
from wstunnel.errors import HttpPayloadError
from wstunnel.headers import Headers
from wstunnel.server.fasthttp import FALLBACK, DirectEncoder, Fallback, read_simple_request
from wstunnel.v2 import parse_response_head

MANY = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_BODY = 64

TRICKY = b"aZ09-!#$%&'*+.:;,/?=()<>@[]\" \t\x00\r\n\x7f\x80"
pieces = st.binary(max_size=8).map(lambda raw: bytes(TRICKY[b % len(TRICKY)] for b in raw))
request_fields = st.lists(st.tuples(
    st.one_of(st.sampled_from([b"Host", b"host", b"Content-Length", b"Connection", b"Expect",
                               b"Transfer-Encoding", b"Upgrade", b"X-Token", b"Accept"]), pieces),
    st.one_of(st.sampled_from([b"x", b"5", b"0", b"05", b"5, 5", b"close", b"100-continue",
                               b"chunked", b"websocket", b"a b", b""]), pieces),
), max_size=5)


def _request(method: bytes, target: bytes, version: bytes, fields: Headers) -> bytes:
    return b"%s %s HTTP/%s\r\n%s\r\n" % (
        method, target, version, b"".join(b"%s: %s\r\n" % field for field in fields))


def _h11_reads(data: bytes) -> tuple[bytes, bytes, Headers, bytes, bytes] | None:
    """What h11 makes of a whole request at the start of ``data``, and what it leaves."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    body = b""
    try:
        event = conn.next_event()
        if not isinstance(event, h11.Request):
            return None
        head = event
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return None
    except h11.RemoteProtocolError:
        return None
    headers = [(bytes(k), bytes(v)) for k, v in head.headers.raw_items()]
    return bytes(head.method), bytes(head.target), headers, body, bytes(conn.trailing_data[0])


@MANY
@given(
    method=st.one_of(st.sampled_from([b"GET", b"POST", b"HEAD"]), pieces),
    target=st.one_of(st.sampled_from([b"/", b"/a?b=c", b"*"]), pieces),
    version=st.sampled_from([b"1.1", b"1.0"]),
    fields=request_fields,
    rest=st.sampled_from([b"", b"hello", b"hello world, and more", b"GET / HTTP/1.1\r\n"]),
)
@example(method=b"POST", target=b"/", version=b"1.1",
         fields=[(b"Host", b"x"), (b"Content-Length", b"5")], rest=b"helloGET")
@example(method=b"GET", target=b"/", version=b"1.1", fields=[(b"Host", b"x")], rest=b"")
def test_a_simple_request_reads_as_h11_reads_it(method: bytes, target: bytes, version: bytes,
                                               fields: Headers, rest: bytes) -> None:
    data = _request(method, target, version, fields) + rest
    ours = read_simple_request(data, MAX_BODY)
    if isinstance(ours, Fallback) or ours is None:
        return  # h11 reads it: nothing to compare
    theirs = _h11_reads(data)
    assert theirs is not None, data
    method_, target_, headers, body, size = ours
    assert (method_, target_, headers, body) == theirs[:4]
    assert data[size:] == theirs[4]  # the same bytes are left for the next request


def test_what_is_not_simple_goes_to_h11() -> None:
    simple = _request(b"GET", b"/", b"1.1", [(b"Host", b"x")])
    assert read_simple_request(simple, MAX_BODY) == (b"GET", b"/", [(b"Host", b"x")], b"", len(simple))
    assert read_simple_request(simple[:-2], MAX_BODY) is None  # the head is still coming
    for fields in ([], [(b"Host", b"x"), (b"Host", b"y")],
                   [(b"Host", b"x"), (b"Connection", b"close")],
                   [(b"Host", b"x"), (b"Expect", b"100-continue"), (b"Content-Length", b"1")],
                   [(b"Host", b"x"), (b"Transfer-Encoding", b"chunked")],
                   [(b"Host", b"x"), (b"Upgrade", b"websocket")],
                   [(b"Host", b"x"), (b"Content-Length", b"5")],  # its body has not come
                   [(b"Host", b"x"), (b"Content-Length", b"%d" % (MAX_BODY + 1))]):
        assert read_simple_request(_request(b"GET", b"/", b"1.1", fields), MAX_BODY) is FALLBACK
    assert read_simple_request(_request(b"GET", b"/", b"1.0", [(b"Host", b"x")]), MAX_BODY) is FALLBACK
    assert read_simple_request(b"\r\n" + simple, MAX_BODY) is FALLBACK
    assert read_simple_request(b"\x16\x03\x01", MAX_BODY) is FALLBACK  # h11 refuses at once


response_fields = st.lists(st.tuples(
    st.one_of(st.sampled_from([b"Content-Type", b"Content-Length", b"Host", b"Set-Cookie"]), pieces),
    st.one_of(st.sampled_from([b"text/plain", b"3", b"0", b"3, 3", b"x"]), pieces),
), max_size=4)


def _h11_writes(status: int, reason: bytes, headers: Headers, chunks: list[bytes],
                trailers: Headers) -> bytes | None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(conn.next_event(), h11.Request)
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    out = b""
    try:
        out += conn.send(h11.Response(status_code=status, reason=reason, headers=headers)) or b""
        for chunk in chunks:
            out += conn.send(h11.Data(data=chunk)) or b""
        out += conn.send(h11.EndOfMessage(headers=trailers)) or b""
    except h11.LocalProtocolError:
        return None
    return out


@MANY
@given(
    status=st.sampled_from([200, 201, 204, 304, 404, 502, 999]),
    reason=st.one_of(st.sampled_from([b"OK", b"", b"Not Found"]), pieces),
    headers=response_fields,
    chunks=st.lists(st.sampled_from([b"abc", b"", b"x"]), max_size=3),
    trailers=st.one_of(st.just([]), st.lists(st.tuples(st.sampled_from([b"X-T", b"bad name"]),
                                                       st.sampled_from([b"v", b"a\r\nb", b" v"])),
                                             min_size=1, max_size=2)),
)
@example(status=200, reason=b"OK", headers=[(b"Content-Length", b"3")], chunks=[b"abc"], trailers=[])
@example(status=200, reason=b"OK", headers=[], chunks=[b"abc", b"x"], trailers=[(b"X-T", b"v")])
@example(status=200, reason=b"OK", headers=[(b"Content-Type", b" ")], chunks=[], trailers=[])
@example(status=200, reason=b"OK", headers=[(b"A", b"x\t")], chunks=[], trailers=[])
@example(status=200, reason=b"OK", headers=[(b"a:", b"b")], chunks=[], trailers=[])
@example(status=200, reason=b"OK", headers=[(b"A", b"b\r\nB: c")], chunks=[], trailers=[])
@example(status=200, reason=b"OK", headers=[], chunks=[], trailers=[(b"A", b"b\r\nB: c")])
def test_a_plain_response_is_written_as_h11_writes_it(status: int, reason: bytes, headers: Headers,
                                                      chunks: list[bytes], trailers: Headers) -> None:
    framing = DirectEncoder.framing(status, reason, headers)
    if isinstance(framing, Fallback):
        return  # h11 writes it
    bodyless = status in (204, 304)
    encoder = DirectEncoder(0 if bodyless else framing)
    try:
        ours: bytes | None = encoder.head(status, reason, headers)
        for chunk in chunks:
            ours += encoder.data(chunk)  # type: ignore[operator]
        ours += encoder.end(trailers)  # type: ignore[operator]
    except h11.LocalProtocolError:
        ours = None
    assert ours == _h11_writes(status, reason, headers, chunks, trailers)


@MANY
@given(status=st.sampled_from([200, 204, 404, 999]),
       reason=st.one_of(st.sampled_from([b"OK", b"", b"Not Found"]), pieces),
       headers=response_fields, chunked=st.booleans())
@example(status=200, reason=b"OK", headers=[(b"A", b" x\t")], chunked=False)
def test_a_parsed_head_is_written_unchecked_as_it_would_be_checked(
        status: int, reason: bytes, headers: Headers, chunked: bool) -> None:
    # What a tunnel client's HEAD reads as (the v2 reader) passes the encoder's checks: skipping
    # them for such a head (``parsed``) writes the very same bytes.
    try:
        _, reason, headers = parse_response_head(http1.head_bytes(b"HTTP/1.1 %d %s" % (status, reason),
                                                                  headers))
    except HttpPayloadError:
        return
    kept = [(name, value) for name, value in headers if name.lower() != b"content-length"]
    length = None if chunked else 5
    checked = DirectEncoder(length).head(status, reason, kept)
    assert DirectEncoder(length).head(status, reason, kept, parsed=True) == checked


@pytest.mark.parametrize(("status", "reason", "headers"), [
    (101, b"", []), (100, b"", []), (200, b"OK", [(b"Host", b"x")]),
    (200, b"OK", [(b"Content-Length", b"1"), (b"Content-Length", b"1")]),
    (200, b"OK", [(b"Content-Length", b"1, 1")]), (200, b"O\r\nK", []), (200, b"\x00", []),
])
def test_responses_h11_must_write(status: int, reason: bytes, headers: Headers) -> None:
    assert DirectEncoder.framing(status, reason, headers) is FALLBACK
