"""What the server remembers of how requests ended, for the operator's console (``/_admin/``):
per token its last success and its last error, and server-wide the last errors.

Written where a request's answer is known (``wstunnel.server.forwarding``), so the cost is on the
request path and has to stay tiny: a success is three attribute writes on the token's
:class:`TunnelAudit`, no allocation; an error (rarer) also appends one tuple to a bounded ring.
Times are trio's clock; the console turns them into wall-clock times when it shows them.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass

from wstunnel.tokens import Token

ERRORS_KEPT = 100


class TunnelAudit:
    """The last success and the last error of one token's requests."""

    __slots__ = ("error_addr", "error_at", "error_reason", "error_status",
                 "success_addr", "success_at", "success_reason", "success_status")

    def __init__(self) -> None:
        self.success_at: float | None = None
        self.success_status = 0
        self.success_reason: bytes | str = b""
        self.success_addr = ""
        self.error_at: float | None = None
        self.error_status = 0
        self.error_reason: bytes | str = b""
        self.error_addr = ""

    def succeeded(self, at: float, status: int, reason: bytes, addr: str) -> None:
        self.success_at = at
        self.success_status = status
        self.success_reason = reason
        self.success_addr = addr

    def failed(self, at: float, status: int, reason: bytes | str, addr: str) -> None:
        self.error_at = at
        self.error_status = status
        self.error_reason = reason
        self.error_addr = addr


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    seq: int  # numbers every error the server kept, so a reader can ask for the newer ones
    at: float
    token: str  # the prefix form, "abcdefgh..."
    status: int
    reason: str
    addr: str
    method: str
    path: str


# A backend's answer from this status up counts as an error rather than a success (the server's
# own refusals and failures, whatever their status, are errors anyway).
BACKEND_ERROR = 500


class ErrorLog:
    """The last ERRORS_KEPT errors the server answered, across all tokens, oldest first."""

    def __init__(self, size: int = ERRORS_KEPT) -> None:
        self._records: collections.deque[ErrorRecord] = collections.deque(maxlen=size)
        self._seq = itertools.count(1)

    def add(self, at: float, token: Token, status: int, reason: bytes | str, addr: str,
            method: bytes, path: bytes) -> None:
        text = reason.decode("latin-1") if isinstance(reason, bytes) else reason
        self._records.append(ErrorRecord(
            next(self._seq), at, str(token), status, text[:200], addr,
            method.decode("latin-1")[:16], safe_path(path, token),
        ))

    def since(self, seq: int) -> list[ErrorRecord]:
        """The records numbered after ``seq``, oldest first."""
        return [record for record in self._records if record.seq > seq]

    @property
    def last_seq(self) -> int:
        return self._records[-1].seq if self._records else 0


PATH_SHOWN = 80


def safe_path(target: bytes, token: Token, limit: int = PATH_SHOWN) -> str:
    """A request target fit for the console: the path only (a query string may carry secrets),
    never a ``/_token/`` secret nor the request's own token anywhere in it, cut to ``limit``
    characters."""
    path, query, _ = target.partition(b"?")
    if path.startswith(b"/_token/"):
        secret, _, rest = path[len(b"/_token/"):].partition(b"/")
        path = b"/_token/" + secret[:8] + b".../" + rest
    text = path.decode("latin-1")
    whole = token.reveal().encode("utf-8", "surrogateescape").decode("latin-1")
    if whole and whole in text:
        text = text.replace(whole, str(token))
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text + ("?..." if query else "")
