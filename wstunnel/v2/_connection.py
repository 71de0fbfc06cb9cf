"""One end of a protocol v2 tunnel, sans-I/O: its streams (``_state``) and both flow-control windows.

``V2Connection`` builds the frames to send (``send_request``, ``send_response``, ``data_frames``,
``send_end``, ``reset``, ``consumed``) and turns received messages into events (``receive``).
Frames must reach the transport in the order the calls made them (put them on one outbound queue
without a checkpoint in between), or a frame may follow the RESET that ended its stream.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Literal

from wstunnel.errors import LocalProtocolError, ProtocolError, StreamClosedError
from wstunnel.headers import get
from wstunnel.v2._events import (
    DataReceived,
    Event,
    RequestReceived,
    ResponseReceived,
    SendFrame,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from wstunnel.v2._frames import (
    INITIAL_STREAM_WINDOW,
    INITIAL_TUNNEL_WINDOW,
    MAX_CODE,
    MAX_FRAME_PAYLOAD,
    MAX_STREAM_ID,
    MAX_WINDOW,
    RESET_GRACE,
    Data,
    End,
    Frame,
    Head,
    Reset,
    Window,
    decode_frame,
)
from wstunnel.v2._heads import (
    OnStream,
    encode_trailers,
    parse_request_head,
    parse_response_head,
    parse_trailers,
    request_head,
    response_head,
)
from wstunnel.v2._state import Gone, Phase, Stream, StreamState, credit_due

__all__ = [
    "Role",
    "V2Connection",
]

Role = Literal["server", "client"]


def _wants_upgrade(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return get(headers, b"upgrade") is not None


class V2Connection:
    """One end of a v2 tunnel: stream states and flow control, no I/O.

    ``role`` is "server" for the side that receives HTTP requests and opens streams (``srv``),
    "client" for the side that answers them (``cli``). The window sizes are the protocol's; both
    ends must use the same, and only tests change them, but for ``request_window``: the first
    window of each request body, which the two ends may agree on as the tunnel opens
    (``wstunnel.v2.agreed_request_window``).

    Methods that send return the frames to send, in order; ``receive`` returns events. A peer's
    violation raises a FramingError (ProtocolError, TunnelMessageError or HttpPayloadError) and
    leaves the connection as it was; close the tunnel. Sending what the protocol forbids raises
    LocalProtocolError (a bug); sending on a stream that has ended or was reset raises
    StreamClosedError (a race with the peer's RESET, usually).
    """

    def __init__(
        self,
        role: Role,
        *,
        stream_window: int = INITIAL_STREAM_WINDOW,
        tunnel_window: int = INITIAL_TUNNEL_WINDOW,
        request_window: int | None = None,
    ) -> None:
        if role not in ("server", "client"):
            raise ValueError(f"role must be 'server' or 'client', not {role!r}")
        request_window = stream_window if request_window is None else request_window
        for window in (stream_window, tunnel_window, request_window):
            if not 1 <= window <= MAX_WINDOW:
                raise ValueError(f"window {window} out of range (1 to {MAX_WINDOW})")
        self.role: Role = role
        self._initial_stream_window = stream_window
        self._request_window = request_window  # a request body's first window (server to client)
        # Credit goes back once half a window is consumed (each stream's, and the tunnel's): few
        # WINDOW frames, and the sender still has the other half to send while the grant travels.
        self._send_window = tunnel_window
        self._receive_window = tunnel_window
        self._window = tunnel_window  # the tunnel's receive window's size; it only grows
        # The receive window a stream's body gets at once (within ``opening_window``'s bound):
        # the protocol's initial window, a first window its owner sets (``first_window``), or
        # what the tunnel's streams have needed so far (a window tuner raises it).
        self.start_window = stream_window
        self._unacked = 0
        self._buffered = 0
        self._consumed = 0
        self._streams: dict[int, Stream] = {}
        self._last_id = 0  # the highest stream id opened so far (sent by a server, received by a client)
        self._gone: OrderedDict[int, Gone] = OrderedDict()

    # -- queries --------------------------------------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet consumed, every stream together: at most the tunnel window."""
        return self._buffered

    @property
    def consumed_bytes(self) -> int:
        """Bytes the application consumed, every stream together, since the tunnel began."""
        return self._consumed

    @property
    def opening_window(self) -> int:
        """The receive window a new stream's body gets at once: ``start_window``, but no more
        than half of the tunnel window its consumers do not hold, and never less than the
        protocol's initial window.

        A consumer that does not read (an HTTP client gone quiet, a backend that stopped taking
        a request body) holds what it was sent, and the tunnel window with it. Were each new
        stream to get ``start_window`` regardless, two such streams could hold a whole tunnel
        window and leave every other stream of the tunnel waiting on them; halving what is
        left keeps room for the next stream however many consumers stall."""
        return self._opening_window(self._buffered)

    def _opening_window(self, held: int) -> int:
        # held: what the consumers of the tunnel's other streams have been sent and not read.
        return max(self._initial_stream_window, min(self.start_window, (self._window - held) >> 1))

    @property
    def request_window(self) -> int:
        """The window each request body starts with (the tunnel's opening agreed on it)."""
        return self._request_window

    @property
    def tunnel_window(self) -> int:
        """The size of the tunnel's receive window (the peer's credit for every stream)."""
        return self._window

    def receiving_streams(self) -> dict[int, tuple[int, int]]:
        """Each stream that may still receive DATA: ``(bytes consumed, its window's size)``."""
        return {state.id: (state.consumed, state.window) for state in self._streams.values()
                if state.receiving is not Phase.ENDED}

    @property
    def send_window(self) -> int:
        """Body bytes we may still send, every stream together, before the peer grants more."""
        return self._send_window

    @property
    def receive_window(self) -> int:
        """Body bytes the peer may still send us, every stream together (what we granted)."""
        return self._receive_window

    @property
    def credit_owed(self) -> int:
        """Bytes consumed whose tunnel credit is not granted back yet (it goes in batches): at
        rest, ``receive_window + credit_owed`` is the tunnel window's size (``tunnel_window``)."""
        return self._unacked

    @property
    def open_streams(self) -> int:
        """Streams this side still keeps state for (open, half-closed, or holding buffered bytes)."""
        return len(self._streams)

    def send_capacity(self, stream: int) -> int:
        """How many body bytes ``stream`` may send now; 0 means wait for WindowUpdated."""
        state = self._sendable(stream)
        self._check_body_allowed(state, nonempty=True)
        return min(state.send_window, self._send_window)

    def stream_state(self, stream: int) -> StreamState:
        """Where ``stream`` stands, as far as this side knows (RESET only while remembered)."""
        state = self._streams.get(stream)
        if state is None:
            if stream > self._last_id or stream < 1:
                return StreamState.IDLE
            return StreamState.RESET if stream in self._gone else StreamState.CLOSED
        return state.state

    # -- sending --------------------------------------------------------------------------------

    def send_request(
        self,
        method: bytes,
        target: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        *,
        end_stream: bool = False,
        parsed: bool = False,
    ) -> tuple[int, Head]:
        """Open a stream with a request (server side only): its new id and the HEAD to send.
        ``parsed``: as for ``request_head``."""
        if self.role != "server":
            raise LocalProtocolError("only the server side opens streams")
        if self._last_id >= MAX_STREAM_ID:
            raise LocalProtocolError("stream ids are used up: open a new tunnel")
        headers = list(headers)
        head = request_head(method, target, headers, parsed=parsed)
        stream = self._last_id + 1
        self._last_id = stream
        self._streams[stream] = Stream(
            id=stream,
            sending=Phase.ENDED if end_stream else Phase.BODY,
            receiving=Phase.HEAD,
            send_window=self._request_window,
            receive_window=self._initial_stream_window,
            window=self._initial_stream_window,
            upgrade=_wants_upgrade(headers),
            head_request=method == b"HEAD",
        )
        return stream, Head(stream, head, end_stream)

    def send_response(
        self,
        stream: int,
        status: int,
        reason: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        *,
        end_stream: bool = False,
        parsed: bool = False,
    ) -> Head:
        """A response head (client side only): any 1xx first, then the final one (>= 200 or 101).
        ``parsed``: as for ``response_head``."""
        if self.role != "client":
            raise LocalProtocolError("only the client side sends responses")
        state = self._sendable(stream)
        if state.sending is not Phase.HEAD:
            raise LocalProtocolError(f"stream {stream}: the final response head was already sent")
        final = status >= 200 or status == 101
        if not final and end_stream:
            raise LocalProtocolError(f"stream {stream}: an informational response cannot end the stream")
        if status == 101 and not state.upgrade:
            raise LocalProtocolError(f"stream {stream}: 101 Switching Protocols to a request without Upgrade")
        head = response_head(status, reason, headers, parsed=parsed)
        if final:
            state.final_response(status, end_stream=end_stream, sent=True)
            self._forget_if_done(state)
        return Head(stream, head, end_stream)

    def data_frames(
        self, stream: int, data: bytes | bytearray | memoryview, *, end_stream: bool = False
    ) -> tuple[list[Data], int]:
        """DATA frames for as much of ``data`` as the windows allow, and how many bytes they took.

        ``end_stream`` applies only once all of ``data`` fits; until then call again with the rest
        after a WindowUpdated. Empty ``data`` with ``end_stream`` ends the stream at once.
        """
        state = self._sendable(stream)
        self._check_body_allowed(state, nonempty=bool(data))
        taken = min(len(data), state.send_window, self._send_window)
        view = memoryview(data)[:taken]
        frames = [
            Data(stream, bytes(view[start : start + MAX_FRAME_PAYLOAD]))
            for start in range(0, taken, MAX_FRAME_PAYLOAD)
        ]
        state.send_window -= taken
        self._send_window -= taken
        if end_stream and taken == len(data):
            if frames:
                frames[-1] = Data(stream, frames[-1].data, end_stream=True)
            else:
                frames.append(Data(stream, b"", end_stream=True))
            state.sending = Phase.ENDED
            self._forget_if_done(state)
        return frames, taken

    def send_end(self, stream: int, trailers: Iterable[tuple[bytes, bytes]] = ()) -> End:
        """End our side of ``stream``, with trailers if any."""
        state = self._sendable(stream)
        if state.sending is Phase.HEAD:
            raise LocalProtocolError(f"stream {stream}: END before the final response head")
        block = encode_trailers(trailers)
        state.sending = Phase.ENDED
        self._forget_if_done(state)
        return End(stream, block)

    def reset(self, stream: int, code: int, reason: str = "") -> list[Frame]:
        """Abort ``stream`` both ways: the RESET to send (none if the stream is already closed),
        and any WINDOW credit for its buffered bytes, which are dropped."""
        if not 0 <= code <= MAX_CODE:
            raise ValueError(f"RESET code {code} out of range")
        state = self._streams.get(stream)
        if state is None:
            if stream < 1 or stream > self._last_id:
                raise LocalProtocolError(f"stream {stream} was never opened")
            return []  # closed or reset already: nothing left to abort
        frames: list[Frame] = [Reset(stream, code, reason)]
        del self._streams[stream]
        frames += self._drop_buffered(state)
        self._remember(stream, Gone(code, peer_may_send=state.receiving is not Phase.ENDED))
        return frames

    def consumed(self, stream: int, amount: int) -> list[Window]:
        """The application took ``amount`` received bytes of ``stream``: WINDOW frames to send.

        Bytes of a stream that was reset meanwhile are ignored: they were released with it.
        """
        if amount < 0:
            raise ValueError(f"consumed a negative amount ({amount})")
        state = self._streams.get(stream)
        if state is None:
            if 1 <= stream <= self._last_id:
                return []
            raise LocalProtocolError(f"stream {stream} was never opened")
        if amount > state.buffered:
            raise LocalProtocolError(
                f"stream {stream}: consumed {amount} bytes, but only {state.buffered} are buffered"
            )
        state.buffered -= amount
        self._buffered -= amount
        state.consumed += amount
        self._consumed += amount
        frames: list[Window] = []
        if state.receiving is not Phase.ENDED:  # no more DATA can come: no point in stream credit
            state.unacked += amount
            if credit_due(state.unacked, state.window, state.buffered):
                frames.append(Window(stream, state.unacked))
                state.receive_window += state.unacked
                state.unacked = 0
        frames += self._credit_tunnel(amount)
        self._forget_if_done(state)
        return frames

    def widen(self, stream: int, size: int) -> list[Window]:
        """Grow the receive window of ``stream`` (0: the tunnel's) to ``size`` bytes: the WINDOW
        frame granting the difference, or nothing if it is that large already or the stream
        receives no more. Windows never shrink: a peer may use credit as soon as it has it."""
        if not 1 <= size <= MAX_WINDOW:
            raise ValueError(f"window {size} out of range (1 to {MAX_WINDOW})")
        if stream == 0:
            extra = size - self._window
            if extra <= 0:
                return []
            self._window = size
            self._receive_window += extra
            return [Window(0, extra)]
        state = self._streams.get(stream)
        if state is None or state.receiving is Phase.ENDED or size <= state.window:
            return []
        extra = size - state.window
        state.window = size
        state.receive_window += extra
        return [Window(stream, extra)]

    # -- receiving ------------------------------------------------------------------------------

    def receive(self, message: bytes | bytearray | memoryview | str) -> list[Event]:
        """The events one tunnel message brings; a FramingError if the peer broke the protocol."""
        frame = decode_frame(message)
        if isinstance(frame, Window):
            return self._on_window(frame)
        if isinstance(frame, Reset):
            return self._on_reset(frame)
        if isinstance(frame, Head):
            if self.role == "client":
                return self._on_request(frame)
            return self._on_response(frame)
        if isinstance(frame, Data):
            return self._on_data(frame)
        return self._on_end(frame)

    def _on_window(self, frame: Window) -> list[Event]:
        stream, increment = frame.stream, frame.increment
        if stream == 0:
            if self._send_window + increment > MAX_WINDOW:
                raise ProtocolError(
                    f"WINDOW of {increment} overflows the tunnel window ({self._send_window})"
                )
            self._send_window += increment
            return [WindowUpdated(0, increment)]
        state = self._streams.get(stream)
        if state is None:
            if stream > self._last_id:
                raise ProtocolError(f"WINDOW frame on stream {stream}, which was never opened", stream)
            return []  # the peer granted before it saw the stream close
        if state.sending is Phase.ENDED:
            return []
        if state.send_window + increment > MAX_WINDOW:
            raise ProtocolError(
                f"WINDOW of {increment} overflows the window of stream {stream} ({state.send_window})", stream
            )
        state.send_window += increment
        return [WindowUpdated(stream, increment)]

    def _on_reset(self, frame: Reset) -> list[Event]:
        stream = frame.stream
        state = self._streams.get(stream)
        if state is None:
            if stream > self._last_id:
                raise ProtocolError(f"RESET frame on stream {stream}, which was never opened", stream)
            return []  # it crossed our own END or RESET
        del self._streams[stream]
        events: list[Event] = [StreamReset(stream, frame.code, frame.reason)]
        events += [SendFrame(window) for window in self._drop_buffered(state)]
        self._remember(stream, Gone(frame.code, peer_may_send=False))
        return events

    def _on_request(self, frame: Head) -> list[Event]:
        stream = frame.stream
        if stream in self._streams:
            raise ProtocolError(f"second request HEAD on stream {stream}", stream)
        if stream <= self._last_id:
            raise ProtocolError(
                f"request HEAD on stream {stream}: new stream ids must be above {self._last_id}", stream
            )
        with OnStream(stream):
            method, target, headers = parse_request_head(frame.head)
        self._last_id = stream
        self._streams[stream] = Stream(
            id=stream,
            sending=Phase.HEAD,
            receiving=Phase.ENDED if frame.end_stream else Phase.BODY,
            send_window=self._initial_stream_window,
            receive_window=self._request_window,
            window=self._request_window,
            upgrade=_wants_upgrade(headers),
            head_request=method == b"HEAD",
        )
        events: list[Event] = [RequestReceived(stream, method, target, headers, frame.end_stream)]
        if frame.end_stream:
            events.append(StreamEnded(stream, []))
        elif (opening := self.opening_window) > self._request_window:
            # A request body on a tunnel whose transfers widened their windows: all of that now.
            events += [SendFrame(window) for window in self.widen(stream, opening)]
        return events

    def _on_response(self, frame: Head) -> list[Event]:
        stream = frame.stream
        if stream > self._last_id:
            raise ProtocolError(f"HEAD frame on stream {stream}: only the server side opens streams", stream)
        state = self._live(frame)
        if state is None:
            return []
        if state.receiving is not Phase.HEAD:
            raise ProtocolError(f"HEAD frame on stream {stream} after the final response head", stream)
        with OnStream(stream):
            status, reason, headers = parse_response_head(frame.head)
        final = status >= 200 or status == 101
        if not final and frame.end_stream:
            raise ProtocolError(f"informational {status} response with END_STREAM on stream {stream}", stream)
        if status == 101 and not state.upgrade:
            raise ProtocolError(
                f"101 Switching Protocols on stream {stream}, whose request has no Upgrade", stream
            )
        events: list[Event] = [ResponseReceived(stream, status, reason, headers, frame.end_stream)]
        if final:
            state.final_response(status, end_stream=frame.end_stream, sent=False)
            self._forget_if_done(state)
        if frame.end_stream:
            events.append(StreamEnded(stream, []))
        return events

    def _on_data(self, frame: Data) -> list[Event]:
        stream, size = frame.stream, len(frame.data)
        state = self._live(frame)
        if state is None:
            # DATA the peer sent before it saw our RESET: it took from the tunnel window all the
            # same, so check it and give the credit straight back.
            if size > self._receive_window:
                raise self._tunnel_overrun(stream, size)
            self._receive_window -= size
            return [SendFrame(window) for window in self._credit_tunnel(size)]
        if state.receiving is Phase.HEAD:
            raise ProtocolError(f"DATA frame on stream {stream} before the final response head", stream)
        if state.receiving is Phase.ENDED:
            raise ProtocolError(f"DATA frame on stream {stream} after the end of the stream", stream)
        if size:
            reason = state.body_forbidden(requests=self.role == "client")
            if reason:
                raise ProtocolError(f"DATA frame on stream {stream}: {reason}", stream)
        if size > state.receive_window:
            raise ProtocolError(
                f"DATA of {size} bytes on stream {stream} exceeds its window ({state.receive_window})", stream
            )
        if size > self._receive_window:
            raise self._tunnel_overrun(stream, size)
        state.receive_window -= size
        self._receive_window -= size
        state.buffered += size
        self._buffered += size
        events: list[Event] = []
        if size:
            events.append(DataReceived(stream, frame.data, frame.end_stream))
        if frame.end_stream:
            state.receiving = Phase.ENDED
            events.append(StreamEnded(stream, []))
            self._forget_if_done(state)
        elif state.window < self.start_window and state.window < (
                opening := self._opening_window(self._buffered - state.buffered)):
            events += [SendFrame(window) for window in self.widen(stream, opening)]
        return events

    def _on_end(self, frame: End) -> list[Event]:
        stream = frame.stream
        state = self._live(frame)
        if state is None:
            return []
        if state.receiving is Phase.HEAD:
            raise ProtocolError(f"END frame on stream {stream} before the final response head", stream)
        if state.receiving is Phase.ENDED:
            raise ProtocolError(f"END frame on stream {stream} after the end of the stream", stream)
        with OnStream(stream):
            trailers = parse_trailers(frame.trailers)
        state.receiving = Phase.ENDED
        self._forget_if_done(state)
        return [StreamEnded(stream, trailers)]

    # -- helpers --------------------------------------------------------------------------------

    def _live(self, frame: Head | Data | End) -> Stream | None:
        """The open stream a HEAD, DATA or END from the peer is for, or None to ignore the frame."""
        stream = frame.stream
        state = self._streams.get(stream)
        if state is not None:
            return state
        name = type(frame).__name__.upper()
        if stream > self._last_id:
            raise ProtocolError(f"{name} frame on stream {stream}, which was never opened", stream)
        gone = self._gone.get(stream)
        if gone is None or not gone.peer_may_send:
            raise ProtocolError(f"{name} frame on closed stream {stream}", stream)
        if isinstance(frame, End) or frame.end_stream:
            gone.peer_may_send = False  # its side is over: anything after this is an error
        return None


    def _tunnel_overrun(self, stream: int, size: int) -> ProtocolError:
        window = self._receive_window
        message = f"DATA of {size} bytes on stream {stream} exceeds the tunnel window ({window})"
        return ProtocolError(message, stream)

    def _sendable(self, stream: int) -> Stream:
        state = self._streams.get(stream)
        if state is None:
            if stream < 1 or stream > self._last_id:
                raise LocalProtocolError(f"stream {stream} was never opened")
            gone = self._gone.get(stream)
            if gone is not None:
                raise StreamClosedError(f"stream {stream} was reset (code {gone.code})", stream, gone.code)
            raise StreamClosedError(f"stream {stream} is closed", stream)
        if state.sending is Phase.ENDED:
            raise StreamClosedError(f"stream {stream}: our side has ended", stream)
        return state

    def _check_body_allowed(self, state: Stream, *, nonempty: bool) -> None:
        if state.sending is Phase.HEAD:
            raise LocalProtocolError(f"stream {state.id}: DATA before the final response head")
        if nonempty:
            reason = state.body_forbidden(requests=self.role == "server")
            if reason:
                raise LocalProtocolError(f"stream {state.id}: {reason}")

    def _credit_tunnel(self, amount: int) -> list[Window]:
        self._unacked += amount
        if not credit_due(self._unacked, self._window, self._buffered):
            return []
        increment, self._unacked = self._unacked, 0
        self._receive_window += increment
        return [Window(0, increment)]

    def _drop_buffered(self, state: Stream) -> list[Window]:
        """Release what a reset stream had buffered: the application will never consume it."""
        dropped, state.buffered = state.buffered, 0
        self._buffered -= dropped
        return self._credit_tunnel(dropped) if dropped else []

    def _forget_if_done(self, state: Stream) -> None:
        if state.done:
            del self._streams[state.id]

    def _remember(self, stream: int, gone: Gone) -> None:
        self._gone[stream] = gone
        while len(self._gone) > RESET_GRACE:
            self._gone.popitem(last=False)
