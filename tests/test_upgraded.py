"""The pipe of a connection a 101 switched (``wstunnel.server.upgraded``), between a trio memory
stream for the HTTP client and stand-ins for the tunnel's stream: bytes both ways, how each side's
end, break or silence ends the pipe, and what it reports."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from tests.support.bodies import FakeBody
from wstunnel.server.aborts import Cause, Cut
from wstunnel.server.messages import ResponseAborted, StreamingResponse
from wstunnel.server.upgraded import pipe_upgraded, switching_headers
from wstunnel.tunnel.endpoint import PIPE_LINGER

# Not waits: bounds on waits that should end sooner, so that a broken pipe fails the test instead
# of hanging it. In seconds of trio's clock: mock time in the tests that jump the clock.
PROMPTLY = 5.0
EVENTUALLY = 1000.0


class _Sink:
    """The tunnel's way up: each ``send`` arrives in ``received``; ``end`` arrives as None."""

    def __init__(self) -> None:
        self._in, self.received = trio.open_memory_channel[bytes | None](math.inf)

    async def send(self, data: bytes) -> None:
        self._in.send_nowait(data)

    def end(self) -> None:
        self._in.send_nowait(None)


@dataclass
class _Rig:
    client: trio.abc.HalfCloseableStream  # the HTTP client's end of its connection
    backend: FakeBody
    sink: _Sink
    response: StreamingResponse
    cuts: list[Cut] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)  # pipe_upgraded returned


@asynccontextmanager
async def _piping(*, first: bytes = b"", idle_timeout: float = math.inf,
                  receive_hook: Callable[[], Awaitable[object]] | None = None,
                  ) -> AsyncIterator[_Rig]:
    """A pipe running on the server's end of a memory stream pair; ``receive_hook`` runs before
    each read of the server's end (a reset can be raised from it)."""
    client, server = trio.testing.memory_stream_pair()
    if receive_hook is not None:
        receive = server.receive_stream
        assert isinstance(receive, trio.testing.MemoryReceiveStream)
        receive.receive_some_hook = receive_hook
    backend, sink = FakeBody(), _Sink()
    response = StreamingResponse(101, b"Switching Protocols", [], backend,
                                 idle_timeout=idle_timeout, upgraded=sink)
    rig = _Rig(client, backend, sink, response)

    async def run() -> None:
        await pipe_upgraded(server, response, sink, first, rig.cuts.append)
        rig.done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield rig


def _nothing_more(sink: _Sink) -> bool:
    try:
        sink.received.receive_nowait()
    except trio.WouldBlock:
        return True
    return False


def test_the_101_keeps_the_backends_headers_but_this_hops_own() -> None:
    backend = [(b"Upgrade", b"websocket"), (b"connection", b"upgrade"), (b"Keep-Alive", b"5"),
               (b"Content-Length", b"0"), (b"Transfer-Encoding", b"chunked"),
               (b"Sec-WebSocket-Accept", b"k")]
    assert switching_headers(backend) == [
        (b"Upgrade", b"websocket"), (b"Sec-WebSocket-Accept", b"k"), (b"Connection", b"Upgrade"),
    ]


async def test_bytes_pass_both_ways_until_both_sides_have_closed() -> None:
    with trio.fail_after(PROMPTLY):
        async with _piping(first=b"hello") as rig:
            assert await rig.sink.received.receive() == b"hello"  # before anything the client sends
            await rig.client.send_all(b"up")
            assert await rig.sink.received.receive() == b"up"
            rig.backend.put(b"down")
            assert await rig.client.receive_some() == b"down"
            rig.backend.put(None)
            assert await rig.client.receive_some() == b""  # the backend's end, as a half-close
            await rig.client.send_all(b"still up")  # the client's side stays open
            assert await rig.sink.received.receive() == b"still up"
            assert not rig.done.is_set()
            await rig.client.send_eof()
            assert await rig.sink.received.receive() is None
            await rig.done.wait()
    assert rig.cuts == []
    assert (rig.response.sent_bytes, [amount for amount, _ in rig.backend.credits]) == (4, [4])
    assert rig.response.received_bytes == len(b"hello" + b"up" + b"still up")


async def test_once_one_side_has_ended_the_other_gets_pipe_linger_to_follow(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(EVENTUALLY):
        async with _piping() as rig:
            rig.backend.put(None)
            assert await rig.client.receive_some() == b""
            ended = trio.current_time()
            await rig.done.wait()  # the client never closes its side
    assert trio.current_time() - ended == pytest.approx(PIPE_LINGER)
    assert rig.cuts == []  # an end that was not followed is no break
    assert _nothing_more(rig.sink)


async def test_a_pipe_that_carries_nothing_for_its_idle_timeout_is_cut_as_stalled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(EVENTUALLY):
        async with _piping(idle_timeout=30.0) as rig:
            start = trio.current_time()
            await trio.sleep(20)  # mock time: the clock jumps
            await rig.client.send_all(b"x")  # a byte up pushes the deadline on
            assert await rig.sink.received.receive() == b"x"
            await rig.done.wait()
    assert trio.current_time() - start == pytest.approx(20 + 30)
    assert rig.cuts == [Cut("response", Cause.STALLED, "nothing passed either way for 30s")]


async def test_a_broken_backend_is_reported_and_ends_the_way_up_too() -> None:
    cut = Cut("response", Cause.BACKEND_FAILED, "the backend's connection broke")
    with trio.fail_after(PROMPTLY):
        async with _piping() as rig:
            rig.backend.put(ResponseAborted(cut))
            await rig.done.wait()  # though the client has not closed its side
    assert rig.cuts == [cut]
    assert _nothing_more(rig.sink)  # no end told upward: the tunnel's stream is reset instead


async def test_a_client_reset_is_reported_as_gone_and_ends_the_way_down_too() -> None:
    reset = trio.Event()

    async def receive_hook() -> None:
        await reset.wait()
        raise trio.BrokenResourceError("connection reset by peer")

    with trio.fail_after(PROMPTLY):
        async with _piping(receive_hook=receive_hook) as rig:
            reset.set()
            await rig.done.wait()  # though the backend has not ended
    assert rig.cuts == [Cut("request", Cause.CLIENT_GONE, "the HTTP client went away")]
    assert _nothing_more(rig.sink)
