"""Log lines in the original WStunnel's ``key=value`` form: how they are logged, held and written
to stderr or a file (their text: ``wstunnel.logtext``; journald, syslog and choosing among them:
``wstunnel.logtargets``).

Every event is one line: ``LEVEL EVENT  key=value ...`` with the original's event names
("HTTP RCV", "WS   SND", ...), so the original's log scrapers keep working. Values that are
:class:`~wstunnel.tokens.Token` objects render as their 8-character prefix plus ``...``
(``logtext.render_value``): passing a Token is the one rule for callers.

The structured fields ride along on each ``logging.LogRecord`` (``record.wstunnel_fields``) so a
handler such as journald's can send them as fields of their own. wstunnel's own handlers also
take events without a LogRecord (``emit_event``): the request path logs a few lines per request,
and the logging module's machinery cost more than rendering and writing them.
"""

from __future__ import annotations

import codecs
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO, TypeVar, cast

from wstunnel.logtext import MAX_CACHED, event_column, format_event, format_fields, key_prefix, render_value

_LEVEL_NAMES = {
    logging.DEBUG: "DBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARN",
    logging.ERROR: "EROR",
    logging.CRITICAL: "CRIT",
}


# What a LogRecord holds when logging is not asked to look for the caller (Logger.findCaller's
# answer when it finds none).
_NO_CALLER = ("(unknown file)", 0, "(unknown function)")


class EventLogger:
    """Logs events for one component (``pkg=WStunsrv`` or ``pkg=WStuncli``)."""

    def __init__(self, pkg: str, logger: logging.Logger | None = None) -> None:
        self.pkg = pkg
        self._logger = logger or logging.getLogger("wstunnel")
        self._pkg_text = key_prefix("pkg") + render_value(pkg)
        self._heads: dict[str, str] = {}
        # logger.handlers as last seen, and the same handlers as ours if each one is (else
        # None): the fast path's test, made again only when the logger's handlers change. One
        # attribute, so a thread never sees the one pair half replaced.
        self._handlers_checked: tuple[list[logging.Handler], tuple[EventHandler, ...] | None] = ([], None)

    def log(self, level: int, event: str, /, **fields: Any) -> None:
        self._log(level, event, fields)

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        logger = self._logger
        if not logger.isEnabledFor(level):
            return
        # The fast path skips LogRecord, Logger.handle and Formatter.format, which together cost
        # more than the line's rendering and write: allowed only when nothing but wstunnel's own
        # handlers would see the record (each makes itself a record if it has a filter or some
        # other formatter). Anything else (pytest's capture handlers, a handler a test adds, a
        # propagating logger) gets records as before.
        handlers = logger.handlers
        seen, own = self._handlers_checked
        if handlers != seen:  # handlers compare as themselves, not by value
            own = _as_own_handlers(handlers)
            self._handlers_checked = (list(handlers), own)
        # (A field named pkg replaces the logger's own in place: the record path knows how.)
        if own and not logger.propagate and not logger.filters and "pkg" not in fields:
            created = time.time()
            held = _held
            if held is not None and held.thread == threading.get_ident():
                if level < logging.WARNING:
                    held.add((self, own, level, created, event, fields))
                    return
                held.write()  # a warning goes at once, after what is held
            self._emit(own, level, created, event, fields)
            return
        write_held_lines()  # what is held goes first: lines keep their order
        logger.handle(self.make_record(level, event, fields))

    def _emit(self, own: tuple[EventHandler, ...], level: int, created: float, event: str,
              fields: dict[str, Any]) -> None:
        text = self._text(event, fields)
        for handler in own:
            if level >= handler.level:
                handler.emit_event(self, level, created, event, fields, text)

    def _text(self, event: str, fields: Mapping[str, Any]) -> str:
        # format_event(event, {"pkg": pkg, **fields}), without copying the fields.
        head = self._heads.get(event) or self._head(event)
        return f"{head} {format_fields(fields)}" if fields else head

    def _head(self, event: str) -> str:
        """ "EVENT         pkg=..." for this event, made once per EventLogger and event."""
        head = event_column(event) + self._pkg_text
        if len(self._heads) < MAX_CACHED:
            self._heads[event] = head
        return head

    def make_record(
        self, level: int, event: str, fields: Mapping[str, Any], created: float | None = None
    ) -> logging.LogRecord:
        """The LogRecord of one event, for handlers other than wstunnel's own."""
        logger = self._logger
        all_fields = {"pkg": self.pkg, **fields}
        # makeRecord is what Logger.log does, minus findCaller: it walks the stack for a file
        # name and line no line of ours shows. The line shows the event and its fields only.
        record = logger.makeRecord(
            logger.name, level, _NO_CALLER[0], _NO_CALLER[1], format_event(event, all_fields), (),
            None, _NO_CALLER[2], {"wstunnel_event": event, "wstunnel_fields": all_fields},
        )
        if created is not None:
            record.created = created
        return record

    def debug(self, event: str, /, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, /, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, /, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, /, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)


_HeldLine = tuple["EventLogger", tuple["EventHandler", ...], int, float, str, dict[str, Any]]


class HeldLines:
    """Info and debug lines of EventLogger's fast path, held back until the event loop has
    run every task it had to run: those tasks send responses and requests on their way.

    A request's log lines cost a few µs each to render and write, and more for journald's
    fields and datagram. Written the moment they are logged, that time sits between the
    request's bytes and the socket they are on their way to, in both daemons. Held, they are
    written when the loop is about to wait for I/O (``wstunnel.daemon.HeldLinesWriter``): all of
    them (``write``) when it has nothing left to run, else those of the turns before
    (``turn_ends``), so the tasks a line's turn woke (the one sending the response the line is
    about, say) run first. A daemon's lines may also wait a few milliseconds for the next ones
    (``HeldLinesWriter.write_late``). Each line keeps the time it was logged at and its place in
    the order.

    What waits is bounded: MAX_HELD_LINES lines, and only info and debug ones logged on the
    thread that holds them (the event loop's). A warning or an error, a line that takes logging's
    record path, and ``release_lines`` write what is held first, then go at once: the lines that
    explain a failure are never the ones a crash loses.
    """

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self._lines: list[_HeldLine] = []
        self._before_this_turn = 0  # how many of _lines were held before the current turn
        # Called when a line is held and none was: what writes held lines later may want to know.
        self.on_first: Callable[[], object] | None = None

    def __len__(self) -> int:
        return len(self._lines)

    def add(self, line: _HeldLine) -> None:
        lines = self._lines
        if not lines and self.on_first is not None:
            self.on_first()
        lines.append(line)
        if len(lines) >= MAX_HELD_LINES:
            self.write()

    def write(self) -> None:
        """Write every held line, oldest first."""
        self._before_this_turn = 0
        while self._lines:
            lines, self._lines = self._lines, []
            self._emit(lines)

    def turn_ends(self) -> None:
        """A turn of the loop ended with tasks it woke still to run (they may be about to send
        what this turn's lines are about): write the lines of earlier turns, hold this one's."""
        earlier = self._before_this_turn
        if earlier:
            lines = self._lines[:earlier]
            del self._lines[:earlier]
            self._emit(lines)
        self._before_this_turn = len(self._lines)

    @staticmethod
    def _emit(lines: list[_HeldLine]) -> None:
        if len(lines) == 1:  # the common turn at low load: no grouping to do
            source, own, level, created, event, fields = lines[0]
            source._emit(own, level, created, event, fields)
            return
        # Each handler takes its lines of a run with the same handlers at once: one write for
        # a file or stderr, however many requests the turn answered.
        start = 0
        while start < len(lines):
            own = lines[start][1]
            end = start + 1
            while end < len(lines) and lines[end][1] == own:  # the handlers, not the tuple
                end += 1
            events = [(source, level, created, event, fields, source._text(event, fields))
                      for source, _, level, created, event, fields in lines[start:end]]
            for handler in own:
                handler.emit_events([line for line in events if line[1] >= handler.level])
            start = end


# A loop that runs many tasks between waits for I/O: past this many lines, they go at once.
MAX_HELD_LINES = 256
_held: HeldLines | None = None


def hold_lines() -> HeldLines:
    """From now on, hold this thread's fast-path info and debug lines until ``HeldLines.write``."""
    global _held
    release_lines()
    _held = HeldLines()
    return _held


def write_held_lines() -> None:
    """Write what this thread holds now (before its handlers change, say), and go on holding."""
    held = _held
    if held is not None and held.thread == threading.get_ident():
        held.write()


def release_lines() -> None:
    """Write what is held and hold no more lines."""
    global _held
    held, _held = _held, None
    if held is not None:
        held.write()


class LineFormatter(logging.Formatter):
    """``LEVEL text``, optionally behind a UTC timestamp (files and terminals want one)."""

    def __init__(self, *, timestamps: bool) -> None:
        super().__init__()
        self.timestamps = timestamps
        # The stamp has whole seconds only: made once a second, not once a line, and so is each
        # level's "STAMP LEVEL " line start.
        self._stamp_second = -1
        self._stamp = ""
        self._starts: dict[int, str] = {}

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_LEVEL_NAMES.get(record.levelno, record.levelname)} {record.getMessage()}"
        if record.exc_info and record.levelno >= logging.ERROR:
            line += " exc=" + render_value(self.formatException(record.exc_info))
        if self.timestamps:
            self._set_second(int(record.created))
            line = f"{self._stamp} {line}"
        return line

    def event_line(self, level: int, created: float, text: str) -> str:
        """What format() makes of a record of this level, time and message (no exc)."""
        if self.timestamps and int(created) != self._stamp_second:
            self._set_second(int(created))
        return (self._starts.get(level) or self._start(level)) + text

    def _start(self, level: int) -> str:
        """"STAMP LEVEL " (or "LEVEL "), the start of each line of this level this second."""
        name = _LEVEL_NAMES.get(level) or logging.getLevelName(level)
        start = self._starts[level] = f"{self._stamp} {name} " if self.timestamps else f"{name} "
        return start

    def _set_second(self, second: int) -> None:
        if second != self._stamp_second:
            self._stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.gmtime(second))
            self._stamp_second = second
            self._starts = {}


# What emit_event takes: the EventLogger, level, time, event name, fields and rendered text.
Event = tuple["EventLogger", int, float, str, Mapping[str, Any], str]


class EventHandler(logging.Handler):
    """A handler of ours that EventLogger hands events to without a LogRecord.

    EventLogger calls ``emit_event`` instead of ``handle`` only on the exact classes in
    ``_EVENT_HANDLERS``, and only when no other handler would see the record. A handler that
    cannot take the event as it comes (a filter, some other formatter) makes itself a record
    with ``source.make_record`` and goes logging's own way.
    """

    # Handler.__init__ always makes one (createLock); typeshed allows None for subclasses
    # that override createLock, which ours do not.
    lock: threading.RLock

    def emit_event(
        self, source: EventLogger, level: int, created: float, event: str,
        fields: Mapping[str, Any], text: str,
    ) -> None:
        raise NotImplementedError

    def emit_events(self, events: list[Event]) -> None:
        """Several events, oldest first (held lines): each as ``emit_event`` takes it, unless
        the handler can do better with all of them at once."""
        for source, level, created, event, fields, text in events:
            self.emit_event(source, level, created, event, fields, text)


_STATELESS_CODECS = frozenset({"utf-8", "ascii", "iso8859-1"})


def _write_rest(fd: int, data: bytes, written: int) -> None:
    """The rest of a line a pipe or a full disk took only part of."""
    while written < len(data):
        data = data[written:]
        written = os.write(fd, data)


class _DirectWrites(EventHandler):
    """EventLogger's fast path for a handler with a stream: one os.write per line, or per turn's
    worth of held lines.

    TextIOWrapper.write plus flush cost about as much as the write system call itself, and
    the line goes to the OS before the call returns either way. Streams that are not plain
    files, pipes or terminals (pytest's capture, io.StringIO) get write and flush as before.
    """

    # The stream of the StreamHandler this is mixed into: TextIO, or a FileHandler's
    # TextIOWrapper, None until its file is open.
    stream: Any
    terminator: str
    # A shared stream (stderr) is flushed first, so whatever else went through it (a print,
    # logging's traceback of a failed emit) comes out in order, and a closed stream raises.
    # A log file's stream is the handler's own, and Handler.emit flushes after each record.
    _flush_first = True
    _direct_stream: object = object()  # no stream yet, and not None: delay=True leaves that
    _direct_fd: int | None = None
    _direct_encoding = "utf-8"
    _direct_errors = "strict"

    def emit_event(
        self, source: EventLogger, level: int, created: float, event: str,
        fields: Mapping[str, Any], text: str,
    ) -> None:
        formatter = self.formatter
        if formatter.__class__ is not LineFormatter or self.filters:
            self.handle(source.make_record(level, event, fields, created))
            return
        with self.lock:
            try:
                self._write(self._line(formatter, level, created, text))
            except RecursionError:  # as StreamHandler.emit: no handleError for these
                raise
            except Exception:
                self.handleError(source.make_record(level, event, fields, created))

    def emit_events(self, events: list[Event]) -> None:
        """Held lines: all of them in one write."""
        formatter = self.formatter
        if len(events) < 2 or formatter.__class__ is not LineFormatter or self.filters:
            super().emit_events(events)
            return
        with self.lock:
            lines = "".join([self._line(formatter, level, created, text)
                             for _, level, created, _, _, text in events])
            try:
                self._write(lines)
            except UnicodeError:
                # A line this stream's codec cannot take: one by one, so only that line is lost
                # (and reported), as without holding. Nothing was written yet: the encoding
                # comes first.
                super().emit_events(events)
            except RecursionError:
                raise
            except Exception:
                source, level, created, event, fields, _ = events[0]
                self.handleError(source.make_record(level, event, fields, created))

    def _line(self, formatter: LineFormatter, level: int, created: float, text: str) -> str:
        """LineFormatter.event_line plus the terminator, in one string."""
        if formatter.timestamps and int(created) != formatter._stamp_second:
            formatter._set_second(int(created))
        start = formatter._starts.get(level) or formatter._start(level)
        return f"{start}{text}{self.terminator}"

    def _write(self, lines: str) -> None:
        stream = self.stream
        if stream is not self._direct_stream:
            stream = self._direct_to(stream)
            if stream is None:
                return
        fd = self._direct_fd
        if fd is None:
            stream.write(lines)
            stream.flush()
            return
        if self._flush_first:
            stream.flush()
        data = lines.encode(self._direct_encoding, self._direct_errors)
        written = os.write(fd, data)
        if written != len(data):
            _write_rest(fd, data, written)

    def _direct_to(self, stream: TextIO | None) -> TextIO | None:
        """Takes a new stream (or opens a file handler's): the one to write to, or None."""
        self._direct_fd = None
        # Only codecs that encode a line the same alone as in a stream: no BOM (utf-8-sig,
        # utf-16), no state. POSIX streams do not translate "\n", so that needs no check.
        if type(stream) is io.TextIOWrapper and codecs.lookup(stream.encoding).name in _STATELESS_CODECS:
            try:
                self._direct_fd = stream.fileno()
            except (OSError, ValueError):
                pass
            else:
                self._direct_encoding, self._direct_errors = stream.encoding, stream.errors or "strict"
        # Holding the stream keeps its id from going to another stream with another fd.
        self._direct_stream = stream
        return stream


class LineStreamHandler(_DirectWrites, logging.StreamHandler[TextIO]):
    """stderr's handler: logging.StreamHandler plus the fast path of EventLogger."""


class ReopenableFileHandler(_DirectWrites, logging.FileHandler):
    """A log file that ``reopen()`` closes and opens again, for logrotate's SIGHUP."""

    _flush_first = False

    def __init__(self, filename: str | os.PathLike[str], mode: str = "a", encoding: str | None = None,
                 delay: bool = False, errors: str | None = None) -> None:
        super().__init__(filename, mode, encoding, delay, errors)
        # What to open again, kept here: FileHandler's own copies and opener are undocumented.
        # Absolute, as FileHandler makes it, so a chdir does not move the log.
        self.path = os.path.abspath(filename)
        self._open_mode, self._open_errors = mode, errors
        self._open_encoding = io.text_encoding(encoding)
        self._shut = False  # close() was called: FileHandler opens a "w" file only once

    def _open_file(self) -> io.TextIOWrapper:
        # A text mode, as FileHandler's (a binary one could not take its lines either).
        return cast(io.TextIOWrapper, open(self.path, self._open_mode, encoding=self._open_encoding,
                                           errors=self._open_errors))

    def reopen(self) -> None:
        with self.lock:
            # The new file first: if it cannot be opened, lines still go to the old one.
            old = self.setStream(self._open_file())
            if old is not None:
                old.close()

    def close(self) -> None:
        with self.lock:
            self._shut = True
            super().close()

    def _direct_to(self, stream: TextIO | None) -> TextIO | None:
        if stream is None:  # delay=True, or closed: FileHandler.emit opens it then too
            if self._open_mode == "w" and self._shut:
                return None
            opened = self._open_file()
            self.setStream(opened)
            stream = opened
        return super()._direct_to(stream)


# The handler classes whose emit_event EventLogger calls instead of building a LogRecord: exact
# classes, as a subclass may have changed what emit() does. The journald and syslog handlers
# (wstunnel.logtargets) add themselves with ``own_event_handler``.
_EVENT_HANDLERS: set[type[EventHandler]] = {LineStreamHandler, ReopenableFileHandler}

_H = TypeVar("_H", bound=EventHandler)


def own_event_handler(handler_class: type[_H]) -> type[_H]:
    """Class decorator: EventLogger may give this exact class events without a LogRecord."""
    _EVENT_HANDLERS.add(handler_class)
    return handler_class


def _as_own_handlers(handlers: list[logging.Handler]) -> tuple[EventHandler, ...] | None:
    """``handlers`` if every one is of a class in _EVENT_HANDLERS (so EventLogger may skip the
    LogRecord), else None."""
    own = tuple(handler for handler in handlers
                if isinstance(handler, EventHandler) and handler.__class__ in _EVENT_HANDLERS)
    return own if len(own) == len(handlers) else None


def reopen_files(logger: logging.Logger | None = None) -> None:
    for handler in (logger or logging.getLogger("wstunnel")).handlers:
        if isinstance(handler, ReopenableFileHandler):
            handler.reopen()
