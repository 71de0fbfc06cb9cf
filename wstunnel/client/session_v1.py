"""The client's end of a protocol v1 tunnel, the original's: each message one whole request,
answered with one whole response carrying the same id (``wstunnel.framing``).

Each request is replayed against the backend by a handler task of its own, at most
``max_concurrent_requests`` at once (the receive loop waits for a slot before it reads on, so a
busy backend slows the server's sender down instead of filling memory).
"""

from __future__ import annotations

import trio
import trio_websocket

from wstunnel import framing
from wstunnel.client.backend import Backend
from wstunnel.errors import HttpPayloadError
from wstunnel.logs import EventLogger
from wstunnel.tokens import Token
from wstunnel.tunnel.transport import MessageTransport


class ClientSessionV1:
    """Serves one v1 tunnel until the WebSocket closes (ConnectionClosed) or the server sends a
    message that is not a request (TunnelMessageError)."""

    def __init__(self, ws: MessageTransport, backend: Backend, *, limiter: trio.CapacityLimiter,
                 log: EventLogger, token: Token) -> None:
        self.ws = ws
        self.backend = backend
        self.limiter = limiter
        self.log = log
        self.token = token

    async def run(self) -> None:
        async with trio.open_nursery() as handlers:
            while True:
                message = await self.ws.get_message()
                request_id, payload = framing.split_message(message)
                ticket = object()  # ids may repeat after a wrap; tickets never do
                await self.limiter.acquire_on_behalf_of(ticket)
                handlers.start_soon(self._handle, request_id, payload, ticket)

    async def _handle(self, request_id: int, payload: bytes, ticket: object) -> None:
        try:
            try:
                request = framing.parse_request(payload)
            except HttpPayloadError as exc:
                self.log.warning("WS   ERR", token=self.token, id=request_id, err=str(exc))
                request = framing.Request(b"GET", b"/")
                response = framing.Response(400, b"Bad Request", [], b"Malformed request\n")
            else:
                self.log.info("WS   RCV", token=self.token, id=request_id,
                              verb=request.method, url=request.target[:200])
                response = await self.backend.replay(request)
            message = framing.encode_response(request_id, response, request_method=request.method)
            self.log.info("WS   SND", token=self.token, id=request_id, status=response.status,
                          len=len(message))
            try:
                await self.ws.send_message(message)
            except trio_websocket.ConnectionClosed:
                self.log.warning("WS   ERR", token=self.token, id=request_id,
                                 err="tunnel closed before the response was sent")
        finally:
            self.limiter.release_on_behalf_of(ticket)
