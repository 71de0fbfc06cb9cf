"""wstunnel.http1 against h11, with generated heads: what our readers accept, h11 accepts and reads
the same; what h11 refuses, our readers refuse; what h11 accepts, our readers accept too unless it
has lines that are folded or end with a bare LF (the callers then leave it to h11); what our
writers let through, h11 reads back as written."""

from __future__ import annotations

import re

import h11
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wstunnel import http1
from wstunnel.headers import Headers
from wstunnel.http1._grammar import FIELD_BLOCK_RE, FIELD_LINE, FIELD_TEXT, FIELD_VCHAR

MANY = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Bytes chosen to sit on every edge of the grammar: token characters and separators, blanks,
# controls (NUL, CR, LF, VT, DEL), obs-text.
TRICKY = b"aZ09-!#$%&'*+.^_`|~:;,/?=()<>@[]{}\"\\ \t\x00\x01\r\n\x0b\x0c\x7f\x80\xff"
pieces = st.binary(max_size=12).map(lambda raw: bytes(TRICKY[b % len(TRICKY)] for b in raw))
tokens = st.sampled_from([b"X-Thing", b"accept", b"Set-Cookie", b"x_y", b"A"])
names = st.one_of(tokens, pieces)
values = st.one_of(st.sampled_from([b"", b"a b", b"v", b" x ", b"\tx\t", b"x\x80y", b"a\x01b"]), pieces)
methods = st.one_of(st.sampled_from([b"GET", b"POST", b"M-SEARCH"]), pieces)
targets = st.one_of(st.sampled_from([b"/", b"/a?b=c", b"*", b"http://h/x"]), pieces)
versions = st.sampled_from([b"1.1", b"1.0", b"2.0", b"1.1 ", b"11"])


def _agrees(ours: object, theirs: object, head: bytes) -> None:
    """Ours accepts only what h11 accepts, the same way, and declines only folded lines and bare
    LFs among what h11 accepts."""
    if ours is not None:
        assert ours == theirs
    elif theirs is not None:
        lines = head.replace(b"\r\n", b"\n").split(b"\n")
        assert head.count(b"\n") != head.count(b"\r\n") or any(
            line[:1] in (b" ", b"\t") for line in lines[1:]), head


def _h11_request(head: bytes) -> tuple[bytes, bytes, bytes, Headers] | None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request):
        return None
    headers = [(bytes(k), bytes(v)) for k, v in event.headers.raw_items()]
    return bytes(event.method), bytes(event.target), bytes(event.http_version), headers


def _ours_request(head: bytes) -> tuple[bytes, bytes, bytes, Headers] | None:
    split = http1.split_head(head)
    assert split is not None and split[2] == len(head)
    start, block, _end = split
    line = http1.parse_request_line(start)
    fields = http1.parse_fields(block)
    if line is None or fields is None:
        return None
    return line[0], line[1], line[2], fields


@MANY
@given(methods, targets, versions, st.lists(st.tuples(names, values), max_size=4),
       st.sampled_from([b": ", b":", b" : ", b":\t"]))
@example(b"GET", b"/", b"1.1", [(b"X", b"a\r\n b")], b": ")  # obs-fold
@example(b"GET", b"/", b"1.1", [(b"X", b"a\nb")], b": ")  # bare LF
@example(b"GET", b"/", b"1.1", [(b"X", b"a\rb")], b": ")  # bare CR
def test_request_heads_read_as_h11_reads_them(method: bytes, target: bytes, version: bytes,
                                              fields: list[tuple[bytes, bytes]], colon: bytes) -> None:
    # Exactly one Host and no framing fields: h11's rules about those are the callers' to apply.
    lines = [b"%s %s HTTP/%s" % (method, target, version), b"Host: example"]
    lines += [name + colon + value for name, value in fields
              if name.lower() not in (b"host", b"content-length", b"transfer-encoding")]
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    if head.count(b"\r\n\r\n") != 1:
        return  # a value that ends the head early: not one head
    _agrees(_ours_request(head), _h11_request(head), head)


def _h11_response(head: bytes) -> tuple[bytes, int, bytes, Headers] | None:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "t")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Response):
        return None
    headers = [(bytes(k), bytes(v)) for k, v in event.headers.raw_items()]
    return bytes(event.http_version), event.status_code, bytes(event.reason), headers


def _ours_response(head: bytes) -> tuple[bytes, int, bytes, Headers] | None:
    split = http1.split_head(head)
    assert split is not None
    start, block, _end = split
    line = http1.parse_status_line(start)
    fields = http1.parse_fields(block)
    if line is None or fields is None:
        return None
    return line[0], line[1], line[2], fields


@MANY
@given(versions, st.sampled_from([b"200", b"404", b"599", b"20", b"2000", b"2x0"]),
       st.one_of(st.sampled_from([b" OK", b"", b" ", b" Not  Found", b" \tx"]), pieces.map(b" ".__add__)),
       st.lists(st.tuples(names, values), max_size=4))
def test_response_heads_read_as_h11_reads_them(version: bytes, status: bytes, reason: bytes,
                                               fields: list[tuple[bytes, bytes]]) -> None:
    lines = [b"HTTP/%s %s%s" % (version, status, reason)]
    lines += [name + b": " + value for name, value in fields
              if name.lower() not in (b"content-length", b"transfer-encoding")]
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    if head.count(b"\r\n\r\n") != 1:
        return
    _agrees(_ours_response(head), _h11_response(head), head)


@MANY
@given(st.one_of(st.sampled_from([b"5", b"5, 5", b"5,6", b"", b" 7 ", b"0" * 20, b"0" * 21, b"1,,1"]),
                 pieces))
def test_content_length_as_h11_reads_it(value: bytes) -> None:
    if b"\r" in value or b"\n" in value:
        return  # line ends inside the value: the field grammar's test, not this one
    head = b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\n"
    read = _h11_response(head)
    ours = http1.content_length(value.strip(b" \t"))
    if read is None:
        # h11 refused the head: for its field grammar, or for the length itself.
        assert http1.parse_fields(b"Content-Length: " + value + b"\r\n") is None or ours is None
    else:
        assert read[3] == [(b"Content-Length", ours)]


@MANY
@given(names, values)
def test_what_check_field_lets_through_h11_reads_back_unchanged(name: bytes, value: bytes) -> None:
    if name.lower() in (b"host", b"content-length", b"transfer-encoding"):
        return
    try:
        http1.check_field(name, value)
    except http1.HeadError:
        allowed = False
    else:
        allowed = True
    head = http1.head_bytes(http1.request_line(b"GET", b"/"), [(b"Host", b"h"), (name, value)])
    read = _h11_request(head) if head.count(b"\r\n\r\n") == 1 else None
    round_trip = read is not None and read[3] == [(b"Host", b"h"), (name, value)]
    assert allowed == round_trip


def test_field_text_is_a_field_vchar_or_a_blank() -> None:
    for byte in (bytes([b]) for b in range(256)):
        either = re.fullmatch(FIELD_VCHAR, byte) is not None or byte in (b" ", b"\t")
        assert (re.fullmatch(FIELD_TEXT, byte) is not None) == either, byte


@MANY
@given(st.lists(st.one_of(pieces, st.binary(max_size=8)), min_size=1, max_size=4))
@example([b"X: a b \t"])
@example([b"X:\x0bv"])
@example([b"X: a\r\nY: b"])
@example([b"X: a\r\n b"])
def test_the_block_regex_reads_field_lines_as_the_grammar_says(lines: list[bytes]) -> None:
    # FIELD_BLOCK_RE says what follows a field line's colon as one character class: it must
    # accept exactly the blocks whose every line is a FIELD_LINE of the ABNF.
    block = b"".join(line + b"\r\n" for line in lines)
    by_grammar = all(re.fullmatch(FIELD_LINE, line) is not None for line in block.split(b"\r\n")[:-1])
    assert (FIELD_BLOCK_RE.fullmatch(block) is not None) == by_grammar


@pytest.mark.parametrize(("method", "target", "error"), [
    (b"GE T", b"/", "Illegal method characters"),
    (b"GET", b"/a b", "Illegal target characters"),
    (b"GET", b"", "Illegal target characters"),
])
def test_start_line_checks(method: bytes, target: bytes, error: str) -> None:
    with pytest.raises(http1.HeadError, match=error):
        http1.check_method(method)
        http1.check_target(target)


def test_split_head_waits_for_the_end_and_leaves_the_body() -> None:
    assert http1.split_head(b"HTTP/1.1 200 OK\r\nA: b\r\n") is None
    data = b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody"
    assert http1.split_head(data) == (b"HTTP/1.1 200 OK", b"A: b\r\n", len(data) - 4)
    assert http1.split_head(b"GET / HTTP/1.1\r\n\r\n") == (b"GET / HTTP/1.1", b"", 18)


def test_head_bytes_writes_lines_in_order() -> None:
    assert http1.head_bytes(http1.status_line(204, b"No Content"), [(b"A", b"1"), (b"b", b"")]) == \
        b"HTTP/1.1 204 No Content\r\nA: 1\r\nb: \r\n\r\n"
