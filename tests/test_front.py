"""The HTTP front's response writing, over trio memory streams: what goes out in which write, and
when a streamed body's credit goes back."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import h11
import pytest
import trio
import trio.testing

from tests.support.bodies import FakeBody
from wstunnel.alarms import Alarms
from wstunnel.headers import Headers
from wstunnel.server.aborts import Cause, Cut
from wstunnel.server.front import (
    KEEPALIVE_TIMEOUT,
    FrontLimits,
    HttpConnection,
    ResponseAborted,
    StreamingResponse,
)
from wstunnel.server.incoming import IncomingRequest

LIMITS = FrontLimits(max_header_size=16 * 1024, max_header_count=100,
                     max_body_size=1024 * 1024, header_timeout=5.0)
GET = b"GET /x HTTP/1.1\r\nHost: example\r\n\r\n"


class Recording(trio.abc.HalfCloseableStream):
    """The server's end of the connection, noting each write."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def written(self) -> int:
        return sum(len(w) for w in self.writes)


def _response(body: FakeBody, headers: Headers | None = None) -> StreamingResponse:
    return StreamingResponse(status=200, reason=b"OK", headers=headers or [], body=body)


def _connection(stream: Recording,
                respond: Callable[[IncomingRequest], Awaitable[StreamingResponse]],
                alarms: Alarms | None = None) -> HttpConnection:
    """The front's connection on ``stream``, answering with ``respond`` (never a tunnel)."""

    async def take_tunnel(request: IncomingRequest, stream: object) -> None:
        raise AssertionError("not a tunnel")

    return HttpConnection(
        stream, "127.0.0.1", LIMITS,  # type: ignore[arg-type]
        respond=respond, is_tunnel=lambda request: False,
        take_tunnel=take_tunnel,  # type: ignore[arg-type]
        draining=lambda: False, alarms=alarms if alarms is not None else Alarms(),
    )


async def _serve(server: Recording, response: StreamingResponse) -> None:
    async def respond(request: IncomingRequest) -> StreamingResponse:
        return response

    await _connection(server, respond).serve()


async def _read_response(client: trio.abc.Stream, parser: h11.Connection,
                         *, until: type = h11.EndOfMessage) -> list[h11.Event]:
    """Events of one response, up to the first ``until`` (or the connection's end)."""
    events: list[h11.Event] = []
    while True:
        event = parser.next_event()
        if event is h11.NEED_DATA:
            parser.receive_data(await client.receive_some(65536))
            continue
        events.append(event)
        if isinstance(event, until | h11.ConnectionClosed):
            return events


def _pair() -> tuple[trio.abc.HalfCloseableStream, Recording, h11.Connection]:
    client, server = trio.testing.memory_stream_pair()
    parser = h11.Connection(h11.CLIENT)
    parser.send(h11.Request(method="GET", target="/x", headers=[("Host", "example")]))
    parser.send(h11.EndOfMessage())
    return client, Recording(server), parser


async def test_head_and_ready_body_go_out_in_one_write() -> None:
    client, server, parser = _pair()
    body = FakeBody(b"a" * 600, b"b" * 424, None)
    body.on_credit = server.written
    response = _response(body, [(b"Content-Length", b"1024")])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve, server, response)
        await client.send_all(GET)
        events = await _read_response(client, parser)
        await client.aclose()
    assert len(server.writes) == 1
    assert isinstance(events[0], h11.Response) and events[0].status_code == 200
    assert b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data)) == \
        b"a" * 600 + b"b" * 424
    assert response.sent_bytes == 1024
    assert [amount for amount, _ in body.credits] == [1024]
    assert body.credits[0][1] == server.written()  # credited once written, not before


async def test_chunked_body_ready_with_its_end_and_trailers_in_one_write() -> None:
    client, server, parser = _pair()
    body = FakeBody(b"hello", b" world", None)
    body.trailers = [(b"X-Sum", b"42")]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve, server, _response(body))
        await client.send_all(GET)
        events = await _read_response(client, parser)
        await client.aclose()
    assert len(server.writes) == 1
    assert server.writes[0].endswith(b"0\r\nX-Sum: 42\r\n\r\n")
    end = events[-1]
    assert isinstance(end, h11.EndOfMessage) and list(end.headers) == [(b"x-sum", b"42")]


async def test_head_goes_out_before_a_slow_body() -> None:
    client, server, parser = _pair()
    body = FakeBody()
    body.on_credit = server.written
    response = _response(body, [(b"Content-Type", b"text/event-stream")])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve, server, response)
        await client.send_all(GET)
        with trio.fail_after(2):
            head = await _read_response(client, parser, until=h11.Response)
        assert isinstance(head[0], h11.Response)
        assert len(server.writes) == 1 and not body.credits
        for event in (b"data: 1\n\n", b"data: 2\n\n"):
            body.put(event)
            with trio.fail_after(2):
                data = await _read_response(client, parser, until=h11.Data)
            assert isinstance(data[0], h11.Data) and bytes(data[0].data) == event
            assert body.credits[-1] == (len(event), server.written())
        body.put(None)
        events = await _read_response(client, parser)
        assert isinstance(events[-1], h11.EndOfMessage)
        await client.aclose()
    assert response.sent_bytes == 18


async def test_response_ends_at_its_content_length_without_waiting_for_the_end() -> None:
    client, server, parser = _pair()
    body = FakeBody(b"12345")  # no end yet: the stream's END may come much later
    response = _response(body, [(b"Content-Length", b"5")])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve, server, response)
        await client.send_all(GET)
        with trio.fail_after(2):
            events = await _read_response(client, parser)
        assert isinstance(events[-1], h11.EndOfMessage)
        await client.aclose()
    assert len(server.writes) == 1 and body.closed


async def test_head_request_sends_no_body_and_reads_none() -> None:
    client, server, _ = _pair()
    parser = h11.Connection(h11.CLIENT)
    parser.send(h11.Request(method="HEAD", target="/x", headers=[("Host", "example")]))
    parser.send(h11.EndOfMessage())
    body = FakeBody(b"never sent", None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve, server, _response(body, [(b"Content-Length", b"10")]))
        await client.send_all(b"HEAD /x HTTP/1.1\r\nHost: example\r\n\r\n")
        events = await _read_response(client, parser)
        await client.aclose()
    assert [type(e) for e in events] == [h11.Response, h11.EndOfMessage]
    assert b"never sent" not in b"".join(server.writes)
    assert body.closed and not body.credits


@pytest.mark.parametrize("failure", [ResponseAborted(Cut("response", Cause.RESET, "reset")), None])
async def test_broken_body_sends_what_came_before_then_drops_the_connection(
    failure: Exception | None,
) -> None:
    client, server, _ = _pair()
    if failure is None:  # more than the Content-Length: h11 refuses the extra chunk
        body = FakeBody(b"abc", b"defgh", None)
        headers: Headers = [(b"Content-Length", b"4")]
    else:
        body = FakeBody(b"abc", failure)
        headers = []
    async with trio.open_nursery() as nursery:
        response = _response(body, headers)
        nursery.start_soon(_serve, server, response)
        await client.send_all(GET)
        with trio.fail_after(2):
            received = b""
            while chunk := await client.receive_some(65536):
                received += chunk
        await client.aclose()
    assert received.startswith(b"HTTP/1.1 200 ")
    assert b"abc" in received
    assert not received.endswith(b"0\r\n\r\n")  # never a clean end
    assert body.closed
    # The break is told (HTTP ABORT, by the forwarder's on_finish), with its cause.
    assert response.cut is not None
    assert response.cut.cause == (Cause.RESET if failure else Cause.BAD_FRAMING)


async def test_keep_alive_serves_the_next_request_after_a_batched_response() -> None:
    client, server, parser = _pair()
    bodies = [FakeBody(b"one", None), FakeBody(b"two", None)]

    async def respond(request: IncomingRequest) -> StreamingResponse:
        return _response(bodies.pop(0), [(b"Content-Length", b"3")])

    connection = _connection(server, respond)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.serve)
        await client.send_all(GET + GET)  # pipelined
        first = await _read_response(client, parser)
        parser.start_next_cycle()
        parser.send(h11.Request(method="GET", target="/x", headers=[("Host", "example")]))
        parser.send(h11.EndOfMessage())
        second = await _read_response(client, parser)
        await client.aclose()
    assert [bytes(e.data) for e in first + second if isinstance(e, h11.Data)] == [b"one", b"two"]
    assert len(server.writes) == 2


@pytest.mark.parametrize("method, status", [(b"GET", 204), (b"GET", 304), (b"HEAD", 200)])
async def test_keep_alive_serves_the_next_request_after_a_bodyless_response(
    method: bytes, status: int
) -> None:
    """A bodyless response ends with its head, for h11 too: the connection stays usable."""
    client, server = trio.testing.memory_stream_pair()
    recording = Recording(server)
    answered: list[bytes] = []

    async def respond(request: IncomingRequest) -> StreamingResponse:
        answered.append(request.method)
        headers = [(b"Content-Length", b"5")] if method == b"HEAD" else []
        return StreamingResponse(status=status, reason=b"X", headers=headers,
                                 body=FakeBody(None))

    connection = _connection(recording, respond)
    parser = h11.Connection(h11.CLIENT)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve)
            for _ in range(2):
                request = h11.Request(method=method, target="/x", headers=[("Host", "example")])
                await client.send_all(parser.send(request) + parser.send(h11.EndOfMessage()))
                events = await _read_response(client, parser)
                assert [type(e) for e in events] == [h11.Response, h11.EndOfMessage]
                assert isinstance(events[0], h11.Response) and events[0].status_code == status
                parser.start_next_cycle()
            await client.aclose()
    assert answered == [method, method]


async def test_stalled_body_drops_the_connection_after_the_idle_timeout() -> None:
    client, server, parser = _pair()
    body = FakeBody(b"first")
    response = _response(body)
    response.idle_timeout = 0.2
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve, server, response)
        await client.send_all(GET)
        with trio.fail_after(2):
            events = await _read_response(client, parser, until=h11.Data)
            assert bytes(events[-1].data) == b"first"  # type: ignore[attr-defined]
            start = trio.current_time()
            assert await client.receive_some(65536) == b""  # closed, with no last chunk
            assert trio.current_time() - start >= 0.15
    assert body.closed


# -- the head's deadline: one alarm per wait, one cancel scope per connection ----------------


async def _answer_ok(request: IncomingRequest) -> StreamingResponse:
    return _response(FakeBody(b"ok", None), [(b"Content-Length", b"2")])


async def test_a_head_not_in_by_its_deadline_gets_408_and_a_silent_wait_none(
        autojump_clock: trio.testing.MockClock) -> None:
    alarms = Alarms()
    with trio.fail_after(KEEPALIVE_TIMEOUT * 2):  # mock time: a deadline missed fails, no hang
        await _two_waits_past_their_deadlines(alarms)
    assert alarms.armed == 0


async def _two_waits_past_their_deadlines(alarms: Alarms) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(alarms.run)
        # Part of a head, then nothing: 408 at header_timeout (not before), and the end.
        client, server = trio.testing.memory_stream_pair()
        start = trio.current_time()
        nursery.start_soon(_connection(Recording(server), _answer_ok, alarms).serve)
        await client.send_all(b"GET /x HTTP/1.1\r\nHost: exa")
        parser = h11.Connection(h11.CLIENT)
        parser.send(h11.Request(method="GET", target="/x", headers=[("Host", "example")]))
        events = await _read_response(client, parser)
        assert isinstance(events[0], h11.Response) and events[0].status_code == 408
        assert LIMITS.header_timeout <= trio.current_time() - start <= LIMITS.header_timeout + 0.1
        # A request served, then silence past the keep-alive wait: closed without a word.
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(_connection(Recording(server), _answer_ok, alarms).serve)
        parser = h11.Connection(h11.CLIENT)
        await client.send_all(GET)
        parser.send(h11.Request(method="GET", target="/x", headers=[("Host", "example")]))
        parser.send(h11.EndOfMessage())
        await _read_response(client, parser)
        answered = trio.current_time()
        assert await client.receive_some(65536) == b""
        assert trio.current_time() - answered >= KEEPALIVE_TIMEOUT
        nursery.cancel_scope.cancel()


async def test_a_head_whole_just_as_its_deadline_passes_gets_408_not_a_cut_answer() -> None:
    """The alarm cancels the connection's scope while the head's last bytes are on their way
    to the reading task: the scope cannot be uncancelled, so the request is not started (its
    forwarding would be cut at its first wait) and the client hears why."""
    alarms = Alarms()
    incoming = trio.testing.MemoryReceiveStream()
    outgoing = trio.testing.MemorySendStream()
    answered: list[IncomingRequest] = []

    async def respond(request: IncomingRequest) -> StreamingResponse:
        answered.append(request)
        return await _answer_ok(request)

    connection = _connection(Recording(trio.StapledStream(outgoing, incoming)),  # type: ignore[arg-type]
                             respond, alarms)
    with trio.fail_after(5):
        await _race(connection, incoming, alarms)
    parser = h11.Connection(h11.CLIENT)
    parser.send(h11.Request(method="GET", target="/x", headers=[("Host", "example")]))
    parser.send(h11.EndOfMessage())
    parser.receive_data(outgoing.get_data_nowait())
    event = parser.next_event()
    assert isinstance(event, h11.Response) and event.status_code == 408
    assert answered == []


async def _race(connection: HttpConnection, incoming: trio.testing.MemoryReceiveStream,
                alarms: Alarms) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.serve)
        await trio.testing.wait_all_tasks_blocked()  # waiting for the head
        assert alarms.armed == 1
        incoming.put_data(GET)  # wakes the reader; it has not run yet...
        alarms.fire_due(math.inf)  # ...when the alarm goes off


async def test_header_look_ups_take_the_first_value_whatever_the_case() -> None:
    request = IncomingRequest(
        method=b"GET", target=b"/", peer="127.0.0.1",
        headers=[(b"Host", b"a"), (b"X-Token", b"first"), (b"x-token", b"second")],
    )
    assert request.header(b"x-token") == b"first"
    assert request.header(b"host") == b"a"
    assert request.header(b"content-length") is None
    assert request.declared_length() == 0
