"""The brute-force brake, tunnel passwords and handshake turns, without sockets: clocks we move
by hand (trio's MockClock for the turns)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from wstunnel.headers import basic_credentials, parse_basic
from wstunnel.server.guard import WAITERS_PER_SLOT, FailureBrake, HandshakeTurns, PasswordBook
from wstunnel.tokens import Token


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_brake_allows_up_to_the_limit_then_says_when() -> None:
    clock = Clock()
    brake = FailureBrake(limit=3, window=60, clock=clock)
    for _ in range(2):
        brake.failed("10.0.0.1")
        assert brake.retry_after("10.0.0.1") is None
    clock.now += 10
    brake.failed("10.0.0.1")
    # The first failure leaves the window 60 s after it happened: 50 s from now.
    assert brake.retry_after("10.0.0.1") == 50
    assert brake.retry_after("10.0.0.2") is None
    clock.now += 50
    assert brake.retry_after("10.0.0.1") is None


def test_brake_keeps_only_what_decides_and_forgets_old_addresses() -> None:
    clock = Clock()
    brake = FailureBrake(limit=2, window=10, clock=clock, max_addresses=3)
    for _ in range(100):
        brake.failed("10.0.0.1")
    assert brake.retry_after("10.0.0.1") == 10
    for address in ("10.0.0.2", "10.0.0.3"):
        brake.failed(address)
    clock.now += 11
    brake.failed("10.0.0.4")  # full: the stale entries go first
    assert len(brake) == 1
    assert brake.retry_after("10.0.0.1") is None


def test_brake_with_a_full_table_of_live_entries_drops_the_oldest() -> None:
    clock = Clock()
    brake = FailureBrake(limit=5, window=100, clock=clock, max_addresses=2)
    brake.failed("a")
    clock.now += 1
    brake.failed("b")
    clock.now += 1
    brake.failed("c")
    assert len(brake) == 2


def test_zero_limit_is_no_brake() -> None:
    brake = FailureBrake(limit=0, window=60, clock=Clock())
    for _ in range(1000):
        brake.failed("10.0.0.1")
    assert brake.retry_after("10.0.0.1") is None
    assert len(brake) == 0


def test_passwords_admit_only_the_right_basic_credentials() -> None:
    token = "t" * 20
    book = PasswordBook([(token, "s3cret")])
    assert book
    assert book.admits(Token(token), basic_credentials(token, "s3cret"))
    assert not book.admits(Token(token), basic_credentials(token, "wrong"))
    assert not book.admits(Token(token), basic_credentials("u" * 20, "s3cret"))
    assert not book.admits(Token(token), None)
    assert not book.admits(Token(token), b"Bearer abc")
    assert book.admits(Token("o" * 20), None)  # no password set for that token
    assert not PasswordBook()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, (b"", b"")),
        (b"Basic dXNlcjpwYXNz", (b"user", b"pass")),
        (b"basic dXNlcjpwYTpzcw==", (b"user", b"pa:ss")),
        (b"Basic !!!notbase64", (b"", b"")),
        (b"Digest abc", (b"", b"")),
        (b"Basic", (b"", b"")),
    ],
)
def test_parse_basic(header: bytes | None, expected: tuple[bytes, bytes]) -> None:
    assert parse_basic(header) == expected


async def test_handshake_turns_wait_in_order_and_pass_straight_on() -> None:
    turns = HandshakeTurns(2)
    assert await turns.acquire() and await turns.acquire()
    got: list[int] = []

    async def wait_for_turn(index: int) -> None:
        assert await turns.acquire()
        got.append(index)

    async with trio.open_nursery() as nursery:
        for index in range(3):
            nursery.start_soon(wait_for_turn, index)
            await trio.testing.wait_all_tasks_blocked()
        assert got == [] and turns.in_progress == 2
        turns.release()
        await trio.testing.wait_all_tasks_blocked()
        assert got == [0] and turns.in_progress == 2  # handed over, never free for a newcomer
        for _ in range(2):  # one at a time: trio may run tasks woken together in either order
            turns.release()
            await trio.testing.wait_all_tasks_blocked()
    assert got == [0, 1, 2]
    for _ in range(2):
        turns.release()
    assert turns.in_progress == 0


async def test_handshake_turns_refuse_beyond_the_waiters_and_after_the_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    turns = HandshakeTurns(1, wait=5.0)
    assert await turns.acquire()
    outcomes: list[bool] = []

    async def wait_for_turn() -> None:
        outcomes.append(await turns.acquire())

    async with trio.open_nursery() as nursery:
        for _ in range(WAITERS_PER_SLOT):
            nursery.start_soon(wait_for_turn)
        await trio.testing.wait_all_tasks_blocked()
        assert not await turns.acquire()  # the line is full: refused at once
        start = trio.current_time()
    assert outcomes == [False] * WAITERS_PER_SLOT  # nobody finished within the wait
    assert trio.current_time() - start == pytest.approx(5.0)
    turns.release()
    assert turns.in_progress == 0 and await turns.acquire()


async def test_a_lowered_limit_lets_handshakes_in_progress_drain_first() -> None:
    turns = HandshakeTurns(3)
    for _ in range(3):
        assert await turns.acquire()
    turns.limit = 1  # a reload
    got: list[bool] = []

    async def wait_for_turn() -> None:
        got.append(await turns.acquire())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_turn)
        await trio.testing.wait_all_tasks_blocked()
        turns.release()
        turns.release()
        await trio.testing.wait_all_tasks_blocked()
        assert got == [] and turns.in_progress == 1
        turns.release()
    assert got == [True] and turns.in_progress == 1
