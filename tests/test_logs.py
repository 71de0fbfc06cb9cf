"""wstunnel.logs: the original's key=value lines (SPEC §5), to stderr, a file or syslog."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wstunnel import logs
from wstunnel.logs import (
    EventLogger,
    LineFormatter,
    ReopenableFileHandler,
    configure,
    format_event,
    reopen_files,
)
from wstunnel.tokens import Token

SECRET = "tech_xyz_0123456789_do_not_log"
TOKEN = Token(SECRET)
STAMP = r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d"


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


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
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
    ],
)
def test_value_rendering(value: object, rendered: str) -> None:
    assert logs.format_fields({"k": value}) == f"k={rendered}"


def test_rendered_lines_stay_on_one_line_and_encode() -> None:
    text = format_event("WS   ERR", {"err": "a\nINFO HTTP RET forged\r\n\udcff\x85"})
    assert "\n" not in text and "\r" not in text and "\x85" not in text
    text.encode("utf-8")  # a surrogate would make the handler drop the line
    assert text == r'WS   ERR      err="a\nINFO HTTP RET forged\r\n\udcff\x85"'


def test_trailing_underscore_is_dropped_from_keys() -> None:
    assert logs.format_fields({"try_": "", "class_": "x", "id": 1}) == "try= class=x id=1"
    assert logs.format_fields({"try_": 2}) == "try=2"


def test_field_order_is_kept() -> None:
    assert logs.format_fields({"z": 1, "a": 2, "m": 3}) == "z=1 a=2 m=3"


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
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", str(path))
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
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", "/nonexistent/socket")  # too late to matter
    EventLogger("WStuncli").info("WS   CONNECTED", url="ws://h")
    assert syslog_socket.recv(65536) == (
        b"<30>custom-tag[%d]: INFO WS   CONNECTED pkg=WStuncli url=ws://h\x00" % os.getpid()
    )


def test_journal_fields_carry_the_token_prefix_id_status_and_event(
    captured: tuple[EventLogger, ListHandler],
) -> None:
    logger, handler = captured
    token = Token("abcdefgh-the-rest-is-secret")
    logger.info("HTTP RET", token=token, id=19, status=401, url="/a b", err=None, try_="")
    fields = logs.journal_fields(handler.records[-1])
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
    assert logs.journal_fields(handler.records[-1])["WSTUNNEL_EVENT"] == "WS SND"


def test_under_journald_compares_stderr_with_journal_stream(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "stream"
    with target.open("w") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        info = os.fstat(stream.fileno())
        assert logs.under_journald({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
        assert not logs.under_journald({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino + 1}"})
        assert not logs.under_journald({"JOURNAL_STREAM": "garbage"})
        assert not logs.under_journald({})
