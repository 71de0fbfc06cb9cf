"""Many real tunnel clients in one process, for the server-restart test with hundreds of clients.

    python tests/support/many_clients.py TUNNEL_URL BACKEND_URL TOKEN_FILE LOG_FILE [-reconnect-max-delay S]

A thousand ``wstunnel cli`` processes do not fit on a small machine, so this runs one
:class:`~wstunnel.client.agent.TunnelClient` per token (one token a line in TOKEN_FILE, which keeps
them off the command line) in a single trio nursery. It is the real client code, only co-hosted:
same dialing, handshake, keepalive and jittered backoff. The log lines carry millisecond UTC
timestamps (``WS   CONNECTED`` marks a handshake done), so the test can measure arrival rates finer
than the daemons' one-second stamps. SIGTERM or SIGINT closes every tunnel and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from pathlib import Path

import trio

from wstunnel.client.agent import TunnelClient
from wstunnel.config import ClientSettings
from wstunnel.limits import raise_open_files_limit
from wstunnel.logs import EventLogger


class MillisecondFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z {record.getMessage()}"


def _logger(path: Path) -> logging.Logger:
    logger = logging.getLogger("wstunnel")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(MillisecondFormatter())
    logger.addHandler(handler)
    return logger


def _settings(args: argparse.Namespace, token: str) -> ClientSettings:
    return ClientSettings(
        token=token, tunnel=args.tunnel, server=args.backend,
        reconnect_max_delay=args.reconnect_max_delay, timeout=args.timeout,
        max_concurrent_requests=4,
        # The backend is plain http://, so this changes nothing but the cost of each client's
        # backend pool: with verification on it loads the CA bundle (~15 ms and ~700 KiB each).
        insecure=True,
    )


async def run(args: argparse.Namespace, tokens: list[str]) -> None:
    log = EventLogger("WStuncli", _logger(args.log_file))
    clients = [TunnelClient(_settings(args, token), log) for token in tokens]
    log.info("Started", clients=len(clients))
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(client.run)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        with trio.move_on_after(5):
            async with trio.open_nursery() as closers:
                for client in clients:
                    closers.start_soon(client.close)
        nursery.cancel_scope.cancel()
    log.info("Stopped", clients=len(clients))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tunnel")
    parser.add_argument("backend")
    parser.add_argument("token_file", type=Path)
    parser.add_argument("log_file", type=Path)
    parser.add_argument("-reconnect-max-delay", type=float, default=5.0)
    parser.add_argument("-timeout", type=float, default=30.0)
    args = parser.parse_args()
    tokens = [line.strip() for line in args.token_file.read_text().splitlines() if line.strip()]
    # Each client holds a descriptor or two: thousands need more than the usual 1,024, as the
    # daemons raise their limit themselves.
    raise_open_files_limit()
    trio.run(run, args, tokens)


if __name__ == "__main__":
    main()
