"""Protocol v2 frames: their types, limits and byte layout, and the batched message format.

The wire format is specified in docs/protocol-v2.md; this module is its codec and nothing else:
``encode_frame``/``decode_frame`` check a frame's structure (sizes, flags, stream ids), never the
HTTP text inside a HEAD or END payload (that is ``_heads``) nor whether the frame is allowed in its
stream's state (that is ``_connection``).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from wstunnel.errors import TunnelMessageError
from wstunnel.framing import MAX_HEAD_SIZE

__all__ = [
    "BATCH_ENTRY_OVERHEAD",
    "BATCH_SUBPROTOCOL",
    "END_STREAM",
    "HEADER_SIZE",
    "INITIAL_STREAM_WINDOW",
    "INITIAL_TUNNEL_WINDOW",
    "MAX_BATCH_SIZE",
    "MAX_FRAME_PAYLOAD",
    "MAX_MESSAGE_SIZE",
    "MAX_STREAM_ID",
    "MAX_WINDOW",
    "RESET_GRACE",
    "SUBPROTOCOL",
    "Data",
    "End",
    "ErrorCode",
    "Frame",
    "FrameType",
    "Head",
    "Reset",
    "Window",
    "decode_frame",
    "encode_frame",
    "pack_batch",
    "unpack_batch",
]

SUBPROTOCOL = "wstunnel.v2"
BATCH_SUBPROTOCOL = "wstunnel.v2.batch"
HEADER_SIZE = 6
MAX_FRAME_PAYLOAD = 64 * 1024
INITIAL_STREAM_WINDOW = 256 * 1024
INITIAL_TUNNEL_WINDOW = 4 * 1024 * 1024
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**32 - 1
MAX_CODE = 0xFFFF
END_STREAM = 0x01
# How many of our own resets we remember to excuse the peer's frames still in flight: far more than
# can be reset within one round trip, and only an int and a small record each.
RESET_GRACE = 1024
# The largest message a peer may send: one frame, a HEAD or END of MAX_HEAD_SIZE at most.
MAX_MESSAGE_SIZE = HEADER_SIZE + max(MAX_HEAD_SIZE, MAX_FRAME_PAYLOAD)
# The largest batched message; the largest frame and its length always fit.
MAX_BATCH_SIZE = 1024 * 1024
_ENTRY_LENGTH = struct.Struct(">I")
# What each frame adds to a batched message: its length.
BATCH_ENTRY_OVERHEAD = _ENTRY_LENGTH.size

_HEADER = struct.Struct(">BBI")
_WINDOW = struct.Struct(">I")
_CODE = struct.Struct(">H")


class FrameType(enum.IntEnum):
    HEAD = 1
    DATA = 2
    END = 3
    WINDOW = 4
    RESET = 5


_FRAME_TYPES = {int(kind): kind for kind in FrameType}
_ALLOWED_FLAGS = {kind: END_STREAM if kind in (FrameType.HEAD, FrameType.DATA) else 0
                  for kind in FrameType}


class ErrorCode(enum.IntEnum):
    CANCEL = 1
    BACKEND_ERROR = 2
    PROTOCOL_ERROR = 3
    TOO_LARGE = 4
    TIMEOUT = 5
    REFUSED = 6


@dataclass(frozen=True, slots=True)
class Head:
    stream: int
    head: bytes
    end_stream: bool = False


@dataclass(frozen=True, slots=True)
class Data:
    stream: int
    data: bytes = field(repr=False)  # up to 64 KiB: too much for a log line
    end_stream: bool = False


@dataclass(frozen=True, slots=True)
class End:
    stream: int
    trailers: bytes = b""


@dataclass(frozen=True, slots=True)
class Window:
    stream: int
    increment: int


@dataclass(frozen=True, slots=True)
class Reset:
    stream: int
    code: int
    reason: str = ""


Frame = Head | Data | End | Window | Reset


def _check_stream(frame: Frame) -> None:
    low = 0 if isinstance(frame, Window) else 1
    if not low <= frame.stream <= MAX_STREAM_ID:
        raise ValueError(f"stream id {frame.stream} out of range for {type(frame).__name__.upper()}")


def encode_frame(frame: Frame) -> bytes:
    """The tunnel message carrying ``frame``; ValueError if the frame could not be decoded again."""
    _check_stream(frame)
    if isinstance(frame, Head):
        if not 1 <= len(frame.head) <= MAX_HEAD_SIZE:
            raise ValueError(f"HEAD payload of {len(frame.head)} bytes (1 to {MAX_HEAD_SIZE} allowed)")
        flags = END_STREAM if frame.end_stream else 0
        return _HEADER.pack(FrameType.HEAD, flags, frame.stream) + frame.head
    if isinstance(frame, Data):
        if len(frame.data) > MAX_FRAME_PAYLOAD:
            raise ValueError(f"DATA payload of {len(frame.data)} bytes (at most {MAX_FRAME_PAYLOAD})")
        if not frame.data and not frame.end_stream:
            raise ValueError("empty DATA without END_STREAM")
        flags = END_STREAM if frame.end_stream else 0
        return _HEADER.pack(FrameType.DATA, flags, frame.stream) + frame.data
    if isinstance(frame, End):
        if len(frame.trailers) > MAX_HEAD_SIZE:
            raise ValueError(f"END payload of {len(frame.trailers)} bytes (at most {MAX_HEAD_SIZE})")
        return _HEADER.pack(FrameType.END, 0, frame.stream) + frame.trailers
    if isinstance(frame, Window):
        if not 1 <= frame.increment <= MAX_WINDOW:
            raise ValueError(f"WINDOW increment {frame.increment} out of range (1 to {MAX_WINDOW})")
        return _HEADER.pack(FrameType.WINDOW, 0, frame.stream) + _WINDOW.pack(frame.increment)
    if isinstance(frame, Reset):
        if not 0 <= frame.code <= MAX_CODE:
            raise ValueError(f"RESET code {frame.code} out of range (0 to {MAX_CODE})")
        payload = _CODE.pack(frame.code) + frame.reason.encode()
        if len(payload) > MAX_FRAME_PAYLOAD:
            raise ValueError(f"RESET payload of {len(payload)} bytes (at most {MAX_FRAME_PAYLOAD})")
        return _HEADER.pack(FrameType.RESET, 0, frame.stream) + payload
    raise TypeError(f"not a frame: {frame!r}")


def decode_frame(message: bytes | bytearray | memoryview | str) -> Frame:
    """The frame in one tunnel message; TunnelMessageError if it breaks the wire format.

    Only the frame's structure is checked here; the HTTP text of HEAD and END payloads is checked by
    ``parse_request_head``/``parse_response_head``/``parse_trailers`` (V2Connection calls them),
    since which head is allowed depends on the direction.
    """
    if isinstance(message, str):
        raise TunnelMessageError("text message on the tunnel (only binary messages are allowed)")
    if not isinstance(message, bytes | bytearray | memoryview):
        raise TunnelMessageError(f"tunnel message of type {type(message).__name__}, not bytes")
    if isinstance(message, memoryview):  # an entry of a batch: one copy, of the payload only
        message = message.cast("B")
    if len(message) < HEADER_SIZE:
        raise TunnelMessageError(f"message of {len(message)} bytes is too short for a frame header")
    type_, flags, stream = _HEADER.unpack_from(message)
    payload = bytes(message[HEADER_SIZE:])
    # A table, not FrameType(type_): an enum call and .name cost more than the rest of a small
    # frame's decoding, for every frame.
    kind = _FRAME_TYPES.get(type_)
    if kind is None:
        raise TunnelMessageError(f"unknown frame type {type_} on stream {stream}")
    unknown = flags & ~_ALLOWED_FLAGS[kind]
    if unknown:
        raise TunnelMessageError(
            f"{kind.name} frame on stream {stream} has unknown flags 0x{unknown:02x}"
        )
    end_stream = bool(flags & END_STREAM)
    if stream == 0 and kind is not FrameType.WINDOW:
        raise TunnelMessageError(f"{kind.name} frame on stream 0 (only WINDOW may use stream 0)")
    size = len(payload)
    if kind is FrameType.HEAD:
        if not 1 <= size <= MAX_HEAD_SIZE:
            raise TunnelMessageError(
                f"HEAD frame on stream {stream} with {size} bytes (1 to {MAX_HEAD_SIZE})"
            )
        return Head(stream, payload, end_stream)
    if kind is FrameType.DATA:
        if size > MAX_FRAME_PAYLOAD:
            raise TunnelMessageError(
                f"DATA frame on stream {stream} with {size} bytes (at most {MAX_FRAME_PAYLOAD})"
            )
        if not size and not end_stream:
            raise TunnelMessageError(f"empty DATA frame on stream {stream} without END_STREAM")
        return Data(stream, payload, end_stream)
    if kind is FrameType.END:
        if size > MAX_HEAD_SIZE:
            raise TunnelMessageError(
                f"END frame on stream {stream} with {size} bytes (at most {MAX_HEAD_SIZE})"
            )
        return End(stream, payload)
    if kind is FrameType.WINDOW:
        if size != _WINDOW.size:
            raise TunnelMessageError(f"WINDOW frame on stream {stream} with {size} bytes (exactly 4)")
        (increment,) = _WINDOW.unpack(payload)
        if not 1 <= increment <= MAX_WINDOW:
            raise TunnelMessageError(
                f"WINDOW frame on stream {stream} with increment {increment} (1 to {MAX_WINDOW})"
            )
        return Window(stream, increment)
    # RESET
    if not _CODE.size <= size <= MAX_FRAME_PAYLOAD:
        raise TunnelMessageError(
            f"RESET frame on stream {stream} with {size} bytes (2 to {MAX_FRAME_PAYLOAD})"
        )
    (code,) = _CODE.unpack_from(payload)
    try:
        reason = payload[_CODE.size :].decode()
    except UnicodeDecodeError:
        raise TunnelMessageError(f"RESET frame on stream {stream} with a reason that is not UTF-8") from None
    return Reset(stream, code, reason)


def pack_batch(frames: Iterable[bytes]) -> bytes:
    """One batched message holding ``frames`` (encoded frames; their total within MAX_BATCH_SIZE)."""
    pack = _ENTRY_LENGTH.pack
    return b"".join([part for frame in frames for part in (pack(len(frame)), frame)])


def unpack_batch(message: bytes | bytearray | memoryview | str) -> list[memoryview]:
    """The frames of one batched message, each still to decode; TunnelMessageError if its entries
    do not add up."""
    if isinstance(message, str):
        raise TunnelMessageError("text message on the tunnel (only binary messages are allowed)")
    view = memoryview(message).cast("B")
    if not view:
        raise TunnelMessageError("empty batch message")
    frames: list[memoryview] = []
    offset, size = 0, len(view)
    while offset < size:
        if size - offset < _ENTRY_LENGTH.size:
            raise TunnelMessageError(f"batch entry at byte {offset} is cut short")
        (length,) = _ENTRY_LENGTH.unpack_from(view, offset)
        start = offset + _ENTRY_LENGTH.size
        offset = start + length
        if length < HEADER_SIZE or offset > size:
            raise TunnelMessageError(
                f"batch entry of {length} bytes at byte {start - _ENTRY_LENGTH.size} does not fit"
            )
        frames.append(view[start:offset])
    return frames
