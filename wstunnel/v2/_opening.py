"""What the two ends agree on as a tunnel opens, beyond the subprotocol: the first window of
request bodies, sans-I/O.

Every stream starts with the protocol's 256 KiB windows (``INITIAL_STREAM_WINDOW``); a receiver
may widen a window only by a WINDOW frame, which reaches the sender a round trip later. For a
request body that round trip is the whole cost of the first window: across a 50 ms link a 1 MiB
upload that the original (no flow control) sends in one round trip would take two. So the client,
which receives request bodies, may offer a larger first window for them in its opening (the
WebSocket handshake or the long-poll session's open), in ``X-Wstunnel-Request-Window``; a server
that knows the header answers with the same header and the value it takes, and from then on every
request stream starts with that window in both ends' books. A server from before the header
answers without it, and both keep 256 KiB; a client from before it offers nothing.

The offer costs no memory the tunnel window does not already bound: the bytes a client holds for
all its streams together stay within its tunnel window (4 MiB at first).
"""

from __future__ import annotations

from wstunnel.v2._frames import INITIAL_STREAM_WINDOW, MAX_WINDOW
from wstunnel.v2._tuning import FIRST_WINDOW, WindowLimits, first_window

__all__ = [
    "FIRST_REQUEST_WINDOW",
    "REQUEST_WINDOW_HEADER",
    "accept_request_window",
    "agreed_request_window",
    "offered_request_window",
]

# Named in the client's opening (its offer) and in the server's answer (what it took).
REQUEST_WINDOW_HEADER = b"X-Wstunnel-Request-Window"
# What our client offers: the first window of any body on a tunnel that tunes its windows.
FIRST_REQUEST_WINDOW = FIRST_WINDOW
_MAX_DIGITS = len(str(MAX_WINDOW))


def offered_request_window(limits: WindowLimits) -> int | None:
    """What a client offers: ``FIRST_REQUEST_WINDOW`` within its stream window limit; None (no
    header) when that is the protocol's own first window."""
    window = first_window(limits)
    return window if window > INITIAL_STREAM_WINDOW else None


def _parse(value: bytes) -> int:
    text = value.strip()
    if not (text.isdigit() and len(text) <= _MAX_DIGITS):
        raise ValueError(f"{REQUEST_WINDOW_HEADER.decode()} must be a number of bytes, not {value[:40]!r}")
    window = int(text)
    if not INITIAL_STREAM_WINDOW <= window <= MAX_WINDOW:
        raise ValueError(f"{REQUEST_WINDOW_HEADER.decode()} {window} out of range "
                         f"({INITIAL_STREAM_WINDOW} to {MAX_WINDOW})")
    return window


def accept_request_window(offer: bytes | None) -> int | None:
    """The server's side: the window a client's offer asks for, to answer with and to use (None:
    no offer, the protocol's first window). ValueError for an offer that is not a window."""
    return None if offer is None else _parse(offer)


def agreed_request_window(offered: int | None, answer: bytes | None) -> int:
    """The client's side: the first window of request bodies, from what it offered and what the
    server answered (no answer: a server from before the header, and the protocol's window).
    ValueError for an answer the client did not offer."""
    if answer is None:
        return INITIAL_STREAM_WINDOW
    window = _parse(answer)
    if offered is None or window > offered:
        raise ValueError(f"the server took a request window of {window} bytes; "
                         f"{offered or 'none'} was offered")
    return window
