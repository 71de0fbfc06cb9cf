"""What both daemons do around their main loop: pid files, signals, log file reopening."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import trio

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


async def reopen_logs_on_sighup() -> None:
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            logs.reopen_files()
