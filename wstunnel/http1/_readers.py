"""Reading heads: a head split into its start line and field lines, each checked against the
grammar. Only the grammar: which fields a message must or must not have is its reader's business
(``wstunnel.v2`` and ``wstunnel.client.origin`` fall back to h11 for anything unusual)."""

from __future__ import annotations

from wstunnel.headers import Headers
from wstunnel.http1._grammar import (
    CONTENT_LENGTH_RE,
    FIELD_BLOCK_RE,
    REQUEST_LINE_RE,
    STATUS_LINE_RE,
)

CRLF = b"\r\n"
BLANK_LINE = b"\r\n\r\n"


def split_head(data: bytes) -> tuple[bytes, bytes, int] | None:
    """A head at the start of ``data``: its start line, its field block (the field lines, each
    with its CRLF) and the offset just past its empty line; None while its end has not come."""
    end = data.find(BLANK_LINE)
    if end < 0:
        return None
    first = data.find(CRLF)
    return data[:first], data[first + 2 : end + 2], end + 4


def parse_request_line(line: bytes) -> tuple[bytes, bytes, bytes] | None:
    """``(method, target, version)`` of a request line, version as ``b"1.1"``; None if malformed."""
    match = REQUEST_LINE_RE.fullmatch(line)
    return None if match is None else (match[1], match[2], match[3])


def parse_status_line(line: bytes) -> tuple[bytes, int, bytes] | None:
    """``(version, status, reason)`` of a status line; None if malformed."""
    match = STATUS_LINE_RE.fullmatch(line)
    return None if match is None else (match[1], int(match[2]), match[3] or b"")


def parse_fields(block: bytes) -> Headers | None:
    """The ``(name, value)`` pairs of a field block, names as sent, values without their outer
    blanks (as h11 gives them); None if a line is malformed, folded, or has a bare CR or LF."""
    if block and FIELD_BLOCK_RE.fullmatch(block) is None:
        return None
    headers: Headers = []
    for line in block.split(CRLF)[:-1]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip(b" \t")))
    return headers


def content_length(value: bytes) -> bytes | None:
    """A Content-Length value as h11 reads it: a list of equal numbers (``5, 5``) is that number;
    None if h11 refuses it (no number, different numbers, more than 20 digits)."""
    lengths = {part.strip(b" \t") for part in value.split(b",")}
    if len(lengths) != 1:
        return None
    length = lengths.pop()
    return length if CONTENT_LENGTH_RE.fullmatch(length) is not None else None
