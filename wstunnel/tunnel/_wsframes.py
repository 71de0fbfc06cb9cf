"""The frames of an open WebSocket (RFC 6455 section 5), sans I/O: no sockets, no trio.

:class:`FrameReader` turns the bytes received into whole messages (``bytes`` for binary, ``str``
for text, fragments joined) and the control frames (:class:`Ping`, :class:`Pong`,
:class:`Close`), or, when the peer breaks the protocol, one :class:`Failure` carrying the close
code to answer with (1002; 1007 for text that is not UTF-8; 1009 for a message over the size
limit). After a Close or a Failure it reads nothing more. The ``encode_*`` functions make frames,
masked when the client sends them (section 5.3).

It replaces wsproto's ``Connection`` once the opening handshake is done: that one builds an event
object per frame and per message part, runs its extension hooks, and copies every payload four
or five times; with one request in flight this was a tenth of each daemon's CPU. No extension
is negotiated on our connections (we neither offer nor accept permessage-deflate), so a frame
with a reserved bit set is a protocol error here, as it was there. The checks, their close codes
and most of their reasons are wsproto's.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "INVALID_PAYLOAD", "MASK_IS_COMPILED", "MESSAGE_TOO_BIG", "NO_STATUS", "PROTOCOL_ERROR",
    "Close", "Event", "Failure", "FrameReader", "Ping", "Pong", "encode_close", "encode_message",
    "encode_ping", "encode_pong", "mask", "mask_in_python",
]

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_OPCODES = frozenset((CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG))

NORMAL_CLOSURE = 1000
PROTOCOL_ERROR = 1002
NO_STATUS = 1005  # a Close frame without a code (never sent as a code)
INVALID_PAYLOAD = 1007
MESSAGE_TOO_BIG = 1009
# Codes that describe what happened locally and must not be sent in a Close frame (7.4.1).
_LOCAL_ONLY = frozenset((NO_STATUS, 1006, 1015))
# The codes below 3000 that are defined (RFC 6455 7.4.1, and IANA's 1012-1014): any other code
# below 3000 is reserved and a protocol error.
_DEFINED = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))

MAX_CONTROL_PAYLOAD = 125
_MAX_CLOSE_REASON = MAX_CONTROL_PAYLOAD - 2  # bytes of reason after the 2-byte code
_PACK_16 = struct.Struct("!BBH").pack
_PACK_64 = struct.Struct("!BBQ").pack

# -- masking (5.3) -------------------------------------------------------------------------------

# Every byte the cli sends is masked and every byte srv receives unmasked, so at transfer speeds
# masking is most of what either daemon does per byte: the translate passes below take 72 us for
# 64 KiB, a third of each daemon's CPU in a large download. websockets' C function (SSE2) takes
# 1.3 us; the passes stay for an interpreter that has no build of it.
def _compiled() -> Callable[[bytes, bytes], bytes] | None:
    try:
        from websockets.speedups import apply_mask
    except ImportError:  # pragma: no cover - the wheels of every platform we ship have it
        return None
    return apply_mask


# Below this size one XOR of two big ints is quickest; above it, four strided translate() passes
# (wsproto's way) are, about twice as quick at 1 MiB (measured: 1.2 ms against 2.5 ms).
_XOR_BY_INT_BELOW = 1024
_XOR_TABLES = [bytes(a ^ b for a in range(256)) for b in range(256)]


def mask_in_python(payload: bytes, key: bytes) -> bytes:
    """:func:`mask` without websockets' compiled function: the same bytes, 50 times slower."""
    size = len(payload)
    if size < _XOR_BY_INT_BELOW:
        if not size:
            return b""
        repeated = key * ((size + 3) >> 2)
        if size & 3:
            repeated = repeated[:size]
        return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
            size, "little")
    data = bytearray(payload)
    for offset in range(4):
        data[offset::4] = data[offset::4].translate(_XOR_TABLES[key[offset]])
    return bytes(data)


# mask(payload, key): ``payload`` XOR the 4-byte ``key`` repeated; masks, and unmasks what was masked.
mask: Callable[[bytes, bytes], bytes] = _compiled() or mask_in_python
MASK_IS_COMPILED = mask is not mask_in_python


# -- writing -------------------------------------------------------------------------------------

def _frame(opcode: int, payload: bytes, masked: bool) -> bytes:
    """One final frame carrying ``payload``."""
    size = len(payload)
    first = 0x80 | opcode  # FIN: we never fragment what we send
    bit = 0x80 if masked else 0
    if size < 126:
        head = bytes((first, bit | size))
    elif size < 0x10000:
        head = _PACK_16(first, bit | 126, size)
    else:
        head = _PACK_64(first, bit | 127, size)
    if masked:
        # "The masking key MUST be derived from a strong source of entropy" (5.3).
        key = os.urandom(4)
        return head + key + mask(payload, key)
    return head + payload


def encode_message(message: bytes | bytearray | str, *, masked: bool) -> bytes:
    """A whole message in one frame: binary for bytes, text for str."""
    if isinstance(message, str):
        return _frame(TEXT, message.encode(), masked)
    return _frame(BINARY, bytes(message), masked)


def _control(opcode: int, payload: bytes, masked: bool) -> bytes:
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError(f"a control frame's payload is at most {MAX_CONTROL_PAYLOAD} bytes, "
                         f"not {len(payload)}")
    return _frame(opcode, payload, masked)


def encode_ping(payload: bytes, *, masked: bool) -> bytes:
    return _control(PING, bytes(payload), masked)


def encode_pong(payload: bytes, *, masked: bool) -> bytes:
    return _control(PONG, bytes(payload), masked)


def encode_close(code: int | None, reason: str | None, *, masked: bool) -> bytes:
    """A Close frame. No code (or 1005) sends none; a local-only code (1006, 1015) is sent as
    1000; the reason is cut to the 123 bytes that fit, never inside a character."""
    if code is None or code == NO_STATUS:
        if reason:
            raise TypeError("a Close reason needs a code")
        return _frame(CLOSE, b"", masked)
    if code in _LOCAL_ONLY:
        code = NORMAL_CLOSURE
    said = (reason or "").encode()
    if len(said) > _MAX_CLOSE_REASON:
        said = said[:_MAX_CLOSE_REASON].decode(errors="ignore").encode()
    return _frame(CLOSE, code.to_bytes(2, "big") + said, masked)


# -- reading -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The peer's Close frame: its code (1005 when it gave none) and reason."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Failure:
    """The peer broke the protocol: close the WebSocket with ``code`` and ``reason``."""

    code: int
    reason: str


Event = bytes | str | Ping | Pong | Close | Failure


class _ProtocolError(Exception):
    def __init__(self, reason: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(reason)
        self.code = code


def _parse_close(payload: bytes) -> Close:
    if not payload:
        return Close(NO_STATUS, "")  # "considered to be 1005" (7.1.5)
    if len(payload) == 1:
        raise _ProtocolError("CLOSE with 1 byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not 1000 <= code <= 4999:
        raise _ProtocolError("CLOSE with invalid code")
    if code in _LOCAL_ONLY:
        raise _ProtocolError("remote CLOSE with local-only reason")
    if code < 3000 and code not in _DEFINED:
        raise _ProtocolError("CLOSE with unknown reserved code")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError as exc:
        raise _ProtocolError(f"Error decoding CLOSE reason: {exc}", INVALID_PAYLOAD) from None
    return Close(code, reason)


class FrameReader:
    """Received bytes in, events out; see the module docstring.

    A client's reader expects unmasked frames, a server's masked ones (5.1). A message larger
    than ``max_message_size`` fails (1009) as soon as a frame header announces it, before its
    payload is held.
    """

    __slots__ = (
        "_client", "_done", "_frame_chunks", "_frame_fin", "_frame_key", "_frame_missing",
        "_frame_opcode", "_header", "_max_message_size", "_message_opcode", "_message_size",
        "_parts",
    )

    def __init__(self, *, client: bool, max_message_size: int) -> None:
        self._client = bool(client)
        self._max_message_size = max_message_size
        self._done = False  # a Close or a Failure was read: nothing more
        self._header = b""  # the start of a frame whose header is not whole yet
        # The frame whose payload is arriving (its header read): what is still missing, what
        # came so far (masked as sent), and the header's fields.
        self._frame_missing = 0
        self._frame_chunks: list[bytes] = []
        self._frame_opcode = 0
        self._frame_fin = True
        self._frame_key = b""
        # The message being reassembled from fragments: its opcode (0: none), payloads, size.
        self._message_opcode = 0
        self._parts: list[bytes] = []
        self._message_size = 0

    def receive(self, data: bytes) -> list[Event]:
        """The events that ``data``, following what was received before, completes, in order."""
        if self._done:
            return []
        events: list[Event] = []
        try:
            self._parse(data, events)
        except _ProtocolError as exc:
            self._done = True
            events.append(Failure(exc.code, str(exc)))
        return events

    def _parse(self, data: bytes, events: list[Event]) -> None:
        position, end = 0, len(data)
        if self._frame_missing:
            take = min(self._frame_missing, end)
            self._frame_chunks.append(data[:take])  # data itself when it is all this frame's
            self._frame_missing -= take
            if self._frame_missing:
                return
            position = take
            chunks, self._frame_chunks = self._frame_chunks, []
            self._frame_done(b"".join(chunks), events)
        elif self._header:
            data = self._header + data
            self._header = b""
            end = len(data)
        while position < end and not self._done:
            # The header (5.2): FIN, RSV1-3, opcode; MASK, length; extended length; masking key.
            if end - position < 2:
                self._header = data[position:]
                return
            first, second = data[position], data[position + 1]
            opcode, fin, size = first & 0x0F, first & 0x80, second & 0x7F
            # The checks in wsproto's order, so that a frame wrong in two ways gets its reason.
            if opcode not in _OPCODES:
                raise _ProtocolError(f"Invalid opcode {opcode:#x}")
            control = opcode & 0x08
            if control:
                if not fin:
                    raise _ProtocolError("Invalid attempt to fragment control frame")
                if size > MAX_CONTROL_PAYLOAD:
                    raise _ProtocolError("Control frame with payload len > 125")
            header_size = 2
            if size == 126:
                header_size = 4
                if end - position < 4:
                    self._header = data[position:]
                    return
                size = int.from_bytes(data[position + 2:position + 4], "big")
                if size < 126:
                    raise _ProtocolError("Payload length used 2 bytes when 1 would have sufficed")
            elif size == 127:
                header_size = 10
                if end - position < 10:
                    self._header = data[position:]
                    return
                size = int.from_bytes(data[position + 2:position + 10], "big")
                if size < 0x10000:
                    raise _ProtocolError("Payload length used 8 bytes when 2 would have sufficed")
                if size >> 63:
                    raise _ProtocolError("8-byte payload length with non-zero MSB")
            if first & 0x70:
                raise _ProtocolError("Reserved bit set unexpectedly")  # no extension agreed
            if bool(second & 0x80) is self._client:  # 5.1: to the server masked, else not
                raise _ProtocolError("client received unexpected masked frame" if self._client
                                     else "server received unexpected unmasked frame")
            if not self._client:
                header_size += 4  # the masking key
            if end - position < header_size:
                self._header = data[position:]
                return
            if not control:
                self._check_data_frame(opcode, size)
            self._frame_key = b"" if self._client else data[
                position + header_size - 4:position + header_size]
            self._frame_opcode, self._frame_fin = opcode, bool(fin)
            position += header_size
            if end - position >= size:
                payload = data[position:position + size]
                position += size
                self._frame_done(payload, events)
            else:
                self._frame_chunks.append(data[position:])
                self._frame_missing = size - (end - position)
                return

    def _check_data_frame(self, opcode: int, size: int) -> None:
        """A data frame's place in its message (5.4) and the message's size so far."""
        if opcode == CONTINUATION:
            if not self._message_opcode:
                raise _ProtocolError("unexpected CONTINUATION")
        elif self._message_opcode:
            raise _ProtocolError(f"expected CONTINUATION, got opcode {opcode:#x}")
        if self._message_size + size > self._max_message_size:
            raise _ProtocolError(
                f"Exceeded maximum message size: {self._max_message_size} bytes", MESSAGE_TOO_BIG)

    def _frame_done(self, payload: bytes, events: list[Event]) -> None:
        """A frame's whole payload has come (still masked, if it was)."""
        if self._frame_key:
            payload = mask(payload, self._frame_key)
        opcode = self._frame_opcode
        if opcode >= CLOSE:
            if opcode == PING:
                events.append(Ping(payload))
            elif opcode == PONG:
                events.append(Pong(payload))
            else:
                self._done = True  # nothing is read after a Close frame (5.5.1)
                events.append(_parse_close(payload))
            return
        if opcode:
            self._message_opcode = opcode
        if not self._frame_fin:
            self._parts.append(payload)
            self._message_size += len(payload)
            return
        if self._parts:
            self._parts.append(payload)
            payload = b"".join(self._parts)
            self._parts, self._message_size = [], 0
        opcode, self._message_opcode = self._message_opcode, 0
        if opcode == TEXT:
            try:
                events.append(payload.decode())
            except UnicodeDecodeError as exc:
                raise _ProtocolError(str(exc), INVALID_PAYLOAD) from None
        else:
            events.append(payload)
