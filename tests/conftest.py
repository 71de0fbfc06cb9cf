from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Harness


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    """Processes for one test; all stopped at the end, and their logs searched for tokens."""
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.close()
    leaks = h.leaked_tokens()
    assert not leaks, f"whole tokens in logs: {leaks}"
