"""The tunnel client's backend messages as bytes (``wstunnel.client.wire``), without sockets: the
request head it writes is the one h11 would write, and the response heads its fast path reads
are read as h11 reads them."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wstunnel.client.wire import Outgoing, fast_head, parse_base
from wstunnel.errors import LocalRequestError

_TARGET = parse_base("http://backend.example:8080")

_STATUS_LINES = [b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found", b"HTTP/1.1 204 No Content",
                 b"HTTP/1.1 304 ", b"HTTP/1.1 101 Switching", b"HTTP/1.1 100 Continue",
                 b"HTTP/1.0 200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 500 \xff\tx", b"HTTP/1.1 200 O\x00K"]
_FIELD_LINES = [b"Content-Length: 5", b"Content-Length: 005", b"content-length: 5", b"Content-Length: 6",
                b"Content-Length: x", b"Transfer-Encoding: chunked", b"Connection: close",
                b"Connection: keep-alive, Close", b"X-Thing:  spaced  ", b"X:", b"X: a\x00",
                b"X : a", b": a", b"NoColon", b" folded", b"Set-Cookie: a=1", b"Set-Cookie: b=2"]


def _h11_head(data: bytes, method: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], bool] | None:
    """What h11 makes of a response head to ``method``: status, reason, raw headers and whether
    the connection may be kept; None for a head it refuses or that is not a final response."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target=b"/", headers=[(b"Host", b"x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    try:
        event = client.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Response):
        return None
    keep = not any(name.lower() == b"connection" and b"close" in value.lower()
                   for name, value in event.headers.raw_items())
    return event.status_code, event.reason, list(event.headers.raw_items()), keep


@given(st.sampled_from(_STATUS_LINES), st.lists(st.sampled_from(_FIELD_LINES), max_size=5),
       st.sampled_from([b"GET", b"HEAD", b"POST"]))
@settings(max_examples=400, deadline=None)
def test_the_fast_path_reads_a_response_head_as_h11_does(status: bytes, fields: list[bytes],
                                                          method: bytes) -> None:
    data = b"".join(line + b"\r\n" for line in [status, *fields]) + b"\r\nhello"
    fast = fast_head(data, method)
    if fast is None:
        return  # h11 reads it (and refuses it, if it is bad): nothing to compare
    head, keep_alive = fast
    expected = _h11_head(data, method)
    assert expected is not None, data  # the fast path takes nothing h11 would refuse
    status_code, reason, headers, keep = expected
    assert (head.status, head.reason, keep_alive) == (status_code, reason, keep)
    assert head.headers == headers  # raw, in order; a repeated identical Content-Length once
    declared = [value for name, value in headers if name.lower() == b"content-length"]
    bodyless = method == b"HEAD" or status_code in (204, 304)
    assert head.length == (0 if bodyless else int(declared[0]))
    assert head.body == b"hello"


def test_the_common_response_takes_the_fast_path() -> None:
    fast = fast_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhel", b"GET")
    assert fast is not None
    head, keep_alive = fast
    assert (head.status, head.reason, head.headers, head.length, head.body, keep_alive) == (
        200, b"OK", [(b"Content-Length", b"5"), (b"X-A", b"b")], 5, b"hel", True)
    assert fast_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", b"GET") is None  # not whole yet
    assert fast_head(b"HTTP/1.1 200 OK\r\n\r\n", b"GET") is None  # read until close: h11's


@pytest.mark.parametrize(("method", "path", "headers", "body"), [
    (b"GET", b"/", [], b""),
    (b"GET", b"/a/b?c=d", [(b"Accept", b"*/*"), (b"X-Forwarded-For", b"10.0.0.1")], b""),
    (b"POST", b"/form", [(b"Content-Type", b"text/plain")], b"hello"),
    (b"POST", b"/empty", [], b""),
    (b"PUT", b"/x", [(b"Content-Length", b"3")], b"abc"),
    (b"DELETE", b"/x", [], b""),
])
def test_a_request_head_is_what_h11_would_send(method: bytes, path: bytes,
                                               headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    outgoing = Outgoing(_TARGET, method, path, headers, body)
    client = h11.Connection(h11.CLIENT)
    h11_headers = [(b"Host", b"backend.example:8080"), *headers]
    declared = any(name.lower() == b"content-length" for name, _ in headers)
    if (body or method in (b"POST", b"PUT", b"PATCH")) and not declared:
        h11_headers.append((b"Content-Length", b"%d" % len(body)))
    sent = client.send(h11.Request(method=method, target=path, headers=h11_headers))
    assert sent is not None
    assert outgoing.head.lower() == sent.lower()  # h11 writes the names as given, we too
    assert outgoing.head.startswith(b"%s %s HTTP/1.1\r\nHost: backend.example:8080\r\n" % (method, path))
    assert outgoing.simple


def test_a_request_with_connection_or_upgrade_goes_the_h11_way() -> None:
    upgrade = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    outgoing = Outgoing(_TARGET, b"GET", b"/ws", upgrade, b"")
    assert not outgoing.simple
    assert outgoing.special == upgrade
    # The h11 that reads the answer knows a 101 may come.
    assert outgoing.parser().our_state is h11.MIGHT_SWITCH_PROTOCOL


@pytest.mark.parametrize(("headers", "body", "error"), [
    ([(b"Host", b"other")], b"", "multiple Host"),
    ([(b"Transfer-Encoding", b"chunked")], b"", "Transfer-Encoding"),
    ([(b"Content-Length", b"4")], b"abc", "differs"),
    ([(b"Content-Length", b"3"), (b"Content-Length", b"4")], b"abc", "conflicting"),
    ([(b"Content-Length", b"x")], b"", "bad Content-Length"),
    ([(b"Bad Name", b"v")], b"", None),
    ([(b"X", b"a\r\nInjected: 1")], b"", None),
])
def test_a_request_head_h11_would_refuse_is_refused(headers: list[tuple[bytes, bytes]], body: bytes,
                                                    error: str | None) -> None:
    with pytest.raises(LocalRequestError, match=error):
        Outgoing(_TARGET, b"POST", b"/", headers, body)


def test_a_streamed_body_is_chunked_unless_its_length_is_declared() -> None:
    async def chunks() -> object:  # never iterated: only its kind matters here
        yield b"x"

    assert b"Transfer-Encoding: chunked\r\n" in Outgoing(_TARGET, b"POST", b"/", [], chunks()).head  # type: ignore[arg-type]
    declared = Outgoing(_TARGET, b"POST", b"/", [(b"Content-Length", b"10")], chunks())  # type: ignore[arg-type]
    assert declared.length == 10 and b"chunked" not in declared.head
