"""A streamed response as the server's front writes it: its head, the body chunks that are
there already and, once known, its end, gathered into one write (one system call and one wakeup
of the client instead of one per piece), with the body's credit given back only once its bytes
are in the client's socket. ``wstunnel.server.front`` drives it; the bytes come from an Encoder
(``wstunnel.server.fasthttp``: ours for a plain response to a simple request, else h11's).
"""

from __future__ import annotations

import trio

from wstunnel.headers import Headers
from wstunnel.server.fasthttp import Encoder
from wstunnel.server.messages import StreamingResponse

# A streamed response's pieces are gathered into one write up to about this size.
SEND_BATCH = 64 * 1024


def declared_length(headers: Headers) -> int | None:
    """The one valid Content-Length of ``headers``; None when absent or doubtful (h11 judges)."""
    values = [value for name, value in headers if name.lower() == b"content-length"]
    if len(values) != 1 or not values[0].isdigit():
        return None
    return int(values[0])


async def next_chunk(response: StreamingResponse) -> bytes | None:
    """The body's next chunk (None at its end); TooSlowError after ``idle_timeout`` without one.

    A bare cancel scope: trio.fail_after's generator-based context manager costs as much again.
    """
    with trio.CancelScope(deadline=trio.current_time() + response.idle_timeout):
        return await response.body.receive()
    raise trio.TooSlowError


class ResponseBatch:
    """The bytes of a streamed response that go out in its next write, and their accounts."""

    def __init__(self, encoder: Encoder, response: StreamingResponse, length: int | None
                 ) -> None:
        self.encoder = encoder
        self.response = response
        # The declared Content-Length (0 for a bodyless response); None for a chunked (or
        # HTTP/1.0, ended by closing) body.
        self.length = length
        self.out: list[bytes] = []
        self.size = 0  # body bytes in ``out``
        self.uncredited = 0  # bytes taken from the body, credited once written
        self.done = False  # the end of the message is in ``out``, or already written

    def head(self, status: int, reason: bytes, headers: Headers, *, parsed: bool = False) -> None:
        """The response head (``parsed``: as Encoder.head); a bodyless response ends with it (h11
        must see its end too, or it would not let the connection serve another request)."""
        self.out.append(self.encoder.head(status, reason, headers, parsed=parsed))
        if self.length == 0:
            self._end()

    def add(self, chunk: bytes | None) -> None:
        """One chunk from the body source (None: its end)."""
        if chunk is None:
            self._end()
            return
        self.uncredited += len(chunk)
        self.out.append(self.encoder.data(chunk))
        self.size += len(chunk)
        if self.length is not None and self.response.sent_bytes + self.size >= self.length:
            # Whole: the client may reuse the connection without waiting for the stream's END.
            self._end()

    def take_ready(self) -> None:
        """Add what the body source has without waiting, up to about SEND_BATCH bytes."""
        body = self.response.body
        while not self.done and self.size < SEND_BATCH:
            try:
                chunk = body.receive_nowait()
            except trio.WouldBlock:
                return
            self.add(chunk)

    def _end(self) -> None:
        # Trailers only where chunked coding carries them (h11 refuses them elsewhere).
        trailers = self.response.body.trailers if self.encoder.chunked else []
        self.out.append(self.encoder.end(trailers))
        self.done = True

    async def write(self, stream: trio.abc.SendStream) -> None:
        data = b"".join(self.out)
        self.out.clear()
        if data:
            await stream.send_all(data)
        self.response.sent_bytes += self.size
        self.size = 0
        # Credit goes back only once the bytes are in the client's socket: a slow client
        # slows its own stream, nothing else.
        if self.uncredited:
            self.response.body.consumed(self.uncredited)
            self.uncredited = 0
