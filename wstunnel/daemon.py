"""What both daemons do around their main loop: pid files, signals, log file reopening."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import trio
from pydantic import BaseModel

from wstunnel import logs

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# Container objects allocated (net of those freed) before the cyclic collector runs on the
# youngest generation; CPython's default is 700. A daemon with requests in flight builds a few
# thousand per turn of its loop (heads, frames, events) and frees nearly all of them by reference
# counting, after the turn: at 700 each such turn set off collections that found no garbage. With
# 100 tokens under load, srv collected 64 times a second, 14 µs of CPU per request (5 % of it).
YOUNG_GENERATION_THRESHOLD = 10_000


def tune_collector() -> None:
    """Ready the cyclic garbage collector for serving, just before the main loop starts.

    What exists now (modules, settings, logging) lives as long as the process: frozen, out of
    the collector's sight, full collections walk only what serving creates (srv: GC time 0.34 ->
    0.24 s, cli 0.15 -> 0.05 s in 5 s of 1 KiB GETs at -c32). And the youngest generation is
    collected after YOUNG_GENERATION_THRESHOLD allocations, not 700: real cyclic garbage is rare
    on the request path (a closed connection's few objects), so it waits a little longer, at a
    cost of at most that many objects' memory.
    """
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, oldest)


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
