"""DirectSocketStream: trio's stream contract, with writes that skip the scheduler when they can."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from wstunnel.tunnel.sockets import FAIR_WRITES, DirectSocketStream


def _pair() -> tuple[DirectSocketStream, trio.SocketStream]:
    left, right = trio.socket.socketpair()
    return DirectSocketStream(trio.SocketStream(left)), trio.SocketStream(right)


async def _read_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(65536)
        assert chunk, "the stream ended early"
        data += chunk
    return bytes(data)


async def test_bytes_arrive_whole_and_in_order() -> None:
    ours, peer = _pair()
    async with ours, peer:
        await ours.send_all(b"hello ")
        await ours.send_all(memoryview(b"world"))
        await ours.send_all(bytearray(b"!"))
        assert await _read_exactly(peer, 12) == b"hello world!"
        await peer.send_all(b"back")
        assert await ours.receive_some(10) == b"back"


class _Steps(trio.abc.Instrument):
    """Counts the scheduler steps of one task: each is a return from a yield."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def test_a_write_the_socket_takes_does_not_yield_until_the_fairness_turn() -> None:
    # Counted in the writer's own steps, not in another task's turns: trio may run the writer
    # first in the batch after its yield (it reverses batches at random), so another task's
    # count could stay the same although the writer did yield.
    ours, peer = _pair()
    async with ours, peer:
        steps = _Steps(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(steps)
        try:
            for _ in range(FAIR_WRITES - 1):
                await ours.send_all(b"x")
            assert steps.steps == 0  # no write yielded
            await ours.send_all(b"x")  # the FAIR_WRITES-th does
            assert steps.steps == 1
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert await _read_exactly(peer, FAIR_WRITES) == b"x" * FAIR_WRITES


async def test_a_full_socket_makes_the_writer_wait_for_the_reader() -> None:
    ours, peer = _pair()
    payload = bytes(range(256)) * 40_000  # ~10 MB: far more than the socket buffers hold
    async with ours, peer, trio.open_nursery() as nursery:
        received: list[bytes] = []

        async def reader() -> None:
            received.append(await _read_exactly(peer, len(payload)))

        with trio.fail_after(30):
            nursery.start_soon(reader)
            await ours.send_all(payload)
    assert received == [payload]


async def test_a_write_is_cancellable_before_it_starts() -> None:
    ours, peer = _pair()
    async with ours, peer:
        with trio.CancelScope() as scope:
            scope.cancel()
            await ours.send_all(b"never")
        assert scope.cancelled_caught
        with trio.move_on_after(0.2):
            assert await peer.receive_some(10) == b"", "nothing was written"


async def test_closed_and_broken_sockets_raise_trio_stream_errors() -> None:
    ours, peer = _pair()
    await peer.aclose()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first writes may still land in a buffer
            await ours.send_all(b"x" * 65536)
    await ours.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await ours.send_all(b"x")


async def test_closed_by_another_task_while_waiting_for_room() -> None:
    ours, peer = _pair()
    async with peer:
        errors: list[BaseException] = []

        async def writer() -> None:
            try:
                await ours.send_all(b"y" * 20_000_000)  # fills the buffers, then waits
            except trio.ClosedResourceError as exc:
                errors.append(exc)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                await trio.testing.wait_all_tasks_blocked()
                await ours.aclose()
        assert len(errors) == 1


async def test_writes_after_send_eof_are_refused_and_the_peer_sees_the_end() -> None:
    ours, peer = _pair()
    async with ours, peer:
        await ours.send_all(b"last")
        await ours.send_eof()
        assert await _read_exactly(peer, 4) == b"last"
        assert await peer.receive_some(10) == b""
        with pytest.raises(trio.ClosedResourceError):
            await ours.send_all(b"more")


async def test_two_writers_at_once_is_an_error() -> None:
    ours, peer = _pair()
    async with ours, peer:
        failures: list[BaseException] = []

        async def big() -> None:
            await ours.send_all(b"z" * 20_000_000)

        async def second() -> None:
            try:
                await ours.send_all(b"!")
            except trio.BusyResourceError as exc:
                failures.append(exc)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(big)
                await trio.testing.wait_all_tasks_blocked()  # big waits for room
                await second()
                nursery.cancel_scope.cancel()
        assert len(failures) == 1


# --- reads -------------------------------------------------------------------------------------


async def test_a_read_that_finds_data_yields_once_and_one_that_waits_does_not_yield_again() -> None:
    # trio's SocketStream does the same: a reader that always finds data still lets others run.
    ours, peer = _pair()
    async with ours, peer:
        await peer.send_all(b"ready")
        steps = _Steps(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(steps)
        try:
            assert await ours.receive_some(65536) == b"ready"
            assert steps.steps == 1
        finally:
            trio.lowlevel.remove_instrument(steps)

        async def later() -> None:
            await trio.testing.wait_all_tasks_blocked()
            await peer.send_all(b"late")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(later)
            steps = _Steps(trio.lowlevel.current_task())
            trio.lowlevel.add_instrument(steps)
            try:
                assert await ours.receive_some() == b"late"
                assert steps.steps == 1  # woken once by the data, no yield after it
            finally:
                trio.lowlevel.remove_instrument(steps)


async def test_a_read_takes_at_most_what_it_asks_for_and_an_empty_read_is_the_end() -> None:
    ours, peer = _pair()
    async with ours, peer:
        await peer.send_all(b"abcdef")
        assert await ours.receive_some(4) == b"abcd"
        assert await ours.receive_some(4) == b"ef"
        await peer.send_eof()
        assert await ours.receive_some(4) == b""
        with pytest.raises(ValueError, match="max_bytes"):
            await ours.receive_some(0)


async def test_a_read_is_cancellable_before_it_starts_and_takes_nothing_then() -> None:
    ours, peer = _pair()
    async with ours, peer:
        await peer.send_all(b"kept")
        with trio.CancelScope() as scope:
            scope.cancel()
            await ours.receive_some(10)
        assert scope.cancelled_caught
        assert await ours.receive_some(10) == b"kept"


async def test_a_waiting_read_ends_with_the_stream_errors_trio_gives() -> None:
    ours, peer = _pair()
    async with trio.open_nursery() as nursery:
        errors: list[BaseException] = []

        async def reader() -> None:
            try:
                await ours.receive_some(10)
            except trio.ClosedResourceError as exc:
                errors.append(exc)

        with trio.fail_after(30):
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await ours.aclose()  # closed by another task while the read waits
    assert len(errors) == 1
    with pytest.raises(trio.ClosedResourceError):
        await ours.receive_some(10)
    await peer.aclose()


async def test_a_reset_connection_is_a_broken_stream() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    async with trio.open_nursery() as nursery:
        accepted: list[trio.socket.SocketType] = []

        async def accept() -> None:
            sock, _ = await listener.accept()
            accepted.append(sock)

        nursery.start_soon(accept)
        client = await trio.open_tcp_stream(*listener.getsockname())
    ours = DirectSocketStream(client)
    # SO_LINGER 0: the close sends a reset, not a FIN
    accepted[0].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    accepted[0].close()
    listener.close()
    with trio.fail_after(30), pytest.raises(trio.BrokenResourceError):
        await ours.receive_some(10)
    await ours.aclose()
