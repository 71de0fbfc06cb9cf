"""Log lines in the original WStunnel's ``key=value`` form, to stderr, a file or syslog.

Every event is one line: ``LEVEL EVENT  key=value ...`` with the original's event names
("HTTP RCV", "WS   SND", ...), so the original's log scrapers keep working. Values that are
:class:`~wstunnel.tokens.Token` objects render as their 8-character prefix plus ``...``; nothing
else in this module knows about secrets, so passing a Token is the one rule for callers.

The structured fields ride along on each ``logging.LogRecord`` (``record.wstunnel_fields``) so a
handler such as journald's can send them as fields of their own.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wstunnel.tokens import Token

EVENT_WIDTH = 14
_LEVEL_NAMES = {
    logging.DEBUG: "DBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARN",
    logging.ERROR: "EROR",
    logging.CRITICAL: "CRIT",
}
SYSLOG_SOCKET = "/dev/log"


def _render_value(value: Any) -> str:
    # Every request logs a few lines of mostly strs, ints, bytes and Tokens: those are checked
    # first, by exact type (a bool is an int, and an enum or a subclass must take the generic path).
    kind = type(value)
    if kind is str:
        text = value
    elif kind is int:
        return str(value)
    elif kind is bytes:
        text = value.decode("utf-8", "replace")
    elif kind is Token:
        text = str(value)  # the Token's own redacted form, never its secret
    elif value is None:
        return ""
    elif isinstance(value, bool):
        return "true" if value else "false"
    elif isinstance(value, int | float):
        return f"{value:.3f}" if isinstance(value, float) else str(value)
    else:
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        text = str(value)
    # A value needs quotes when it holds a space, '=', '"', '\\' or an unprintable character.
    # Four `in` tests beat one regex search on the short values of the request lines.
    if text.isprintable() and " " not in text and "=" not in text and '"' not in text and "\\" not in text:
        return text  # the empty string too: printable, nothing to quote
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    # Any other unprintable character (a terminal escape, NUL, a lone surrogate left by a
    # surrogateescape-decoded header) as \xNN/\uNNNN: it could forge output, and a surrogate
    # cannot even be encoded, so the handler would drop the whole line.
    escaped = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in escaped
    )
    return f'"{escaped}"'


# "key=" for each field name seen: a trailing underscore lets callers use keywords as keys
# (try_=1 logs "try=1"). Field names are literals in the code, so the cache stays small; the
# bound only guards against a caller that makes names up from data.
_KEY_PREFIXES: dict[str, str] = {}
_MAX_CACHED = 512


def _key_prefix(key: str) -> str:
    prefix = _KEY_PREFIXES.get(key)
    if prefix is None:
        prefix = key.rstrip("_") + "="
        if len(_KEY_PREFIXES) < _MAX_CACHED:
            _KEY_PREFIXES[key] = prefix
    return prefix


def format_fields(fields: Mapping[str, Any]) -> str:
    return " ".join([_key_prefix(key) + _render_value(value) for key, value in fields.items()])


def format_event(event: str, fields: Mapping[str, Any]) -> str:
    """The text of one event, without level or time: ``HTTP RCV      pkg=... id=1``."""
    rendered = format_fields(fields)
    # Pad to EVENT_WIDTH but always keep one space: "WS   RECONNECT" is itself 14 characters.
    return f"{event:<{EVENT_WIDTH - 1}} {rendered}".rstrip() if rendered else event


# What logging records when it does not look for the caller (logging.Logger._log's own default).
_NO_CALLER = ("(unknown file)", 0, "(unknown function)")


class EventLogger:
    """Logs events for one component (``pkg=WStunsrv`` or ``pkg=WStuncli``)."""

    def __init__(self, pkg: str, logger: logging.Logger | None = None) -> None:
        self.pkg = pkg
        self._logger = logger or logging.getLogger("wstunnel")

    def log(self, level: int, event: str, /, **fields: Any) -> None:
        logger = self._logger
        if not logger.isEnabledFor(level):
            return
        all_fields = {"pkg": self.pkg, **fields}
        # makeRecord and handle are what Logger.log does, minus findCaller: it walks the stack
        # for a file name and line no line of ours shows, and cost about a third of each log
        # call on the request path. The line shows the event and its fields, nothing else.
        record = logger.makeRecord(
            logger.name, level, _NO_CALLER[0], _NO_CALLER[1], format_event(event, all_fields), (),
            None, _NO_CALLER[2], {"wstunnel_event": event, "wstunnel_fields": all_fields},
        )
        logger.handle(record)

    def debug(self, event: str, /, **fields: Any) -> None:
        self.log(logging.DEBUG, event, **fields)

    def info(self, event: str, /, **fields: Any) -> None:
        self.log(logging.INFO, event, **fields)

    def warning(self, event: str, /, **fields: Any) -> None:
        self.log(logging.WARNING, event, **fields)

    def error(self, event: str, /, **fields: Any) -> None:
        self.log(logging.ERROR, event, **fields)


class LineFormatter(logging.Formatter):
    """``LEVEL text``, optionally behind a UTC timestamp (files and terminals want one)."""

    def __init__(self, *, timestamps: bool) -> None:
        super().__init__()
        self.timestamps = timestamps
        # The stamp has whole seconds only: made once a second, not once a line.
        self._stamp_second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_LEVEL_NAMES.get(record.levelno, record.levelname)} {record.getMessage()}"
        if record.exc_info and record.levelno >= logging.ERROR:
            line += " exc=" + _render_value(self.formatException(record.exc_info))
        if self.timestamps:
            second = int(record.created)
            if second != self._stamp_second:
                self._stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.gmtime(second))
                self._stamp_second = second
            line = f"{self._stamp} {line}"
        return line


class ReopenableFileHandler(logging.FileHandler):
    """A log file that ``reopen()`` closes and opens again, for logrotate's SIGHUP."""

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream:
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


_SYSLOG_PRIORITIES = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
# Fields worth their own well-known journal name, for `journalctl WSTUNNEL_TOKEN=abcdefgh`.
_JOURNAL_FIELD_NAMES = {"token": "WSTUNNEL_TOKEN", "id": "WSTUNNEL_REQUEST_ID",
                        "status": "WSTUNNEL_STATUS"}


def journal_fields(record: logging.LogRecord) -> dict[str, str]:
    """The structured journal fields of one record (besides MESSAGE and PRIORITY)."""
    fields: dict[str, str] = {}
    event = getattr(record, "wstunnel_event", None)
    if event:
        fields["WSTUNNEL_EVENT"] = " ".join(event.split())
    for key, value in getattr(record, "wstunnel_fields", {}).items():
        if value is None or value == "":
            continue
        name = key.rstrip("_")
        journal_name = _JOURNAL_FIELD_NAMES.get(name) or "WSTUNNEL_" + "".join(
            ch if ch.isalnum() else "_" for ch in name.upper()
        )
        # A token field carries its bare 8-character prefix: the value one filters on.
        prefix = getattr(value, "prefix", None)
        fields[journal_name] = prefix if isinstance(prefix, str) else _render_value(value).strip('"')
    return fields


class JournalHandler(logging.Handler):
    """Each line to journald, same text as MESSAGE, plus the structured fields."""

    def __init__(self, identifier: str) -> None:
        super().__init__()
        from systemd import journal  # only importable (and only needed) where journald is

        self._send = journal.send
        self.identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            self._send(
                message,
                PRIORITY=str(_SYSLOG_PRIORITIES.get(record.levelno, 6)),
                SYSLOG_IDENTIFIER=self.identifier,
                **journal_fields(record),
            )
        except Exception:
            self.handleError(record)


def under_journald(environ: Mapping[str, str] | None = None) -> bool:
    """True when stderr is the journal's stream (systemd sets JOURNAL_STREAM=dev:inode)."""
    stream = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        info = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def configure(
    *,
    name: str,
    level: str = "info",
    logfile: Path | None = None,
    syslog_tag: str | None = None,
    target: str = "auto",
) -> logging.Logger:
    """Set up the ``wstunnel`` logger for one daemon and return it.

    ``name`` is the program's name (``wstunsrv``/``wstuncli``). Exactly one destination is
    used: syslog if a tag is given, else the log file, else the journal (under systemd, or
    when ``target`` is ``journal``), else stderr.
    """
    logger = logging.getLogger("wstunnel")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(level.upper())
    logger.propagate = False
    handler: logging.Handler
    if syslog_tag:
        handler = logging.handlers.SysLogHandler(
            address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        # "tag[pid]: " as syslog(3) and the original's Go log/syslog write it, so lines read
        # "wstunsrv[7808]: INFO ..." as in the original's documentation.
        handler.ident = f"{syslog_tag}[{os.getpid()}]: "
        handler.setFormatter(LineFormatter(timestamps=False))
    elif logfile is not None:
        handler = ReopenableFileHandler(logfile, encoding="utf-8", delay=False)
        handler.setFormatter(LineFormatter(timestamps=True))
    elif target == "journal" or (target == "auto" and under_journald()):
        handler = JournalHandler(name)
        handler.setFormatter(LineFormatter(timestamps=False))  # the journal keeps the time
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LineFormatter(timestamps=True))
    logger.addHandler(handler)
    return logger


def reopen_files(logger: logging.Logger | None = None) -> None:
    for handler in (logger or logging.getLogger("wstunnel")).handlers:
        if isinstance(handler, ReopenableFileHandler):
            handler.reopen()
