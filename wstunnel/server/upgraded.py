"""An upgraded connection as the server's front carries it once a 101 has switched it (a WebSocket
to the backend, say): the HTTP client's bytes up into the tunnel's stream (an UpgradeSink), the
backend's bytes (the response's body) down to the client, until both ways have ended.

``wstunnel.server.front`` decides that the response switches the connection, writes the 101 with
h11 (its head from :func:`switching_headers`) and hands over the socket with what the client sent
past its request; from then on no HTTP is spoken, so this module knows nothing of h11 or of the
front's connection state. It is the counterpart of ``incoming`` and ``outgoing``, for the one
response whose body flows both ways. A break is told through a callback (the front then ends the
connection with a reset), as a streamed response's would be.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from wstunnel.headers import Headers
from wstunnel.server.aborts import Cause, Cut
from wstunnel.server.incoming import RECEIVE_SIZE
from wstunnel.server.messages import ResponseAborted, StreamingResponse, UpgradeSink
from wstunnel.tunnel.endpoint import PIPE_LINGER
from wstunnel.tunnel.transport import half_close

CutReporter = Callable[[Cut], None]


def switching_headers(headers: Headers) -> Headers:
    """The 101's headers: the backend's, minus those about this hop and a body's framing, plus
    the ``Connection: Upgrade`` that switches this hop."""
    kept = [
        (k, v) for k, v in headers
        if k.lower() not in (b"connection", b"keep-alive", b"transfer-encoding", b"content-length")
    ]
    kept.append((b"Connection", b"Upgrade"))
    return kept


async def pipe_upgraded(stream: trio.abc.Stream, response: StreamingResponse, sink: UpgradeSink,
                        first: bytes, on_cut: CutReporter) -> None:
    """Carry raw bytes both ways between ``stream`` (the HTTP client's) and the tunnel until both
    sides have closed, or one has and the other did not follow within PIPE_LINGER.

    ``first`` is what the client sent past its request (a first WebSocket frame): it goes up
    before anything else. ``response.body`` brings the backend's bytes, ``sink`` takes the
    client's; ``response.sent_bytes`` and ``received_bytes`` count them. A side that breaks, or
    nothing passing either way for ``response.idle_timeout``, ends both, and is told to
    ``on_cut``.
    """
    await _Pipe(stream, response, sink, on_cut).run(first)


class _Pipe:
    """One upgraded connection's two directions, and the idle deadline that both push on."""

    def __init__(self, stream: trio.abc.Stream, response: StreamingResponse, sink: UpgradeSink,
                 on_cut: CutReporter) -> None:
        self.stream = stream
        self.response = response
        self.sink = sink
        self.on_cut = on_cut
        # Like any transfer, a pipe may last as long as it moves; one that carried nothing either
        # way for the idle timeout ends, or a vanished peer would hold it forever.
        self.idle_timeout = response.idle_timeout
        self.idle = trio.CancelScope()

    async def run(self, first: bytes) -> None:
        with self.idle:
            self._moved()
            await self._both_ways(first)
        if self.idle.cancelled_caught:
            self.on_cut(Cut("response", Cause.STALLED,
                            f"nothing passed either way for {self.idle_timeout:g}s"))

    def _moved(self) -> None:
        self.idle.deadline = trio.current_time() + self.idle_timeout

    async def _both_ways(self, first: bytes) -> None:
        response = self.response
        async with trio.open_nursery() as pipe:
            pipe.start_soon(self._up, first, pipe.cancel_scope)
            try:
                while (chunk := await response.body.receive()) is not None:
                    await self.stream.send_all(chunk)
                    self._moved()
                    response.sent_bytes += len(chunk)
                    response.body.consumed(len(chunk))
                await half_close(self.stream)  # the client may still send
            except ResponseAborted as aborted:
                self.on_cut(aborted.cut)  # the backend side broke, or the tunnel
                pipe.cancel_scope.cancel()
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.on_cut(Cut("response", Cause.CLIENT_GONE, "the HTTP client went away"))
                pipe.cancel_scope.cancel()
                return
            pipe.cancel_scope.deadline = min(pipe.cancel_scope.deadline,
                                             trio.current_time() + PIPE_LINGER)

    async def _up(self, first: bytes, scope: trio.CancelScope) -> None:
        response, sink = self.response, self.sink
        try:
            if first:
                await sink.send(first)
                response.received_bytes += len(first)
            while data := await self.stream.receive_some(RECEIVE_SIZE):
                self._moved()
                await sink.send(bytes(data))
                response.received_bytes += len(data)
            sink.end()
        except ResponseAborted as aborted:
            self.on_cut(aborted.cut)
            scope.cancel()
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # A reset, not a close: a client that closes its side ends the pipe cleanly above.
            self.on_cut(Cut("request", Cause.CLIENT_GONE, "the HTTP client went away"))
            scope.cancel()
            return
        scope.deadline = min(scope.deadline, trio.current_time() + PIPE_LINGER)
