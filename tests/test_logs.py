"""wstunnel.logs: the original's key=value lines (SPEC §5), to stderr, a file or syslog."""

from __future__ import annotations

import io
import logging
import os
import re
import socket
import sys
import types
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest

from tests.support import private_logs
from tests.support.private_logs import add_handler, refuse_records
from wstunnel import logs, logtargets, logtext
from wstunnel.logs import (
    EventLogger,
    LineFormatter,
    ReopenableFileHandler,
    reopen_files,
)
from wstunnel.logtargets import configure
from wstunnel.logtext import format_event
from wstunnel.tokens import Token

SECRET = "tech_xyz_0123456789_do_not_log"
TOKEN = Token(SECRET)
STAMP = r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d"


class _Str(str):
    pass


class _Bytes(bytes):
    pass


class ListHandler(logging.Handler):
    """Keeps records and their formatted lines."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(formatter)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


@pytest.fixture(autouse=True)
def wstunnel_logger() -> Iterator[logging.Logger]:
    """The shared "wstunnel" logger, put back as it was after each test."""
    logger = logging.getLogger("wstunnel")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        if handler not in saved[0]:
            handler.close()
    for handler in saved[0]:
        logger.addHandler(handler)
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


@pytest.fixture
def captured() -> Iterator[tuple[EventLogger, ListHandler]]:
    """An EventLogger for the server on a private logger, lines as syslog gets them (no time)."""
    logger = logging.getLogger("wstunnel.test-private")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = ListHandler(LineFormatter(timestamps=False))
    logger.addHandler(handler)
    try:
        yield EventLogger("WStunsrv", logger), handler
    finally:
        logger.removeHandler(handler)


# -- the lines of SPEC §5 -----------------------------------------------------------------------


def test_spec_example_lines(captured: tuple[EventLogger, ListHandler]) -> None:
    log, handler = captured
    token = Token("tech_xyz" + "-rest-of-the-secret")
    # As the server logs one request (wstunnel/server: app.py and tunnels.py).
    log.info("HTTP RCV", token=token, id=19, verb=b"GET", url=b"/", addr="10.210.2.11, 53.5.22.247",
             **{"x-host": b""}, try_="")
    log.info("WS   SND", token=token, id=19, info="GET /")
    log.info("WS   RCV", token=token, id=19, ws="...", len=393)
    log.info("HTTP RET", token=token, id=19, status=401)
    assert handler.lines == [
        'INFO HTTP RCV      pkg=WStunsrv token=tech_xyz... id=19 verb=GET url=/ '
        'addr="10.210.2.11, 53.5.22.247" x-host= try=',
        'INFO WS   SND      pkg=WStunsrv token=tech_xyz... id=19 info="GET /"',
        "INFO WS   RCV      pkg=WStunsrv token=tech_xyz... id=19 ws=... len=393",
        "INFO HTTP RET      pkg=WStunsrv token=tech_xyz... id=19 status=401",
    ]


def test_a_single_address_is_not_quoted_like_log15(captured: tuple[EventLogger, ListHandler]) -> None:
    # log15, the original's logger, quotes a value only when it holds a space, '=', '"' or a
    # control character: one address is bare, "a, b" (X-Forwarded-For) is quoted.
    log, handler = captured
    log.info("HTTP RCV", token=TOKEN, id=1, addr="10.210.2.11")
    assert handler.lines == ["INFO HTTP RCV      pkg=WStunsrv token=tech_xyz... id=1 addr=10.210.2.11"]


def test_levels_have_the_original_four_letter_names(captured: tuple[EventLogger, ListHandler]) -> None:
    log, handler = captured
    log.debug("D", n=1)
    log.info("I", n=2)
    log.warning("W", n=3)
    log.error("E", n=4)
    log.log(logging.CRITICAL, "C", n=5)
    assert [line.split(" ", 1)[0] for line in handler.lines] == ["DBUG", "INFO", "WARN", "EROR", "CRIT"]
    assert handler.lines[0] == "DBUG D             pkg=WStunsrv n=1"


def test_records_carry_the_event_and_fields_for_journald(captured: tuple[EventLogger, ListHandler]) -> None:
    log, handler = captured
    log.warning("WS   ERR", token=TOKEN, id=7, err="bad")
    (record,) = handler.records
    assert record.levelno == logging.WARNING
    assert record.wstunnel_event == "WS   ERR"  # type: ignore[attr-defined]
    fields: dict[str, Any] = record.wstunnel_fields  # type: ignore[attr-defined]
    assert list(fields) == ["pkg", "token", "id", "err"]
    assert fields["pkg"] == "WStunsrv"
    assert fields["id"] == 7
    # The token rides as a Token, so whatever renders it gets the redacted form.
    assert fields["token"] is TOKEN
    assert str(fields["token"]) == "tech_xyz..."
    assert record.getMessage() == "WS   ERR      pkg=WStunsrv token=tech_xyz... id=7 err=bad"


def test_disabled_levels_are_not_formatted(captured: tuple[EventLogger, ListHandler]) -> None:
    log, handler = captured
    logger = logging.getLogger("wstunnel.test-private")
    logger.setLevel(logging.WARNING)

    class Exploding:
        def __str__(self) -> str:
            raise AssertionError("rendered a field of a disabled level")

    log.info("HTTP RCV", value=Exploding())
    log.debug("HTTP RCV", value=Exploding())
    log.warning("HTTP RET", status=503)
    assert handler.lines == ["WARN HTTP RET      pkg=WStunsrv status=503"]


# -- rendering ----------------------------------------------------------------------------------


# Values and how a line shows them (SPEC §5, log15's quoting).
RENDERED: list[tuple[object, str]] = [
    ("plain", "plain"),
    ("/path?q=1", '"/path?q=1"'),
    ("", ""),
    (None, ""),
    (b"", ""),
    ("two words", '"two words"'),
    ("a=b", '"a=b"'),
    ('say "hi"', r'"say \"hi\""'),
    ("back\\slash", r'"back\\slash"'),
    ("line\nbreak\r\ttab", r'"line\nbreak\r\ttab"'),
    ("\x1b[31mred", r'"\x1b[31mred"'),
    ("nul\x00", r'"nul\x00"'),
    ("\x7f", r'"\x7f"'),
    ("\u2028", r'"\u2028"'),
    ("\udcff\udcfe", r'"\udcff\udcfe"'),  # surrogateescape leftovers
    ("café", "café"),
    (True, "true"),
    (False, "false"),
    (0, "0"),
    (19, "19"),
    (-3, "-3"),
    (0.5, "0.500"),
    (2.0, "2.000"),
    (b"GET", "GET"),
    (b"\xff", "\ufffd"),
    (b"a b", '"a b"'),
    (TOKEN, "tech_xyz..."),
    (Token("my token is secret"), '"my token..."'),
    (Path("/var/log/x.log"), "/var/log/x.log"),
    # Types the fast loop of format_fields leaves to render_value, and exact-type look-alikes.
    (HTTPStatus.NOT_FOUND, "404"),
    (10**30, "1" + "0" * 30),
    (-1.23456, "-1.235"),
    (float("nan"), "nan"),
    (bytearray(b"ab"), "bytearray(b'ab')"),
    (_Str("sub class"), '"sub class"'),
    (_Bytes(b"sub"), "sub"),
    (b'say "hi"', r'"say \"hi\""'),
    (Token('ab"cdefgh-the-rest'), r'"ab\"cdefg..."'),
    (Token("ab\ncdefgh-the-rest"), r'"ab\ncdefg..."'),
]


@pytest.mark.parametrize(("value", "rendered"), RENDERED)
def test_value_rendering(value: object, rendered: str) -> None:
    assert logtext.format_fields({"k": value}) == f"k={rendered}"
    # The journal's fields and exc= render through the one-value function: same text.
    assert logtext.render_value(value) == rendered


def test_rendered_lines_stay_on_one_line_and_encode() -> None:
    text = format_event("WS   ERR", {"err": "a\nINFO HTTP RET forged\r\n\udcff\x85"})
    assert "\n" not in text and "\r" not in text and "\x85" not in text
    text.encode("utf-8")  # a surrogate would make the handler drop the line
    assert text == r'WS   ERR      err="a\nINFO HTTP RET forged\r\n\udcff\x85"'


def test_trailing_underscore_is_dropped_from_keys() -> None:
    assert logtext.format_fields({"try_": "", "class_": "x", "id": 1}) == "try= class=x id=1"
    assert logtext.format_fields({"try_": 2}) == "try=2"


def test_field_order_is_kept() -> None:
    assert logtext.format_fields({"z": 1, "a": 2, "m": 3}) == "z=1 a=2 m=3"


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ("HTTP RCV", "HTTP RCV      pkg=P"),
        ("WS   SND", "WS   SND      pkg=P"),
        ("Listening", "Listening     pkg=P"),
        ("13-characters", "13-characters pkg=P"),
        # As long as the column or longer: still one space before the fields.
        ("WS   RECONNECT", "WS   RECONNECT pkg=P"),
        ("WS   CONNECTED", "WS   CONNECTED pkg=P"),
        ("A much longer event name", "A much longer event name pkg=P"),
    ],
)
def test_event_column(event: str, expected: str) -> None:
    assert format_event(event, {"pkg": "P"}) == expected


def test_event_without_fields_is_just_the_event() -> None:
    assert format_event("Stopped", {}) == "Stopped"


def test_line_formatter_timestamp_is_utc() -> None:
    record = logging.LogRecord("wstunnel", logging.INFO, __file__, 1, "HTTP RET      pkg=x", None, None)
    record.created = 1_396_633_229.9  # 2014-04-04 17:40:29.9 UTC, the original's sample
    assert LineFormatter(timestamps=True).format(record) == "2014/04/04 17:40:29 INFO HTTP RET      pkg=x"
    assert LineFormatter(timestamps=False).format(record) == "INFO HTTP RET      pkg=x"


def test_line_formatter_puts_a_traceback_on_the_same_line() -> None:
    def fail() -> None:
        raise RuntimeError("boom")

    try:
        fail()
    except RuntimeError:
        record = logging.LogRecord("wstunnel", logging.ERROR, __file__, 1, "Crash", None, sys.exc_info())
    line = LineFormatter(timestamps=False).format(record)
    assert "\n" not in line
    assert line.startswith('EROR Crash exc="Traceback (most recent call last):\\n')
    assert line.endswith('RuntimeError: boom"')


# -- configure(): stderr, files, syslog --------------------------------------------------------


def test_configure_defaults_to_stderr_with_timestamps(capsys: pytest.CaptureFixture[str]) -> None:
    logger = configure(name="wstunsrv")
    assert logger is logging.getLogger("wstunnel")
    assert logger.propagate is False
    assert logger.level == logging.INFO
    EventLogger("WStunsrv").info("Listening", port=8080, host="0.0.0.0")
    EventLogger("WStunsrv").debug("Hidden", n=1)
    err = capsys.readouterr().err
    assert re.fullmatch(rf"{STAMP} INFO Listening     pkg=WStunsrv port=8080 host=0\.0\.0\.0\n", err), err


def test_configure_replaces_and_closes_earlier_handlers(tmp_path: Path) -> None:
    first = tmp_path / "first.log"
    configure(name="wstunsrv", logfile=first)
    (old,) = logging.getLogger("wstunnel").handlers
    logger = configure(name="wstunsrv", level="warning", logfile=tmp_path / "second.log")
    assert len(logger.handlers) == 1
    assert logger.handlers[0] is not old
    assert isinstance(old, ReopenableFileHandler) and old.stream is None  # closed
    assert logger.level == logging.WARNING
    EventLogger("WStunsrv").info("Quiet")
    EventLogger("WStunsrv").warning("Loud", n=1)
    assert first.read_text() == ""
    second = (tmp_path / "second.log").read_text()
    assert re.fullmatch(rf"{STAMP} WARN Loud          pkg=WStunsrv n=1\n", second), second


def test_lines_held_when_the_logs_are_reconfigured_go_where_they_were_logged(tmp_path: Path) -> None:
    # A reload that moves the log (SIGHUP with a new logfile): a line the event loop still
    # holds belongs in the file it was logged for, and the old handler is closed next.
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    configure(name="wstunsrv", logfile=first)
    logs.hold_lines()
    try:
        EventLogger("WStunsrv").info("Held", n=1)
        assert first.read_text() == ""
        configure(name="wstunsrv", logfile=second)
        assert first.read_text().endswith("INFO Held          pkg=WStunsrv n=1\n")
        EventLogger("WStunsrv").info("Next", n=2)
    finally:
        logs.release_lines()
    assert second.read_text().endswith("INFO Next          pkg=WStunsrv n=2\n")
    assert "Next" not in first.read_text()


@pytest.mark.parametrize(("level", "shown"), [("debug", 4), ("info", 3), ("warning", 2), ("error", 1)])
def test_configure_level(tmp_path: Path, level: str, shown: int) -> None:
    path = tmp_path / "level.log"
    configure(name="wstuncli", level=level, logfile=path)
    log = EventLogger("WStuncli")
    log.debug("D")
    log.info("I")
    log.warning("W")
    log.error("E")
    assert len(path.read_text().splitlines()) == shown


def test_logfile_appends_and_never_holds_a_whole_token(tmp_path: Path) -> None:
    path = tmp_path / "wstunsrv.log"
    path.write_text("line from before\n")
    configure(name="wstunsrv", logfile=path)
    EventLogger("WStunsrv").info("HTTP RET", token=TOKEN, id=19, status=200)
    lines = path.read_text().splitlines()
    assert lines[0] == "line from before"
    assert re.fullmatch(rf"{STAMP} INFO HTTP RET      pkg=WStunsrv token=tech_xyz\.\.\. id=19 status=200",
                        lines[1])
    assert SECRET not in path.read_text()


def test_reopen_files_after_logrotate_renames_the_file(tmp_path: Path) -> None:
    path = tmp_path / "wstunsrv.log"
    rotated = tmp_path / "wstunsrv.log.1"
    configure(name="wstunsrv", logfile=path)
    log = EventLogger("WStunsrv")
    log.info("Before", n=1)
    path.rename(rotated)
    log.info("Between", n=2)  # still the old, renamed file: nobody told us yet
    assert not path.exists()
    reopen_files()
    assert path.exists()
    log.info("After", n=3)
    assert [line.split(" ", 3)[3] for line in rotated.read_text().splitlines()] == [
        "Before        pkg=WStunsrv n=1",
        "Between       pkg=WStunsrv n=2",
    ]
    after = [line.split(" ", 3)[3] for line in path.read_text().splitlines()]
    assert after == ["After         pkg=WStunsrv n=3"]


def test_reopen_files_of_a_given_logger_and_without_files(tmp_path: Path) -> None:
    path = tmp_path / "private.log"
    logger = logging.getLogger("wstunnel.test-reopen")
    logger.propagate = False
    handler = ReopenableFileHandler(path, encoding="utf-8")
    handler.setFormatter(LineFormatter(timestamps=False))
    other = ListHandler(LineFormatter(timestamps=False))
    logger.addHandler(handler)
    logger.addHandler(other)
    try:
        log = EventLogger("WStuncli", logger)
        log.warning("One")
        path.unlink()
        reopen_files(logger)
        log.warning("Two")
        assert path.read_text() == "WARN Two           pkg=WStuncli\n"  # One went to the old file
        assert other.lines == ["WARN One           pkg=WStuncli", "WARN Two           pkg=WStuncli"]
    finally:
        logger.removeHandler(handler)
        logger.removeHandler(other)
        handler.close()
    configure(name="wstunsrv")  # stderr only: nothing to reopen, nothing breaks
    reopen_files()


@pytest.fixture
def syslog_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for /dev/log."""
    path = tmp_path / "log"
    if len(os.fsencode(path)) > 100:  # AF_UNIX paths are short
        pytest.skip("temporary directory path too long for a unix socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)  # only guards against a hang: the datagram is sent before we read
    monkeypatch.setattr(logtargets, "SYSLOG_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()


def test_syslog_gets_tagged_lines(syslog_socket: socket.socket, tmp_path: Path) -> None:
    logfile = tmp_path / "not-used.log"
    logger = configure(name="wstunsrv", level="debug", logfile=logfile, syslog_tag="wstunsrv")
    assert len(logger.handlers) == 1  # syslog wins over the file
    log = EventLogger("WStunsrv")
    log.info("HTTP RET", token=TOKEN, id=19, status=401)
    log.warning("WS   ERR", err="x")
    log.error("Crash")
    log.debug("D")
    datagrams = [syslog_socket.recv(65536) for _ in range(4)]
    tag = b"wstunsrv[%d]: " % os.getpid()
    # <facility daemon (3) * 8 + severity>, "tag[pid]: " as the original's syslog lines, no time.
    assert datagrams == [
        b"<30>" + tag + b"INFO HTTP RET      pkg=WStunsrv token=tech_xyz... id=19 status=401\x00",
        b"<28>" + tag + b"WARN WS   ERR      pkg=WStunsrv err=x\x00",
        b"<27>" + tag + b"EROR Crash         pkg=WStunsrv\x00",
        b"<31>" + tag + b"DBUG D             pkg=WStunsrv\x00",
    ]
    assert not logfile.exists()
    assert SECRET.encode() not in b"".join(datagrams)


def test_syslog_socket_is_looked_up_at_configure_time(
    syslog_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(name="wstuncli", syslog_tag="custom-tag")
    monkeypatch.setattr(logtargets, "SYSLOG_SOCKET", "/nonexistent/socket")  # too late to matter
    EventLogger("WStuncli").info("WS   CONNECTED", url="ws://h")
    assert syslog_socket.recv(65536) == (
        b"<30>custom-tag[%d]: INFO WS   CONNECTED pkg=WStuncli url=ws://h\x00" % os.getpid()
    )


def _bind_datagram_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)  # only guards against a hang: the datagram is sent before we read
    return sock


def test_syslog_follows_a_restarted_daemon(syslog_socket: socket.socket, tmp_path: Path) -> None:
    # A restarted syslog daemon (or journald) binds a new socket at the same path: the next
    # line finds the old one gone, connects again and is not lost.
    configure(name="wstunsrv", syslog_tag="wstunsrv")
    log = EventLogger("WStunsrv")
    log.info("Before", n=1)
    assert syslog_socket.recv(65536).endswith(b"INFO Before        pkg=WStunsrv n=1\x00")
    syslog_socket.close()
    path = tmp_path / "log"
    path.unlink()
    with _bind_datagram_socket(path) as restarted:
        log.info("After", n=2)
        logging.getLogger("wstunnel").warning("Through logging")  # the record path, same socket
        assert restarted.recv(65536) == b"<30>wstunsrv[%d]: INFO After         pkg=WStunsrv n=2\x00" % (
            os.getpid())
        assert restarted.recv(65536) == b"<28>wstunsrv[%d]: WARN Through logging\x00" % os.getpid()


def test_syslog_daemon_started_after_us_gets_the_next_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "log"
    if len(os.fsencode(path)) > 100:
        pytest.skip("temporary directory path too long for a unix socket")
    monkeypatch.setattr(logtargets, "SYSLOG_SOCKET", str(path))
    monkeypatch.setattr(logging, "raiseExceptions", True)
    configure(name="wstuncli", syslog_tag="wstuncli")  # no socket yet: as openlog(3), no error
    log = EventLogger("WStuncli")
    log.info("Lost", n=1)  # nobody to take it: reported on stderr, not raised
    assert "--- Logging error ---" in capsys.readouterr().err
    with _bind_datagram_socket(path) as late:
        log.info("Kept", n=2)
        assert late.recv(65536) == b"<30>wstuncli[%d]: INFO Kept          pkg=WStuncli n=2\x00" % os.getpid()


def test_syslog_on_a_stream_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Some syslog-ng setups listen for streams on /dev/log: each message ends with its NUL.
    path = tmp_path / "log"
    if len(os.fsencode(path)) > 100:
        pytest.skip("temporary directory path too long for a unix socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(5)
        monkeypatch.setattr(logtargets, "SYSLOG_SOCKET", str(path))
        configure(name="wstunsrv", syslog_tag="wstunsrv")
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(5)
            log = EventLogger("WStunsrv")
            log.info("One", n=1)
            log.error("Two", n=2)
            expected = b"<30>wstunsrv[%d]: INFO One           pkg=WStunsrv n=1\x00" % os.getpid() + (
                b"<27>wstunsrv[%d]: EROR Two           pkg=WStunsrv n=2\x00" % os.getpid())
            received = b""
            while len(received) < len(expected):
                chunk = connection.recv(65536)
                assert chunk, "the handler hung up"
                received += chunk
            assert received == expected


def test_journal_fields_carry_the_token_prefix_id_status_and_event(
    captured: tuple[EventLogger, ListHandler],
) -> None:
    logger, handler = captured
    token = Token("abcdefgh-the-rest-is-secret")
    logger.info("HTTP RET", token=token, id=19, status=401, url="/a b", err=None, try_="")
    fields = logtargets.journal_fields(handler.records[-1])
    assert fields == {
        "WSTUNNEL_EVENT": "HTTP RET",
        "WSTUNNEL_PKG": "WStunsrv",
        "WSTUNNEL_TOKEN": "abcdefgh",
        "WSTUNNEL_REQUEST_ID": "19",
        "WSTUNNEL_STATUS": "401",
        "WSTUNNEL_URL": "/a b",
    }
    assert all(token.reveal() not in value for value in fields.values())


def test_event_names_are_normalised_for_the_journal(captured: tuple[EventLogger, ListHandler]) -> None:
    logger, handler = captured
    logger.info("WS   SND", id=1)
    assert logtargets.journal_fields(handler.records[-1])["WSTUNNEL_EVENT"] == "WS SND"


def test_under_journald_compares_stderr_with_journal_stream(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "stream"
    with target.open("w") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        info = os.fstat(stream.fileno())
        assert logtargets.under_journald({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
        assert not logtargets.under_journald({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino + 1}"})
        assert not logtargets.under_journald({"JOURNAL_STREAM": "garbage"})
        assert not logtargets.under_journald({})


# -- the fast path: wstunnel's own handlers without LogRecords -----------------------------------

@pytest.fixture
def private_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Logger]:
    ours = (ReopenableFileHandler, logs.LineStreamHandler, logtargets.JournalHandler, ListHandler)
    with private_logs.private_logger("wstunnel.test-fast", monkeypatch, ours) as logger:
        yield logger


def _log_table(log: EventLogger) -> None:
    """Every value of RENDERED, alone and all together, at every level, plus keyless events."""
    for number, (value, _) in enumerate(RENDERED):
        log.info("HTTP RCV", token=TOKEN, id=number, k=value, try_="")
    log.warning("WS   RECONNECT", **{f"k{number}": value for number, (value, _) in enumerate(RENDERED)})
    log.debug("D")
    log.error("Stopped")
    log.log(logging.CRITICAL, "A much longer event name", n=1)
    log.log(25, "Custom level", n=2)


def _always(record: logging.LogRecord) -> bool:
    return True


@pytest.mark.parametrize("timestamps", [True, False])
def test_fast_file_lines_are_the_record_path_lines(
    tmp_path: Path, private_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch, timestamps: bool
) -> None:
    paths = {}
    for way in ("records", "fast"):
        paths[way] = tmp_path / f"{way}.log"
        handler = ReopenableFileHandler(paths[way], encoding="utf-8")
        handler.setFormatter(LineFormatter(timestamps=timestamps))
        if way == "records":
            handler.addFilter(_always)  # a filter needs a record: the logging module's path
        add_handler(private_logger, handler)
        with monkeypatch.context() as patch:
            if way == "fast":
                refuse_records(private_logger, patch)
            _log_table(EventLogger("WStunsrv", private_logger))
        private_logger.removeHandler(handler)
        handler.close()
    records, fast = paths["records"].read_bytes(), paths["fast"].read_bytes()
    assert fast == records
    assert len(fast.splitlines()) == len(RENDERED) + 5
    assert SECRET.encode() not in fast
    first = fast.decode().splitlines()[0]
    assert first == ("2014/04/04 17:40:29 " if timestamps else "") + (
        "INFO HTTP RCV      pkg=WStunsrv token=tech_xyz... id=0 k=plain try="
    )


def test_a_pkg_field_replaces_the_loggers_pkg(tmp_path: Path, private_logger: logging.Logger) -> None:
    path = tmp_path / "pkg.log"
    handler = ReopenableFileHandler(path, encoding="utf-8")
    handler.setFormatter(LineFormatter(timestamps=False))
    add_handler(private_logger, handler)
    EventLogger("WStunsrv", private_logger).info("Own pkg", n=1, pkg="other")
    assert path.read_text() == "INFO Own pkg       pkg=other n=1\n"  # as format_event has it


@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
def test_fast_stream_lines_are_the_record_path_lines(
    tmp_path: Path, private_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch, encoding: str
) -> None:
    # stderr's handler, on a stream with a file descriptor: os.write, with the stream's codec
    # and error handler (stderr's is backslashreplace, so "café" survives an ascii locale).
    outputs = {}
    for way in ("records", "fast"):
        path = tmp_path / f"{way}.txt"
        with path.open("w", encoding=encoding, errors="backslashreplace") as stream:
            stream.write("before ")  # a partial line still in the stream's buffer goes first
            handler = logs.LineStreamHandler(stream)
            handler.setFormatter(LineFormatter(timestamps=True))
            if way == "records":
                handler.addFilter(_always)
            add_handler(private_logger, handler)
            with monkeypatch.context() as patch:
                if way == "fast":
                    refuse_records(private_logger, patch)
                _log_table(EventLogger("WStuncli", private_logger))
            private_logger.removeHandler(handler)
        outputs[way] = path.read_bytes()
    assert outputs["fast"] == outputs["records"]
    assert outputs["fast"].startswith(b"before 2014/04/04 17:40:29 INFO HTTP RCV ")
    assert ("caf\\xe9" if encoding == "ascii" else "café").encode() in outputs["fast"]


def test_fast_stream_without_a_file_descriptor_writes_to_the_stream(
    private_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pytest's capsys and io.StringIO have no fileno(): write and flush as before.
    stream = io.StringIO()
    handler = logs.LineStreamHandler(stream)
    handler.setFormatter(LineFormatter(timestamps=False))
    add_handler(private_logger, handler)
    refuse_records(private_logger, monkeypatch)
    EventLogger("WStunsrv", private_logger).info("HTTP RET", token=TOKEN, id=1, status=200)
    assert stream.getvalue() == "INFO HTTP RET      pkg=WStunsrv token=tech_xyz... id=1 status=200\n"


def test_fast_lines_reach_the_file_before_the_call_returns(tmp_path: Path) -> None:
    # Daemons may be SIGKILLed and tests read their logs while they run: nothing may wait in
    # a buffer of ours. Read through another descriptor right after each call. (The daemons'
    # event loop holds info lines for a turn or two: tests/test_held_lines.py.)
    path = tmp_path / "wstunsrv.log"
    configure(name="wstunsrv", logfile=path)
    log = EventLogger("WStunsrv")
    fd = os.open(path, os.O_RDONLY)
    try:
        for number in range(3):
            log.info("HTTP RET", id=number, status=200)
            assert os.read(fd, 4096).decode().endswith(f"HTTP RET      pkg=WStunsrv id={number} status=200\n")
    finally:
        os.close(fd)


@pytest.mark.parametrize(("logger_level", "handler_level", "shown"), [
    (logging.DEBUG, logging.NOTSET, ["DBUG", "INFO", "WARN", "EROR"]),
    (logging.INFO, logging.NOTSET, ["INFO", "WARN", "EROR"]),
    (logging.DEBUG, logging.WARNING, ["WARN", "EROR"]),
    (logging.ERROR, logging.DEBUG, ["EROR"]),
])
def test_fast_path_levels(tmp_path: Path, private_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch,
                          logger_level: int, handler_level: int, shown: list[str]) -> None:
    path = tmp_path / "levels.log"
    handler = ReopenableFileHandler(path, encoding="utf-8")
    handler.setFormatter(LineFormatter(timestamps=False))
    handler.setLevel(handler_level)
    add_handler(private_logger, handler)
    private_logger.setLevel(logger_level)
    refuse_records(private_logger, monkeypatch)
    log = EventLogger("WStunsrv", private_logger)
    log.debug("D")
    log.info("I")
    log.warning("W")
    log.error("E")
    assert [line.split(" ")[0] for line in path.read_text().splitlines()] == shown


def test_fast_path_after_close_and_reopen(tmp_path: Path, private_logger: logging.Logger,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "wstunsrv.log"
    handler = ReopenableFileHandler(path, encoding="utf-8", delay=True)
    handler.setFormatter(LineFormatter(timestamps=False))
    add_handler(private_logger, handler)
    refuse_records(private_logger, monkeypatch)
    log = EventLogger("WStunsrv", private_logger)
    assert not path.exists()
    log.info("One")  # delay=True: opened by the first line, as FileHandler.emit does
    path.rename(tmp_path / "rotated.log")
    reopen_files(private_logger)
    log.info("Two")
    handler.close()  # closed but still attached: FileHandler.emit opens it again, so do we
    log.info("Three")
    assert (tmp_path / "rotated.log").read_text() == "INFO One           pkg=WStunsrv\n"
    assert path.read_text() == "INFO Two           pkg=WStunsrv\nINFO Three         pkg=WStunsrv\n"


def test_a_closed_write_mode_file_stays_closed_as_in_filehandler(
    tmp_path: Path, private_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FileHandler opens a "w" file again after close() only if it never was closed: the fast
    # path and the record path both drop the lines, rather than truncate the file anew.
    for way in ("records", "fast"):
        path = tmp_path / f"{way}.log"
        handler = ReopenableFileHandler(path, mode="w", encoding="utf-8")
        handler.setFormatter(LineFormatter(timestamps=False))
        if way == "records":
            handler.addFilter(_always)
        add_handler(private_logger, handler)
        log = EventLogger("WStunsrv", private_logger)
        with monkeypatch.context() as patch:
            if way == "fast":
                refuse_records(private_logger, patch)
            log.info("Kept")
            handler.close()
            log.info("Dropped")
        private_logger.removeHandler(handler)
        assert path.read_text() == "INFO Kept          pkg=WStunsrv\n", way


def test_reopen_keeps_the_old_file_when_the_new_one_cannot_be_opened(
    tmp_path: Path, private_logger: logging.Logger
) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "wstunsrv.log"
    handler = ReopenableFileHandler(path, encoding="utf-8")
    handler.setFormatter(LineFormatter(timestamps=False))
    add_handler(private_logger, handler)
    log = EventLogger("WStunsrv", private_logger)
    log.info("One")
    rotated = tmp_path / "rotated.log"
    path.rename(rotated)
    directory.rmdir()  # (not a permission: the tests may run as root)
    with pytest.raises(FileNotFoundError):
        reopen_files(private_logger)
    log.info("Two")
    assert rotated.read_text() == "INFO One           pkg=WStunsrv\nINFO Two           pkg=WStunsrv\n"


def test_foreign_handlers_still_get_records(tmp_path: Path, private_logger: logging.Logger) -> None:
    path = tmp_path / "wstunsrv.log"
    own = ReopenableFileHandler(path, encoding="utf-8")
    own.setFormatter(LineFormatter(timestamps=False))
    foreign = ListHandler(LineFormatter(timestamps=False))
    add_handler(private_logger, own)
    add_handler(private_logger, foreign)
    log = EventLogger("WStunsrv", private_logger)
    log.info("HTTP RET", token=TOKEN, id=3, status=200)
    line = "INFO HTTP RET      pkg=WStunsrv token=tech_xyz... id=3 status=200"
    assert foreign.lines == [line]
    assert foreign.records[0].wstunnel_fields["token"] is TOKEN  # type: ignore[attr-defined]
    assert path.read_text() == line + "\n"
    # Alone again, the file still gets the same line, now without a record; and the lines of
    # both ways interleave in order.
    private_logger.removeHandler(foreign)
    log.info("HTTP RET", token=TOKEN, id=3, status=200)
    private_logger.addHandler(foreign)
    log.info("HTTP RET", token=TOKEN, id=4, status=200)
    private_logger.removeHandler(foreign)
    log.info("HTTP RET", token=TOKEN, id=5, status=200)
    assert path.read_text().splitlines() == [line, line, line.replace("id=3", "id=4"),
                                             line.replace("id=3", "id=5")]


def test_a_handler_swapped_in_place_is_seen(tmp_path: Path, private_logger: logging.Logger) -> None:
    # EventLogger checks the handlers again only when the list changes: a change that keeps
    # the list and its length still counts.
    own = ReopenableFileHandler(tmp_path / "own.log", encoding="utf-8")
    own.setFormatter(LineFormatter(timestamps=False))
    foreign = ListHandler(LineFormatter(timestamps=False))
    add_handler(private_logger, own)
    log = EventLogger("WStunsrv", private_logger)
    log.info("First")
    private_logger.handlers[0] = foreign
    log.info("Second")
    private_logger.handlers[0] = own
    log.info("Third")
    assert foreign.lines == ["INFO Second        pkg=WStunsrv"]
    assert (tmp_path / "own.log").read_text().splitlines() == [
        "INFO First         pkg=WStunsrv", "INFO Third         pkg=WStunsrv"]


def test_propagating_loggers_and_subclasses_take_the_record_path(
    tmp_path: Path, private_logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    class Custom(ReopenableFileHandler):
        def emit(self, record: logging.LogRecord) -> None:
            self.seen = record.getMessage()

    custom = Custom(tmp_path / "custom.log")
    custom.setFormatter(LineFormatter(timestamps=False))
    add_handler(private_logger, custom)
    log = EventLogger("WStunsrv", private_logger)
    log.info("Listening", port=1)
    assert custom.seen == "Listening     pkg=WStunsrv port=1"
    private_logger.propagate = True  # caplog's handler sits on the root logger
    with caplog.at_level(logging.INFO, logger="wstunnel.test-fast"):
        log.info("Listening", port=2)
    assert [record.getMessage() for record in caplog.records] == ["Listening     pkg=WStunsrv port=2"]


def test_exceptions_logged_through_logging_keep_exc(tmp_path: Path, wstunnel_logger: logging.Logger) -> None:
    path = tmp_path / "wstunsrv.log"
    configure(name="wstunsrv", logfile=path)

    def fail() -> None:
        raise RuntimeError("boom")

    try:
        fail()
    except RuntimeError:
        wstunnel_logger.exception("Crash")
    EventLogger("WStunsrv").info("After")
    crash, after = path.read_text().splitlines()
    traceback_start = r'EROR Crash exc="Traceback \(most recent call last\):\\n'
    assert re.fullmatch(rf"{STAMP} {traceback_start}.*RuntimeError: boom\"", crash), crash
    assert re.fullmatch(rf"{STAMP} INFO After         pkg=WStunsrv", after)


def test_a_failed_write_is_reported_not_raised(
    tmp_path: Path, private_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    handler = ReopenableFileHandler(tmp_path / "full.log", encoding="utf-8")
    handler.setFormatter(LineFormatter(timestamps=False))
    add_handler(private_logger, handler)

    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    monkeypatch.setattr(logging, "raiseExceptions", True)
    EventLogger("WStunsrv", private_logger).info("HTTP RET", token=TOKEN, id=1, status=200)
    err = capsys.readouterr().err
    assert "--- Logging error ---" in err and "No space left on device" in err
    assert "HTTP RET      pkg=WStunsrv token=tech_xyz... id=1 status=200" in err  # logging's "Message:"
    assert SECRET not in err


def test_a_short_write_is_completed(tmp_path: Path, private_logger: logging.Logger,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pipe-like.log"
    handler = ReopenableFileHandler(path, encoding="utf-8")
    handler.setFormatter(LineFormatter(timestamps=False))
    add_handler(private_logger, handler)
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:5])))
    EventLogger("WStunsrv", private_logger).info("HTTP RET", id=1, status=200)
    assert path.read_text() == "INFO HTTP RET      pkg=WStunsrv id=1 status=200\n"


def test_fast_syslog_datagrams_are_the_record_path_datagrams(
    syslog_socket: socket.socket, wstunnel_logger: logging.Logger
) -> None:
    logger = configure(name="wstunsrv", level="debug", syslog_tag="wstunsrv")
    log = EventLogger("WStunsrv")
    log.info("HTTP RET", token=TOKEN, id=19, status=401)
    log.log(25, "Custom", n=1)
    logger.handlers[0].addFilter(_always)
    log.info("HTTP RET", token=TOKEN, id=19, status=401)
    log.log(25, "Custom", n=1)
    fast, custom_fast, records, custom_records = (syslog_socket.recv(65536) for _ in range(4))
    assert fast == records
    assert custom_fast == custom_records
    assert custom_fast.startswith(b"<28>")  # logging's "Level 25" maps to warning


def test_fast_journal_messages_are_the_record_path_messages(
    private_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[str, dict[str, str]]] = []
    code_fields: list[list[str]] = []

    def sendv(*args: str) -> None:
        # journal.sendv's arguments: "KEY=value" each, MESSAGE first, as journal.send makes them.
        pairs = [arg.split("=", 1) for arg in args]
        assert pairs[0][0] == "MESSAGE"
        code_fields.append([arg for arg in args if arg.startswith("CODE_")])
        sent.append((pairs[0][1], {key: value for key, value in pairs[1:] if not key.startswith("CODE_")}))

    package = types.ModuleType("systemd")
    package.journal = types.SimpleNamespace(sendv=sendv)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "systemd", package)
    handler = logtargets.JournalHandler("wstunsrv")
    handler.setFormatter(LineFormatter(timestamps=False))
    add_handler(private_logger, handler)
    log = EventLogger("WStunsrv", private_logger)
    token = Token("abcdefgh-the-rest-is-secret")
    with monkeypatch.context() as patch:
        refuse_records(private_logger, patch)
        log.info("HTTP RET", token=token, id=19, status=401, url="/a b", err=None, try_="")
        log.warning("WS   SND", id=1)
    handler.addFilter(_always)
    log.info("HTTP RET", token=token, id=19, status=401, url="/a b", err=None, try_="")
    log.warning("WS   SND", id=1)
    assert sent[:2] == sent[2:]
    assert sent[0] == (
        'INFO HTTP RET      pkg=WStunsrv token=abcdefgh... id=19 status=401 url="/a b" err= try=',
        {"PRIORITY": "6", "SYSLOG_IDENTIFIER": "wstunsrv", "WSTUNNEL_EVENT": "HTTP RET",
         "WSTUNNEL_PKG": "WStunsrv", "WSTUNNEL_TOKEN": "abcdefgh", "WSTUNNEL_REQUEST_ID": "19",
         "WSTUNNEL_STATUS": "401", "WSTUNNEL_URL": "/a b"},
    )
    assert sent[1][1]["PRIORITY"] == "4"
    assert all(token.reveal() not in message + "".join(fields.values()) for message, fields in sent)
    # CODE_* name this module's send call, as journal.send's look at its caller found it.
    for found in code_fields:
        assert [field.split("=")[0] for field in found] == ["CODE_FILE", "CODE_LINE", "CODE_FUNC"]
        assert found[0] == f"CODE_FILE={logtargets.__file__}"
        assert int(found[1].removeprefix("CODE_LINE=")) > 0
    assert [found[2] for found in code_fields] == ["CODE_FUNC=_send_event"] * 2 + ["CODE_FUNC=emit"] * 2


def test_each_token_renders_as_its_own_prefix_however_many_come_and_go() -> None:
    # Many short-lived Tokens, each only ever shown as its own prefix.
    for number in range(3 * logtext.MAX_CACHED):
        prefix = f"{number:08d}"
        token = Token(prefix + "-the-rest-is-secret")
        assert logtext.format_fields({"token": token}) == f"token={prefix}..."
        assert (logtext.format_fields({"token": token, "again": token})
                == f"token={prefix}... again={prefix}...")
        del token


def test_own_handlers_with_other_formatters_or_filters_get_records(
    tmp_path: Path, private_logger: logging.Logger
) -> None:
    formatted = ReopenableFileHandler(tmp_path / "formatted.log", encoding="utf-8")
    formatted.setFormatter(logging.Formatter("%(levelname)s|%(name)s|%(message)s"))
    filtered = ReopenableFileHandler(tmp_path / "filtered.log", encoding="utf-8")
    filtered.setFormatter(LineFormatter(timestamps=False))
    filtered.addFilter(lambda record: record.getMessage().startswith("Kept"))
    plain = ReopenableFileHandler(tmp_path / "plain.log", encoding="utf-8")
    plain.setFormatter(LineFormatter(timestamps=False))
    for handler in (formatted, filtered, plain):
        add_handler(private_logger, handler)
    log = EventLogger("WStunsrv", private_logger)
    log.info("Kept", n=1)
    log.info("Dropped", n=2)
    assert (tmp_path / "formatted.log").read_text() == (
        "INFO|wstunnel.test-fast|Kept          pkg=WStunsrv n=1\n"
        "INFO|wstunnel.test-fast|Dropped       pkg=WStunsrv n=2\n"
    )
    assert (tmp_path / "filtered.log").read_text() == "INFO Kept          pkg=WStunsrv n=1\n"
    assert (tmp_path / "plain.log").read_text() == (
        "INFO Kept          pkg=WStunsrv n=1\nINFO Dropped       pkg=WStunsrv n=2\n"
    )
