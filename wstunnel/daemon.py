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


class HeldLinesWriter(trio.abc.Instrument):
    """Writes the log lines held for the loop (``logs.HeldLines``) when it is about to wait for
    I/O: all of them when it has nothing left to run (``timeout`` > 0), else the lines of earlier
    turns, so the tasks this turn woke send first. A trio instrument, not a task: holding and
    writing lines costs no trip through the scheduler."""

    def __init__(self, held: logs.HeldLines) -> None:
        self._held = held

    def before_io_wait(self, timeout: float) -> None:
        if timeout > 0:
            self._held.write()
        else:
            self._held.turn_ends()


async def report_on_sigusr1(report: Callable[[], None]) -> None:
    """SIGUSR1: log a STATS line (tasks, file descriptors, memory: what a leak would grow)."""
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            report()


def changed_settings(old: BaseModel, new: BaseModel) -> list[str]:
    """Names of the settings whose values differ, in declaration order."""
    before, after = old.model_dump(), new.model_dump()
    return [name for name in after if after[name] != before.get(name)]
