"""One v2 stream's state, as one end of the tunnel keeps it: where each direction stands, its
windows and byte counts, and what its request and final response allow the body to be.

``V2Connection`` (``_connection``) holds a :class:`Stream` per live stream and a :class:`Gone`
per stream reset a short while ago; the tunnel-wide windows are its own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["StreamState"]

# Credit goes back once half a window is consumed, and also, once an eighth is, whenever the
# application has taken everything received: on a long link data comes in bursts, a window's
# worth a round trip, and a grant made in the middle of one would leave the rest of it consumed
# but unacknowledged until the next: the peer could then use only half its window.
DRAINED_SHIFT = 3
# Statuses whose responses never carry a body, whatever their headers say.
BODYLESS_STATUSES = frozenset({204, 304})


class StreamState(enum.Enum):
    IDLE = "idle"  # never opened
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"  # we ended our side; the peer may still send
    HALF_CLOSED_REMOTE = "half-closed (remote)"  # the peer ended its side; we may still send
    CLOSED = "closed"
    RESET = "reset"


class Phase(enum.Enum):
    """Where one direction of a stream stands."""

    HEAD = "before the final head"
    BODY = "open"
    ENDED = "ended"


@dataclass(slots=True, eq=False)
class Stream:
    id: int
    sending: Phase
    receiving: Phase
    send_window: int
    receive_window: int
    # The receive window's size: the peer's credit plus what we hold and have not yet granted
    # back. It starts at the protocol's initial window and only grows (``widen``).
    window: int
    unacked: int = 0  # consumed but not yet granted back
    buffered: int = 0  # received but not yet consumed
    consumed: int = 0  # in all: what a window tuner samples
    upgrade: bool = False  # the request has Upgrade: a 101 may answer it
    switched: bool = False  # a 101 answered it: DATA is the upgraded byte stream
    head_request: bool = False  # a HEAD request: its response has no body
    bodyless_response: bool = False

    @property
    def state(self) -> StreamState:
        """OPEN, HALF_CLOSED_* or CLOSED (ended both ways, buffered bytes still to consume)."""
        sent, received = self.sending is Phase.ENDED, self.receiving is Phase.ENDED
        if sent and received:
            return StreamState.CLOSED
        if sent:
            return StreamState.HALF_CLOSED_LOCAL
        return StreamState.HALF_CLOSED_REMOTE if received else StreamState.OPEN

    @property
    def done(self) -> bool:
        """Ended both ways with nothing left to consume: nothing more to keep."""
        return self.sending is Phase.ENDED and self.receiving is Phase.ENDED and not self.buffered

    def body_forbidden(self, *, requests: bool) -> str | None:
        """Why body bytes may not flow now in the direction that carries the request
        (``requests``) or the response, or None if they may."""
        if requests:
            if self.upgrade and not self.switched:
                return "body bytes on an upgrade request before its 101 Switching Protocols"
        elif self.bodyless_response:
            return "body bytes in a response to HEAD, or in a 204 or 304 response"
        return None

    def final_response(self, status: int, *, end_stream: bool, sent: bool) -> None:
        """The final response head went (``sent``) or came, with ``status``."""
        self.switched = status == 101
        self.bodyless_response = self.head_request or status in BODYLESS_STATUSES
        phase = Phase.ENDED if end_stream else Phase.BODY
        if sent:
            self.sending = phase
        else:
            self.receiving = phase


@dataclass(slots=True)
class Gone:
    """A reset stream, remembered for a while."""

    code: int
    peer_may_send: bool  # we reset it before the peer's END: its HEAD/DATA/END may still arrive


def credit_due(unacked: int, window: int, buffered: int) -> bool:
    """Whether to grant back ``unacked`` consumed bytes of a receive window of ``window`` bytes
    now, with ``buffered`` bytes received and not consumed yet: a stream's or the tunnel's."""
    return unacked >= (window >> 1 or 1) or (not buffered and unacked >= window >> DRAINED_SHIFT)
