"""Log lines held for a turn of the daemons' event loop (``logs.HeldLines``,
``daemon.HeldLinesWriter``): written later, but whole, in order, with the time they were logged
at, and never later than the first warning."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.support import private_logs
from tests.support.private_logs import add_handler, refuse_records
from wstunnel import daemon, logs
from wstunnel.logs import EventLogger, LineFormatter, ReopenableFileHandler


@pytest.fixture
def log_file(tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], tuple[EventLogger, Path]]]:
    """Makes an EventLogger on a private logger writing to a file, the clock one second further
    at each line; no holder is left behind.

    Made in the test's body: pytest gives a non-propagating logger its capture handler as each
    test phase starts, and any handler but ours means LogRecords, not the fast path."""
    path = tmp_path / "held.log"
    with private_logs.private_logger("wstunnel.test-held", monkeypatch, (logs.EventHandler,)) as logger:
        clock = iter(range(1_396_633_229, 1_396_633_229 + 10_000))
        monkeypatch.setattr(time, "time", lambda: float(next(clock)))

        def make() -> tuple[EventLogger, Path]:
            handler = ReopenableFileHandler(path, encoding="utf-8")
            handler.setFormatter(LineFormatter(timestamps=True))
            add_handler(logger, handler)
            refuse_records(logger, monkeypatch)
            return EventLogger("WStunsrv", logger), path

        try:
            yield make
        finally:
            logs.release_lines()


def count_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every os.write from now on, by its file descriptor, in a list (the writes still happen)."""
    writes: list[int] = []
    real_write = os.write

    def counted_write(fd: int, data: bytes) -> int:
        writes.append(fd)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counted_write)
    return writes


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_held_lines_wait_for_write_and_keep_their_times_and_order(
        log_file: Callable[[], tuple[EventLogger, Path]]) -> None:
    log, path = log_file()
    held = logs.hold_lines()
    log.info("HTTP RCV", id=1, url=b"/a")
    log.debug("D", id=1)
    log.info("HTTP RET", id=1, status=200)
    assert _lines(path) == []
    held.write()
    assert _lines(path) == [
        "2014/04/04 17:40:29 INFO HTTP RCV      pkg=WStunsrv id=1 url=/a",
        "2014/04/04 17:40:30 DBUG D             pkg=WStunsrv id=1",
        "2014/04/04 17:40:31 INFO HTTP RET      pkg=WStunsrv id=1 status=200",
    ]
    log.info("Next", n=2)
    logs.release_lines()
    assert _lines(path)[-1] == "2014/04/04 17:40:32 INFO Next          pkg=WStunsrv n=2"
    log.info("After", n=3)  # nothing holds lines now: at once
    assert _lines(path)[-1] == "2014/04/04 17:40:33 INFO After         pkg=WStunsrv n=3"


def test_a_busy_turn_writes_the_lines_of_the_turns_before_it(
        log_file: Callable[[], tuple[EventLogger, Path]]) -> None:
    log, path = log_file()
    held = logs.hold_lines()
    log.info("T1", n=1)
    held.turn_ends()  # tasks still to run: turn 1's line waits for them
    assert _lines(path) == []
    log.info("T2", n=2)
    log.info("T2", n=3)
    held.turn_ends()  # turn 1's line goes, turn 2's wait
    assert [line.split()[-1] for line in _lines(path)] == ["n=1"]
    held.turn_ends()  # a turn that logged nothing: turn 2's lines go
    assert [line.split()[-1] for line in _lines(path)] == ["n=1", "n=2", "n=3"]
    log.info("T4", n=4)
    held.write()  # nothing left to run: everything goes
    held.turn_ends()
    assert [line.split()[-1] for line in _lines(path)] == ["n=1", "n=2", "n=3", "n=4"]


def test_a_warning_goes_at_once_after_what_is_held(log_file: Callable[[], tuple[EventLogger, Path]]) -> None:
    log, path = log_file()
    logs.hold_lines()
    log.info("HTTP RCV", id=1)
    log.warning("HTTP RET", id=1, status=503, err="queue full")
    assert [line.split()[2] for line in _lines(path)] == ["INFO", "WARN"]
    log.error("Stopped")
    assert len(_lines(path)) == 3


def test_a_record_path_line_goes_at_once_after_what_is_held(
        log_file: Callable[[], tuple[EventLogger, Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    log, path = log_file()
    monkeypatch.undo()  # records allowed again (and the real clock)
    logs.hold_lines()
    log.info("First", n=1)
    log.info("Own pkg", pkg="other")  # a pkg field takes logging's record path
    assert [line.split()[3] for line in _lines(path)] == ["First", "Own"]


def test_another_threads_lines_are_not_held(log_file: Callable[[], tuple[EventLogger, Path]]) -> None:
    log, path = log_file()
    held = logs.hold_lines()
    log.info("Loop line")
    thread = threading.Thread(target=lambda: log.info("Thread line"))
    thread.start()
    thread.join(10)
    assert [line.split()[3] for line in _lines(path)] == ["Thread"]
    held.write()
    assert [line.split()[3] for line in _lines(path)] == ["Thread", "Loop"]


def test_at_most_max_held_lines_wait(log_file: Callable[[], tuple[EventLogger, Path]]) -> None:
    log, path = log_file()
    logs.hold_lines()
    for number in range(logs.MAX_HELD_LINES - 1):
        log.info("L", n=number)
    assert _lines(path) == []
    log.info("L", n=logs.MAX_HELD_LINES - 1)
    lines = _lines(path)
    assert len(lines) == logs.MAX_HELD_LINES
    assert lines[-1].endswith(f"n={logs.MAX_HELD_LINES - 1}")


def test_the_daemons_lines_go_once_the_turns_tasks_have_run(
        log_file: Callable[[], tuple[EventLogger, Path]]) -> None:
    log, path = log_file()
    seen: dict[str, list[str]] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            peer_may_run = trio.Event()

            async def peer() -> None:  # stands for the task about to send a response
                await peer_may_run.wait()
                seen["peer"] = _lines(path)

            nursery.start_soon(peer)
            await trio.testing.wait_all_tasks_blocked()
            log.info("WS   RCV", id=7, status=200)
            peer_may_run.set()  # the peer wakes for the next turn: the line waits for it
            await trio.lowlevel.checkpoint()
            seen["logger"] = _lines(path)
        await trio.testing.wait_all_tasks_blocked()
        seen["idle"] = _lines(path)
        log.info("HTTP RET", id=7, status=200)  # the loop ends before its next wait for I/O

    for _ in range(20):  # trio runs a turn's tasks in either order: try both, many times
        path.write_text("")
        held = logs.hold_lines()
        try:
            trio.run(main, instruments=[daemon.HeldLinesWriter(held)])
        finally:
            logs.release_lines()
        assert seen["peer"] == seen["logger"] == []
        assert [line.split()[3] for line in seen["idle"]] == ["WS"]
        assert [line.split()[3] for line in _lines(path)] == ["WS", "HTTP"]
        log.info("Not held")
        assert len(_lines(path)) == 3


def test_a_turns_held_lines_reach_a_file_in_one_write_as_the_same_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs: dict[str, bytes] = {}
    writes = count_writes(monkeypatch)
    with private_logs.private_logger("wstunnel.test-held-bytes", monkeypatch,
                                     (logs.EventHandler,)) as logger:
        for way in ("at once", "held"):
            path = tmp_path / f"{way}.log"
            handler = ReopenableFileHandler(path, encoding="utf-8")
            handler.setFormatter(LineFormatter(timestamps=True))
            handler.setLevel(logging.INFO)  # the debug lines are left out, held or not
            add_handler(logger, handler)
            refuse_records(logger, monkeypatch)
            log = EventLogger("WStuncli", logger)
            held = logs.hold_lines() if way == "held" else None
            writes.clear()
            try:
                for number in range(50):
                    log.info("WS   RCV", id=number, verb=b"GET", url=b"/caf\xc3\xa9 x")
                    log.debug("D", id=number)
                    log.info("WS   SND", id=number, status=200)
                if held is not None:
                    assert path.read_bytes() == b""
                    held.write()
            finally:
                logs.release_lines()
            outputs[way] = path.read_bytes()
            assert len(writes) == (1 if way == "held" else 100)
            logger.removeHandler(handler)
            handler.close()
    assert outputs["held"] == outputs["at once"]
    assert len(outputs["held"].splitlines()) == 100
    assert 'url="/café x"' in outputs["held"].decode()


def test_lines_of_several_event_loggers_share_the_write_and_a_bad_line_costs_only_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    writes = count_writes(monkeypatch)
    path = tmp_path / "ascii.log"
    ours = (logs.EventHandler,)
    with private_logs.private_logger("wstunnel.test-held-ascii", monkeypatch, ours) as logger, \
            path.open("w", encoding="ascii", errors="strict") as stream:
        handler = logs.LineStreamHandler(stream)
        handler.setFormatter(LineFormatter(timestamps=False))
        add_handler(logger, handler)
        refuse_records(logger, monkeypatch)
        front, tunnel = EventLogger("WStunsrv", logger), EventLogger("WStunsrv", logger)
        held = logs.hold_lines()
        try:
            front.info("HTTP RCV", id=1)
            tunnel.info("WS   RCV", id=1)
            held.write()
            assert len(writes) == 1  # two EventLoggers, one handler: one write
            front.info("A", n=1)
            tunnel.info("B", text="café")  # no ascii for this one
            front.info("C", n=3)
            monkeypatch.undo()  # handleError makes a record of the line it reports
            held.write()
        finally:
            logs.release_lines()
            logger.removeHandler(handler)
    assert path.read_text().splitlines() == [
        "INFO HTTP RCV      pkg=WStunsrv id=1", "INFO WS   RCV      pkg=WStunsrv id=1",
        "INFO A             pkg=WStunsrv n=1", "INFO C             pkg=WStunsrv n=3"]
    assert "UnicodeEncodeError" in capsys.readouterr().err  # logging's report of the lost line


def _run_with_late_writes(main: Callable[[], Awaitable[None]]) -> None:
    """``main`` in a loop that holds lines and writes them late (``write_late`` beside it), on a
    clock that jumps to the next deadline whenever every task waits."""
    writer = daemon.HeldLinesWriter(logs.hold_lines())

    async def beside_write_late() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.write_late)
            await main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(beside_write_late, clock=trio.testing.MockClock(autojump_threshold=0),
                 instruments=[writer])
    finally:
        logs.release_lines()


def test_a_quiet_loops_lines_wait_for_the_next_ones_then_go_in_one_write(
        log_file: Callable[[], tuple[EventLogger, Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    log, path = log_file()
    writes = count_writes(monkeypatch)
    seen: dict[str, list[str]] = {}

    async def main() -> None:
        log.info("HTTP RCV", id=1)
        # Waits with nothing to run, as a daemon between requests: without write_late, each
        # would write what was logged before it.
        await trio.sleep(daemon.WRITE_AFTER / 4)
        seen["first wait"] = _lines(path)
        log.info("HTTP RET", id=1, status=200)
        await trio.sleep(daemon.WRITE_AFTER / 4)
        seen["second wait"] = _lines(path)
        await trio.sleep(daemon.WRITE_AFTER)  # nothing more is logged: they go all the same
        seen["later"] = _lines(path)

    _run_with_late_writes(main)
    assert seen["first wait"] == seen["second wait"] == []
    assert [line.split()[4] for line in seen["later"]] == ["RCV", "RET"]
    assert len(writes) == 1


def test_lines_wait_for_write_late_only_while_they_are_few(
        log_file: Callable[[], tuple[EventLogger, Path]]) -> None:
    log, path = log_file()
    seen: dict[str, list[str]] = {}

    async def main() -> None:
        log.info("First", n=0)
        await trio.sleep(daemon.WRITE_AFTER / 8)  # write_late sleeps now; "First" waits
        for number in range(1, daemon.WRITE_BATCH):
            log.info("L", n=number)
        # WRITE_BATCH lines held: the next wait writes them as it would without write_late
        # (those of earlier turns: the ones this turn's tasks logged wait for them to run).
        await trio.sleep(daemon.WRITE_AFTER / 8)
        seen["batch"] = _lines(path)

    _run_with_late_writes(main)
    assert [line.split()[-1] for line in seen["batch"]] == ["n=0"]
    assert [line.split()[-1] for line in _lines(path)] == [
        f"n={number}" for number in range(daemon.WRITE_BATCH)]


def test_lines_go_at_each_wait_again_once_write_late_is_over(
        log_file: Callable[[], tuple[EventLogger, Path]]) -> None:
    log, path = log_file()
    writer = daemon.HeldLinesWriter(logs.hold_lines())
    seen: dict[str, list[str]] = {}

    async def main() -> None:
        with trio.move_on_after(daemon.WRITE_AFTER / 2):  # write_late cancelled while it sleeps
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.write_late)
                await trio.testing.wait_all_tasks_blocked()
                log.info("Held")
                await trio.sleep_forever()
        await trio.sleep(daemon.WRITE_AFTER / 8)
        seen["after"] = _lines(path)
        log.info("Later")
        await trio.sleep(daemon.WRITE_AFTER / 8)
        seen["later"] = _lines(path)

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0), instruments=[writer])
    finally:
        logs.release_lines()
    assert [line.split()[3] for line in seen["after"]] == ["Held"]
    assert [line.split()[3] for line in seen["later"]] == ["Held", "Later"]
