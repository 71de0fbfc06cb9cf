"""Who may try what: tunnel passwords, the brute-force brake on token guessing, and the turns of
tunnel handshakes.

A token is a bearer secret, so an address that keeps presenting unknown tokens or failing
handshakes is guessing. :class:`FailureBrake` counts such failures per client address in a
sliding window; once an address is over the limit, everything it tries with a token is refused
(429 with Retry-After) until its window has room again, valid tokens included: answering those
normally would tell the guesser which guess was right.
"""

from __future__ import annotations

import collections
import hmac
import math
from collections.abc import Callable, Iterable

import trio

from wstunnel.headers import parse_basic
from wstunnel.tokens import Token

BASIC_REALM = b'Basic realm="wstunnel", charset="UTF-8"'
# How long a handshake waits for its turn, and how many may wait per handshake slot.
HANDSHAKE_WAIT = 5.0
WAITERS_PER_SLOT = 128


class FailureBrake:
    def __init__(self, *, limit: int, window: float, clock: Callable[[], float],
                 max_addresses: int = 100_000) -> None:
        self.limit = limit  # 0: no brake
        self.window = window
        self.clock = clock
        self.max_addresses = max_addresses
        self._failures: dict[str, collections.deque[float]] = {}

    def _recent(self, address: str) -> collections.deque[float]:
        stamps = self._failures.get(address)
        if stamps is None:
            return collections.deque()
        horizon = self.clock() - self.window
        while stamps and stamps[0] <= horizon:
            stamps.popleft()
        if not stamps:
            del self._failures[address]
        return stamps

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may try again, or None if it may try now."""
        if not self.limit:
            return None
        stamps = self._recent(address)
        if len(stamps) < self.limit:
            return None
        # Room comes back when the oldest failure that keeps it at the limit leaves the window.
        release = stamps[len(stamps) - self.limit] + self.window
        return max(1, math.ceil(release - self.clock()))

    def failed(self, address: str) -> None:
        if not self.limit:
            return
        if address not in self._failures and len(self._failures) >= self.max_addresses:
            self._forget_stale()
        stamps = self._failures.setdefault(address, collections.deque())
        stamps.append(self.clock())
        # Keep what decides, not every failure an address ever had.
        while len(stamps) > self.limit:
            stamps.popleft()

    def _forget_stale(self) -> None:
        for address in list(self._failures):
            self._recent(address)
        if len(self._failures) >= self.max_addresses:
            # Still full of live entries: drop the oldest address rather than grow without bound.
            oldest = min(self._failures, key=lambda a: self._failures[a][-1])
            del self._failures[oldest]

    def __len__(self) -> int:
        return len(self._failures)


class PasswordBook:
    """Per-token tunnel passwords, the later Go fork's ``-passwords token:pass,...`` format."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self._entries = [(Token(token), password.encode()) for token, password in pairs]

    def __bool__(self) -> bool:
        return bool(self._entries)

    def required_for(self, token: Token) -> bytes | None:
        # Every entry is compared: the time taken says nothing about which tokens have one.
        found: bytes | None = None
        for entry, password in self._entries:
            if entry == token:
                found = password
        return found

    def admits(self, token: Token, authorization: bytes | None) -> bool:
        """True when ``token`` needs no password, or the Basic credentials carry its own."""
        expected = self.required_for(token)
        if expected is None:
            return True
        user, password = parse_basic(authorization)
        user_ok = hmac.compare_digest(user, token.reveal().encode("utf-8", "surrogateescape"))
        password_ok = hmac.compare_digest(password, expected)
        return user_ok and password_ok


class HandshakeTurns:
    """At most ``limit`` tunnel handshakes in progress at once; the next ones wait their turn, in
    order of arrival, for at most ``wait`` seconds and at most ``limit * WAITERS_PER_SLOT`` of
    them; beyond that, or after the wait, the caller refuses (503 with Retry-After).

    Refusing everything over the limit at once sent a herd of returning clients (a server restart
    with thousands of tunnels) away to their exponential backoff, most of them several times:
    10,000 tunnels took 41 s to come back, the server busy a fraction of it. A wait costs one
    connection already accepted and its task; the turns go at the pace the server handshakes.
    """

    def __init__(self, limit: int, *, wait: float = HANDSHAKE_WAIT) -> None:
        # trio's limiter hands a returned token straight to the next waiter, in order, and keeps
        # newcomers behind those waiting; a lowered limit lets the handshakes in progress drain.
        self._slots = trio.CapacityLimiter(limit)
        self._turns: list[object] = []  # held now; turns are alike, so release() returns any
        self.wait = wait

    @property
    def limit(self) -> int:
        return int(self._slots.total_tokens)

    @limit.setter
    def limit(self, limit: int) -> None:  # a reload
        self._slots.total_tokens = limit

    @property
    def in_progress(self) -> int:
        return self._slots.borrowed_tokens

    async def acquire(self) -> bool:
        """A turn (True), at once or after waiting; False if refused. Pair with ``release``."""
        turn = object()
        try:
            self._slots.acquire_on_behalf_of_nowait(turn)  # no checkpoint: the handshake's I/O is one
        except trio.WouldBlock:
            if self._slots.statistics().tasks_waiting >= self.limit * WAITERS_PER_SLOT:
                return False
            with trio.move_on_after(self.wait) as waited:
                await self._slots.acquire_on_behalf_of(turn)
            if waited.cancelled_caught:
                return False
        self._turns.append(turn)
        return True

    def release(self) -> None:
        self._slots.release_on_behalf_of(self._turns.pop())
