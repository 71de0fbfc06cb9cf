"""The client's session bookkeeping, without sockets."""

from __future__ import annotations

import trio_websocket
from trio_websocket._impl import CloseReason

from wstunnel.client.agent import Backoff, _first_session_ending


def _closed(code: int = 1006) -> trio_websocket.ConnectionClosed:
    return trio_websocket.ConnectionClosed(CloseReason(code, None))


def test_a_connection_lost_by_two_tasks_at_once_is_one_ending() -> None:
    # The receiver and an in-flight ping both see the close: a group of two, one cause.
    first, second = _closed(1001), _closed(1006)
    group = ExceptionGroup("session", [ExceptionGroup("serve", [first]), second])
    assert _first_session_ending(group, timeout=30) is first


def test_a_bug_beside_a_closed_connection_still_propagates() -> None:
    bug = ValueError("a bug")
    group = ExceptionGroup("session", [_closed(), bug])
    assert _first_session_ending(group, timeout=30) is group


def test_a_single_error_is_unwrapped() -> None:
    closed = _closed()
    assert _first_session_ending(ExceptionGroup("x", [ExceptionGroup("y", [closed])]), 30) is closed


def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    import random

    backoff = Backoff(cap=8.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [1, 2, 4, 8, 8, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.next_delay() <= 1.0
