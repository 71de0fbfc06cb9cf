"""Header lists as the tunnel carries them: ``(name, value)`` byte pairs, original case kept."""

from __future__ import annotations

from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded by a proxy.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def get(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lowercase), or None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def without(headers: Iterable[tuple[bytes, bytes]], names: Iterable[bytes]) -> Headers:
    """``headers`` minus every header whose lowercase name is in ``names``."""
    drop = frozenset(names)
    return [(k, v) for k, v in headers if k.lower() not in drop]


def without_hop_by_hop(headers: Iterable[tuple[bytes, bytes]], *extra: bytes) -> Headers:
    """Drop hop-by-hop headers, those named in ``Connection``, and ``extra`` names."""
    headers = list(headers)
    named: set[bytes] = set()
    for key, value in headers:
        if key.lower() == b"connection":
            named.update(part.strip().lower() for part in value.split(b","))
    return without(headers, HOP_BY_HOP | named | set(extra))
