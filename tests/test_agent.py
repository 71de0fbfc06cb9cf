"""The client's session bookkeeping, without sockets."""

from __future__ import annotations

import trio_websocket
from trio_websocket._impl import CloseReason

from wstunnel.client.agent import Backoff, PingTimeout, _describe_session_end, _first_session_ending
from wstunnel.errors import TunnelMessageError


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


def test_every_session_end_is_named() -> None:
    """The reconnect line's reason: never empty, whatever ended the session."""
    vanished = trio_websocket.ConnectionClosed(
        CloseReason(1006, "server vanished (connection reset, no Close frame)"))
    cases = {
        vanished: "connection closed: server vanished (connection reset, no Close frame) (code=1006)",
        _closed(1006): "connection closed: no reason given (ABNORMAL_CLOSURE) (code=1006)",
        trio_websocket.ConnectionClosed(CloseReason(1001, "server shutting down")):
            "connection closed: server shutting down (code=1001)",
        trio_websocket.ConnectionClosed(None): "connection closed: the transport ended",
        PingTimeout(): "ping timeout: no pong within 3s",
        TunnelMessageError("DATA frame on stream 9, which was never opened"):
            "protocol error from server: DATA frame on stream 9, which was never opened",
    }
    for ending, reason in cases.items():
        assert _describe_session_end(ending, timeout=3) == reason
