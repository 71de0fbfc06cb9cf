"""The accept loop: takes connections while the open-files budget has room, never dies of EMFILE.

In place of trio.serve_listeners, which on EMFILE logs a traceback and retries every 100 ms while
the health check waits unanswered. Here the budget (``wstunnel.server.capacity``) is asked before
each accept: at its ceiling the loop waits for a connection to close instead of calling accept()
at all, and the connections wait in the kernel's listen queue meanwhile. Should accept() run out
all the same (descriptors the count does not see), the loop counts afresh, warns (one line per
interval, no traceback) and tries again shortly.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable

import trio

from wstunnel.limits import OUT_OF_FILES_ERRNOS
from wstunnel.server.capacity import FileBudget

# After accept() itself ran out: how long to wait before trying again.
ACCEPT_RETRY = 0.1

Handler = Callable[[trio.SocketStream, bool], Awaitable[None]]


async def serve(listeners: list[trio.SocketListener], handler: Handler, nursery: trio.Nursery,
                budget: FileBudget) -> None:
    """Accept on every listener until cancelled; ``handler(stream, limited)`` runs in ``nursery``
    for each connection, and its stream is closed (and uncounted) when the handler returns."""
    async with trio.open_nursery() as loops:
        for listener in listeners:
            loops.start_soon(_accept_forever, listener, handler, nursery, budget)


async def _accept_forever(listener: trio.SocketListener, handler: Handler, nursery: trio.Nursery,
                          budget: FileBudget) -> None:
    while True:
        if budget.at_ceiling():
            await budget.wait_for_room()
            continue
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in OUT_OF_FILES_ERRNOS:
                raise
            budget.accept_failed(errno.errorcode.get(exc.errno, str(exc.errno)))
            await trio.sleep(ACCEPT_RETRY)
            continue
        limited = budget.admit()
        nursery.start_soon(_serve_one, stream, handler, limited, budget)


async def _serve_one(stream: trio.SocketStream, handler: Handler, limited: bool,
                     budget: FileBudget) -> None:
    try:
        await handler(stream, limited)
    finally:
        await trio.aclose_forcefully(stream)
        budget.release()
