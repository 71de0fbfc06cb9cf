"""The chunk queue that carries a v2 stream's body from the tunnel's receive loop to its reader."""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class ChunkQueue(Generic[T]):
    """Body chunks of one v2 stream, from the tunnel's receive loop to the one task that reads them.

    What a trio memory channel does here, for a fraction of its cost per stream (a stream per
    request: the channel pair, its state and statistics objects were a measurable part of each
    1 KiB request): ``send_nowait`` never waits (the v2 windows bound what is buffered), the reader
    gets everything sent before ``close`` and then EndOfChannel. Unlike a channel's, ``receive``
    returns at once, without a checkpoint, when a chunk is there: the reader's next write is one.
    """

    __slots__ = ("_closed", "_items", "_waiting")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._closed = False
        self._waiting: trio.lowlevel.ParkingLot | None = None  # made when a reader must wait

    def send_nowait(self, item: T) -> None:
        if self._closed:
            raise trio.ClosedResourceError("chunk queue closed")
        self._items.append(item)
        if self._waiting:
            self._waiting.unpark()

    def close(self) -> None:
        self._closed = True
        if self._waiting:
            self._waiting.unpark_all()

    def receive_nowait(self) -> T:
        if self._items:
            return self._items.popleft()
        if self._closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def wait(self) -> None:
        """Until a chunk or the end is there; at once, without a checkpoint, if it is."""
        while not self._items and not self._closed:
            if self._waiting is None:
                self._waiting = trio.lowlevel.ParkingLot()
            await self._waiting.park()

    async def receive(self) -> T:
        await self.wait()
        return self.receive_nowait()

    def __aiter__(self) -> ChunkQueue[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
