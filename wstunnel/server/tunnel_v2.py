"""The server's end of a protocol v2 tunnel: requests go out as streams, responses stream back.

A :class:`TunnelConnectionV2` pulls from the same :class:`~wstunnel.server.rendezvous.Rendezvous`
queue as v1 connections, so v1 and v2 clients of one token share its requests. Each request becomes
a stream (HEAD, DATA within the peer's windows, END); the final response head finishes the
PendingRequest with a :class:`~wstunnel.server.front.StreamingResponse` whose body is fed by the
stream's DATA frames. Credit goes back to the client only as the HTTP front writes the bytes to its
client (``consumed``), which is the backpressure: a slow HTTP client stalls its own stream only.

Request bodies stream the same way the other way round: a body still on the HTTP client's socket
(incoming.RequestBody) is read only while the stream has credit, so the server holds at most a chunk
of it, and a slow backend slows its HTTP client down (TCP backpressure) instead of filling memory.
At most ``max_streams`` streams are open at once on one tunnel; further requests wait in the queue.

The frames, the windows and the receive loop are the shared :class:`~wstunnel.tunnel.endpoint.
V2Endpoint`'s; this module is what the server does with its streams. Requests are also handed to
it directly by the HTTP request's task (``start_now``) while it has room and nothing waits.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import ClassVar, Unpack

import trio
import trio_websocket

from wstunnel import v2
from wstunnel.errors import FramingError, StreamClosedError
from wstunnel.headers import Headers, without
from wstunnel.server.aborts import Cause, Cut, Direction
from wstunnel.server.connection import ConnectionOptions, TunnelConnection, short_target
from wstunnel.server.messages import (
    BodyError,
    BodyTimeout,
    BodyTooLarge,
    RequestBodySource,
    ResponseAborted,
    StreamingResponse,
)
from wstunnel.server.rendezvous import Failure, PendingRequest, Rendezvous
from wstunnel.tunnel.chunks import ChunkQueue
from wstunnel.tunnel.endpoint import V2Endpoint, log_widened
from wstunnel.tunnel.transport import Activity, MessageTransport

_END = object()  # marks the end of a body in a stream's chunk channel


@dataclass(eq=False)
class _Stream:
    """One request on the tunnel, as the server sees it."""

    id: int
    # Let go once the response is handed over: the PendingRequest holds the response, whose
    # body holds this stream, and that cycle (with the request's objects) would otherwise wait
    # for the garbage collector, ~30 objects a request (4 % of srv's CPU at 3,000 req/s).
    pending: PendingRequest | None
    request_id: int
    # The response body as it arrives (bytes, then _END); bounded by the windows we grant.
    chunks: ChunkQueue[object] = field(default_factory=ChunkQueue)
    headed: bool = False  # the final response head arrived
    switched: bool = False  # that head was a 101: DATA is the upgraded byte stream, not a body
    received: int = 0  # body bytes so far (max_stream_size)
    finished: bool = False  # ended or reset: nothing more will come
    aborted: Cut | None = None  # why the body will never complete
    # The scope of the task that sends the request body, if one does (``body_scope``): most
    # requests have no body, and no scope to make and cancel (1.6 µs a request in srv).
    body_task: trio.CancelScope | None = None
    trailers: Headers = field(default_factory=list)  # from the END, once the body is whole

    def body_scope(self) -> trio.CancelScope:
        """The cancel scope for a task about to send the request body (``stop_body`` stops it)."""
        self.body_task = trio.CancelScope()
        return self.body_task

    def stop_body(self) -> None:
        if self.body_task is not None:
            self.body_task.cancel()


class _StreamBody:
    """The body of one streamed response, as the HTTP front pulls it (front.BodySource)."""

    def __init__(self, connection: TunnelConnectionV2, stream: _Stream) -> None:
        self._connection = connection
        self._stream = stream
        self._closed = False

    async def receive(self) -> bytes | None:
        await self._stream.chunks.wait()
        return self.receive_nowait()

    def receive_nowait(self) -> bytes | None:
        stream = self._stream
        try:
            item = stream.chunks.receive_nowait()  # trio.WouldBlock: nothing buffered yet
        except trio.EndOfChannel:
            raise ResponseAborted(self._connection.cut_of(stream, "response")) from None
        if item is _END:
            return None
        assert isinstance(item, bytes)
        return item

    @property
    def trailers(self) -> Headers:
        return self._stream.trailers

    def consumed(self, amount: int) -> None:
        self._connection.endpoint.credit(self._stream.id, amount)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._connection.cancel_stream(self._stream, v2.ErrorCode.CANCEL, "HTTP client done")


class _UpgradedUpload:
    """The HTTP client's bytes after a 101, as DATA on the stream (front.UpgradeSink)."""

    def __init__(self, connection: TunnelConnectionV2, stream: _Stream) -> None:
        self._connection = connection
        self._stream = stream

    async def send(self, data: bytes) -> None:
        try:
            await self._connection.endpoint.send_data(self._stream.id, data)
        except StreamClosedError as exc:
            raise ResponseAborted(self._connection.cut_of(self._stream, "request", exc.code)) from None

    def end(self) -> None:
        # Reset meanwhile: the pipe is over anyway.
        with contextlib.suppress(StreamClosedError):
            self._connection.endpoint.end(self._stream.id)


class TunnelConnectionV2(TunnelConnection):
    """One v2 client's WebSocket: many concurrent streams, each with its own flow control."""

    protocol: ClassVar[str] = "v2"

    def __init__(self, rendezvous: Rendezvous, ws: MessageTransport, stream: Activity, *,
                 httptimeout: float = math.inf, max_streams: int = 256, max_stream_size: int = 0,
                 batched: bool = False, limits: v2.WindowLimits | None = None,
                 request_window: int = v2.INITIAL_STREAM_WINDOW,
                 **options: Unpack[ConnectionOptions]) -> None:
        super().__init__(rendezvous, ws, stream, **options)
        self.direct = self  # requests are handed to it too (start_now)
        self.httptimeout = httptimeout
        self.max_streams = max_streams
        self.max_stream_size = max_stream_size or math.inf  # of a response body
        # Replaced each time a stream leaves self.streams; the sender waits on it at the cap.
        self._stream_left = trio.Event()
        self.endpoint = V2Endpoint("server", ws, self, batched=batched, limits=limits,
                                   request_window=request_window)
        self.conn = self.endpoint.conn
        self.streams: dict[int, _Stream] = {}
        self._nursery: trio.Nursery | None = None

    async def _run(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self.endpoint.run_writer)
        nursery.start_soon(self.endpoint.run_tuner, self._widened)
        nursery.start_soon(self._send_requests)
        await self._receive_frames()

    def _lost(self) -> None:
        self.endpoint.abort()  # a request task's send under way ends now, not with the socket
        reason = f"tunnel connection lost: {self.close_description()}"
        for stream in list(self.streams.values()):
            self._abort(stream, Cut("response", Cause.TUNNEL_LOST, reason))
        self._fail_in_flight()

    def flow(self) -> dict[str, int]:
        return {"streams": len(self.streams), **self.endpoint.flow()}

    def _widened(self, rtt: float, grants: list[v2.Window]) -> None:
        log_widened(self.log, self.token, self.endpoint.conn, rtt, grants, addr=self.addr)

    def cut_of(self, stream: _Stream, direction: Direction, code: int | None = None) -> Cut:
        """Why ``stream`` broke off, as its reader or writer on the HTTP side learns it (``code``:
        the RESET's, when the stream was reset after its response had ended)."""
        if stream.aborted is not None:
            return stream.aborted
        if self.ws.closed is not None or self._closing:
            return Cut(direction, Cause.TUNNEL_LOST,
                       f"tunnel connection lost: {self.close_description()}")
        if code is not None:
            return Cut(direction, _RESET_CAUSES.get(code, Cause.RESET),
                       f"reset by the tunnel client (code {code})")
        return Cut(direction, Cause.RESET, "stream reset")

    # -- helpers used by the HTTP side -------------------------------------------------------

    def _forget(self, stream_id: int) -> None:
        if self.streams.pop(stream_id, None) is not None:
            self._stream_left.set()
            self._stream_left = trio.Event()

    def cancel_stream(self, stream: _Stream, code: int, reason: str) -> None:
        """Reset ``stream`` unless it is over already; fine to call on a dead tunnel."""
        self._forget(stream.id)
        stream.finished = True
        # Nothing to send if the stream is over both ways; but a response may end while our
        # request body is still going, and then the RESET stops that too.
        self.endpoint.reset(stream.id, code, reason)
        stream.stop_body()  # its request body need not go on

    def abandon(self, pending: PendingRequest) -> None:
        for stream in list(self.streams.values()):
            if stream.pending is pending:
                self.cancel_stream(stream, v2.ErrorCode.CANCEL, "HTTP client gave up")
                self.in_flight.pop(pending.id, None)
                pending.holder = None

    # -- sending ------------------------------------------------------------------------------

    async def _send_requests(self) -> None:
        """Take what waits in the queue (requests are handed to us directly while we have room
        and nothing waits: ``start_now``)."""
        queue = self.rendezvous.queue
        while True:
            while len(self.streams) >= self.max_streams:
                await self._stream_left.wait()
            pending = await queue.get()
            if pending.abandoned:
                continue
            if len(self.streams) >= self.max_streams:
                # Direct hand-overs filled us up while we waited: back to its place in line.
                queue.put_front(pending)
                continue
            self.start_now(pending)
            await self.send_early()

    async def send_early(self) -> None:
        # The request just started alone on the tunnel: its HEAD goes now, from this task.
        await self.endpoint.send_early(quiet=len(self.streams) <= 1)

    def can_start_now(self) -> bool:
        return (self._nursery is not None and not self._closing
                and len(self.streams) < self.max_streams)

    @property
    def load(self) -> int:
        return len(self.streams)

    def start_now(self, pending: PendingRequest) -> None:
        """Open a stream for ``pending``: its HEAD goes out with the caller's ``send_early``
        (called next, before any checkpoint), its body (if any) from a task."""
        assert self._nursery is not None
        self.endpoint.hold()
        request = pending.request
        headers = without(request.headers, (b"transfer-encoding",))
        bodiless = not request.body and pending.body_source is None and not pending.upgrade
        try:
            # The HTTP client's request as the front read it (the target may have lost its
            # /_token/ prefix; X-Forwarded-For is made of read values): a parsed head.
            stream_id, head = self.conn.send_request(
                request.method, request.target, headers, end_stream=bodiless, parsed=True
            )
        except ValueError as exc:
            self.log.warning("WS   ERR", token=self.token, id=pending.id, err=str(exc))
            pending.finish(Failure(400, "Request cannot be carried by the tunnel"))
            self.rendezvous.release(pending)
            return
        pending.holder = self
        pending.tries += 1
        self.in_flight[pending.id] = pending
        stream = _Stream(stream_id, pending, pending.id)
        self.streams[stream_id] = stream
        # The response may send its first window at once (``opening_window``: 2 MiB on a tunnel
        # that tunes its windows, what its transfers reached once they widened them), granted
        # in the request's own message: a round trip sooner than from its first DATA.
        self.endpoint.emit(head, *self.conn.widen(stream_id, self.conn.opening_window))
        self.log.info(
            "WS   SND", token=self.token, id=pending.id, stream=stream_id,
            info=f"{pending.method.decode('latin-1')} {short_target(request.target)}",
        )
        if pending.body_source is not None:
            self._nursery.start_soon(self._send_streamed_body, stream, stream.body_scope(),
                                     pending.body_source)
        elif request.body:
            # What the windows take goes now, right behind the HEAD (a small body: all of it, in
            # the same message); a task waits for credit for the rest.
            frames, taken = self.conn.data_frames(stream_id, request.body, end_stream=True)
            self.endpoint.emit(*frames)
            if taken < len(request.body):
                self._nursery.start_soon(self._send_body, stream, stream.body_scope(),
                                         memoryview(request.body)[taken:])

    async def _send_body(self, stream: _Stream, scope: trio.CancelScope, rest: memoryview) -> None:
        """The rest of a request body that is whole in memory here, as DATA within the client's
        windows."""
        # Reset meanwhile: nothing more to send.
        with scope, contextlib.suppress(StreamClosedError):
            await self.endpoint.send_data(stream.id, rest, end_stream=True)

    async def _send_streamed_body(self, stream: _Stream, scope: trio.CancelScope,
                                  source: RequestBodySource) -> None:
        """The request body as the HTTP client sends it, read from its socket only while the
        stream has credit: the client's windows bound what waits here, and a backend that reads
        slowly slows the HTTP client down."""
        with scope:
            try:
                while True:
                    await self.endpoint.wait_credit(stream.id)
                    chunk = await source.receive()
                    if chunk is None:
                        self.endpoint.end(stream.id)
                        return
                    await self.endpoint.send_data(stream.id, chunk)
            except StreamClosedError:
                pass  # reset meanwhile: nothing more to send
            except BodyError as exc:
                self._body_failed(stream, exc)

    def _body_failed(self, stream: _Stream, exc: BodyError) -> None:
        """The HTTP client's body broke off, stalled or grew too large: the backend must not
        take it as whole, so the stream is reset; the HTTP client gets the error, if it is there."""
        code = (v2.ErrorCode.TOO_LARGE if isinstance(exc, BodyTooLarge)
                else v2.ErrorCode.TIMEOUT if isinstance(exc, BodyTimeout) else v2.ErrorCode.CANCEL)
        self.log.info("WS   ERR", token=self.token, id=stream.request_id, stream=stream.id,
                      err=exc.text)
        self._forget(stream.id)
        stream.finished = True
        self.endpoint.reset(stream.id, code, exc.text)
        if stream.headed:
            stream.aborted = exc.cut()
            stream.chunks.close()
            return
        pending = stream.pending
        assert pending is not None  # kept until the response head came
        self.in_flight.pop(pending.id, None)
        pending.holder = None
        pending.finish(Failure(exc.status, exc.text, cut=exc.cut(), tunnel_aborts=self.aborts))
        self.rendezvous.release(pending)

    # -- receiving ----------------------------------------------------------------------------

    async def _receive_frames(self) -> None:
        endpoint, rendezvous = self.endpoint, self.rendezvous
        while True:
            try:
                await endpoint.receive()
            except trio_websocket.ConnectionClosed:
                return
            except FramingError as exc:
                self.log.warning("WS   ERR", token=self.token, err=str(exc))
                self._end_soon(1002, f"protocol error: {exc}")  # exc names the frame at fault
                return
            rendezvous.touch()

    # -- the endpoint's events (StreamHandler) ------------------------------------------------

    def on_request(self, event: v2.RequestReceived) -> None:  # pragma: no cover
        raise AssertionError("V2Connection gives a server no requests")

    def on_data(self, event: v2.DataReceived) -> bool:
        stream = self.streams.get(event.stream)
        if stream is None:
            return False  # nobody will read it (a late frame)
        stream.received += len(event.data)
        if stream.received > self.max_stream_size and not stream.switched:
            reason = "response body larger than max_stream_size"
            self.cancel_stream(stream, v2.ErrorCode.TOO_LARGE, reason)  # releases its bytes
            stream.aborted = Cut("response", Cause.TOO_LARGE, reason)  # its HTTP ABORT line says it
            stream.chunks.close()
            return True
        stream.chunks.send_nowait(event.data)
        return True

    def on_end(self, event: v2.StreamEnded) -> None:
        stream = self.streams.get(event.stream)
        if stream is not None and stream.headed:
            stream.finished = True
            stream.trailers = list(event.trailers)
            stream.chunks.send_nowait(_END)
            stream.chunks.close()
            self._forget(event.stream)

    def on_reset(self, event: v2.StreamReset) -> None:
        stream = self.streams.get(event.stream)
        if stream is not None:
            stream.finished = True
            cause = _RESET_CAUSES.get(event.code, Cause.RESET)
            # Before the response head, the request's body is what the reset cut off.
            direction: Direction = "response" if stream.headed else "request"
            reason = f"reset by the tunnel client: {event.reason or f'code {event.code}'}"
            self._abort(stream, Cut(direction, cause, reason), code=event.code)

    def on_response(self, event: v2.ResponseReceived) -> None:
        stream = self.streams.get(event.stream)
        if stream is None or event.informational:
            return  # a 1xx tells the HTTP client nothing it needs; the final head follows
        pending = stream.pending
        assert pending is not None  # a stream gets one final head (V2Connection checks)
        stream.headed = True
        stream.switched = event.status == 101
        self.in_flight.pop(pending.id, None)
        pending.holder = None
        self.answered += 1
        self.log.info("WS   RCV", token=self.token, id=pending.id, stream=stream.id, status=event.status)
        if pending.abandoned or pending.outcome is not None:
            self.cancel_stream(stream, v2.ErrorCode.CANCEL, "HTTP client gave up")
        else:
            upgraded = _UpgradedUpload(self, stream) if event.status == 101 else None
            if pending.upgrade and upgraded is None and not event.end_stream:
                # Not switched: the upgrade request had no body, so our side is over.
                self.endpoint.end(stream.id)
            pending.finish(StreamingResponse(
                status=event.status, reason=event.reason, headers=event.headers,
                body=_StreamBody(self, stream), idle_timeout=self.httptimeout, upgraded=upgraded,
                tunnel_aborts=self.aborts, parsed_head=True,
            ))
        stream.pending = None
        self.rendezvous.release(pending)

    def _abort(self, stream: _Stream, cut: Cut, code: int | None = None) -> None:
        """The stream will never complete: fail or retry its request, or abort its response."""
        self._forget(stream.id)
        stream.stop_body()
        if stream.headed:
            stream.aborted = cut
            stream.chunks.close()  # the reader gets EndOfChannel after what was buffered
            return
        pending = stream.pending
        assert pending is not None  # kept until the response head came
        if code is None:
            return  # the tunnel died: _fail_in_flight retries or fails what it holds
        self.in_flight.pop(pending.id, None)
        pending.holder = None
        # Only a body under way was cut; a request whose body was whole just failed.
        source = pending.body_source
        upload = cut if source is not None and source.started else None
        if code == v2.ErrorCode.TOO_LARGE:
            failure = Failure(413, "Request body too large for the tunnel client", cut=upload)
        else:
            failure = Failure(502, "Tunnel client reset the request", cut=upload)
        failure.tunnel_aborts = self.aborts
        pending.finish(failure)
        self.rendezvous.release(pending)


# How the tunnel client's RESET codes are counted.
_RESET_CAUSES: dict[int, Cause] = {
    v2.ErrorCode.BACKEND_ERROR: Cause.BACKEND_FAILED,
    v2.ErrorCode.TOO_LARGE: Cause.TOO_LARGE,
    v2.ErrorCode.TIMEOUT: Cause.STALLED,
}
