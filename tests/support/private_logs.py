"""A logger of a test's own for wstunnel.logs' fast path (EventLogger writing through its own
handlers without LogRecords), shared by tests/test_logs.py and tests/test_log_bytes.py."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

NOW = 1_396_633_229.9  # 2014/04/04 17:40:29 UTC: every line's time


@contextmanager
def private_logger(name: str, monkeypatch: pytest.MonkeyPatch,
                   ours: tuple[type[logging.Handler], ...]) -> Iterator[logging.Logger]:
    """The logger ``name`` at debug level, the clock fixed at NOW; on the way out, the handlers
    of the classes ``ours`` are removed and closed (pytest removes its own).

    ``add_handler`` makes it non-propagating, not this: pytest attaches its capture handler to
    every logger that is non-propagating when a test phase starts, and any handler but ours
    means LogRecords, not the fast path."""
    monkeypatch.setattr(time, "time", lambda: NOW)  # both paths read the clock through time.time
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    try:
        yield logger
    finally:
        logger.propagate = True
        for handler in list(logger.handlers):
            if isinstance(handler, ours):
                logger.removeHandler(handler)
                handler.close()


def add_handler(logger: logging.Logger, handler: logging.Handler) -> None:
    logger.propagate = False
    logger.addHandler(handler)


def refuse_records(logger: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any LogRecord ``logger`` builds fail the test: the fast path must not build one."""
    def refuse(*args: object, **kwargs: object) -> logging.LogRecord:
        raise AssertionError("the fast path made a LogRecord")

    monkeypatch.setattr(logger, "makeRecord", refuse)
