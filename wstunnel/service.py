"""Talking to the service manager: readiness, a status line, reloads and watchdog pings.

systemd's ``sd_notify`` protocol, through systemd-python. Outside systemd (no ``NOTIFY_SOCKET``)
every call is a cheap no-op, so the daemons call these unconditionally.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping

import trio
from systemd import daemon as sd_daemon

# The manager wants a ping well inside WatchdogSec; half of it is what sd_watchdog_enabled(3) advises.
WATCHDOG_FRACTION = 0.5


class ServiceNotifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self.watchdog_interval = _watchdog_interval(env)
        self.last_status: str | None = None

    def _send(self, *assignments: str) -> None:
        if self.enabled:
            # sd_notify opens a socket per message: at the open-files limit there may be none
            # for it. That one message is lost (a watchdog ping comes again in half the
            # interval); raising would end the daemon over it.
            with contextlib.suppress(OSError):
                sd_daemon.notify("\n".join(assignments))

    def ready(self, status: str) -> None:
        self.last_status = status
        self._send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        if text != self.last_status:
            self.last_status = text
            self._send(f"STATUS={text}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd >= 253 match the reload to its READY=1; older ones ignore it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def reloaded(self) -> None:
        self._send("READY=1", f"STATUS={self.last_status or 'running'}")

    def stopping(self) -> None:
        self._send("STOPPING=1", "STATUS=stopping")

    async def watchdog_forever(self) -> None:
        """Ping the watchdog from the event loop itself: a hung loop stops pinging, and is killed."""
        if not self.enabled or self.watchdog_interval is None:
            return
        while True:
            self._send("WATCHDOG=1")
            await trio.sleep(self.watchdog_interval)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 1_000_000 * WATCHDOG_FRACTION, 0.05)
    except ValueError:
        return None
