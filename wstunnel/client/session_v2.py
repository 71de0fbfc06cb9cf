"""The client's end of a protocol v2 tunnel: each request a stream, each response streamed back.

The session's receive loop feeds a :class:`~wstunnel.v2.V2Connection` and starts one
handler task per request (in the session's nursery, so a dying tunnel cancels them all). A handler
replays the request against the backend at once, streaming both ways: the request body goes to
the backend as its DATA arrives (credit goes back to the server only once the chunk was written to
the backend, so a slow backend stops the upload instead of filling memory), and the response goes
back as a head, then DATA as the backend sends it (within the server's windows: a handler short of
credit waits, and so stops reading from its backend), the last DATA with END_STREAM when the body's
end is already known, else a separate END. A RESET from the server cancels the handler, which
closes its backend connection.

An ``Upgrade`` request the backend answers with 101 becomes a byte pipe: the backend client hands
over the connection (``response.stream``) and DATA flows both ways, with the same flow control, until
both sides have ended (or one has, and the other does not follow within PIPE_LINGER).

A stream that does not end cleanly (the server reset it, the backend broke mid-body) gets one
``WS   ABORT`` line with how far it got and why, and is counted in ``aborts``; the streams a lost
tunnel took with it wait in ``cut_by_end`` for the agent, which knows why the tunnel ended.

The frames, the windows and the receive loop are the shared :class:`~wstunnel.tunnel.endpoint.
V2Endpoint`'s; this module is what the client does with its streams.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import trio

from wstunnel import framing, v2
from wstunnel.client.backend import Backend, Refusal
from wstunnel.client.origin import Response, UpgradedStream
from wstunnel.errors import BackendError, FramingError, StreamClosedError, TunnelMessageError
from wstunnel.headers import Headers, without_hop_by_hop
from wstunnel.headers import get as get_header
from wstunnel.logs import EventLogger
from wstunnel.tokens import Token
from wstunnel.tunnel.chunks import ChunkQueue
from wstunnel.tunnel.endpoint import PIPE_LINGER, V2Endpoint, log_widened
from wstunnel.tunnel.transport import MessageTransport

# Request body bytes handed to the backend client at once, at most: fewer, larger writes to the backend.
FEED_SIZE = 256 * 1024
PIPE_READ_SIZE = 64 * 1024


@dataclass(eq=False)
class _Stream:
    id: int
    method: bytes
    target: bytes
    headers: Headers
    has_body: bool
    # The request body as it arrives; bounded by the stream window we grant, not by the queue.
    chunks: ChunkQueue[bytes] = field(default_factory=ChunkQueue)
    size: int = 0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    started: float = field(default_factory=trio.current_time)
    sent: int = 0  # response body bytes sent to the server
    declared: int | None = None  # the response's Content-Length, if it has one
    finished: bool = False  # our side ended cleanly: the whole response went
    cut: tuple[str, str] | None = None  # (cause, reason) once it broke off

    @property
    def upgrade(self) -> bytes | None:
        return get_header(self.headers, b"upgrade")


class _BodyFeed:
    """The request body as the backend client pulls it (an async iterable, not a generator, so
    nothing is left for a finalizer when it stops early). Taking the next chunk means the client
    has written the previous ones to the backend: only then does their credit go back to the server."""

    def __init__(self, session: ClientSessionV2, stream: _Stream) -> None:
        self._session = session
        self._stream = stream
        self._taken = 0

    def __aiter__(self) -> _BodyFeed:
        return self

    async def __anext__(self) -> bytes:
        stream = self._stream
        if self._taken:
            self._session.endpoint.credit(stream.id, self._taken)
            self._taken = 0
        try:
            parts = [await stream.chunks.receive()]
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        size = len(parts[0])
        while size < FEED_SIZE:
            try:
                parts.append(stream.chunks.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            size += len(parts[-1])
        self._taken = size
        return parts[0] if len(parts) == 1 else b"".join(parts)


class ClientSessionV2:
    """Serves one v2 tunnel until the WebSocket closes or the server breaks the protocol."""

    def __init__(self, ws: MessageTransport, backend: Backend, *,
                 limiter: trio.CapacityLimiter, log: EventLogger,
                 token: Token, batched: bool = False, aborts: Counter[str] | None = None,
                 limits: v2.WindowLimits | None = None,
                 request_window: int = v2.INITIAL_STREAM_WINDOW) -> None:
        self.ws = ws
        self.backend = backend
        self.limiter = limiter
        self.log = log
        self.token = token
        self.endpoint = V2Endpoint("client", ws, self, batched=batched, limits=limits,
                                   request_window=request_window)
        self.conn = self.endpoint.conn
        self.streams: dict[int, _Stream] = {}
        self._nursery: trio.Nursery | None = None  # the handlers', while run() runs
        # Streams that broke off, by cause (the agent's, across its sessions).
        self.aborts: Counter[str] = Counter() if aborts is None else aborts
        # Streams the end of the tunnel cut off: the agent tells them, with why it ended.
        self.cut_by_end: list[_Stream] = []

    async def run(self) -> None:
        endpoint = self.endpoint
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            # The writer returns on ConnectionClosed: the receive loop sees the close too and
            # ends the session with one error, not a group of two it could not describe.
            nursery.start_soon(endpoint.run_writer)
            nursery.start_soon(endpoint.run_tuner, self._widened)
            try:
                while True:
                    try:
                        await endpoint.receive()  # ConnectionClosed ends the session
                    except FramingError as exc:
                        with trio.move_on_after(2):
                            await self.ws.aclose(1002, "protocol error")
                        raise TunnelMessageError(str(exc)) from None
            finally:
                # Here, before the nursery waits for the handlers: one of them may be sending,
                # shielded, to a link that fell silent (the keepalive's ping timeout ends the
                # session), and would hold the session until the kernel gave up on the socket.
                endpoint.abort()

    def _widened(self, rtt: float, grants: list[v2.Window]) -> None:
        log_widened(self.log, self.token, self.endpoint.conn, rtt, grants)

    # -- the endpoint's events (StreamHandler) ------------------------------------------------

    def on_request(self, event: v2.RequestReceived) -> None:
        assert self._nursery is not None
        stream = _Stream(event.stream, event.method, event.target, event.headers,
                         has_body=not event.end_stream)
        self.streams[event.stream] = stream
        self._nursery.start_soon(self._handle, stream)

    def on_response(self, event: v2.ResponseReceived) -> None:  # pragma: no cover
        raise AssertionError("V2Connection gives a client no responses")

    def on_data(self, event: v2.DataReceived) -> bool:
        stream = self.streams.get(event.stream)
        if stream is None:
            return False  # its handler is gone and nobody will read this
        stream.size += len(event.data)
        # The backend's cap (a reload updates it); an upgraded connection is not one body.
        if stream.upgrade is None and stream.size > self.backend.max_stream_size:
            self.streams.pop(stream.id, None)
            stream.cut = stream.cut or ("too_large", "request body larger than max_stream_size")
            stream.scope.cancel()
            self.endpoint.reset(stream.id, v2.ErrorCode.TOO_LARGE, "request body too large")
            return True  # released with the stream
        stream.chunks.send_nowait(event.data)
        return True

    def on_end(self, event: v2.StreamEnded) -> None:
        stream = self.streams.get(event.stream)
        if stream is not None:
            stream.chunks.close()

    def on_reset(self, event: v2.StreamReset) -> None:
        stream = self.streams.pop(event.stream, None)
        if stream is not None:
            # The server may reset a response it has whole (by its Content-Length) before our
            # END reached it: that one is over, not cut off.
            whole = stream.declared is not None and stream.sent >= stream.declared
            if not (stream.finished or whole):
                stream.cut = stream.cut or (
                    "reset_by_server", f"reset by the server: {event.reason or f'code {event.code}'}")
            stream.scope.cancel()  # closes the backend request, if any

    # -- one request --------------------------------------------------------------------------

    async def _handle(self, stream: _Stream) -> None:
        try:
            await self._handle_in(stream)
        finally:
            # Its last frames are out of our hands: with many requests in flight, often the last
            # of a batch's worth; alone on the tunnel, they go now, from this task (which ends
            # any hold of _answer's).
            await self.endpoint.send_early(quiet=not self.streams)

    async def _handle_in(self, stream: _Stream) -> None:
        with stream.scope:
            try:
                # A free slot is taken without the checkpoint (one more trip through trio's
                # scheduler per request) that ``async with limiter`` makes; a busy one is waited for.
                try:
                    self.limiter.acquire_nowait()
                except trio.WouldBlock:
                    await self.limiter.acquire()
                try:
                    await self._answer(stream)
                finally:
                    self.limiter.release()
            except StreamClosedError:
                pass  # the server reset the stream while we were answering
            finally:
                self.streams.pop(stream.id, None)
                # The server may still be sending a body nobody will read (the backend answered
                # without it, or failed): stop it, which also gives back the credit it holds.
                if self.conn.stream_state(stream.id) in (v2.StreamState.OPEN,
                                                          v2.StreamState.HALF_CLOSED_LOCAL):
                    self.endpoint.reset(stream.id, v2.ErrorCode.CANCEL,
                                        "request body not taken")
                self._account(stream)

    def _account(self, stream: _Stream) -> None:
        """A handler ends: a stream that broke off is told and counted (one that the tunnel's
        end cut off, later, by the agent)."""
        if stream.finished and stream.cut is None:
            return
        if stream.cut is None:
            self.cut_by_end.append(stream)  # cancelled from outside: the tunnel is ending
            return
        self.tell_abort(stream, *stream.cut)

    def tell_abort(self, stream: _Stream, cause: str, reason: str) -> None:
        self.aborts[cause] += 1
        self.log.info("WS   ABORT", token=self.token, id=stream.id, bytes_in=stream.size,
                      bytes_out=stream.sent, secs=round(trio.current_time() - stream.started, 3),
                      cause=cause, reason=reason)

    async def _answer(self, stream: _Stream) -> None:
        request = framing.Request(stream.method, stream.target, stream.headers, b"")
        self.log.info("WS   RCV", token=self.token, id=stream.id, verb=request.method,
                      url=request.target[:200])
        body = _BodyFeed(self, stream) if stream.has_body and stream.upgrade is None else None
        try:
            response = await self.backend.open_stream(request, body, upgrade=stream.upgrade)
            try:
                if response.stream is not None:  # a 101 to our upgrade request
                    await self._pipe(stream, response)
                    return
                head = self._response_head(stream, response)
                bodyless = head.end_stream
                cap = self.backend.max_stream_size
                if response.complete:
                    # The whole body came with the head: no wait before _handle sends it all
                    # (send_data hands it to the writer if it has to wait for credit).
                    self.endpoint.hold()
                self.endpoint.emit(head)
                self.log.info("WS   SND", token=self.token, id=stream.id, status=response.status)
                if bodyless:
                    stream.finished = True
                    await self._send_last()
                    return
                declared = get_header(response.headers, b"content-length") or b""
                stream.declared = int(declared) if declared.isdigit() else None
                try:
                    async for chunk in response:
                        if stream.sent + len(chunk) > cap:  # undeclared length: the head is gone
                            stream.cut = ("too_large", "backend response larger than max_stream_size")
                            self.endpoint.reset(stream.id, v2.ErrorCode.TOO_LARGE,
                                                "backend response larger than max_stream_size")
                            return
                        # The body's end already known: END_STREAM on this DATA, no END frame
                        # (unless trailers need one).
                        last = response.complete and not response.trailers
                        await self.endpoint.send_data(stream.id, chunk, end_stream=last)
                        stream.sent += len(chunk)
                        if last:
                            stream.finished = True
                            await self._send_last()
                            return
                except BackendError as exc:
                    # Mid-body: the head is gone already, so the only honest answer is an abort.
                    stream.cut = ("backend_failed", f"backend response broken: {type(exc).__name__}")
                    self.endpoint.reset(stream.id, v2.ErrorCode.BACKEND_ERROR,
                                        "backend response broken")
                    return
                self.endpoint.emit(self.conn.send_end(stream.id, _passable_trailers(response.trailers)))
                stream.finished = True
            finally:
                await response.aclose()
        except Refusal as refusal:
            if (refusal.backend_failed and stream.size
                    and self.conn.stream_state(stream.id) is v2.StreamState.OPEN):
                # The backend went while the request's body was on its way to it.
                stream.cut = ("backend_failed", f"backend failed mid-upload: {refusal.text}")
            await self._send_whole(stream, refusal.response())
            stream.finished = True

    async def _send_last(self) -> None:
        """The response's last frame is put: alone on the tunnel (or after a quiet spell), it
        goes now, before this handler gives its backend connection back and tidies up, which
        the server's answer need not wait for (_handle's own send_early then finds nothing)."""
        await self.endpoint.send_early(quiet=len(self.streams) <= 1)

    async def _pipe(self, stream: _Stream, response: Response) -> None:
        """The backend switched protocols: carry the raw bytes both ways until both ends close."""
        assert response.stream is not None
        network = response.stream
        headers = [*without_hop_by_hop(response.headers),
                   (b"Upgrade", get_header(response.headers, b"upgrade") or b"")]
        self.endpoint.emit(self.conn.send_response(stream.id, 101, response.reason, headers))
        self.log.info("WS   SND", token=self.token, id=stream.id, status=101)
        async with trio.open_nursery() as pipe:
            pipe.start_soon(self._pipe_up, stream, network, pipe.cancel_scope)
            try:
                while True:
                    data = await network.receive_some(PIPE_READ_SIZE)
                    if not data:
                        break
                    await self.endpoint.send_data(stream.id, data)
                    stream.sent += len(data)
            except BackendError as exc:
                stream.cut = ("backend_failed", f"backend connection broken: {type(exc).__name__}")
                self.endpoint.reset(stream.id, v2.ErrorCode.BACKEND_ERROR,
                                    f"backend connection broken: {type(exc).__name__}")
                pipe.cancel_scope.cancel()
                return
            except StreamClosedError:
                # The server reset the stream (on_reset says why) just as we sent: caught here,
                # since out of this nursery it would come wrapped in an ExceptionGroup that
                # _handle does not catch, and end the whole client (it did).
                pipe.cancel_scope.cancel()
                return
            self.endpoint.emit(self.conn.send_end(stream.id))
            pipe.cancel_scope.deadline = min(pipe.cancel_scope.deadline,
                                             trio.current_time() + PIPE_LINGER)
        # Both ways ended, or one did and the other was given PIPE_LINGER to follow: over.
        stream.finished = stream.cut is None

    async def _pipe_up(self, stream: _Stream, network: UpgradedStream,
                       scope: trio.CancelScope) -> None:
        """HTTP client to backend; its credit goes back once the backend's socket took it."""
        try:
            async for chunk in stream.chunks:
                await network.send_all(chunk)
                self.endpoint.credit(stream.id, len(chunk))
        except BackendError as exc:
            stream.cut = ("backend_failed", f"backend connection broken: {type(exc).__name__}")
            self.endpoint.reset(stream.id, v2.ErrorCode.BACKEND_ERROR,
                                f"backend connection broken: {type(exc).__name__}")
            scope.cancel()
            return
        # The HTTP client's side is over; the backend's may follow, but not forever.
        scope.deadline = min(scope.deadline, trio.current_time() + PIPE_LINGER)

    def _response_head(self, stream: _Stream, response: Response) -> v2.Head:
        """The HEAD frame for the backend's response; Refusal if it cannot be passed on."""
        # A streamed body holds no more memory the larger it is: only an admin's max_stream_size
        # (none by default) caps it.
        declared = get_header(response.headers, b"content-length") or b""
        if declared.isdigit() and int(declared) > self.backend.max_stream_size:
            self.log.warning("WS   ERR", token=self.token, id=stream.id,
                             err="backend response larger than max_stream_size")
            raise Refusal(502, "Backend response larger than max_stream_size")
        status = response.status
        bodyless = stream.method == b"HEAD" or status in (204, 304)
        try:
            # The backend's head as the origin read it, less its hop-by-hop fields.
            return self.conn.send_response(stream.id, status, response.reason,
                                           without_hop_by_hop(response.headers), end_stream=bodyless,
                                           parsed=True)
        except ValueError as exc:
            raise Refusal(502, f"Backend response cannot be carried: {exc}") from None

    async def _send_whole(self, stream: _Stream, response: framing.Response) -> None:
        """A response we make ourselves (a refusal, a 502 before any backend head)."""
        headers = [*response.headers, (b"Content-Length", b"%d" % len(response.body))]
        bodyless = stream.method == b"HEAD"
        self.endpoint.emit(self.conn.send_response(stream.id, response.status, response.reason, headers,
                                           end_stream=bodyless))
        self.log.info("WS   SND", token=self.token, id=stream.id, status=response.status)
        if bodyless:
            return
        await self.endpoint.send_data(stream.id, response.body)
        self.endpoint.emit(self.conn.send_end(stream.id))


# Fields that describe or frame the message, never trailers to pass on (RFC 9110 §6.5.1).
_NOT_TRAILERS = frozenset({b"content-length", b"transfer-encoding", b"host", b"content-type",
                           b"content-encoding", b"content-range", b"trailer", b"te",
                           b"connection", b"keep-alive", b"upgrade"})


def _passable_trailers(trailers: Headers) -> Headers:
    return [(name, value) for name, value in trailers if name.lower() not in _NOT_TRAILERS]
