"""Tunnels opening: a ``/_tunnel`` WebSocket handshake checked, accepted and served.

The HTTP front hands over a connection whose request is a WebSocket upgrade on ``/_tunnel``; the
:class:`TunnelAcceptor` answers a refusal itself (the connection never became a WebSocket), or
accepts with the protocol the client offered (v2, batched if it asks; an original client offers
nothing and gets v1) and serves the tunnel until it ends. The long-poll transport opens its
sessions elsewhere (``wstunnel.server.longpoll``) but builds its connections here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from wstunnel import __version__, framing, http1, v2
from wstunnel.config import ServerSettings
from wstunnel.headers import Headers
from wstunnel.logs import EventLogger
from wstunnel.server.admission import SHUTTING_DOWN, Admission, Refusal
from wstunnel.server.connection import TunnelConnection
from wstunnel.server.incoming import IncomingRequest
from wstunnel.server.rendezvous import Registry, Rendezvous
from wstunnel.server.tunnel_v1 import TunnelConnectionV1
from wstunnel.server.tunnel_v2 import TunnelConnectionV2
from wstunnel.tokens import MIN_LENGTH
from wstunnel.tunnel import websocket
from wstunnel.tunnel.transport import (
    VERSION_HEADER,
    WS_RECEIVE_SIZE,
    Activity,
    ActivityStream,
    HandshakeError,
    MessageTransport,
)

# How long a refusal may take to send before the connection is closed without it.
REFUSAL_SEND_TIMEOUT = 5.0


def client_version(request: IncomingRequest) -> str:
    return (request.header(VERSION_HEADER.lower()) or b"").decode("latin-1") or "unknown"


def new_connection(rendezvous: Rendezvous, ws: MessageTransport, stream: Activity,
                   settings: ServerSettings, log: EventLogger, *, subprotocol: str | None,
                   addr: str, version: str, transport: str,
                   client_subject: str | None = None,
                   request_window: int | None = None) -> TunnelConnection:
    """The connection for a tunnel that speaks ``subprotocol`` (None: v1); ``request_window``
    is the first window of request bodies the client offered and we took (None: v2's own)."""
    if subprotocol is None:
        return TunnelConnectionV1(rendezvous, ws, stream, addr=addr, client_version=version,
                                  transport=transport, wstimeout=settings.wstimeout, log=log,
                                  max_body_size=settings.max_body_size,
                                  client_subject=client_subject)
    return TunnelConnectionV2(
        rendezvous, ws, stream, addr=addr, client_version=version, transport=transport,
        client_subject=client_subject,
        wstimeout=settings.wstimeout, log=log, httptimeout=settings.httptimeout,
        max_streams=settings.max_streams_per_tunnel, max_stream_size=settings.max_stream_size,
        batched=subprotocol == v2.BATCH_SUBPROTOCOL, limits=settings.window_limits,
        request_window=request_window or v2.INITIAL_STREAM_WINDOW,
    )


@dataclass(eq=False)
class TunnelAcceptor:
    """Takes ``/_tunnel`` WebSocket upgrades from the HTTP front."""

    admission: Admission
    registry: Registry
    log: EventLogger
    settings: Callable[[], ServerSettings] = field(kw_only=True)  # current: a reload swaps them
    draining: Callable[[], bool] = field(kw_only=True)

    async def take_tunnel(self, request: IncomingRequest, stream: ActivityStream) -> None:
        origin = request.header(b"origin")
        addr = self.admission.client_address(request)  # behind nginx: the client's, not nginx's
        if request.method != b"GET":
            await _refuse(stream, Refusal(400, "The tunnel endpoint takes GET upgrades only"))
            return
        key, ws_version = request.header(b"sec-websocket-key"), request.header(b"sec-websocket-version")
        # A missing or short token is admit()'s to refuse, and to count as a failure.
        if origin and len(origin) >= MIN_LENGTH and (key is None or ws_version != b"13"):
            await _refuse(stream, Refusal(400, "Not a WebSocket version 13 handshake"))
            return
        request_window = offered_request_window(request, addr, self.log)
        if isinstance(request_window, Refusal):
            await _refuse(stream, request_window)
            return
        admitted = self.admission.admit(request, addr)
        if isinstance(admitted, Refusal):
            await _refuse(stream, admitted)
            return
        token = admitted
        settings = self.settings()
        subprotocol = _chosen_subprotocol(request)
        if subprotocol == v2.BATCH_SUBPROTOCOL:
            max_message = v2.MAX_BATCH_SIZE
        elif subprotocol is not None:
            max_message = v2.MAX_MESSAGE_SIZE
        else:  # a v1 message can be a whole body
            max_message = settings.max_body_size + framing.MAX_HEAD_SIZE + framing.ID_DIGITS
        handshakes = self.admission.handshakes
        if not await handshakes.acquire():
            self.log.warning("WS   REFUSE", token=token, addr=addr, err="too many handshakes")
            await _refuse(stream, Refusal(503, "Too many tunnel handshakes at once",
                                          [(b"Retry-After", b"1")]))
            return
        try:
            if self.draining():  # it began while we waited for our turn
                await _refuse(stream, SHUTTING_DOWN)
                return
            with trio.fail_after(settings.header_timeout):
                ws = await websocket.accept(
                    stream, subprotocol=subprotocol,
                    extra_headers=[(VERSION_HEADER, __version__.encode()),
                                   *request_window_answer(request_window, subprotocol)],
                    max_message_size=max_message, receive_size=WS_RECEIVE_SIZE,
                )
        except HandshakeError as exc:
            self.log.warning("WS   REFUSE", token=token, addr=addr, err=str(exc))
            return
        finally:
            handshakes.release()
        connection = new_connection(
            self.registry.register(token), ws, stream, settings, self.log,
            subprotocol=subprotocol, addr=addr, version=client_version(request),
            transport="websocket", client_subject=self.admission.client_subject(request),
            request_window=request_window,
        )
        await connection.serve_logged()


def offered_request_window(request: IncomingRequest, addr: str, log: EventLogger
                           ) -> int | Refusal | None:
    """The first window of request bodies the client's opening offers (None: no offer), or the
    400 for an offer that is not a window; either transport's opening asks here."""
    try:
        return v2.accept_request_window(request.header(v2.REQUEST_WINDOW_HEADER.lower()))
    except ValueError as exc:
        log.warning("WS   REFUSE", addr=addr, err=str(exc))
        return Refusal(400, str(exc))


def request_window_answer(window: int | None, subprotocol: str | None) -> Headers:
    """The opening's answer to a client's request window offer: the window taken, if any (a v1
    tunnel has no windows to take it for)."""
    if window is None or subprotocol is None:
        return []
    return [(v2.REQUEST_WINDOW_HEADER, str(window).encode())]


def _chosen_subprotocol(request: IncomingRequest) -> str | None:
    """Our cli offers v2 and gets it (batched if it offers that); an original client offers
    nothing and gets None: v1."""
    offered = b",".join(value for name, value in request.headers
                        if name.lower() == b"sec-websocket-protocol")
    names = {part.strip() for part in offered.split(b",")}
    for name in (v2.BATCH_SUBPROTOCOL, v2.SUBPROTOCOL):
        if name.encode() in names:
            return name
    return None


async def _refuse(stream: ActivityStream, refusal: Refusal) -> None:
    """Answer a handshake we refuse, before any WebSocket layer exists; the caller closes."""
    response = refusal.response()
    headers: Headers = [*response.headers, (b"Connection", b"close"),
                        (b"Content-Length", b"%d" % len(response.body))]
    head = http1.head_bytes(http1.status_line(response.status, response.reason), headers)
    with trio.move_on_after(REFUSAL_SEND_TIMEOUT):
        await stream.send_all(head + response.body)
