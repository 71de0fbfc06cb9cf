"""What both daemons do around their main loop: pid files, signals, log file reopening."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import trio
from pydantic import BaseModel

from wstunnel import logs

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


@contextlib.contextmanager
def pidfile(path: Path | None) -> Iterator[None]:
    """Write our pid to ``path`` for the lifetime of the block; remove it on a clean exit."""
    if path is None:
        yield
        return
    path.write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def reload_on_sighup(reload: Callable[[], Awaitable[None]]) -> None:
    """SIGHUP (logrotate, ``systemctl reload``): reopen log files, then re-read the settings."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            logs.reopen_files()
            await reload()


# How long a line may wait for others when the loop waits for I/O between requests, and how many
# may wait. Written at every such wait, a daemon serving one request at a time made two writes per
# request (each side of its wait for the peer), each dearer than the lines' text: a file's
# write(2), journald's datagram and journald's own wake-up. Held a little longer, a busy
# connection's lines go a few requests at a time.
WRITE_AFTER = 0.01
WRITE_BATCH = 32


class HeldLinesWriter(trio.abc.Instrument):
    """Writes the log lines held for the loop (``logs.HeldLines``) when it is about to wait for
    I/O: all of them when it has nothing left to run (``timeout`` > 0), else the lines of earlier
    turns, so the tasks this turn woke send first. A trio instrument, not a task: holding and
    writing lines costs no trip through the scheduler.

    While :meth:`write_late` runs (in the daemon's nursery), lines logged since the loop last
    wrote may wait for the next ones, up to WRITE_AFTER seconds and WRITE_BATCH lines: its task
    sleeps until then and writes them if nothing else has.
    """

    def __init__(self, held: logs.HeldLines) -> None:
        self._held = held
        self._writing_late = False  # write_late sleeps, and writes what is held when it wakes

    def before_io_wait(self, timeout: float) -> None:
        held = self._held
        if self._writing_late and len(held) < WRITE_BATCH:
            return  # write_late writes them by then
        if timeout > 0:
            held.write()
        else:
            held.turn_ends()

    async def write_late(self) -> None:
        """Let held lines wait up to WRITE_AFTER for the next ones, then write them: woken by the
        first line held after a write, it sleeps that long and writes what is held. Runs until
        cancelled; the daemon's last lines are written as the loop ends (``logs.release_lines``)."""
        held = self._held
        try:
            while True:
                if not held:
                    first_held = trio.Event()
                    held.on_first = first_held.set
                    await first_held.wait()
                    held.on_first = None
                self._writing_late = True
                await trio.sleep(WRITE_AFTER)
                self._writing_late = False
                held.write()
        finally:
            held.on_first = None
            self._writing_late = False


async def report_on_sigusr1(report: Callable[[], None]) -> None:
    """SIGUSR1: log a STATS line (tasks, file descriptors, memory: what a leak would grow)."""
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            report()


def changed_settings(old: BaseModel, new: BaseModel) -> list[str]:
    """Names of the settings whose values differ, in declaration order."""
    before, after = old.model_dump(), new.model_dump()
    return [name for name in after if after[name] != before.get(name)]
