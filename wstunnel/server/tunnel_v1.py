"""The server's end of a protocol v1 tunnel, the original's: each request goes out as one whole
message, and its response comes back as one (``wstunnel.framing``).

A v1 connection pulls requests from its token's queue with a sender task of its own. A request
whose body is still on the HTTP client's socket is read whole first (a v1 message carries the body
whole), in a task of its own, so the requests behind it are not held up.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Unpack

import trio
import trio_websocket

from wstunnel import framing
from wstunnel.errors import HttpPayloadError, TunnelMessageError
from wstunnel.server.connection import ConnectionOptions, TunnelConnection, short_target
from wstunnel.server.messages import BodyError
from wstunnel.server.rendezvous import Failure, PendingRequest, Rendezvous
from wstunnel.tunnel.transport import Activity, MessageTransport


class TunnelConnectionV1(TunnelConnection):
    """One original (v1) client's WebSocket, pulling requests from its token's queue."""

    protocol: ClassVar[str] = "v1"

    def __init__(self, rendezvous: Rendezvous, ws: MessageTransport, stream: Activity, *,
                 max_body_size: int, **options: Unpack[ConnectionOptions]) -> None:
        super().__init__(rendezvous, ws, stream, **options)
        self.max_body_size = max_body_size  # a body goes whole in one message
        self._nursery: trio.Nursery | None = None
        # Requests whose streamed bodies are being read whole before they go out.
        self._reading: dict[int, trio.CancelScope] = {}

    async def _run(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self._send_requests)
        await self._receive_responses()

    def _lost(self) -> None:
        self._fail_in_flight()

    def abandon(self, pending: PendingRequest) -> None:
        """v1 has no way to tell the client that the HTTP side gave up, but can stop reading the
        request's body."""
        scope = self._reading.get(pending.id)
        if scope is not None:
            scope.cancel()

    async def _send_requests(self) -> None:
        queue = self.rendezvous.queue
        while True:
            pending = await queue.get()
            if pending.abandoned:
                continue
            if pending.upgrade:
                self.log.info("HTTP RET", token=self.token, id=pending.id, status=501,
                              err="upgrade over a v1 tunnel")
                pending.finish(Failure(501, "WebSocket pass-through needs a protocol v2 tunnel client"))
                self.rendezvous.release(pending)
                continue
            if pending.body_source is not None:
                # A v1 message carries the body whole: read it first, without holding up the
                # requests behind it.
                assert self._nursery is not None
                pending.holder = self
                self.in_flight[pending.id] = pending
                scope = self._reading[pending.id] = trio.CancelScope()
                self._nursery.start_soon(self._read_then_send, pending, scope)
                continue
            if not await self._send_one(pending):
                return

    async def _read_then_send(self, pending: PendingRequest, scope: trio.CancelScope) -> None:
        source = pending.body_source
        assert source is not None
        failure: Failure | None = None
        with scope:
            try:
                body = await source.read_all(self.max_body_size)
            except BodyError as exc:
                failure = Failure(exc.status, exc.text, cut=exc.cut(), tunnel_aborts=self.aborts)
        self._reading.pop(pending.id, None)
        if scope.cancelled_caught or failure is not None:
            self.in_flight.pop(pending.id, None)
            pending.holder = None
            if failure is not None:
                pending.finish(failure)
            self.rendezvous.release(pending)
            return
        # Whole in memory now: from here on, like any v1 request (and replayable).
        pending.request = dataclasses.replace(pending.request, body=body)
        pending.body_source = None
        if not await self._send_one(pending):
            await self.close(1011, "tunnel send failed")

    async def _send_one(self, pending: PendingRequest) -> bool:
        """Send ``pending``; False if the WebSocket is closed (the request is back in the queue)."""
        pending.holder = self
        pending.tries += 1
        self.in_flight[pending.id] = pending
        message = framing.encode_request(pending.id, pending.request)
        try:
            await self.ws.send_message(message)
        except trio_websocket.ConnectionClosed:
            # Never delivered, so safe to retry whatever the method: put it back first.
            del self.in_flight[pending.id]
            pending.holder = None
            pending.tries -= 1
            self.rendezvous.queue.put_front(pending)
            return False
        self.log.info(
            "WS   SND", token=self.token, id=pending.id,
            info=f"{pending.method.decode('latin-1')} {short_target(pending.request.target)}",
        )
        return True

    async def _receive_responses(self) -> None:
        while True:
            try:
                message = await self.ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            self.rendezvous.touch()
            try:
                request_id, payload = framing.split_message(message)
            except TunnelMessageError as exc:
                self.log.warning("WS   ERR", token=self.token, err=str(exc))
                await self.close(1003 if isinstance(message, str) else 1002,
                                 f"protocol error: {exc}")
                return
            pending = self.in_flight.pop(request_id, None)
            if pending is None:
                self.log.warning("WS   ERR", token=self.token, id=request_id, err="unknown request id")
                await self.close(1002, f"protocol error: response for unknown request id {request_id}")
                return
            pending.holder = None
            self.log.info("WS   RCV", token=self.token, id=request_id, ws=self.addr, len=len(message))
            try:
                response: framing.Response | Failure = framing.parse_response(
                    payload, request_method=pending.method
                )
            except HttpPayloadError as exc:
                self.log.warning("WS   ERR", token=self.token, id=request_id, err=str(exc))
                response = Failure(502, "Bad response from tunnel client")
            self.answered += 1
            pending.finish(response)
            self.rendezvous.release(pending)
