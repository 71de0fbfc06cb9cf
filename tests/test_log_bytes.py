"""The exact bytes of wstunnel's log lines, pinned as literals.

tests/test_logs.py checks that EventLogger's fast path (no LogRecord) writes what logging's own
path writes; both render through the same code, so a change there would change both alike. Here
each line is compared with the bytes the original's scrapers and the SPEC (§5) expect, written
out by hand: the request path's lines (escaping, token shortening, keyword fields) to a file and
to a stream, and the journal fields next to what systemd-python's own journal.send sends.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from systemd import journal

from tests.support import private_logs
from tests.support.private_logs import add_handler, refuse_records
from wstunnel import logs, logtargets
from wstunnel.logs import EventLogger, LineFormatter
from wstunnel.tokens import Token

TOKEN = Token("tech_xyz_0123456789_do_not_log")
ODD_TOKEN = Token('ab"c d\nefgh-the-rest-is-secret')  # quoted and escaped, still shortened


def _log_request_lines(log: EventLogger) -> None:
    """What one request through the tunnel logs (srv and cli lines), with awkward values."""
    log.info("HTTP RCV", token=TOKEN, id=17, verb=b"GET", url="/1k.bin", addr="127.0.0.1:40000",
             **{"x-host": b""}, try_="")
    log.info("WS   SND", token=TOKEN, id=17, stream=33, info="GET /1k.bin")
    log.info("WS   RCV", token=TOKEN, id=17, stream=33, status=200)
    log.info("HTTP RET", token=TOKEN, id=17, status=200)
    log.info("WS   RCV", token=TOKEN, id=18, verb=b"POST", url='/a b?q="x"&r=\\n')
    log.info("WS   SND", token=ODD_TOKEN, id=18, status=502, err="line\nbreak\r\ttab\x1b[31m")
    log.info("HTTP RCV", token=TOKEN, id=19, verb=b"G\xffT", url="/caf\u00e9", err=None, n=2.5,
             ok=True, **{"x-host": b"a b"}, try_=3)
    log.warning("WS   RECONNECT", token=TOKEN, reason="")  # the event fills its column
    log.debug("Stopped")  # no fields at all
    log.error("WS   ERR", id=20, err="\udcff\u2028")  # surrogateescape leftovers


# The same lines, as literals: "LEVEL EVENT<padded to 13> pkg=... key=value ...".
EXPECTED_LINES = [
    "INFO HTTP RCV      pkg=WStunsrv token=tech_xyz... id=17 verb=GET url=/1k.bin"
    " addr=127.0.0.1:40000 x-host= try=",
    'INFO WS   SND      pkg=WStunsrv token=tech_xyz... id=17 stream=33 info="GET /1k.bin"',
    "INFO WS   RCV      pkg=WStunsrv token=tech_xyz... id=17 stream=33 status=200",
    "INFO HTTP RET      pkg=WStunsrv token=tech_xyz... id=17 status=200",
    r'INFO WS   RCV      pkg=WStunsrv token=tech_xyz... id=18 verb=POST url="/a b?q=\"x\"&r=\\n"',
    r'INFO WS   SND      pkg=WStunsrv token="ab\"c d\ne..." id=18 status=502'
    r' err="line\nbreak\r\ttab\x1b[31m"',
    "INFO HTTP RCV      pkg=WStunsrv token=tech_xyz... id=19 verb=G\ufffdT url=/caf\u00e9 err="
    ' n=2.500 ok=true x-host="a b" try=3',
    "WARN WS   RECONNECT pkg=WStunsrv token=tech_xyz... reason=",
    "DBUG Stopped       pkg=WStunsrv",
    r'EROR WS   ERR      pkg=WStunsrv id=20 err="\udcff\u2028"',
]


@pytest.fixture
def private_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Logger]:
    with private_logs.private_logger("wstunnel.test-bytes", monkeypatch, (logs.EventHandler,)) as logger:
        yield logger


def test_file_lines_are_these_bytes(tmp_path: Path, private_logger: logging.Logger,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "wstunsrv.log"
    handler = logs.ReopenableFileHandler(path, encoding="utf-8")
    handler.setFormatter(LineFormatter(timestamps=True))
    add_handler(private_logger, handler)
    refuse_records(private_logger, monkeypatch)
    _log_request_lines(EventLogger("WStunsrv", private_logger))
    expected = "".join(f"2014/04/04 17:40:29 {line}\n" for line in EXPECTED_LINES)
    assert path.read_bytes() == expected.encode("utf-8")


def test_stderr_lines_are_these_bytes(tmp_path: Path, private_logger: logging.Logger,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # stderr's handler on a stream that has a file descriptor (one os.write per line), with
    # stderr's own error handler: what cannot be encoded is escaped, not lost.
    path = tmp_path / "stderr.txt"
    with path.open("w", encoding="utf-8", errors="backslashreplace") as stream:
        handler = logs.LineStreamHandler(stream)
        handler.setFormatter(LineFormatter(timestamps=True))
        add_handler(private_logger, handler)
        refuse_records(private_logger, monkeypatch)
        _log_request_lines(EventLogger("WStunsrv", private_logger))
    expected = "".join(f"2014/04/04 17:40:29 {line}\n" for line in EXPECTED_LINES)
    assert path.read_bytes() == expected.encode("utf-8", "backslashreplace")


def test_debug_lines_of_an_info_logger_are_not_rendered(
    tmp_path: Path, private_logger: logging.Logger
) -> None:
    class Loud:
        def __str__(self) -> str:
            raise AssertionError("a disabled line rendered its fields")

    private_logger.setLevel(logging.INFO)
    path = tmp_path / "info.log"
    handler = logs.ReopenableFileHandler(path, encoding="utf-8")
    handler.setFormatter(LineFormatter(timestamps=False))
    add_handler(private_logger, handler)
    log = EventLogger("WStuncli", private_logger)
    log.debug("WS   WINDOW", token=TOKEN, value=Loud())
    log.info("WS   SND", token=TOKEN, id=1, status=200)
    assert path.read_text() == "INFO WS   SND      pkg=WStuncli token=tech_xyz... id=1 status=200\n"


# Each line's journal fields after MESSAGE, PRIORITY and SYSLOG_IDENTIFIER, as literals: the
# token as its bare prefix, empty str and None left out, an empty bytes value an empty field.
EXPECTED_JOURNAL_FIELDS: list[dict[str, str]] = [
    {"WSTUNNEL_EVENT": "HTTP RCV", "WSTUNNEL_PKG": "WStunsrv", "WSTUNNEL_TOKEN": "tech_xyz",
     "WSTUNNEL_REQUEST_ID": "17", "WSTUNNEL_VERB": "GET", "WSTUNNEL_URL": "/1k.bin",
     "WSTUNNEL_ADDR": "127.0.0.1:40000", "WSTUNNEL_X_HOST": ""},
    {"WSTUNNEL_EVENT": "WS SND", "WSTUNNEL_PKG": "WStunsrv", "WSTUNNEL_TOKEN": "tech_xyz",
     "WSTUNNEL_REQUEST_ID": "17", "WSTUNNEL_STREAM": "33", "WSTUNNEL_INFO": "GET /1k.bin"},
    {"WSTUNNEL_EVENT": "WS RCV", "WSTUNNEL_PKG": "WStunsrv", "WSTUNNEL_TOKEN": "tech_xyz",
     "WSTUNNEL_REQUEST_ID": "17", "WSTUNNEL_STREAM": "33", "WSTUNNEL_STATUS": "200"},
    {"WSTUNNEL_EVENT": "HTTP RET", "WSTUNNEL_PKG": "WStunsrv", "WSTUNNEL_TOKEN": "tech_xyz",
     "WSTUNNEL_REQUEST_ID": "17", "WSTUNNEL_STATUS": "200"},
    {"WSTUNNEL_EVENT": "WS RCV", "WSTUNNEL_PKG": "WStunsrv", "WSTUNNEL_TOKEN": "tech_xyz",
     "WSTUNNEL_REQUEST_ID": "18", "WSTUNNEL_VERB": "POST", "WSTUNNEL_URL": r'/a b?q=\"x\"&r=\\n'},
    {"WSTUNNEL_EVENT": "WS SND", "WSTUNNEL_PKG": "WStunsrv", "WSTUNNEL_TOKEN": 'ab"c d\ne',
     "WSTUNNEL_REQUEST_ID": "18", "WSTUNNEL_STATUS": "502",
     "WSTUNNEL_ERR": r"line\nbreak\r\ttab\x1b[31m"},
    {"WSTUNNEL_EVENT": "HTTP RCV", "WSTUNNEL_PKG": "WStunsrv", "WSTUNNEL_TOKEN": "tech_xyz",
     "WSTUNNEL_REQUEST_ID": "19", "WSTUNNEL_VERB": "G\ufffdT", "WSTUNNEL_URL": "/caf\u00e9",
     "WSTUNNEL_N": "2.500", "WSTUNNEL_OK": "true", "WSTUNNEL_X_HOST": "a b", "WSTUNNEL_TRY": "3"},
    {"WSTUNNEL_EVENT": "WS RECONNECT", "WSTUNNEL_PKG": "WStunsrv", "WSTUNNEL_TOKEN": "tech_xyz"},
    {"WSTUNNEL_EVENT": "Stopped", "WSTUNNEL_PKG": "WStunsrv"},
    {"WSTUNNEL_EVENT": "WS ERR", "WSTUNNEL_PKG": "WStunsrv", "WSTUNNEL_REQUEST_ID": "20",
     "WSTUNNEL_ERR": r"\udcff\u2028"},
]
EXPECTED_PRIORITIES = ["6"] * 7 + ["4", "7", "3"]


def test_journal_gets_what_journal_send_sends(private_logger: logging.Logger,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # systemd-python's own journal.send, given the message and fields as literals, against
    # what the handler sends through journal.sendv: the same arguments (CODE_* aside, which
    # name the line that sends). sendv itself, the C call that writes to journald's socket,
    # is the one thing replaced: there is no journald here (tests/test_systemd.py has one).
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(journal, "sendv", lambda *args: calls.append(args))
    handler = logtargets.JournalHandler("wstunsrv")
    handler.setFormatter(LineFormatter(timestamps=False))
    add_handler(private_logger, handler)
    refuse_records(private_logger, monkeypatch)
    _log_request_lines(EventLogger("WStunsrv", private_logger))
    ours = calls[:]
    calls.clear()
    for line, priority, fields in zip(EXPECTED_LINES, EXPECTED_PRIORITIES, EXPECTED_JOURNAL_FIELDS,
                                      strict=True):
        journal.send(line, CODE_FILE=logtargets.__file__, CODE_LINE=1, CODE_FUNC="_send_event",
                     PRIORITY=priority, SYSLOG_IDENTIFIER="wstunsrv", **fields)
    theirs = calls[:]

    def without_code_line(args: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(arg for arg in args if not arg.startswith("CODE_LINE="))

    assert [without_code_line(args) for args in ours] == [without_code_line(args) for args in theirs]
    assert len({args[2] for args in ours}) == 1  # one CODE_LINE: the one send call
    assert all(TOKEN.reveal() not in "".join(args) for args in ours)
