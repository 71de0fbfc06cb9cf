"""A streamed response gathered into writes (``wstunnel.server.outgoing.ResponseBatch``), against
a body source and a memory stream: what goes out in each write, when the message ends, and when
credit goes back."""

from __future__ import annotations

from collections import deque

import pytest
import trio
import trio.testing

from wstunnel.headers import Headers
from wstunnel.server.fasthttp import DirectEncoder
from wstunnel.server.messages import StreamingResponse
from wstunnel.server.outgoing import SEND_BATCH, ResponseBatch, declared_length


class _Body:
    """A body source holding the chunks that have come so far (None: the end)."""

    def __init__(self, *chunks: bytes | None) -> None:
        self.waiting: deque[bytes | None] = deque(chunks)
        self.credited: list[int] = []
        self.trailers: Headers = []

    async def receive(self) -> bytes | None:
        return self.receive_nowait()

    def receive_nowait(self) -> bytes | None:
        if not self.waiting:
            raise trio.WouldBlock
        return self.waiting.popleft()

    def consumed(self, amount: int) -> None:
        self.credited.append(amount)

    def close(self) -> None:
        pass


def _batch(body: _Body, headers: Headers) -> tuple[ResponseBatch, StreamingResponse]:
    response = StreamingResponse(200, b"OK", headers, body)
    length = declared_length(headers)
    batch = ResponseBatch(DirectEncoder(length), response, length)
    batch.head(200, b"OK", headers)
    return batch, response


async def _written(batch: ResponseBatch) -> bytes:
    send, receive = trio.testing.memory_stream_one_way_pair()
    await batch.write(send)
    return bytes(await receive.receive_some())


@pytest.mark.parametrize(("headers", "expected"), [
    ([(b"Content-Length", b"12")], 12), ([(b"content-length", b"0")], 0), ([], None),
    ([(b"Content-Length", b"1"), (b"Content-Length", b"1")], None), ([(b"Content-Length", b"x")], None),
])
def test_declared_length(headers: Headers, expected: int | None) -> None:
    assert declared_length(headers) == expected


async def test_a_body_that_is_there_goes_out_with_its_head_in_one_write() -> None:
    body = _Body(b"hello ", b"world!")
    batch, response = _batch(body, [(b"Content-Length", b"12")])
    batch.take_ready()
    assert batch.done  # whole by its Content-Length: no need to wait for the stream's end
    assert await _written(batch) == b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello world!"
    assert (response.sent_bytes, body.credited) == (12, [12])  # credit once written


async def test_a_chunked_body_ends_with_the_source_and_its_credit_follows_each_write() -> None:
    body = _Body(b"abc")
    batch, response = _batch(body, [])
    batch.take_ready()
    assert not batch.done
    assert await _written(batch) == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    assert body.credited == [3]
    batch.add(b"de")
    batch.add(None)
    assert batch.done
    assert await _written(batch) == b"2\r\nde\r\n0\r\n\r\n"
    assert (response.sent_bytes, body.credited) == (5, [3, 2])


async def test_a_batch_takes_about_send_batch_bytes_and_leaves_the_rest() -> None:
    chunk = b"x" * (SEND_BATCH // 4)
    body = _Body(*[chunk] * 8)
    batch, _ = _batch(body, [(b"Content-Length", b"%d" % (len(chunk) * 8))])
    batch.take_ready()
    assert batch.size == SEND_BATCH and len(body.waiting) == 4 and not batch.done
