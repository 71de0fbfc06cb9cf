"""A TCP relay that delays every byte by a fixed time each way: a long link, made on loopback.

    python tests/support/delay_relay.py LISTEN_PORT TARGET_PORT ONE_WAY_MS

Each connection to 127.0.0.1:LISTEN_PORT is joined to 127.0.0.1:TARGET_PORT; whatever one side
sends reaches the other ONE_WAY_MS later (so a round trip costs twice that), in order, without a
bandwidth cap. It stands in for the distance between a browser and nginx, or between wstunnel cli
and wstunsrv, where the kernel's netem is not available. Bytes pass untouched (TLS included).
"""

from __future__ import annotations

import sys

import trio

CHUNK = 64 * 1024


async def _carry(source: trio.SocketStream, sink: trio.SocketStream, delay: float) -> None:
    """Read ``source``, and write each piece to ``sink`` ``delay`` seconds after it came."""
    send_in, receive_out = trio.open_memory_channel[tuple[float, bytes]](1024)

    async def reader() -> None:
        async with send_in:
            while data := await source.receive_some(CHUNK):
                await send_in.send((trio.current_time() + delay, data))

    async def writer() -> None:
        async with receive_out:
            async for due, data in receive_out:
                await trio.sleep_until(due)
                await sink.send_all(data)
        await sink.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(writer)


async def _join(client: trio.SocketStream, target_port: int, delay: float) -> None:
    async with client:
        try:
            server = await trio.open_tcp_stream("127.0.0.1", target_port)
        except OSError:
            return
        async with server:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_carry, client, server, delay)
                    nursery.start_soon(_carry, server, client, delay)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # one side went away: the connection ends, as it would across a network


async def main(listen_port: int, target_port: int, one_way_ms: float) -> None:
    delay = one_way_ms / 1000
    listeners = await trio.open_tcp_listeners(listen_port, host="127.0.0.1")
    print(f"relaying 127.0.0.1:{listen_port} -> {target_port}, {one_way_ms:g} ms each way", flush=True)
    await trio.serve_listeners(lambda stream: _join(stream, target_port, delay), listeners)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
