"""Writing heads: start and field lines, and the checks that what we write is what a reader
(h11, or our own readers) will read back."""

from __future__ import annotations

from collections.abc import Iterable

from wstunnel.http1._grammar import FIELD_VALUE_RE, TARGET_RE, TOKEN_RE


class HeadError(ValueError):
    """A method, target or field that HTTP/1.1 does not allow (as h11 reads it)."""


def check_method(method: bytes) -> None:
    if TOKEN_RE.fullmatch(method) is None:
        raise HeadError("Illegal method characters")


def check_target(target: bytes) -> None:
    if TARGET_RE.fullmatch(target) is None:
        raise HeadError("Illegal target characters")


def check_field(name: bytes, value: bytes) -> None:
    """A field name must be a token; a value must have no outer blanks and no NUL, CR or LF."""
    if TOKEN_RE.fullmatch(name) is None:
        raise HeadError(f"Illegal header name {name!r}")
    if FIELD_VALUE_RE.fullmatch(value) is None:
        raise HeadError(f"Illegal header value {value!r}")


def head_bytes(start_line: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The head: the start line, one line per field, the empty line; every line ends with CRLF.
    Nothing is checked: see ``check_*``."""
    parts = [start_line, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def request_line(method: bytes, target: bytes) -> bytes:
    return b"%s %s HTTP/1.1" % (method, target)


def status_line(status: int, reason: bytes) -> bytes:
    return b"HTTP/1.1 %d %s" % (status, reason)
