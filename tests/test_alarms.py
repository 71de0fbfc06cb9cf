"""Alarms: deadlines behind one task, on trio's mock clock (no real time passes)."""

from __future__ import annotations

import math

import trio
import trio.testing

from wstunnel.alarms import Alarms


async def test_alarms_fire_in_deadline_order_no_earlier_and_at_most_resolution_late(
        autojump_clock: trio.testing.MockClock) -> None:
    alarms = Alarms(resolution=0.05)
    fired: list[tuple[str, float]] = []
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(alarms.run)
        for name, delay in [("c", 3.0), ("a", 1.0), ("b", 2.0), ("a2", 1.0)]:
            alarms.at(start + delay, lambda name=name: fired.append((name, trio.current_time())))
        await trio.sleep(4)  # mock time: the last is due at 3 s
        nursery.cancel_scope.cancel()
    assert [name for name, _ in fired] == ["a", "a2", "b", "c"]  # ties in the order set
    for (name, when), delay in zip(fired, [1.0, 1.0, 2.0, 3.0], strict=True):
        assert start + delay <= when <= start + delay + 0.05, name


async def test_a_cancelled_alarm_does_not_fire_and_is_not_counted(
        autojump_clock: trio.testing.MockClock) -> None:
    alarms = Alarms()
    fired: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(alarms.run)
        kept = alarms.at(trio.current_time() + 1, lambda: fired.append("kept"))
        dropped = alarms.at(trio.current_time() + 0.5, lambda: fired.append("dropped"))
        assert alarms.armed == 2
        dropped.cancel()
        dropped.cancel()  # twice is once
        assert alarms.armed == 1 and not dropped.pending and kept.pending
        await trio.sleep(2)
        assert fired == ["kept"] and not kept.pending and alarms.armed == 0
        kept.cancel()  # after it fired: nothing to undo
        assert alarms.armed == 0
        nursery.cancel_scope.cancel()


async def test_an_earlier_alarm_set_while_the_runner_sleeps_wakes_it_in_time(
        autojump_clock: trio.testing.MockClock) -> None:
    alarms = Alarms(resolution=0.05)
    fired: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(alarms.run)
        alarms.at(trio.current_time() + 100, lambda: fired.append(trio.current_time()))
        await trio.sleep(1)  # the runner sleeps until the alarm 99 s away
        early = trio.current_time() + 0.5
        alarms.at(early, lambda: fired.append(trio.current_time()))
        await trio.sleep(1)
        assert len(fired) == 1 and early <= fired[0] <= early + 0.05
        nursery.cancel_scope.cancel()


async def test_an_empty_runner_sleeps_until_an_alarm_is_set(autojump_clock: trio.testing.MockClock) -> None:
    alarms = Alarms()
    fired = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(alarms.run)
        await trio.sleep(1000)  # nothing to fire: it waits, it does not spin
        due = trio.current_time() + 1
        alarms.at(due, fired.set)
        await fired.wait()
        assert due <= trio.current_time() <= due + alarms.resolution
        nursery.cancel_scope.cancel()


async def test_many_deadlines_past_at_once_fire_in_one_wake_up(
        autojump_clock: trio.testing.MockClock) -> None:
    alarms = Alarms(resolution=0.05)
    fired: list[float] = []
    start = trio.current_time()
    for i in range(1000):
        alarms.at(start + 1 + i * 0.001, lambda: fired.append(trio.current_time()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(alarms.run)
        await trio.sleep(3)
        nursery.cancel_scope.cancel()
    assert len(fired) == 1000
    # One wake-up per resolution at most: a thousand deadlines a millisecond apart take ~20.
    assert len(set(fired)) <= math.ceil(1.0 / alarms.resolution) + 1


async def test_a_callback_may_set_another_alarm(autojump_clock: trio.testing.MockClock) -> None:
    alarms = Alarms()
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(trio.current_time())
        if len(ticks) < 3:
            alarms.at(trio.current_time() + 1, tick)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(alarms.run)
        alarms.at(trio.current_time() + 1, tick)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert len(ticks) == 3


def test_cancelled_alarms_do_not_pile_up() -> None:
    """A request's alarm is nearly always cancelled long before its deadline: under load the
    heap must hold about what is live, not every deadline of the last httptimeout seconds."""
    alarms = Alarms()
    live = [alarms.at(1e9 + i, lambda: None) for i in range(10)]
    for i in range(100_000):
        alarms.at(1e9 + i, lambda: None).cancel()
    assert alarms.armed == 10
    assert alarms.held < 200
    assert all(alarm.pending for alarm in live)
    alarms.fire_due(2e9)
    assert alarms.armed == 0 and not any(alarm.pending for alarm in live)
