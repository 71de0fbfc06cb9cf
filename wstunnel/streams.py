"""Stream adapters for handing one TCP connection from the HTTP front to the WebSocket layer."""

from __future__ import annotations

import trio


class ActivityStream(trio.abc.Stream):
    """A stream that first replays ``prefix``, then reads ``inner``, noting when bytes arrive.

    The HTTP front has already read (and parsed) the WebSocket handshake when it learns that a
    connection is a tunnel; replaying those bytes lets trio-websocket read the handshake itself.
    ``last_receive`` lets the server close a tunnel that has sent nothing for ``wstimeout``:
    pings count as activity although trio-websocket answers them internally.
    """

    def __init__(self, inner: trio.abc.Stream, prefix: bytes = b"") -> None:
        self._inner = inner
        self._prefix = prefix
        self.last_receive = trio.current_time()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        data = await self._inner.receive_some(max_bytes)
        self.last_receive = trio.current_time()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._inner.aclose()
