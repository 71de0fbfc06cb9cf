"""The server's long-poll session in-process: the transport contract and the poll rules."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from wstunnel.server.longpoll import PollSession, SequenceError, SessionGone
from wstunnel.tunnel.longpoll import SEND_HIGH_WATER
from wstunnel.tunnel.transport import ConnectionClosed


async def test_a_poll_returns_at_once_when_frames_wait_and_numbers_each_batch() -> None:
    session = PollSession("s" * 43)
    await session.send_message(b"one")
    await session.send_message(b"two")
    assert await session.poll(5, ack=0) == (1, [b"one", b"two"])
    await session.send_message(b"three")
    assert await session.poll(5, ack=1) == (2, [b"three"])


async def test_a_held_poll_wakes_on_the_first_frame_and_ends_empty_after_its_wait() -> None:
    session = PollSession("s" * 43)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            results: list[tuple[int, list[bytes]]] = []

            async def poll() -> None:
                results.append(await session.poll(10, ack=0))

            nursery.start_soon(poll)
            await trio.testing.wait_all_tasks_blocked()
            assert not results
            await session.send_message(b"frame")
        assert results == [(1, [b"frame"])]
    # Nothing waiting: empty after the wait, with the number of the last batch.
    assert await session.poll(0.05, ack=1) == (1, [])


async def test_a_newer_poll_ends_the_older_one_empty() -> None:
    session = PollSession("s" * 43)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            older: list[tuple[int, list[bytes]]] = []

            async def first() -> None:
                older.append(await session.poll(10, ack=0))

            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()

            async def second() -> None:
                assert await session.poll(10, ack=0) == (1, [b"late"])

            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert older == [(0, [])]
            await session.send_message(b"late")


async def test_an_unacknowledged_batch_is_sent_again_and_a_bad_ack_refused() -> None:
    session = PollSession("s" * 43)
    await session.send_message(b"x")
    assert await session.poll(5, ack=0) == (1, [b"x"])
    assert await session.poll(5, ack=0) == (1, [b"x"])  # the answer was lost
    with pytest.raises(SequenceError):
        await session.poll(5, ack=7)


async def test_posts_are_taken_once_and_in_order() -> None:
    session = PollSession("s" * 43)
    await session.deliver(1, [b"a", b"b"])
    await session.deliver(1, [b"a", b"b"])  # repeated: answered, not taken again
    await session.deliver(None, [b"c"])  # no number: the next one
    with pytest.raises(SequenceError):
        await session.deliver(5, [b"d"])
    assert [await session.get_message() for _ in range(3)] == [b"a", b"b", b"c"]


async def test_close_wakes_every_side_with_its_reason() -> None:
    session = PollSession("s" * 43)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            async def poll() -> None:
                with pytest.raises(SessionGone, match="bye"):
                    await session.poll(10, ack=0)

            async def receive() -> None:
                with pytest.raises(ConnectionClosed):
                    await session.get_message()

            nursery.start_soon(poll)
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await session.aclose(1001, "bye")
    assert session.closed is not None and session.closed.reason == "bye"
    with pytest.raises(ConnectionClosed):
        await session.send_message(b"too late")
    with pytest.raises(SessionGone):
        await session.deliver(1, [b"too late"])


async def test_a_closed_session_lets_go_of_what_no_poll_will_take() -> None:
    session = PollSession("s" * 43)
    await session.send_message(b"a" * 1000)
    assert await session.poll(5, ack=0) == (1, [b"a" * 1000])  # kept until acknowledged
    await session.send_message(b"b" * 3000)
    assert session.held_bytes == 4000
    await session.aclose(1001, "bye")
    assert session.held_bytes == 0


async def test_a_sender_waits_above_the_high_water_until_a_poll_takes_frames() -> None:
    session = PollSession("s" * 43)
    big = bytes(SEND_HIGH_WATER // 4 + 1)
    for _ in range(4):
        await session.send_message(big)  # up to just over the high water: no wait yet
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            sent: list[bool] = []

            async def send() -> None:
                await session.send_message(b"more")
                sent.append(True)

            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            assert not sent  # over the high water: waiting for the client to poll
            seq, batch = await session.poll(5, ack=0)
            assert seq == 1 and batch
        assert sent == [True]


async def test_a_request_in_progress_counts_as_presence(autojump_clock: trio.abc.Clock) -> None:
    """(The clock jumps: the sleeps take no real time.)"""
    session = PollSession("s" * 43)

    async def held_poll() -> None:
        with pytest.raises(SessionGone):
            await session.poll(10, ack=0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(held_poll)
        await trio.testing.wait_all_tasks_blocked()
        before = trio.current_time()
        await trio.sleep(5)
        assert session.last_receive >= before + 5  # held: present now
        await session.aclose()
    ended = session.last_receive
    await trio.sleep(5)
    assert session.last_receive == ended  # nothing in progress: silence counts
