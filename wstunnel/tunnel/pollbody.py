"""The body codec of the HTTPS long-poll transport, sans-I/O: tunnel messages in an HTTP body.

A poll body (the answer to ``GET /_tunnel/poll``, or a ``POST /_tunnel/poll`` request body) is
zero or more messages back to back, each a u32 big-endian length, then that many bytes: one
protocol v2 frame each, exactly what one binary WebSocket message carries on the other transport::

    +--------+--------+--------+--------+=========...+--------+---...
    |     length (u32, big-endian)      | message    | length | ...
    +--------+--------+--------+--------+=========...+--------+---...

An empty body holds no message. A body must end exactly after its last message: a length that runs
past the end, a partial length prefix, or a message over ``max_message`` bytes is malformed.
Bodies are kept small (MAX_BATCH_BYTES) so that a proxy that buffers whole bodies still passes each
one quickly; one message larger than that still travels alone (v2 heads may reach 256 KiB).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable

from wstunnel import framing, v2
from wstunnel.errors import FramingError

LENGTH = struct.Struct(">I")
MAX_BATCH_BYTES = 1024 * 1024
# The largest v2 frame: a HEAD of MAX_HEAD_SIZE bytes (DATA payloads are far smaller).
MAX_MESSAGE = framing.MAX_HEAD_SIZE + v2.HEADER_SIZE


class PollBodyError(FramingError):
    """A poll body is not a sequence of whole length-prefixed messages."""


def encode(messages: Iterable[bytes]) -> bytes:
    parts: list[bytes] = []
    for message in messages:
        parts.append(LENGTH.pack(len(message)))
        parts.append(message)
    return b"".join(parts)


def decode(body: bytes, *, max_message: int) -> list[bytes]:
    """The messages of ``body``; PollBodyError if it is malformed (nothing is half-decoded)."""
    view = memoryview(body)
    messages: list[bytes] = []
    offset = 0
    while offset < len(view):
        if len(view) - offset < LENGTH.size:
            raise PollBodyError("poll body ends inside a length prefix")
        (size,) = LENGTH.unpack_from(view, offset)
        offset += LENGTH.size
        if size > max_message:
            raise PollBodyError(f"poll message of {size} bytes exceeds {max_message}")
        if size > len(view) - offset:
            raise PollBodyError("poll body ends inside a message")
        messages.append(bytes(view[offset:offset + size]))
        offset += size
    return messages


def take_batch(queue: deque[bytes], limit: int = MAX_BATCH_BYTES) -> list[bytes]:
    """Pop messages from the front of ``queue`` while their encoding stays within ``limit``.

    At least one message is taken when any waits, however large, so that nothing is stuck.
    """
    batch: list[bytes] = []
    size = 0
    while queue:
        cost = LENGTH.size + len(queue[0])
        if batch and size + cost > limit:
            break
        batch.append(queue.popleft())
        size += cost
    return batch
