"""The text of a log line: ``EVENT         key=value key="a value"``, as the original WStunnel's
log15 lines had it, for every handler (the journal's fields too: ``wstunnel.logtargets``).

Values that are :class:`~wstunnel.tokens.Token` objects render as their 8-character prefix plus
``...``: passing a Token is the one rule for callers. Compiled with mypyc (``wstunnel.compiled``):
every request renders a few lines in each daemon.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wstunnel.tokens import Token

__all__ = ["EVENT_WIDTH", "MAX_CACHED", "as_value", "event_column", "format_event",
           "format_fields", "key_prefix", "quoted", "render_value"]

EVENT_WIDTH = 14


def render_value(value: Any) -> str:
    # Every request logs a few lines of mostly strs, ints, bytes and Tokens: those are checked
    # first, by exact type (a bool is an int, and an enum or a subclass must take the generic path).
    kind = type(value)
    text: str
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
    return as_value(text)


def as_value(text: str) -> str:
    """``text`` as a field's value: itself, or quoted when it holds a space, '=', '"', '\\' or
    an unprintable character (the empty string needs no quotes)."""
    # Four `in` tests beat one regex search on the short values of the request lines.
    if text.isprintable() and " " not in text and "=" not in text and '"' not in text and "\\" not in text:
        return text
    return quoted(text)


def quoted(text: str) -> str:
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
MAX_CACHED = 512


def key_prefix(key: str) -> str:
    prefix = _KEY_PREFIXES.get(key)
    if prefix is None:
        prefix = key.rstrip("_") + "="
        if len(_KEY_PREFIXES) < MAX_CACHED:
            _KEY_PREFIXES[key] = prefix
    return prefix


def format_fields(fields: Mapping[str, Any]) -> str:
    return " ".join([key_prefix(key) + render_value(value) for key, value in fields.items()])


def format_event(event: str, fields: Mapping[str, Any]) -> str:
    """The text of one event, without level or time: ``HTTP RCV      pkg=... id=1``."""
    rendered = format_fields(fields)
    # Pad to EVENT_WIDTH but always keep one space: "WS   RECONNECT" is itself 14 characters.
    return f"{event:<{EVENT_WIDTH - 1}} {rendered}".rstrip() if rendered else event


def event_column(event: str) -> str:
    return f"{event:<{EVENT_WIDTH - 1}} "
