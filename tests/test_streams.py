"""ChunkQueue: a v2 stream's body chunks, in order, then the end; one reader that may wait."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from wstunnel.tunnel.chunks import ChunkQueue


async def test_chunks_come_out_in_order_then_the_end() -> None:
    chunks: ChunkQueue[bytes] = ChunkQueue()
    chunks.send_nowait(b"a")
    chunks.send_nowait(b"b")
    chunks.close()
    assert await chunks.receive() == b"a"
    assert chunks.receive_nowait() == b"b"
    with pytest.raises(trio.EndOfChannel):
        chunks.receive_nowait()
    with pytest.raises(trio.EndOfChannel):
        await chunks.receive()
    with pytest.raises(trio.ClosedResourceError):
        chunks.send_nowait(b"late")


async def test_a_waiting_reader_wakes_for_a_chunk_and_for_the_close() -> None:
    chunks: ChunkQueue[bytes] = ChunkQueue()
    got: list[bytes] = []

    async def reader() -> None:
        async for chunk in chunks:
            got.append(chunk)
        got.append(b"<end>")

    with pytest.raises(trio.WouldBlock):
        chunks.receive_nowait()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            chunks.send_nowait(b"x")
            await trio.testing.wait_all_tasks_blocked()
            assert got == [b"x"]
            chunks.close()
    assert got == [b"x", b"<end>"]


async def test_a_cancelled_reader_leaves_the_chunks_for_the_next() -> None:
    chunks: ChunkQueue[bytes] = ChunkQueue()
    with trio.move_on_after(0.01):
        await chunks.receive()
    chunks.send_nowait(b"kept")
    assert await chunks.receive() == b"kept"
