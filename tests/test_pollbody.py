"""The long-poll body codec, sans-I/O: length-prefixed messages in one HTTP body."""

from __future__ import annotations

import random
from collections import deque

import pytest

from wstunnel.tunnel import pollbody
from wstunnel.tunnel.pollbody import PollBodyError


def test_round_trip_keeps_order_and_empty_messages() -> None:
    messages = [b"", b"a", bytes(range(256)), random.Random(1).randbytes(70_000)]
    assert pollbody.decode(pollbody.encode(messages), max_message=100_000) == messages


def test_empty_body_is_no_message() -> None:
    assert pollbody.encode([]) == b""
    assert pollbody.decode(b"", max_message=10) == []


def test_length_is_u32_big_endian() -> None:
    assert pollbody.encode([b"xyz"]) == b"\x00\x00\x00\x03xyz"


@pytest.mark.parametrize("body", [
    pytest.param(b"\x00\x00\x00", id="partial-length"),
    pytest.param(b"\x00\x00\x00\x05abc", id="message-runs-past-the-end"),
    pytest.param(b"\x00\x00\x00\x01a\x00", id="trailing-garbage"),
    pytest.param(b"\xff\xff\xff\xff", id="huge-length"),
])
def test_malformed_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(PollBodyError):
        pollbody.decode(body, max_message=1000)


def test_message_over_the_limit_is_refused_before_reading_it() -> None:
    body = pollbody.encode([b"x" * 11])
    with pytest.raises(PollBodyError, match="exceeds 10"):
        pollbody.decode(body, max_message=10)


def test_take_batch_stays_within_the_limit_and_keeps_the_rest_in_order() -> None:
    queue = deque([b"a" * 60, b"b" * 60, b"c" * 10])
    first = pollbody.take_batch(queue, limit=130)
    assert first == [b"a" * 60, b"b" * 60]
    assert len(pollbody.encode(first)) <= 130
    assert list(queue) == [b"c" * 10]


def test_take_batch_always_takes_one_message_however_large() -> None:
    queue = deque([b"x" * 500, b"y"])
    assert pollbody.take_batch(queue, limit=100) == [b"x" * 500]
    assert pollbody.take_batch(queue, limit=100) == [b"y"]
    assert pollbody.take_batch(queue, limit=100) == []


def test_default_batch_fits_the_largest_v2_frame() -> None:
    assert pollbody.MAX_MESSAGE + pollbody.LENGTH.size <= pollbody.MAX_BATCH_BYTES
