"""Tokens are secrets: this type makes leaking one by accident hard.

``str(token)``, ``repr(token)`` and f-strings show only the first 8 characters followed by
``...``, the original WStunnel's ``cutToken`` form, so a token dropped into a log line, an error
message or a status page is redacted without anyone having to remember to do it. Code that must
use the secret itself (the handshake, comparisons) calls :meth:`Token.reveal`.
"""

from __future__ import annotations

import hmac

PREFIX_LENGTH = 8
MIN_LENGTH = 16


def redact(secret: str) -> str:
    """The loggable form of any secret string."""
    return secret[:PREFIX_LENGTH] + "..."


class Token:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    @property
    def prefix(self) -> str:
        return self._value[:PREFIX_LENGTH]

    def __str__(self) -> str:
        return redact(self._value)

    def __repr__(self) -> str:
        return f"Token({redact(self._value)!r})"

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Token):
            return NotImplemented
        # surrogateescape: the server decodes header bytes that are not UTF-8 that way, and a
        # plain encode() of such a token raises instead of comparing.
        return hmac.compare_digest(
            self._value.encode("utf-8", "surrogateescape"),
            other._value.encode("utf-8", "surrogateescape"),
        )

    def __hash__(self) -> int:
        return hash(self._value)
