"""The client's end of a protocol v2 tunnel: each request a stream, each response streamed back.

The session's receive loop feeds a :class:`~wstunnel.framing_v2.V2Connection` and starts one
handler task per request (in the session's nursery, so a dying tunnel cancels them all). A handler
buffers its request body (streamed uploads come later), replays the request against the backend
with httpx streaming, and sends the response head, then DATA as ``aiter_raw`` yields it (within the
server's windows: a handler short of credit waits, and so stops reading from its backend), then END.
A RESET from the server cancels the handler, which closes its backend connection.

Frames reach the WebSocket through one outbound channel drained by one writer task, each put on it
without a checkpoint after the V2Connection call that made it (framing_v2's ordering rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import httpx
import trio
import trio_websocket

from wstunnel import framing
from wstunnel import framing_v2 as v2
from wstunnel.client.backend import Backend, Refusal
from wstunnel.errors import FramingError, StreamClosedError, TunnelMessageError
from wstunnel.headers import Headers, without_hop_by_hop
from wstunnel.logs import EventLogger
from wstunnel.tokens import Token
from wstunnel.transport import MessageTransport


@dataclass(eq=False)
class _Stream:
    id: int
    method: bytes
    target: bytes
    headers: Headers
    body: list[bytes] = field(default_factory=list)
    size: int = 0
    request_done: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class ClientSessionV2:
    """Serves one v2 tunnel until the WebSocket closes or the server breaks the protocol."""

    def __init__(self, ws: MessageTransport, backend: Backend, *,
                 limiter: trio.CapacityLimiter, log: EventLogger,
                 token: Token) -> None:
        self.ws = ws
        self.backend = backend
        self.limiter = limiter
        self.log = log
        self.token = token
        self.conn = v2.V2Connection("client")
        self.streams: dict[int, _Stream] = {}
        # Unbounded, but what waits in it is bounded by the server's windows (DATA) or tiny.
        self._outbox_in, self._outbox_out = trio.open_memory_channel[bytes](math.inf)
        # Replaced each time the server grants credit; a handler short of credit waits on it.
        self._credit = trio.Event()

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_frames)
                await self._receive_frames(nursery)
        finally:
            self._outbox_in.close()

    # -- sending ------------------------------------------------------------------------------

    def _emit(self, *frames: v2.Frame) -> None:
        for frame in frames:
            try:
                self._outbox_in.send_nowait(v2.encode_frame(frame))
            except trio.ClosedResourceError:
                return  # the session is over

    async def _write_frames(self) -> None:
        async for message in self._outbox_out:
            try:
                await self.ws.send_message(message)
            except trio_websocket.ConnectionClosed:
                # The receive loop sees the close too and ends the session with one error,
                # not a group of two the session could not describe.
                return

    async def _send_data(self, stream: _Stream, chunk: bytes) -> None:
        view = memoryview(chunk)
        offset = 0
        while offset < len(view):
            credit = self._credit
            frames, taken = self.conn.data_frames(stream.id, view[offset:])
            self._emit(*frames)
            offset += taken
            if not taken:
                await credit.wait()

    # -- receiving ----------------------------------------------------------------------------

    async def _receive_frames(self, nursery: trio.Nursery) -> None:
        while True:
            message = await self.ws.get_message()  # ConnectionClosed ends the session
            try:
                events = self.conn.receive(message)
            except FramingError as exc:
                with trio.move_on_after(2):
                    await self.ws.aclose(1002, "protocol error")
                raise TunnelMessageError(str(exc)) from None
            for event in events:
                self._on_event(event, nursery)

    def _on_event(self, event: v2.Event, nursery: trio.Nursery) -> None:
        if isinstance(event, v2.RequestReceived):
            stream = _Stream(event.stream, event.method, event.target, event.headers)
            self.streams[event.stream] = stream
            nursery.start_soon(self._handle, stream)
        elif isinstance(event, v2.DataReceived):
            self._on_data(event)
        elif isinstance(event, v2.StreamEnded):
            stream = self.streams.get(event.stream)
            if stream is not None:
                stream.request_done.set()
        elif isinstance(event, v2.StreamReset):
            stream = self.streams.pop(event.stream, None)
            if stream is not None:
                stream.scope.cancel()  # closes the backend request, if any
            self._wake_senders()
        elif isinstance(event, v2.WindowUpdated):
            self._wake_senders()
        elif isinstance(event, v2.SendFrame):
            self._emit(event.frame)

    def _on_data(self, event: v2.DataReceived) -> None:
        stream = self.streams.get(event.stream)
        if stream is None:
            return
        stream.size += len(event.data)
        if stream.size > self.backend.max_body_size:  # the backend's: a reload updates it
            self.streams.pop(stream.id, None)
            stream.scope.cancel()
            self._emit(*self.conn.reset(stream.id, v2.ErrorCode.TOO_LARGE, "request body too large"))
            return
        stream.body.append(event.data)
        # Buffered whole for now, so take it at once: the window keeps flowing up to the body cap.
        self._emit(*self.conn.consumed(stream.id, len(event.data)))

    def _wake_senders(self) -> None:
        self._credit.set()
        self._credit = trio.Event()

    # -- one request --------------------------------------------------------------------------

    async def _handle(self, stream: _Stream) -> None:
        with stream.scope:
            try:
                await stream.request_done.wait()
                async with self.limiter:
                    await self._answer(stream)
            except StreamClosedError:
                pass  # the server reset the stream while we were answering
            finally:
                self.streams.pop(stream.id, None)

    async def _answer(self, stream: _Stream) -> None:
        request = framing.Request(stream.method, stream.target, stream.headers, b"".join(stream.body))
        stream.body.clear()
        self.log.info("WS   RCV", token=self.token, id=stream.id, verb=request.method,
                      url=request.target[:200])
        try:
            async with self.backend.open_stream(request) as response:
                head = self._response_head(stream, response)
                bodyless = head.end_stream
                cap = self.backend.max_body_size
                self._emit(head)
                self.log.info("WS   SND", token=self.token, id=stream.id, status=response.status_code)
                if bodyless:
                    return
                size = 0
                try:
                    async for chunk in response.aiter_raw():
                        size += len(chunk)
                        if size > cap:  # undeclared length: the head is gone, so abort
                            self._emit(*self.conn.reset(stream.id, v2.ErrorCode.TOO_LARGE,
                                                        "backend response larger than max_body_size"))
                            return
                        await self._send_data(stream, chunk)
                except httpx.TransportError as exc:
                    # Mid-body: the head is gone already, so the only honest answer is an abort.
                    self.log.warning("WS   ERR", token=self.token, id=stream.id,
                                     err=f"backend response broken: {type(exc).__name__}")
                    self._emit(*self.conn.reset(stream.id, v2.ErrorCode.BACKEND_ERROR,
                                                "backend response broken"))
                    return
                self._emit(self.conn.send_end(stream.id))
        except Refusal as refusal:
            await self._send_whole(stream, refusal.response())

    def _response_head(self, stream: _Stream, response: httpx.Response) -> v2.Head:
        """The HEAD frame for the backend's response; Refusal if it cannot be passed on."""
        # max_body_size caps responses as in v1 (TODO: whether a streamed body needs a cap at
        # all is for a later slice: memory no longer grows with it).
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.backend.max_body_size:
            raise Refusal(502, "Backend response larger than max_body_size")
        status = response.status_code
        bodyless = stream.method == b"HEAD" or status in (204, 304)
        reason = response.reason_phrase.encode("latin-1", "replace")
        try:
            return self.conn.send_response(stream.id, status, reason,
                                           without_hop_by_hop(response.headers.raw), end_stream=bodyless)
        except ValueError as exc:
            raise Refusal(502, f"Backend response cannot be carried: {exc}") from None

    async def _send_whole(self, stream: _Stream, response: framing.Response) -> None:
        """A response we make ourselves (a refusal, a 502 before any backend head)."""
        headers = [*response.headers, (b"Content-Length", b"%d" % len(response.body))]
        bodyless = stream.method == b"HEAD"
        self._emit(self.conn.send_response(stream.id, response.status, response.reason, headers,
                                           end_stream=bodyless))
        self.log.info("WS   SND", token=self.token, id=stream.id, status=response.status)
        if bodyless:
            return
        await self._send_data(stream, response.body)
        self._emit(self.conn.send_end(stream.id))
