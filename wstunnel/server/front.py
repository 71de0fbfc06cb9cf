"""The server's HTTP/1.1 front: one h11 connection per accepted socket, and a fast path beside it.

Simple requests (the common case: HTTP/1.1, a Host, no body or a small one that came whole, nothing
about keep-alive, upgrades or 100-continue) are read, and their plain responses written, without
h11 (``wstunnel.server.fasthttp``, held to h11's grammar); anything else goes to h11, which is first
shown the request's own bytes when the request was read on the fast path, so it then answers,
refuses or closes exactly as it always did. The first request h11 has to read takes the connection
off the fast path for good.

It reads requests with limits on everything a peer controls (head size, header count, body size,
time to send the head), answers malformed ones with a 4xx instead of dropping the connection, and
hands each good request to the application. A WebSocket upgrade on ``/_tunnel`` leaves HTTP: the
application receives the raw stream, with the handshake bytes replayed, and owns it from then on.
Another upgrade that the backend accepts (a 101 through a v2 tunnel) leaves HTTP too: the pipe of
``wstunnel.server.upgraded`` then carries its bytes both ways.

Request bodies. A small body (a Content-Length up to SMALL_BODY) is read whole before the request
goes to the application: one cheap step for the common case. A larger or chunked body is handed
over as a :class:`~wstunnel.server.incoming.RequestBody` that whoever forwards the request pulls
from the socket as it goes (a v2 tunnel streams it; a v1 tunnel reads it whole), so nothing reads
a body the request's tunnel cannot take yet. A response sent before its request body was read to
the end closes the connection after it: the rest of the body would have to be read and thrown away
first.
"""

from __future__ import annotations

import contextlib
import math
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import h11
import trio

from wstunnel import framing, http1
from wstunnel.alarms import Alarms
from wstunnel.headers import Headers
from wstunnel.server.aborts import Cause, Cut, Direction
from wstunnel.server.fasthttp import (
    FALLBACK,
    DirectEncoder,
    Encoder,
    Fallback,
    H11Encoder,
    read_simple_request,
)
from wstunnel.server.incoming import RECEIVE_SIZE, IncomingRequest, RequestBody
from wstunnel.server.messages import (
    AnyResponse,
    BodyError,
    BodyTooLarge,
    ResponseAborted,
    StreamingResponse,
    simple_response,
)
from wstunnel.server.outgoing import SEND_BATCH, ResponseBatch, declared_length, next_chunk
from wstunnel.server.upgraded import pipe_upgraded, switching_headers
from wstunnel.tunnel.sockets import DirectSocketStream
from wstunnel.tunnel.transport import ActivityStream, half_close, tune_tunnel_socket

# How long an idle keep-alive connection may wait for its next request.
KEEPALIVE_TIMEOUT = 75.0
# Bodies declared this small are read before the request is routed; larger ones are streamed.
SMALL_BODY = 64 * 1024
# After answering a request whose body we did not read, keep reading (and dropping) for a while
# before closing: closing with unread bytes makes the kernel send a RST, which can destroy the
# response in the client's receive buffer before the client has read it.
LINGER_TIMEOUT = 2.0
LINGER_BYTES = 4 * 1024 * 1024
# SO_LINGER on, with a zero timeout: close() sends a TCP reset instead of a FIN.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class FrontLimits:
    max_header_size: int
    max_header_count: int
    max_body_size: int  # a body read whole before routing (SMALL_BODY at most), or by a v1 tunnel
    header_timeout: float
    max_stream_size: float = math.inf  # a body streamed to the tunnel as it comes


Responder = Callable[[IncomingRequest], Awaitable[AnyResponse]]
TunnelTaker = Callable[[IncomingRequest, ActivityStream], Awaitable[None]]
IsTunnel = Callable[[IncomingRequest], bool]


@dataclass(frozen=True, slots=True)
class _Handover:
    """A tunnel's handshake read: the connection goes to the tunnel code, with what came."""

    request: IncomingRequest
    stream: ActivityStream


class HttpConnection:
    """Serves the requests of one TCP connection until it closes or turns into a tunnel."""

    def __init__(
        self,
        stream: trio.abc.Stream,  # a TCP socket, or TLS over one
        peer: str,
        limits: FrontLimits,
        *,
        respond: Responder,
        is_tunnel: IsTunnel,
        take_tunnel: TunnelTaker,
        draining: Callable[[], bool],
        alarms: Alarms,
        client_subject: str | None = None,
    ) -> None:
        self.stream = stream
        self.alarms = alarms  # the daemon's: a head not read in time ends the connection
        self.peer = peer
        self.client_subject = client_subject
        self.limits = limits
        self.respond = respond
        self.is_tunnel = is_tunnel
        self.take_tunnel = take_tunnel
        self.draining = draining
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_size)
        # Simple requests are read, and their plain responses written, without h11 (the
        # fasthttp module) until the first request that is not: h11 reads the rest. What was
        # read and not parsed yet; whether the peer has closed its side.
        self._fast = True
        self._buffer = b""
        self._eof = False
        # The current request's own bytes while h11 has not seen it (read on the fast path).
        self._fast_request: bytes | None = None
        self._request: IncomingRequest | None = None  # the one being served
        self.idle = True  # waiting for a request's head: nothing of ours is under way
        self._idle_waiter: trio.Event | None = None  # made only when someone waits (a stop)
        # A body reader may send "100 Continue" while this task waits for the response: these
        # keep the two from writing to the socket at once.
        self._responding = False
        self._continuing = False
        self._continued = trio.Event()
        # A response was cut short: the connection ends with a TCP reset, not a FIN, so that no
        # client can take what it got for the whole (a body ended by the close, a pass-through).
        self._reset_on_close = False

    async def wait_idle(self) -> None:
        """Return once nothing of ours is under way: the last response has gone out (or the
        connection has ended)."""
        while not self.idle:
            if self._idle_waiter is None:
                self._idle_waiter = trio.Event()
            await self._idle_waiter.wait()

    def _became_idle(self) -> None:
        self.idle = True
        if self._idle_waiter is not None:
            self._idle_waiter.set()
            self._idle_waiter = None

    async def serve(self) -> None:
        try:
            await self._serve()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away; nothing to answer
        finally:
            self._became_idle()
            if self._reset_on_close and isinstance(self.stream, trio.SocketStream | DirectSocketStream):
                with contextlib.suppress(OSError):
                    self.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _serve(self) -> None:
        # One cancel scope for the connection's life, not one per request, and an alarm (not a
        # deadline of its own) that cancels it if a head is not read in time: a scope per
        # request, or a deadline set and lifted on one, cost 5-7 % of srv's CPU each at 32
        # connections (wstunnel.alarms).
        ending: bool | _Handover = False
        with trio.CancelScope() as head_wait:
            ending = await self._serve_requests(head_wait)
        if isinstance(ending, _Handover):
            # Outside the scope and the request loop's frame: an idle tunnel served inside them
            # held 1.1 KiB more (36.1 -> 37.2 KiB per tunnel at 1,000).
            del head_wait
            await self.take_tunnel(ending.request, ending.stream)
            return
        if ending or (head_wait.cancelled_caught and (
                self.conn.their_state is h11.SEND_BODY or self._has_partial_head())):
            await self._send_error(408, "Request head not received in time")

    async def _serve_requests(self, head_wait: trio.CancelScope) -> bool | _Handover:
        """Serve requests until the connection is done (False), or a tunnel's handshake came
        (its hand-over). True if a whole head came only as its deadline passed: it gets a 408,
        since the scope is cancelled and nothing more can wait."""
        first = True
        while True:
            timeout = self.limits.header_timeout if first else KEEPALIVE_TIMEOUT
            first = False
            self._became_idle()
            alarm = self.alarms.at(trio.current_time() + timeout, head_wait.cancel)
            malformed: h11.RemoteProtocolError | None = None
            try:
                request = await self._read_head()
            except h11.RemoteProtocolError as exc:
                malformed = exc
            finally:
                alarm.cancel()  # before any answer: the alarm must not cut it
            if malformed is not None:
                hint = malformed.error_status_hint
                status = hint if 400 <= hint < 500 else 400
                text = "Request headers too large" if status == 431 else "Malformed request"
                await self._send_error(status, text)
                return False
            self.idle = False
            if request is None:
                return False
            if head_wait.cancel_called:
                return True  # the deadline passed as the head's last bytes came in
            self._request = request
            self._responding = False
            if len(request.headers) > self.limits.max_header_count:
                await self._send_error(431, "Too many request headers")
                return False
            if request.header(b"transfer-encoding") is not None and \
                    request.header(b"content-length") is not None:
                # Two framings: the classic request-smuggling setup (RFC 9112 §6.1 lets us refuse).
                await self._send_error(400, "Both Content-Length and Transfer-Encoding")
                return False
            # h11 bounds only a head that is still arriving; one that came whole needs our check.
            if request.head_size() > self.limits.max_header_size:
                await self._send_error(431, "Request headers too large")
                return False
            streamed = self._streams_body(request)
            limit = self.limits.max_stream_size if streamed else self.limits.max_body_size
            if request.declared_length() > limit:
                # Say so before the client sends a body we would only throw away.
                await self._send_error(413, "Request body too large")
                return False
            if self._fast_request is not None:
                pass  # a simple request's small body came whole with its head
            elif streamed:
                source = RequestBody(self, limit, self.limits.header_timeout)
                try:
                    source.prime()
                except BodyError as exc:
                    await self._send_error(exc.status, exc.text)
                    return False
                if source.complete:
                    request.body = source.take_early()  # it all came with the head
                else:
                    request.body_source = source
            else:
                try:
                    request.body = await self._read_body()
                except BodyTooLarge:
                    await self._send_error(413, "Request body too large")
                    return False
                except trio.TooSlowError:
                    await self._send_error(408, "Request body not received in time")
                    return False
                except h11.RemoteProtocolError:
                    await self._send_error(400, "Malformed request body")
                    return False
            if self.is_tunnel(request) and self.conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                # Bytes after the handshake (a first frame) belong to the WebSocket layer.
                trailing, _closed = self.conn.trailing_data
                replay = http1.head_bytes(http1.request_line(request.method, request.target),
                                         request.headers) + bytes(trailing)
                socket_stream = self.stream
                while isinstance(socket_stream, trio.SSLStream):  # srv's own TLS
                    socket_stream = socket_stream.transport_stream
                if isinstance(socket_stream, trio.SocketStream | DirectSocketStream):
                    tune_tunnel_socket(socket_stream.socket)
                return _Handover(request, ActivityStream(self.stream, replay))
            response = await self.respond(request)
            if isinstance(response, StreamingResponse):
                try:
                    if response.status == 101:
                        await self._pipe(response)
                        return False  # the connection was the upgraded protocol's, to its end
                    await self._send_streaming(response, head_only=request.method == b"HEAD")
                except trio.Cancelled:
                    self._cut(response, "response", Cause.SERVER_STOPPING,
                              "the server stopped before the body ended")
                    raise
                finally:
                    response.body.close()  # a no-op once the body ended; else cancels the stream
                    if response.on_finish is not None:
                        response.on_finish(response)
            else:
                await self._send_response(response, head_only=request.method == b"HEAD")
            if self._body_unread(request):
                await self._linger(request)
                return False
            if self.conn.our_state is h11.MUST_CLOSE or self.draining():
                return False
            if self._fast_request is not None:
                self._fast_request = None  # answered without h11, which is still ready for the next
                continue
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return False

    def _streams_body(self, request: IncomingRequest) -> bool:
        if request.header(b"transfer-encoding") is not None:
            return True
        return request.declared_length() > SMALL_BODY

    def _body_unread(self, request: IncomingRequest | None = None) -> bool:
        request = request or self._request
        source = request.body_source if request is not None else None
        return source is not None and not source.complete

    async def _linger(self, request: IncomingRequest) -> None:
        """Close a connection whose request body we answered without reading it all."""
        source = request.body_source
        assert source is not None
        source.close()
        # Whoever was reading the body lets go of the socket once its stream is cancelled.
        with trio.move_on_after(LINGER_TIMEOUT):
            async with source.lock:
                await half_close(self.stream)  # the linger that follows runs either way
                drained = 0
                while drained < LINGER_BYTES:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        break
                    drained += len(data)

    async def continue_if_expected(self) -> None:
        """Send ``100 Continue`` if the client waits for it: its body is wanted now."""
        if not self.conn.they_are_waiting_for_100_continue or self._responding:
            return
        self._continuing = True
        try:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        finally:
            self._continuing = False
            self._continued.set()
            self._continued = trio.Event()

    async def _start_response(self) -> None:
        """From here on the response owns the socket's sending side (no more 100 Continue)."""
        self._responding = True
        while self._continuing:
            await self._continued.wait()

    def _has_partial_head(self) -> bool:
        return bool(self._buffer) or bool(self.conn.trailing_data[0])

    async def _receive(self) -> None:
        data = await self.stream.receive_some(RECEIVE_SIZE)
        self.conn.receive_data(bytes(data))  # bytes already (socket or TLS): no copy

    async def _read_head(self) -> IncomingRequest | None:
        if self._fast:
            simple = await self._read_simple()
            if not isinstance(simple, Fallback):
                return simple
            # Not a simple request: h11 reads this connection from here on, from what came.
            self._fast = False
            buffered, self._buffer = self._buffer, b""
            if buffered:
                self.conn.receive_data(buffered)
            if self._eof:
                self.conn.receive_data(b"")
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                await self._receive()
                continue
            if isinstance(event, h11.Request):
                return IncomingRequest(
                    method=bytes(event.method),
                    target=bytes(event.target),
                    headers=[(bytes(k), bytes(v)) for k, v in event.headers.raw_items()],
                    peer=self.peer,
                    client_subject=self.client_subject,
                )
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}", 400)

    async def _read_simple(self) -> IncomingRequest | Fallback | None:
        """The next request if it is a simple one (fasthttp); None if the peer closed before
        another; FALLBACK if h11 is to read it (what came is still in ``_buffer``)."""
        while True:
            buffer = self._buffer
            if buffer:
                found = read_simple_request(buffer, SMALL_BODY)
                if isinstance(found, Fallback):
                    return found
                if found is not None:
                    method, target, headers, body, size = found
                    self._fast_request = buffer[:size] if size < len(buffer) else buffer
                    self._buffer = buffer[size:]
                    return IncomingRequest(method=method, target=target, headers=headers,
                                           peer=self.peer, body=body,
                                           client_subject=self.client_subject)
                if len(buffer) > self.limits.max_header_size:
                    return FALLBACK  # h11 says how large is too large
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                if not buffer:
                    return None
                self._eof = True
                return FALLBACK
            self._buffer = buffer + data if buffer else bytes(data)

    def _to_h11(self) -> None:
        """Show h11 the current request, read on the fast path, before it answers it: h11 then
        holds the conversation it would have had (the request taken, nothing past it)."""
        raw, self._fast_request = self._fast_request, None
        if raw is None:
            return
        self.conn.receive_data(raw)
        try:
            for _ in range(4):  # Request, Data, EndOfMessage
                event = self.conn.next_event()
                if type(event) is h11.EndOfMessage or event is h11.NEED_DATA:
                    return
        except h11.RemoteProtocolError:
            raise trio.BrokenResourceError from None  # cannot be: the grammar is h11's

    def _encoder(self, status: int, reason: bytes, headers: Headers, length: int | None, *,
                 bodyless: bool, head_only: bool) -> Encoder:
        """What writes this response: DirectEncoder for a simple request's plain response,
        else h11 (told of a simple request first)."""
        if self._fast_request is not None:
            if not head_only:
                framing = DirectEncoder.framing(status, reason, headers)
                if not isinstance(framing, Fallback):
                    return DirectEncoder(0 if bodyless else framing)
            self._to_h11()
        return H11Encoder(self.conn, length)

    async def _read_body(self) -> bytes:
        if self.conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        chunks: list[bytes] = []
        size = 0
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_after(self.limits.header_timeout):
                    await self._receive()
                continue
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.limits.max_body_size:
                    raise BodyTooLarge
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise h11.RemoteProtocolError("request body ended early", 400)

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def _send_response(self, response: framing.Response, *, head_only: bool = False) -> None:
        headers = [
            (k, v) for k, v in response.headers
            if k.lower() not in (b"connection", b"keep-alive", b"transfer-encoding")
        ]
        bodyless = head_only or response.status in (204, 304) or response.status < 200
        if not bodyless:
            headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
            headers.append((b"Content-Length", b"%d" % len(response.body)))
        await self._start_response()
        if self.draining() or self._body_unread():
            headers.append((b"Connection", b"close"))
        body = b"" if bodyless else response.body
        try:
            encoder = self._encoder(response.status, response.reason, headers, len(body),
                                    bodyless=bodyless, head_only=head_only)
            head = encoder.head(response.status, response.reason, headers)
            data = encoder.data(body) if body else b""
            end = encoder.end([])
        except h11.LocalProtocolError:
            # h11 refused to write what the tunnel sent: the response is lost; so is the socket.
            raise trio.BrokenResourceError from None
        if len(data) <= SEND_BATCH:
            await self.stream.send_all(head + data + end)  # one write, one wakeup of the client
        else:
            await self.stream.send_all(head)
            await self.stream.send_all(data)
            if end:
                await self.stream.send_all(end)

    async def _send_streaming(self, response: StreamingResponse, *, head_only: bool = False) -> None:
        """Send the head at once, with what of the body is there already, then each chunk as it
        comes.

        A ``Content-Length`` from the backend is kept (h11 then refuses a body of another size,
        which aborts the connection); without one h11 uses chunked coding. A body that cannot be
        completed aborts the connection without the final chunk, so the client sees an error and
        never a clean, truncated response.

        The HTTP response ends as soon as the client can tell it is whole (its head for a bodyless
        one, its last byte for one with a Content-Length), without waiting for the stream's END:
        a proxy in front (nginx's upstream keep-alive) may send the next request on this
        connection then, and with the long-poll transport that request can be the very one
        carrying the END. Closing the body source resets a stream that had not ended yet.
        """
        headers = [
            (k, v) for k, v in response.headers
            if k.lower() not in (b"connection", b"keep-alive", b"transfer-encoding")
        ]
        bodyless = head_only or response.status in (204, 304) or response.status < 200
        length = 0 if bodyless else declared_length(headers)
        await self._start_response()
        if self.draining() or self._body_unread():
            headers.append((b"Connection", b"close"))
        # The head, the body chunks already there and the end go out in one write: one syscall
        # and one wakeup of the client instead of one per piece. Only what is ready is taken, so
        # the head of a slow body (server-sent events) still goes out at once.
        try:
            encoder = self._encoder(response.status, response.reason, headers, length,
                                    bodyless=bodyless, head_only=head_only)
            batch = ResponseBatch(encoder, response, length)
            # Fields left out above, and "Connection: close": a parsed head stays one.
            batch.head(response.status, response.reason, headers, parsed=response.parsed_head)
            await self._take_ready(batch)
            if not batch.done:
                # A small body's DATA usually comes in the HEAD's own tunnel message, and is
                # here already; else the task reading the tunnel may not have run since the
                # HEAD woke us: one scheduling pass (no wait for I/O) lets it hand over what it
                # has. The head still goes out now whatever the body does.
                await trio.lowlevel.cancel_shielded_checkpoint()
            while True:
                await self._take_ready(batch)
                await batch.write(self.stream)
                if batch.done:
                    return
                batch.add(await next_chunk(response))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._cut(response, "response", Cause.CLIENT_GONE, "the HTTP client went away")
            raise
        except h11.LocalProtocolError:
            # The body is wrong (not its Content-Length): drop the socket.
            self._cut(response, "response", Cause.BAD_FRAMING,
                      "the body does not match its Content-Length")
            raise trio.BrokenResourceError from None
        except ResponseAborted as aborted:
            self._cut_by(response, aborted.cut)
            raise trio.BrokenResourceError from None
        except trio.TooSlowError:
            self._cut(response, "response", Cause.STALLED,
                      f"no body bytes for {response.idle_timeout:g}s")
            raise trio.BrokenResourceError from None

    def _cut(self, response: StreamingResponse, direction: Direction, cause: Cause,
             reason: str) -> None:
        self._cut_by(response, Cut(direction, cause, reason))

    def _cut_by(self, response: StreamingResponse, cut: Cut) -> None:
        """``response`` will not complete: the first cause seen is the one told."""
        if response.cut is None:
            response.cut = cut
        self._reset_on_close = True

    async def _take_ready(self, batch: ResponseBatch) -> None:
        """What of the body is there already, into ``batch``; if the body turns out broken, the
        client still gets what came before, as it would unbatched, and the error goes on."""
        try:
            batch.take_ready()
        except (h11.LocalProtocolError, ResponseAborted):
            await batch.write(self.stream)
            raise

    async def _pipe(self, response: StreamingResponse) -> None:
        """Send the 101, then hand the connection to the pipe (``wstunnel.server.upgraded``),
        which carries raw bytes both ways until both sides have closed."""
        sink = response.upgraded
        self._to_h11()
        if sink is None or self.conn.their_state is not h11.MIGHT_SWITCH_PROTOCOL:
            # Only an upgrade request can be switched, and only through a v2 stream.
            await self._send_error(502, "Unexpected 101 response from the tunnel client")
            return
        headers = switching_headers(response.headers)
        await self._start_response()
        try:
            await self._send(h11.InformationalResponse(
                status_code=101, headers=headers, reason=response.reason
            ))
        except h11.LocalProtocolError:
            raise trio.BrokenResourceError from None
        # What the client sent after its request (a first WebSocket frame) is the new protocol's.
        first = bytes(self.conn.trailing_data[0])
        await pipe_upgraded(self.stream, response, sink, first, partial(self._cut_by, response))

    async def _send_error(self, status: int, text: str) -> None:
        """Answer a request we will not serve, then close: we cannot trust the framing further."""
        self._to_h11()
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        response = simple_response(status, text, headers=[(b"Connection", b"close")])
        try:
            with trio.move_on_after(5):
                await self._start_response()
                await self._send(h11.Response(status_code=status, headers=[
                    *response.headers, (b"Content-Length", b"%d" % len(response.body))
                ], reason=response.reason))
                await self._send(h11.Data(data=response.body))
                await self._send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            pass
