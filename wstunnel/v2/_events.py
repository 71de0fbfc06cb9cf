"""What a V2Connection reports of the frames it receives: one event class per happening."""

from __future__ import annotations

from dataclasses import dataclass, field

from wstunnel.headers import Headers
from wstunnel.v2._frames import Frame

__all__ = [
    "DataReceived",
    "Event",
    "RequestReceived",
    "ResponseReceived",
    "SendFrame",
    "StreamEnded",
    "StreamReset",
    "WindowUpdated",
]


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A new stream (client side only). A StreamEnded follows at once if ``end_stream``."""

    stream: int
    method: bytes
    target: bytes
    headers: Headers
    end_stream: bool = False


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """A response head (server side only): 1xx informational ones first, then the final one."""

    stream: int
    status: int
    reason: bytes
    headers: Headers
    end_stream: bool = False

    @property
    def informational(self) -> bool:
        return self.status < 200 and self.status != 101


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Body bytes. Pass ``len(data)`` to ``consumed`` once the application has taken them."""

    stream: int
    data: bytes = field(repr=False)
    end_stream: bool = False


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer's side of the stream ended (END, or END_STREAM on the HEAD or DATA before)."""

    stream: int
    trailers: Headers


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer reset the stream: stop both directions; its buffered bytes are already released."""

    stream: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """The send window of ``stream`` grew (stream 0: the tunnel's, so every stream's capacity)."""

    stream: int
    increment: int


@dataclass(frozen=True, slots=True)
class SendFrame:
    """A frame the connection owes the peer on its own: WINDOW credit for bytes it dropped."""

    frame: Frame


Event = (
    RequestReceived | ResponseReceived | DataReceived | StreamEnded | StreamReset | WindowUpdated | SendFrame
)
