"""A TCP relay that delays every byte by a fixed time each way: a long link, made on loopback.

    python tests/support/delay_relay.py LISTEN_PORT TARGET_PORT ONE_WAY_MS [MB_PER_S [QUEUE_KIB]]

Each connection to 127.0.0.1:LISTEN_PORT is joined to 127.0.0.1:TARGET_PORT; whatever one side
sends reaches the other ONE_WAY_MS later (so a round trip costs twice that), in order. It stands
in for the distance between a browser and nginx, or between wstunnel cli and wstunsrv, where the
kernel's netem is not available. Bytes pass untouched (TLS included).

Without MB_PER_S there is no bandwidth cap and the link holds up to 256 MiB in flight each way.
With it, each direction passes at most MB_PER_S megabytes a second, and a router's queue of
QUEUE_KIB (default 256) is all it holds beyond what is in flight: a slow link whose sender
backs up, as a real one does.
"""

from __future__ import annotations

import math
import sys

import trio

CHUNK = 64 * 1024
IN_FLIGHT = 256 * 1024 * 1024  # without a rate: far more than any window


async def _carry(source: trio.SocketStream, sink: trio.SocketStream, delay: float,
                 rate: float | None, queue: int) -> None:
    """Read ``source``, and write each piece to ``sink`` ``delay`` seconds after it came (and,
    with a ``rate`` in bytes a second, no faster than that)."""
    # Bytes in flight: a delay's worth at the rate, plus the queue; without a rate, plenty. Counted
    # in bytes, not pieces: reads come in all sizes, and a count of pieces would cap a link that
    # is read in small ones.
    capacity = IN_FLIGHT if rate is None else int(rate * delay) + queue
    in_flight = 0
    drained = trio.lowlevel.ParkingLot()
    send_in, receive_out = trio.open_memory_channel[tuple[float, bytes]](math.inf)

    async def reader() -> None:
        nonlocal in_flight
        async with send_in:
            while data := await source.receive_some(CHUNK):
                while in_flight and in_flight + len(data) > capacity:
                    await drained.park()
                in_flight += len(data)
                await send_in.send((trio.current_time() + delay, data))

    async def writer() -> None:
        nonlocal in_flight
        free_at = 0.0  # when the rate-limited link can take the next byte
        async with receive_out:
            async for due, data in receive_out:
                if rate is not None:
                    free_at = max(free_at, due - delay) + len(data) / rate
                    due = max(due, free_at + delay)
                await trio.sleep_until(due)
                await sink.send_all(data)
                in_flight -= len(data)
                drained.unpark_all()
        await sink.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(writer)


async def _join(client: trio.SocketStream, target_port: int, delay: float, rate: float | None,
                queue: int) -> None:
    async with client:
        try:
            server = await trio.open_tcp_stream("127.0.0.1", target_port)
        except OSError:
            return
        if rate is not None:
            # A router's queue, not the kernel's autotuned megabytes: what the link cannot take
            # backs up in the sender.
            for stream in (client, server):
                stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, queue)
        async with server:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_carry, client, server, delay, rate, queue)
                    nursery.start_soon(_carry, server, client, delay, rate, queue)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # one side went away: the connection ends, as it would across a network


async def main(listen_port: int, target_port: int, one_way_ms: float, mb_per_s: float | None,
               queue_kib: int) -> None:
    delay = one_way_ms / 1000
    rate = None if mb_per_s is None else mb_per_s * 1e6
    listeners = await trio.open_tcp_listeners(listen_port, host="127.0.0.1")
    cap = "" if mb_per_s is None else f", {mb_per_s:g} MB/s, a {queue_kib} KiB queue"
    print(f"relaying 127.0.0.1:{listen_port} -> {target_port}, {one_way_ms:g} ms each way{cap}",
          flush=True)
    await trio.serve_listeners(
        lambda stream: _join(stream, target_port, delay, rate, queue_kib * 1024), listeners)


if __name__ == "__main__":
    args = sys.argv[1:]
    trio.run(main, int(args[0]), int(args[1]), float(args[2]),
             float(args[3]) if len(args) > 3 else None, int(args[4]) if len(args) > 4 else 256)
