"""Alarms: many deadlines behind one trio task, each ending in a plain callback.

A wait that something else ends anyway (a request waiting for its answer) needs a deadline only
for the rare case that nothing comes. A trio cancel scope per such wait costs more than the wait:
entering, registering its deadline and closing it again, per request, took 7 % of srv's CPU at
32 connections. An :class:`Alarm` costs a heap entry instead; the one task that
:meth:`Alarms.run` holds sleeps until the earliest, and calls back what is due. The callback
decides what "too late" does (wake the waiter, say); it must not block or raise.

Alarms fire in deadline order, at most ``resolution`` seconds late: the task wakes at most once
per ``resolution`` however many deadlines fall in between.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

import trio

__all__ = ["RESOLUTION", "Alarm", "Alarms"]

# How late an alarm may fire: the runner wakes at most this often.
RESOLUTION = 0.05
# Cancelled alarms are dropped from the heap once they are this many, and half of it.
_PRUNE_AT = 64


class Alarm:
    """One deadline and what to call at it; :meth:`cancel` once it is no longer wanted."""

    __slots__ = ("_alarms", "callback", "deadline")

    def __init__(self, alarms: Alarms, deadline: float, callback: Callable[[], object]) -> None:
        self._alarms = alarms
        self.deadline = deadline
        self.callback: Callable[[], object] | None = callback

    @property
    def pending(self) -> bool:
        """Neither fired nor cancelled yet."""
        return self.callback is not None

    def cancel(self) -> None:
        """Do not call back. A no-op once fired or cancelled."""
        if self.callback is not None:
            self.callback = None
            self._alarms.cancelled()


class Alarms:
    """The deadlines of one daemon; :meth:`run` in its nursery makes them fire."""

    def __init__(self, resolution: float = RESOLUTION) -> None:
        self.resolution = resolution
        self._heap: list[tuple[float, int, Alarm]] = []
        self._order = itertools.count()  # ties fire in the order they were set
        self._cancelled = 0  # cancelled alarms still in the heap
        self._sleep: trio.CancelScope | None = None  # the runner's, while it waits
        self._not_before = -math.inf  # the runner's next wake-up is no earlier than this

    @property
    def armed(self) -> int:
        """Alarms that may still fire (not ``__len__``: an Alarms with none is no less there)."""
        return len(self._heap) - self._cancelled

    @property
    def held(self) -> int:
        """Alarms in the heap, cancelled ones not yet dropped included."""
        return len(self._heap)

    def at(self, deadline: float, callback: Callable[[], object]) -> Alarm:
        """Call ``callback()`` at ``deadline`` (trio clock), unless the alarm is cancelled first."""
        alarm = Alarm(self, deadline, callback)
        heap = self._heap
        heapq.heappush(heap, (deadline, next(self._order), alarm))
        sleep = self._sleep
        if sleep is not None and deadline < sleep.deadline:
            sleep.deadline = max(deadline, self._not_before)
        return alarm

    def cancelled(self) -> None:
        """One more alarm in the heap is cancelled; drop them all once they are many."""
        self._cancelled += 1
        if self._cancelled >= _PRUNE_AT and self._cancelled * 2 >= len(self._heap):
            self._heap = [entry for entry in self._heap if entry[2].callback is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    async def run(self) -> None:
        """Fire alarms as they fall due, until cancelled."""
        while True:
            heap = self._heap
            wake = max(heap[0][0], self._not_before) if heap else math.inf
            with trio.CancelScope(deadline=wake) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None
            now = trio.current_time()
            self._not_before = now + self.resolution
            self.fire_due(now)

    def fire_due(self, now: float) -> None:
        """Call back every alarm due by ``now``, earliest first."""
        while self._heap and self._heap[0][0] <= now:  # a callback may set or cancel alarms
            alarm = heapq.heappop(self._heap)[2]
            callback = alarm.callback
            if callback is None:
                self._cancelled -= 1
                continue
            alarm.callback = None
            callback()
