"""Protocol v2: streamed, multiplexed HTTP with flow control over one tunnel, sans-I/O.

Bytes in, events out; calls in, frames out. No sockets and no tasks here: the trio side that
drives a ``V2Connection`` for either end is ``wstunnel.tunnel.endpoint``. The wire format, with
its rules and rationale, is specified in docs/protocol-v2.md.

Inside: ``_frames`` (frame types, limits, the frame and batch codecs), ``_heads`` (HEAD and END
payloads: HTTP/1.1 heads and trailers), ``_events`` (what the connection reports) and
``_connection`` (``V2Connection``: stream states and windows). Import from this package only.
"""

from wstunnel.v2._connection import (
    Role,
    StreamState,
    V2Connection,
)
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
    BATCH_ENTRY_OVERHEAD,
    BATCH_SUBPROTOCOL,
    END_STREAM,
    HEADER_SIZE,
    INITIAL_STREAM_WINDOW,
    INITIAL_TUNNEL_WINDOW,
    MAX_BATCH_SIZE,
    MAX_FRAME_PAYLOAD,
    MAX_HEAD_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_STREAM_ID,
    MAX_WINDOW,
    RESET_GRACE,
    SUBPROTOCOL,
    Data,
    End,
    ErrorCode,
    Frame,
    FrameType,
    Head,
    Reset,
    Window,
    decode_frame,
    encode_frame,
    pack_batch,
    unpack_batch,
)
from wstunnel.v2._heads import (
    encode_trailers,
    parse_request_head,
    parse_response_head,
    parse_trailers,
    request_head,
    response_head,
)

__all__ = [
    "BATCH_ENTRY_OVERHEAD",
    "BATCH_SUBPROTOCOL",
    "END_STREAM",
    "HEADER_SIZE",
    "INITIAL_STREAM_WINDOW",
    "INITIAL_TUNNEL_WINDOW",
    "MAX_BATCH_SIZE",
    "MAX_FRAME_PAYLOAD",
    "MAX_HEAD_SIZE",
    "MAX_MESSAGE_SIZE",
    "MAX_STREAM_ID",
    "MAX_WINDOW",
    "RESET_GRACE",
    "SUBPROTOCOL",
    "Data",
    "DataReceived",
    "End",
    "ErrorCode",
    "Event",
    "Frame",
    "FrameType",
    "Head",
    "RequestReceived",
    "Reset",
    "ResponseReceived",
    "Role",
    "SendFrame",
    "StreamEnded",
    "StreamReset",
    "StreamState",
    "V2Connection",
    "Window",
    "WindowUpdated",
    "decode_frame",
    "encode_frame",
    "encode_trailers",
    "pack_batch",
    "parse_request_head",
    "parse_response_head",
    "parse_trailers",
    "request_head",
    "response_head",
    "unpack_batch",
]
