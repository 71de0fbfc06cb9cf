"""FrameOutbox: the order frames leave in, and how a batching tunnel groups them."""

from __future__ import annotations

import trio
import trio.testing

from wstunnel import v2
from wstunnel.tunnel.outbox import (
    BACKLOG_HIGH_WATER,
    BUSY_SHARE,
    EARLY_SEND_FRAMES,
    EARLY_SEND_IDLE,
    LOAD_WINDOW,
    FrameOutbox,
    ProcessLoad,
)


def busy() -> float:
    """A clock that never moves: the tunnel never counts as idle (EARLY_SEND_IDLE), so what
    these tests see of batching does not hang on how fast the machine runs them."""
    return 0.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def frames(count: int, size: int = 10) -> list[bytes]:
    return [bytes([index % 256]) * size for index in range(count)]


async def test_plain_v2_sends_one_frame_a_message_in_order() -> None:
    outbox = FrameOutbox(batched=False, clock=busy)
    for frame in frames(3):
        outbox.put(frame)
    assert [await outbox.next_message() for _ in range(3)] == frames(3)


async def test_batched_sends_every_waiting_frame_in_one_message() -> None:
    outbox = FrameOutbox(batched=True, clock=busy)
    for frame in frames(5):
        outbox.put(frame)
    message = await outbox.next_message()
    assert message is not None
    assert [bytes(entry) for entry in v2.unpack_batch(message)] == frames(5)
    outbox.put(b"z" * 6)
    lone = await outbox.next_message()
    assert lone is not None and [bytes(e) for e in v2.unpack_batch(lone)] == [b"z" * 6]


async def test_a_batch_stays_within_max_batch_size_and_keeps_the_order() -> None:
    outbox = FrameOutbox(batched=True, clock=busy)
    sent = frames(40, size=v2.MAX_FRAME_PAYLOAD + v2.HEADER_SIZE)  # 2.5 MiB in all
    for frame in sent:
        outbox.put(frame)
    received: list[bytes] = []
    while len(received) < len(sent):
        message = await outbox.next_message()
        assert message is not None and len(message) <= v2.MAX_BATCH_SIZE
        received += [bytes(entry) for entry in v2.unpack_batch(message)]
    assert received == sent


async def test_the_writer_waits_for_a_frame_and_ends_after_close() -> None:
    outbox = FrameOutbox(batched=False, clock=busy)
    got: list[bytes | None] = []

    async def writer() -> None:
        while (message := await outbox.next_message()) is not None:
            got.append(message)
        got.append(None)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            outbox.put(b"a" * 6)
            await trio.testing.wait_all_tasks_blocked()
            assert got == [b"a" * 6]
            outbox.put(b"b" * 6)
            outbox.close()
            outbox.put(b"c" * 6)  # after close: dropped, as the tunnel is gone
    assert got == [b"a" * 6, b"b" * 6, None]


class RecordingTransport:
    """Records messages; each send waits until ``release`` allows it (to hold one in flight)."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self.senders: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.release = trio.Event()
        self.release.set()

    async def send_message(self, message: str | bytes) -> None:
        assert isinstance(message, bytes)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.release.wait()
            await trio.lowlevel.checkpoint()
            self.sent.append([bytes(entry) for entry in v2.unpack_batch(message)])
            self.senders.append(trio.lowlevel.current_task().name)
        finally:
            self.in_flight -= 1


async def test_a_batchs_worth_is_sent_early_by_the_task_that_filled_it() -> None:
    outbox = FrameOutbox(batched=True, clock=busy)
    transport = RecordingTransport()
    sent = frames(EARLY_SEND_FRAMES)
    for frame in sent[:-1]:
        outbox.put(frame)
    await outbox.send_early(transport)  # type: ignore[arg-type]
    assert transport.sent == []  # one short: left for the writer
    outbox.put(sent[-1])
    await outbox.send_early(transport)  # type: ignore[arg-type]
    assert transport.sent == [sent]
    assert transport.senders == [trio.lowlevel.current_task().name]


async def test_a_plain_v2_outbox_never_sends_early() -> None:
    outbox = FrameOutbox(batched=False, clock=busy)
    transport = RecordingTransport()
    for frame in frames(EARLY_SEND_FRAMES * 2):
        outbox.put(frame)
    await outbox.send_early(transport)  # type: ignore[arg-type]
    assert transport.sent == []


async def test_one_message_on_its_way_at_a_time_and_the_order_kept() -> None:
    outbox = FrameOutbox(batched=True, clock=busy)
    transport = RecordingTransport()
    transport.release = trio.Event()  # the writer's first message stays on its way
    sent = frames(3 * EARLY_SEND_FRAMES + 1)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.pump, transport, name="writer")
            outbox.put(sent[0])
            await trio.testing.wait_all_tasks_blocked()
            assert transport.in_flight == 1
            for frame in sent[1:EARLY_SEND_FRAMES + 1]:
                outbox.put(frame)
            await outbox.send_early(transport)  # type: ignore[arg-type]
            assert transport.in_flight == 1  # not while the writer's message is on its way
            transport.release.set()
            await trio.testing.wait_all_tasks_blocked()
            for frame in sent[EARLY_SEND_FRAMES + 1:]:
                outbox.put(frame)
            await outbox.send_early(transport)  # type: ignore[arg-type]
            await trio.testing.wait_all_tasks_blocked()
            outbox.close()
    assert transport.most_in_flight == 1
    assert [frame for message in transport.sent for frame in message] == sent
    assert transport.senders[0] == "writer" and len(transport.sent) == 3


async def test_an_early_send_finishes_even_if_its_caller_is_cancelled() -> None:
    outbox = FrameOutbox(batched=True, clock=busy)
    transport = RecordingTransport()
    for frame in frames(EARLY_SEND_FRAMES):
        outbox.put(frame)
    with trio.CancelScope() as scope:
        scope.cancel()
        await outbox.send_early(transport)  # type: ignore[arg-type]
    assert transport.sent == [frames(EARLY_SEND_FRAMES)]


async def test_a_sender_waits_while_the_backlog_is_over_its_mark_and_goes_on_at_half() -> None:
    """Bytes beyond BACKLOG_HIGH_WATER wait in their sender, not here: what comes later (a small
    response's head) is never queued behind a whole window of a bulk transfer."""
    outbox = FrameOutbox(batched=False, clock=busy)  # one frame a message: the backlog shrinks step by step
    frame = b"d" * (16 * 1024)
    while outbox.backlog <= BACKLOG_HIGH_WATER:
        outbox.put(frame)
    room = trio.Event()

    async def sender() -> None:
        await outbox.wait_room()
        room.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            while outbox.backlog > BACKLOG_HIGH_WATER // 2:
                await trio.testing.wait_all_tasks_blocked()
                assert not room.is_set(), outbox.backlog
                await outbox.next_message()
            await room.wait()
    await outbox.wait_room()  # under the mark: at once


async def test_a_closed_outbox_lets_its_waiting_senders_go() -> None:
    outbox = FrameOutbox(batched=False, clock=busy)
    outbox.put(b"x" * (BACKLOG_HIGH_WATER + 1))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.wait_room)
            await trio.testing.wait_all_tasks_blocked()
            outbox.close()


async def test_a_quiet_tunnels_frames_leave_from_the_task_that_put_them() -> None:
    outbox = FrameOutbox(batched=True, clock=busy)
    transport = RecordingTransport()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.pump, transport, name="writer")
            await trio.testing.wait_all_tasks_blocked()
            outbox.hold()
            outbox.put(b"h" * 6)
            outbox.put(b"d" * 6)
            await outbox.send_early(transport, quiet=True)  # type: ignore[arg-type]
            assert transport.sent == [[b"h" * 6, b"d" * 6]]
            assert transport.senders == [trio.lowlevel.current_task().name]
            outbox.close()


async def test_held_frames_wait_for_their_task_and_others_frames_still_wake_the_writer() -> None:
    outbox = FrameOutbox(batched=True, clock=busy)
    transport = RecordingTransport()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.pump, transport, name="writer")
            await trio.testing.wait_all_tasks_blocked()
            outbox.hold()
            outbox.put(b"a" * 6)
            # (A test may look; a holder must not checkpoint before its send_early.)
            await trio.testing.wait_all_tasks_blocked()
            assert transport.sent == []  # the writer was not woken for them
            await outbox.send_early(transport)  # type: ignore[arg-type]  # not quiet: the writer's
            await trio.testing.wait_all_tasks_blocked()
            assert transport.sent == [[b"a" * 6]] and transport.senders == ["writer"]

            outbox.hold()
            outbox.put(b"b" * 6)

            async def other() -> None:
                outbox.put(b"c" * 6)

            nursery.start_soon(other)
            await trio.testing.wait_all_tasks_blocked()
            assert transport.sent[1:] == [[b"b" * 6, b"c" * 6]]  # another task's frame woke it
            outbox.release()
            outbox.close()
    assert transport.senders == ["writer", "writer"]


async def test_a_quiet_send_waits_behind_a_message_on_its_way() -> None:
    outbox = FrameOutbox(batched=True, clock=busy)
    transport = RecordingTransport()
    transport.release = trio.Event()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.pump, transport, name="writer")
            outbox.put(b"1" * 6)
            await trio.testing.wait_all_tasks_blocked()
            assert transport.in_flight == 1
            outbox.hold()
            outbox.put(b"2" * 6)
            await outbox.send_early(transport, quiet=True)  # type: ignore[arg-type]
            assert transport.in_flight == 1  # left for the writer, in order
            transport.release.set()
            await trio.testing.wait_all_tasks_blocked()
            outbox.close()
    assert transport.sent == [[b"1" * 6], [b"2" * 6]]
    assert transport.most_in_flight == 1


async def test_an_early_send_outlives_its_tasks_cancellation_but_not_the_tunnels_end() -> None:
    """A request's cancellation must not cut its message in half while the tunnel lives; once
    the tunnel is over (a link that fell silent: the send waits for room that never comes),
    ``abort`` ends the send, so the nursery of the session's handlers can close."""
    outbox = FrameOutbox(batched=True, clock=busy)
    transport = RecordingTransport()
    transport.release = trio.Event()  # the link: silent
    done: list[str] = []

    async def request() -> None:
        outbox.hold()
        outbox.put(b"r" * 6)
        await outbox.send_early(transport, quiet=True)  # type: ignore[arg-type]
        done.append("returned")  # cancelled at its next checkpoint, never here
        await trio.lowlevel.checkpoint()

    async def watchdog() -> None:  # a shielded wait ignores fail_after: the link comes back
        await trio.sleep(10)
        done.append("the link came back first")
        transport.release.set()

    async with trio.open_nursery() as outer:
        outer.start_soon(watchdog)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request)
            await trio.testing.wait_all_tasks_blocked()
            assert transport.in_flight == 1
            nursery.cancel_scope.cancel()
            # Cancelled, the request still waits on its message: the shield holds.
            with trio.CancelScope(shield=True):
                await trio.testing.wait_all_tasks_blocked()
            assert transport.in_flight == 1 and done == []
            outbox.abort()
        outer.cancel_scope.cancel()
    assert transport.in_flight == 0 and transport.sent == [] and done == ["returned"]


async def test_after_abort_no_early_send_starts_and_the_writer_ends() -> None:
    """The handlers' last sends (in their finally clauses) may come after the session's abort:
    they must not start a shielded send to the dead link."""
    outbox = FrameOutbox(batched=True, clock=busy)
    transport = RecordingTransport()
    transport.release = trio.Event()  # the link: silent
    outbox.put(b"a" * 6)
    outbox.abort()
    outbox.put(b"b" * 6)  # dropped: the tunnel is gone

    async def watchdog() -> None:
        await trio.sleep(10)
        transport.release.set()

    async with trio.open_nursery() as outer:
        outer.start_soon(watchdog)
        with trio.CancelScope() as cancelled:
            cancelled.cancel()  # as a handler's finally clause runs: cancelled
            await outbox.send_early(transport, quiet=True)  # type: ignore[arg-type]
        outer.cancel_scope.cancel()
    assert transport.sent == [] and transport.in_flight == 0
    assert await outbox.next_message() is None  # nothing is left for the writer: it ends


async def test_abort_lets_go_of_the_frames_nobody_will_send() -> None:
    """A tunnel that ends with its peer's windows' worth of DATA queued must not keep it until
    the last reference to the tunnel goes (found by tests/test_stream_leaks.py: 7.8 MiB of DATA
    frames alive after 300 aborted streams, once request bodies started with 2 MiB windows)."""
    outbox = FrameOutbox(batched=False, clock=busy)
    for _ in range(8):
        outbox.put(bytes(64 * 1024))
    assert outbox.backlog == 8 * 64 * 1024
    outbox.abort()
    assert outbox.backlog == 0
    assert await outbox.next_message() is None
    assert await outbox.next_message() is None


async def test_an_idle_tunnels_frames_leave_at_once_and_a_busy_ones_wait_for_a_batch() -> None:
    clock = Clock()
    outbox = FrameOutbox(batched=True, clock=clock, load=lambda: 0.1)  # a process with time to spare
    transport = RecordingTransport()
    outbox.put(b"a" * 6)
    clock.now = EARLY_SEND_IDLE / 2  # a message went (the opening's) just now: busy
    await outbox.send_early(transport)  # type: ignore[arg-type]
    assert transport.sent == []  # left for the writer, for others to join
    outbox.put(b"b" * 6)
    clock.now = EARLY_SEND_IDLE  # nothing sent for EARLY_SEND_IDLE: idle
    await outbox.send_early(transport)  # type: ignore[arg-type]
    assert transport.sent == [[b"a" * 6, b"b" * 6]]
    assert transport.senders == [trio.lowlevel.current_task().name]
    # That send made the tunnel busy again, until EARLY_SEND_IDLE later.
    outbox.put(b"c" * 6)
    clock.now += EARLY_SEND_IDLE * 0.9
    await outbox.send_early(transport)  # type: ignore[arg-type]
    assert len(transport.sent) == 1
    outbox.put(b"d" * 6)
    clock.now += EARLY_SEND_IDLE * 0.1
    await outbox.send_early(transport)  # type: ignore[arg-type]
    assert transport.sent[1:] == [[b"c" * 6, b"d" * 6]]


async def test_an_idle_plain_v2_tunnel_still_leaves_its_frames_to_the_writer() -> None:
    clock = Clock()
    outbox = FrameOutbox(batched=False, clock=clock, load=lambda: 0.0)
    transport = RecordingTransport()
    outbox.put(b"a" * 6)
    clock.now = 10.0
    await outbox.send_early(transport)  # type: ignore[arg-type]
    assert transport.sent == []


async def test_an_idle_tunnel_in_a_busy_process_still_waits_for_a_batch() -> None:
    # The tunnel went quiet because its peer is working through a batch, say: this process has
    # no time to spare for messages of one request each.
    clock = Clock()
    outbox = FrameOutbox(batched=True, clock=clock, load=lambda: BUSY_SHARE)
    transport = RecordingTransport()
    outbox.put(b"a" * 6)
    clock.now = EARLY_SEND_IDLE * 10
    await outbox.send_early(transport)  # type: ignore[arg-type]
    assert transport.sent == []


def test_process_load_is_cpu_time_over_wall_time_per_window() -> None:
    wall, cpu = Clock(), Clock()
    load = ProcessLoad(wall=wall, cpu=cpu)
    assert load() == 0.0
    wall.now, cpu.now = LOAD_WINDOW / 2, LOAD_WINDOW / 2
    assert load() == 0.0  # within the first window: still the last whole window's share
    wall.now, cpu.now = LOAD_WINDOW * 2, LOAD_WINDOW * 1.6
    assert abs(load() - 0.8) < 1e-9
    wall.now, cpu.now = LOAD_WINDOW * 4, LOAD_WINDOW * 2.0
    assert abs(load() - 0.2) < 1e-9
