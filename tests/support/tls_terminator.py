"""A small TLS terminator for the end-to-end tests, run as its own process.

    python tests/support/tls_terminator.py LISTEN_PORT TARGET_PORT CERT_CHAIN_PEM

Accepts TLS on 127.0.0.1:LISTEN_PORT with the private key and certificate chain in
CERT_CHAIN_PEM, and relays the decrypted bytes to 127.0.0.1:TARGET_PORT in both directions. When
either side ends, both connections are closed. Prints one ``listening`` line once it accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import sys

CHUNK = 64 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ssl.SSLError):
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await asyncio.wait_for(writer.wait_closed(), timeout=5)


async def _relay(target_port: int, client_reader: asyncio.StreamReader,
                 client_writer: asyncio.StreamWriter) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target_port)
    except OSError as exc:
        print(f"tls_terminator: cannot reach 127.0.0.1:{target_port}: {exc}", flush=True)
        await _close(client_writer)
        return
    tasks = [
        asyncio.create_task(_pipe(client_reader, upstream_writer)),
        asyncio.create_task(_pipe(upstream_reader, client_writer)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(_close(client_writer), _close(upstream_writer))


async def main(listen_port: int, target_port: int, cert_chain: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_chain)
    server = await asyncio.start_server(
        lambda r, w: _relay(target_port, r, w), "127.0.0.1", listen_port,
        ssl=context, ssl_handshake_timeout=10,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"tls_terminator listening on 127.0.0.1:{listen_port} -> 127.0.0.1:{target_port}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
