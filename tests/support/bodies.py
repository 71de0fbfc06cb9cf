"""A response body the test feeds by hand, as the front and the 101 pipe take one (a BodySource):
bytes, None for the end, or an exception to raise; and the credit given back as bytes are written."""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

from wstunnel.headers import Headers


class FakeBody:
    """A BodySource fed by the test: bytes, None for the end, or an exception to raise."""

    def __init__(self, *ready: bytes | Exception | None) -> None:
        self._in, self._out = trio.open_memory_channel[bytes | Exception | None](math.inf)
        for item in ready:
            self.put(item)
        self.credits: list[tuple[int, int]] = []  # (amount, bytes written by then)
        self.on_credit: Callable[[], int] = lambda: 0
        self.trailers: Headers = []
        self.closed = False

    def put(self, item: bytes | Exception | None) -> None:
        self._in.send_nowait(item)

    def _unwrap(self, item: bytes | Exception | None) -> bytes | None:
        if isinstance(item, Exception):
            raise item
        return item

    async def receive(self) -> bytes | None:
        return self._unwrap(await self._out.receive())

    def receive_nowait(self) -> bytes | None:
        return self._unwrap(self._out.receive_nowait())

    def consumed(self, amount: int) -> None:
        self.credits.append((amount, self.on_credit()))

    def close(self) -> None:
        self.closed = True
