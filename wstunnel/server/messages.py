"""What the HTTP front and the tunnels hand each other: request bodies still arriving, responses
still streaming, and the errors of both; plus the server's plain-text answers.

The front (``wstunnel.server.front``) implements the request side (its RequestBody, in
``wstunnel.server.incoming``, reads the client's socket) and consumes the response side; a tunnel
connection does the opposite. Neither imports the other: both import this.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol

from wstunnel import framing
from wstunnel.headers import Headers
from wstunnel.server.aborts import AbortTally, Cause, Cut

__all__ = [
    "AnyResponse", "BodyBroken", "BodyError", "BodySource", "BodyTimeout", "BodyTooLarge",
    "BodyVanished", "RequestBodySource", "ResponseAborted", "StreamingResponse", "UpgradeSink",
    "simple_response",
]


# -- request bodies --------------------------------------------------------------------------


class BodyError(Exception):
    """The request body cannot be read to its end; ``status`` and ``text`` say what to answer,
    ``cause`` how the aborted upload is counted."""

    status = 400
    text = "Malformed request body"
    cause = Cause.BAD_FRAMING

    def cut(self) -> Cut:
        """The upload's break, for its ``HTTP ABORT`` line."""
        return Cut("request", self.cause, self.text)


class BodyTooLarge(BodyError):
    status = 413
    text = "Request body too large"
    cause = Cause.TOO_LARGE


class BodyTimeout(BodyError):
    status = 408
    text = "Request body not received in time"
    cause = Cause.STALLED


class BodyBroken(BodyError):
    """The HTTP client broke the framing in the middle of its body (or went away)."""

    text = "Request body incomplete"


class BodyVanished(BodyBroken):
    """The HTTP client's connection ended (closed or reset) in the middle of its body."""

    text = "Request body incomplete: the HTTP client went away"
    cause = Cause.CLIENT_GONE


class RequestBodySource(Protocol):
    """A request body still on the HTTP client's socket, pulled chunk by chunk by whoever forwards
    the request (the front's RequestBody)."""

    @property
    def size(self) -> int:
        """Body bytes received so far."""
        ...

    @property
    def started(self) -> bool:
        """A chunk was handed out: the request can no longer be replayed."""
        ...

    @property
    def buffered(self) -> int:
        """Bytes of the body held in memory, not handed out yet."""
        ...

    @property
    def last_activity(self) -> float | None:
        """When a chunk was last handed out (trio clock), if one was."""
        ...

    async def receive(self) -> bytes | None:
        """The next chunk, or None at the end; BodyError if the body will never be whole."""
        ...

    async def read_all(self, limit: float = ...) -> bytes:
        """The whole rest of the body; BodyTooLarge once it passes ``limit`` bytes."""
        ...


# -- responses -------------------------------------------------------------------------------


class ResponseAborted(Exception):
    """A streamed response body (or an upgraded connection) cannot be completed: the tunnel
    reset the stream or died; ``cut`` says which way broke, and why."""

    def __init__(self, cut: Cut) -> None:
        super().__init__(cut.reason)
        self.cut = cut


class BodySource(Protocol):
    """Where a streamed response body comes from (a protocol v2 stream)."""

    async def receive(self) -> bytes | None:
        """The next chunk; None at the end; ResponseAborted if the body will never be complete."""
        ...

    def receive_nowait(self) -> bytes | None:
        """Like ``receive``, without waiting: trio.WouldBlock when no chunk has come yet."""
        ...

    def consumed(self, amount: int) -> None:
        """``amount`` bytes were written to the HTTP client: the source may let more come."""
        ...

    @property
    def trailers(self) -> Headers:
        """The body's trailer fields, once ``receive`` has returned None (usually none)."""
        ...

    def close(self) -> None:
        """We are done with the body, whole or not: release it (cancel the stream if unfinished)."""
        ...


class UpgradeSink(Protocol):
    """Where the HTTP client's bytes go once a 101 has switched the connection (a v2 stream)."""

    async def send(self, data: bytes) -> None:
        """Forward ``data``, waiting for credit; ResponseAborted if the other end is gone."""
        ...

    def end(self) -> None:
        """The HTTP client closed its side."""
        ...


@dataclass(eq=False)
class StreamingResponse:
    """A response whose head is known and whose body arrives chunk by chunk."""

    status: int
    reason: bytes
    headers: Headers
    body: BodySource
    # The longest wait for the next chunk: deadlines follow activity, not the transfer's size.
    idle_timeout: float = math.inf
    sent_bytes: int = 0
    # Called once the body is over, sent whole or not (metrics count its bytes then).
    on_finish: Callable[[StreamingResponse], None] | None = None
    # For a 101: the way up. ``body`` is then the way down, the backend's bytes.
    upgraded: UpgradeSink | None = None
    received_bytes: int = 0  # for a 101: the HTTP client's bytes passed up
    # Set by the front when the body (or, for a 101, either way) did not complete; on_finish
    # then logs and counts the abort.
    cut: Cut | None = None
    # The abort tally of the tunnel connection that carries the stream.
    tunnel_aborts: AbortTally | None = None
    # The reason and headers are a tunnel client's HEAD as read by wstunnel.http1 or h11: the
    # front writes them without checking each field line again (fasthttp.Encoder.head).
    parsed_head: bool = False


AnyResponse = framing.Response | StreamingResponse


def simple_response(status: int, text: str, *, headers: Headers | None = None) -> framing.Response:
    body = text.encode() if text.endswith("\n") or not text else (text + "\n").encode()
    return framing.Response(
        status=status,
        reason=_reason(status),
        headers=[(b"Content-Type", b"text/plain; charset=utf-8"), *(headers or [])],
        body=body,
    )


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
