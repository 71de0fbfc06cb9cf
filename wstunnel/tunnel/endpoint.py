"""One end of a protocol v2 tunnel, on trio: what ``wstunnel srv`` and ``wstunnel cli`` share.

A :class:`V2Endpoint` drives a :class:`~wstunnel.v2.V2Connection` over a message transport (a
WebSocket or a long-poll session): the frames the connection makes go out through one
:class:`~wstunnel.tunnel.outbox.FrameOutbox`, in order; body bytes go out only within the peer's
windows (a sender short of credit waits for the next WINDOW); received messages become events,
and those that concern no stream in particular (credit granted, frames the connection owes the
peer, DATA for a stream nobody reads any more) are handled here. The rest go to the role's
:class:`StreamHandler`: the server's tunnel connection or the client's session.

The ordering rule of protocol v2 holds here: every frame is put on the outbox right after the
V2Connection call that made it, with no checkpoint in between.
"""

from __future__ import annotations

from typing import Protocol

import trio

from wstunnel import v2
from wstunnel.tunnel.outbox import FrameOutbox
from wstunnel.tunnel.transport import MessageTransport

__all__ = ["StreamHandler", "V2Endpoint"]


class StreamHandler(Protocol):
    """What one role does with the events of its streams."""

    def on_request(self, event: v2.RequestReceived) -> None:
        """A new stream (the client's side only)."""
        ...

    def on_response(self, event: v2.ResponseReceived) -> None:
        """A response head, informational or final (the server's side only)."""
        ...

    def on_data(self, event: v2.DataReceived) -> bool:
        """Body bytes; False when nobody will read them (their credit then goes straight back)."""
        ...

    def on_end(self, event: v2.StreamEnded) -> None:
        """The peer's side of a stream ended, with its trailers."""
        ...

    def on_reset(self, event: v2.StreamReset) -> None:
        """The peer reset a stream."""
        ...


class V2Endpoint:
    """A V2Connection, its outbox and its transport, for either role."""

    def __init__(self, role: v2.Role, transport: MessageTransport, handler: StreamHandler, *,
                 batched: bool) -> None:
        self.conn = v2.V2Connection(role)
        self.transport = transport
        self.batched = batched  # wstunnel.v2.batch: several frames a message
        self._handler = handler
        self._outbox = FrameOutbox(batched=batched)
        # Replaced each time the peer grants credit; a sender short of credit waits on it.
        self._credit = trio.Event()

    # -- sending ----------------------------------------------------------------------------

    def emit(self, *frames: v2.Frame) -> None:
        """Queue frames for the writer, in order and without a checkpoint."""
        put = self._outbox.put
        for frame in frames:
            put(v2.encode_frame(frame))

    async def send_data(self, stream: int, data: bytes | bytearray | memoryview, *,
                        end_stream: bool = False) -> None:
        """``data`` as DATA frames, waiting for credit as often as the windows ask; with
        ``end_stream``, the last of them ends our side. StreamClosedError if the stream was reset
        meanwhile."""
        view = memoryview(data)
        offset = 0
        while offset < len(view) or end_stream:
            credit = self._credit
            frames, taken = self.conn.data_frames(stream, view[offset:], end_stream=end_stream)
            self.emit(*frames)
            offset += taken
            if end_stream and offset == len(view):
                return
            if not taken:
                await credit.wait()

    async def wait_credit(self, stream: int) -> None:
        """Until ``stream`` may send at least one body byte."""
        while True:
            credit = self._credit
            if self.conn.send_capacity(stream) > 0:
                return
            await credit.wait()

    def end(self, stream: int) -> None:
        """End our side of ``stream`` now, without trailers."""
        self.emit(*self.conn.data_frames(stream, b"", end_stream=True)[0])

    def reset(self, stream: int, code: int, reason: str) -> None:
        """Abort ``stream`` both ways (nothing to send if it is closed already)."""
        self.emit(*self.conn.reset(stream, code, reason))

    def credit(self, stream: int, amount: int) -> None:
        """The application took ``amount`` received bytes of ``stream``: the peer may send more."""
        if amount:
            self.emit(*self.conn.consumed(stream, amount))

    async def send_early(self) -> None:
        """After putting frames: send a batch's worth now if it waits (FrameOutbox.send_early)."""
        await self._outbox.send_early(self.transport)

    async def run_writer(self) -> None:
        """The writer task: until the outbox is closed or the transport is."""
        await self._outbox.pump(self.transport)

    def close(self) -> None:
        """Nothing more will be sent: the writer ends once what was put is out."""
        self._outbox.close()

    # -- receiving --------------------------------------------------------------------------

    async def receive(self) -> None:
        """Take one message from the transport and handle its events.

        ConnectionClosed once the transport is closed; a FramingError if the peer broke the
        protocol (the caller closes the tunnel).
        """
        message = await self.transport.get_message()
        for frame in v2.unpack_batch(message) if self.batched else (message,):
            for event in self.conn.receive(frame):
                self._dispatch(event)

    def _dispatch(self, event: v2.Event) -> None:
        handler = self._handler
        if isinstance(event, v2.DataReceived):
            if not handler.on_data(event):
                self.emit(*self.conn.consumed(event.stream, len(event.data)))
        elif isinstance(event, v2.WindowUpdated):
            self._wake_senders()
        elif isinstance(event, v2.SendFrame):
            self.emit(event.frame)
        elif isinstance(event, v2.StreamEnded):
            handler.on_end(event)
        elif isinstance(event, v2.StreamReset):
            handler.on_reset(event)
            self._wake_senders()  # a sender of that stream learns of it from data_frames
        elif isinstance(event, v2.RequestReceived):
            handler.on_request(event)
        else:
            handler.on_response(event)

    def _wake_senders(self) -> None:
        self._credit.set()
        self._credit = trio.Event()
