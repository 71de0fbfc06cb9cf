"""One end of a protocol v2 tunnel, on trio: what ``wstunnel srv`` and ``wstunnel cli`` share.

A :class:`V2Endpoint` drives a :class:`~wstunnel.v2.V2Connection` over a message transport (a
WebSocket or a long-poll session): the frames the connection makes go out through one
:class:`~wstunnel.tunnel.outbox.FrameOutbox`, in order; body bytes go out only within the peer's
windows (a sender short of credit waits for the next WINDOW); received messages become events,
and those that concern no stream in particular (credit granted, frames the connection owes the
peer, DATA for a stream nobody reads any more) are handled here. The rest go to the role's
:class:`StreamHandler`: the server's tunnel connection or the client's session.

The receive windows follow the link (``wstunnel.v2.WindowTuner``): while a stream's consumer
keeps up, a probe task times one round trip at a time (``transport.ping``) and widens the windows
that held the sender back, up to the configured limits.

The ordering rule of protocol v2 holds here: every frame is put on the outbox right after the
V2Connection call that made it, with no checkpoint in between.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import trio

from wstunnel import v2
from wstunnel.logs import EventLogger
from wstunnel.tokens import Token
from wstunnel.tunnel.outbox import BACKLOG_HIGH_WATER, FrameOutbox
from wstunnel.tunnel.transport import ConnectionClosed, MessageTransport

__all__ = ["PIPE_LINGER", "StreamHandler", "V2Endpoint", "Widened"]

# Told of each round trip that widened windows: its length in seconds, and the WINDOW frames.
Widened = Callable[[float, list[v2.Window]], None]

# A round-trip probe unanswered this long is given up (the keepalive watches the tunnel itself).
# A stream that a 101 made a byte pipe, at either end: once one side has ended, how long the other
# side gets to follow before the pipe is over.
PIPE_LINGER = 5.0
PROBE_TIMEOUT = 10.0
# At most one probe per this many seconds: on a short link the round trip is over at once, and
# probing it again and again would cost CPU to learn what the initial windows already cover.
MIN_PROBE_INTERVAL = 0.01
# The most body bytes send_data puts on the outbox before it looks at the backlog again.
SEND_SLICE = 256 * 1024


def log_widened(log: EventLogger, token: Token, conn: v2.V2Connection, rtt: float,
                grants: list[v2.Window], **fields: object) -> None:
    """``WS   WINDOW``: the tunnel's receive window grew (info: a few lines in a tunnel's life),
    or a stream's (debug: every transfer ramps up)."""
    tunnel = any(grant.stream == 0 for grant in grants)
    log.log(logging.INFO if tunnel else logging.DEBUG, "WS   WINDOW", token=token, **fields,
            tunnel=conn.tunnel_window, streams=sum(1 for grant in grants if grant.stream),
            rtt_ms=round(rtt * 1000, 1))


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
                 batched: bool, limits: v2.WindowLimits | None = None,
                 request_window: int = v2.INITIAL_STREAM_WINDOW) -> None:
        # request_window: a request body's first window, as the tunnel's opening agreed.
        self.conn = v2.V2Connection(role, request_window=request_window)
        self.transport = transport
        self.batched = batched  # wstunnel.v2.batch: several frames a message
        self._handler = handler
        self._outbox = FrameOutbox(batched=batched)
        # Replaced each time the peer grants credit; a sender short of credit waits on it.
        self._credit = trio.Event()
        limits = limits or v2.WindowLimits()
        self.tuner = v2.WindowTuner(self.conn, limits)
        if role == "server":
            # Responses start with the first window, granted with each request (the client's
            # request bodies start with theirs by the tunnel's opening: request_window).
            self.conn.start_window = v2.first_window(limits)
        # Set by a grant of credit while the tuner waits for one (a consumer that keeps up).
        self._granting: trio.Event | None = None

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
        outbox = self._outbox
        while offset < len(view) or end_stream:
            if outbox.backlog > BACKLOG_HIGH_WATER:
                outbox.release()  # a held task's frames must not wait while it does
                await outbox.wait_room()
            credit = self._credit
            # A slice at a time, so that a large chunk cannot fill the outbox past its mark.
            piece = view[offset : offset + SEND_SLICE]
            last = end_stream and offset + len(piece) == len(view)
            frames, taken = self.conn.data_frames(stream, piece, end_stream=last)
            self.emit(*frames)
            offset += taken
            if last and taken == len(piece):
                return
            if not taken:
                outbox.release()
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
            frames = self.conn.consumed(stream, amount)
            if frames:
                self.emit(*frames)
                # Half a window consumed: a transfer, worth a round-trip sample.
                if self._granting is not None:
                    self._granting.set()
                    self._granting = None

    def hold(self) -> None:
        """This task's frames wait for its ``send_early`` (FrameOutbox.hold); it must call it
        before its next checkpoint."""
        self._outbox.hold()

    async def send_early(self, *, quiet: bool = False) -> None:
        """After putting frames: send a batch's worth now if it waits, or anything on a
        ``quiet`` tunnel (FrameOutbox.send_early); ends a ``hold``."""
        await self._outbox.send_early(self.transport, quiet=quiet)

    async def run_writer(self) -> None:
        """The writer task: until the outbox is closed or the transport is."""
        await self._outbox.pump(self.transport)

    def abort(self) -> None:
        """The tunnel is over: ``close``, and end a send under way (FrameOutbox.abort)."""
        self._outbox.abort()

    async def run_tuner(self, widened: Widened | None = None) -> None:
        """The window tuner's task: while windows are granted back (their consumers keep up)
        and may still grow, time one round trip at a time and widen what held the sender back;
        ``widened`` hears of each round trip that did."""
        tuner = self.tuner
        if tuner.limits.fixed:
            return
        while True:
            granting = self._granting = trio.Event()
            await granting.wait()
            if not tuner.can_grow():
                continue
            probe = tuner.start()
            began = trio.current_time()
            try:
                with trio.move_on_after(PROBE_TIMEOUT) as waited:
                    await self.transport.ping()
            except ConnectionClosed:
                # The tunnel is over: its receive loop sees the close too, and ends it. Out of
                # here the error would end the whole daemon (it did, a client vanishing mid-probe).
                return
            if waited.cancelled_caught:
                continue
            round_trip = trio.current_time() - began
            await trio.sleep_until(began + round_trip * v2.SAMPLE_ROUND_TRIPS)
            grants = tuner.finish(probe, round_trip, trio.current_time() - began)
            self.emit(*grants)
            if grants and widened is not None:
                widened(round_trip, grants)
            await trio.sleep_until(began + MIN_PROBE_INTERVAL)

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

    # -- status ------------------------------------------------------------------------------

    def flow(self) -> dict[str, int]:
        """Flow-control figures for status pages, STATS lines and leak checks: the windows each
        way, what is buffered and owed, the streams the protocol still tracks, and the tuner's
        probes and widenings."""
        tuner, conn = self.tuner, self.conn
        return {"tunnel_window": conn.tunnel_window, "request_window": conn.request_window,
                "widest_stream_window": tuner.widest_stream, "start_window": conn.start_window,
                "buffered": conn.buffered_bytes, "window_probes": tuner.probes,
                "windows_widened": tuner.widened, "outbox": self._outbox.backlog,
                "protocol_streams": conn.open_streams, "send_window": conn.send_window,
                "receive_window": conn.receive_window, "credit_owed": conn.credit_owed}
