"""FrameOutbox: the order frames leave in, and how a batching tunnel groups them."""

from __future__ import annotations

import trio
import trio.testing

from wstunnel import framing_v2 as v2
from wstunnel.transport import FrameOutbox


def frames(count: int, size: int = 10) -> list[bytes]:
    return [bytes([index % 256]) * size for index in range(count)]


async def test_plain_v2_sends_one_frame_a_message_in_order() -> None:
    outbox = FrameOutbox(batched=False)
    for frame in frames(3):
        outbox.put(frame)
    assert [await outbox.next_message() for _ in range(3)] == frames(3)


async def test_batched_sends_every_waiting_frame_in_one_message() -> None:
    outbox = FrameOutbox(batched=True)
    for frame in frames(5):
        outbox.put(frame)
    message = await outbox.next_message()
    assert message is not None
    assert [bytes(entry) for entry in v2.unpack_batch(message)] == frames(5)
    outbox.put(b"z" * 6)
    lone = await outbox.next_message()
    assert lone is not None and [bytes(e) for e in v2.unpack_batch(lone)] == [b"z" * 6]


async def test_a_batch_stays_within_max_batch_size_and_keeps_the_order() -> None:
    outbox = FrameOutbox(batched=True)
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
    outbox = FrameOutbox(batched=False)
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
