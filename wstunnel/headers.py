"""Header lists as the tunnel carries them: ``(name, value)`` byte pairs, original case kept."""

from __future__ import annotations

import base64
import binascii
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
    # One pass, one lower() a header: every request and response goes through here twice.
    drop = HOP_BY_HOP.union(extra) if extra else HOP_BY_HOP
    kept: Headers = []
    named: set[bytes] = set()
    for key, value in headers:
        lower = key.lower()
        if lower == b"connection":
            named.update(part.strip().lower() for part in value.split(b","))
        elif lower not in drop:
            kept.append((key, value))
    if named - drop:  # "Connection: keep-alive" names nothing that is not dropped already
        return without(kept, named)
    return kept


def parse_basic(authorization: bytes | None) -> tuple[bytes, bytes]:
    """``Authorization: Basic ...`` as (user, password); empty values when absent or broken."""
    if not authorization:
        return b"", b""
    scheme, _, encoded = authorization.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return b"", b""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b"", b""
    user, _, password = decoded.partition(b":")
    return user, password


def basic_credentials(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())
