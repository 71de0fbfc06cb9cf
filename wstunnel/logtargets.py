"""Where a daemon's log lines go: journald (with structured fields), the local syslog socket,
or stderr and files (``wstunnel.logs``), and ``configure``, which picks one.

Lines are made by ``wstunnel.logs``; the handlers here send each whole line as one message.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wstunnel.logs import (
    EventHandler,
    EventLogger,
    LineFormatter,
    LineStreamHandler,
    ReopenableFileHandler,
    own_event_handler,
    write_held_lines,
)
from wstunnel.logtext import MAX_CACHED, as_value, render_value
from wstunnel.tokens import Token

SYSLOG_SOCKET = "/dev/log"

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
    return _journal_fields(getattr(record, "wstunnel_event", None), getattr(record, "wstunnel_fields", {}))


def _journal_fields(event: str | None, all_fields: Mapping[str, Any]) -> dict[str, str]:
    fields: dict[str, str] = {}
    if event:
        fields["WSTUNNEL_EVENT"] = _JOURNAL_EVENTS.get(event) or _journal_event(event)
    for key, value in all_fields.items():
        # The request lines' common types first, by exact type, as in logtext.render_value.
        kind = type(value)
        if kind is int:
            text = str(value)
        elif kind is Token:
            text = value.prefix  # a token field carries its bare prefix: the value one filters on
        elif kind is str or kind is bytes:
            if not value:
                if kind is str:
                    continue  # an empty str is left out; an empty bytes is an empty field
                text = ""
            else:
                text = value if kind is str else value.decode("utf-8", "replace")
                text = as_value(text).strip('"')
        elif value is None or value == "":
            continue
        else:
            prefix = getattr(value, "prefix", None)
            text = prefix if isinstance(prefix, str) else render_value(value).strip('"')
        fields[_JOURNAL_NAMES.get(key) or _journal_name(key)] = text
    return fields


# Each field's and event's journal name, as made once: names are literals in the code.
_JOURNAL_NAMES: dict[str, str] = {}
_JOURNAL_EVENTS: dict[str, str] = {}


def _journal_name(key: str) -> str:
    name = key.rstrip("_")
    journal_name = _JOURNAL_FIELD_NAMES.get(name) or "WSTUNNEL_" + "".join(
        ch if ch.isalnum() else "_" for ch in name.upper()
    )
    if len(_JOURNAL_NAMES) < MAX_CACHED:
        _JOURNAL_NAMES[key] = journal_name
    return journal_name


def _journal_event(event: str) -> str:
    name = " ".join(event.split())
    if len(_JOURNAL_EVENTS) < MAX_CACHED:
        _JOURNAL_EVENTS[event] = name
    return name


class _WholeLines(EventHandler):
    """EventLogger's fast path for handlers that send each line as one message (journald,
    syslog): the line as LineFormatter makes it, to ``_send_event``; any other formatter or a
    filter takes the record path."""

    def emit_event(
        self, source: EventLogger, level: int, created: float, event: str,
        fields: Mapping[str, Any], text: str,
    ) -> None:
        formatter = self.formatter
        if type(formatter) is not LineFormatter or self.filters:
            self.handle(source.make_record(level, event, fields, created))
            return
        with self.lock:
            try:
                self._send_event(formatter.event_line(level, created, text), level, event,
                                 source, fields)
            except Exception:
                self.handleError(source.make_record(level, event, fields, created))

    def _send_event(self, line: str, level: int, event: str, source: EventLogger,
                    fields: Mapping[str, Any]) -> None:
        raise NotImplementedError


@own_event_handler
class JournalHandler(_WholeLines):
    """Each line to journald, same text as MESSAGE, plus the structured fields.

    What ``journal.send`` would send, sent with ``journal.sendv``: send() looks for its caller
    with traceback.extract_stack on every call (two stat() calls of linecache's among it) and
    builds each ``KEY=value`` in Python, which made a request's four lines under journald
    cost about five times as much as on stderr. The CODE_FILE/CODE_LINE/CODE_FUNC it found
    were always this module's own send call; they name it still, found once per call site.
    """

    def __init__(self, identifier: str) -> None:
        super().__init__()
        from systemd import journal  # only importable (and only needed) where journald is

        self._sendv = journal.sendv
        self.identifier = identifier
        self._identifier_field = "SYSLOG_IDENTIFIER=" + identifier
        self._code_fields: dict[str, tuple[str, ...]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send_journal(self.format(record), record.levelno, journal_fields(record),
                               self._code_fields.get("emit") or self._code_here("emit"))
        except Exception:
            self.handleError(record)

    def _send_event(self, line: str, level: int, event: str, source: EventLogger,
                    fields: Mapping[str, Any]) -> None:
        self._send_journal(line, level, _journal_fields(event, {"pkg": source.pkg, **fields}),
                           self._code_fields.get("event") or self._code_here("event"))

    def _code_here(self, site: str) -> tuple[str, ...]:
        """CODE_FILE, CODE_LINE and CODE_FUNC of the caller's line, as journal.send finds them."""
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        if caller is None:  # an interpreter without frames: send() would have found none either
            return ()
        code = self._code_fields[site] = (
            "CODE_FILE=" + caller.f_code.co_filename, f"CODE_LINE={caller.f_lineno:d}",
            "CODE_FUNC=" + caller.f_code.co_name,
        )
        return code

    def _send_journal(self, message: str, level: int, fields: dict[str, str],
                      code: tuple[str, ...]) -> None:
        # journal.send's fields, in its order: MESSAGE, CODE_*, then its keyword arguments.
        self._sendv(
            "MESSAGE=" + message, *code,
            _JOURNAL_PRIORITIES.get(level) or f"PRIORITY={_SYSLOG_PRIORITIES.get(level, 6)}",
            self._identifier_field, *[f"{name}={value}" for name, value in fields.items()],
        )


_JOURNAL_PRIORITIES = {level: f"PRIORITY={priority}" for level, priority in _SYSLOG_PRIORITIES.items()}


# RFC 3164 §4.1.1: the message starts "<PRI>", PRI = facility * 8 + severity; facility 3 is
# "system daemons". Severities (RFC 5424 §6.2.1) by level name; a name of no standard level
# ("Level 25") is a warning, as logging's own SysLogHandler maps it.
LOG_DAEMON = 3
_SYSLOG_SEVERITIES = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}
_UNKNOWN_LEVEL_SEVERITY = 4


@own_event_handler
class SyslogLineHandler(_WholeLines):
    """Each line as one message to the local syslog socket: ``<PRI>tag[pid]: LINE`` and a NUL.

    ``ident`` goes in front of every line ("wstunsrv[7808]: ", the TAG of RFC 3164 §4.1.3 as
    syslog(3) writes it); the syslog daemon or journald adds the time and host. The trailing
    NUL is what logging's SysLogHandler (which sent our lines before) appends, and on a stream
    socket it is what ends a message.
    """

    def __init__(self, address: str, ident: str, facility: int = LOG_DAEMON) -> None:
        super().__init__()
        self.address = address
        self.ident = ident
        self.facility = facility
        self._socket: socket.socket | None = None
        self._heads: dict[str, bytes] = {}  # "<PRI>ident" by level name
        # As openlog(3): no syslog daemon yet is no error; each line tries again.
        with contextlib.suppress(OSError):
            self._connect()

    def _connect(self) -> socket.socket:
        # /dev/log is a datagram socket under journald, rsyslog and most syslog-ngs; a few
        # syslog-ng setups listen for streams there instead.
        try:
            sock = self._connected(socket.SOCK_DGRAM)
        except OSError:
            sock = self._connected(socket.SOCK_STREAM)
        self._socket = sock
        return sock

    def _connected(self, kind: socket.SocketKind) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, kind)
        try:
            sock.connect(self.address)
        except OSError:
            sock.close()
            raise
        return sock

    def _head(self, level_name: str) -> bytes:
        severity = _SYSLOG_SEVERITIES.get(level_name, _UNKNOWN_LEVEL_SEVERITY)
        head = self._heads[level_name] = f"<{self.facility * 8 + severity}>{self.ident}".encode()
        return head

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send_line(self.format(record), record.levelname)
        except Exception:
            self.handleError(record)

    def _send_event(self, line: str, level: int, event: str, source: EventLogger,
                    fields: Mapping[str, Any]) -> None:
        self._send_line(line, logging.getLevelName(level))

    def _send_line(self, line: str, level_name: str) -> None:
        data = (self._heads.get(level_name) or self._head(level_name)) + line.encode() + b"\0"
        sock = self._socket or self._connect()
        try:
            sock.sendall(data)
        except OSError:
            # The daemon restarted and its socket is a new one: connect again, once.
            self._disconnect()
            self._connect().sendall(data)

    def _disconnect(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def close(self) -> None:
        with self.lock:
            self._disconnect()
            super().close()


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
    write_held_lines()  # to the handlers they were logged for, before those are closed
    for earlier in list(logger.handlers):
        logger.removeHandler(earlier)
        earlier.close()
    logger.setLevel(level.upper())
    logger.propagate = False
    handler: logging.Handler
    if syslog_tag:
        # "tag[pid]: " as syslog(3) and the original's Go log/syslog write it, so lines read
        # "wstunsrv[7808]: INFO ..." as in the original's documentation.
        handler = SyslogLineHandler(SYSLOG_SOCKET, ident=f"{syslog_tag}[{os.getpid()}]: ",
                                    facility=LOG_DAEMON)
        handler.setFormatter(LineFormatter(timestamps=False))
    elif logfile is not None:
        handler = ReopenableFileHandler(logfile, encoding="utf-8", delay=False)
        handler.setFormatter(LineFormatter(timestamps=True))
    elif target == "journal" or (target == "auto" and under_journald()):
        handler = JournalHandler(name)
        handler.setFormatter(LineFormatter(timestamps=False))  # the journal keeps the time
    else:
        handler = LineStreamHandler(sys.stderr)
        handler.setFormatter(LineFormatter(timestamps=True))
    logger.addHandler(handler)
    return logger
