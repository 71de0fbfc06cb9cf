"""The cyclic garbage collector as both daemons run it: what they start with is frozen, and the
youngest generation waits for YOUNG_GENERATION_THRESHOLD allocations (wstunnel.daemon)."""

from __future__ import annotations

import json
import subprocess

from tests.support.harness import PYTHON, ROOT
from wstunnel.daemon import YOUNG_GENERATION_THRESHOLD

# Runs a main through the daemons' own entry (commands._run) in a fresh interpreter, since the
# collector's settings are the process's: what main sees is what srv and cli serve under.
_PROBE = """
import gc, json
from wstunnel import commands
seen = {}
before = gc.get_threshold()

async def main():
    seen["threshold"] = gc.get_threshold()
    seen["frozen"] = gc.get_freeze_count()
    made = [[] for _ in range(5_000)]  # young containers, as a busy turn makes
    seen["collections_after_5000"] = sum(s["collections"] for s in gc.get_stats()) - start
    del made

start = sum(s["collections"] for s in gc.get_stats())
commands._run(main)
seen["default"] = before
print(json.dumps(seen))
"""


def test_the_daemons_loop_runs_with_the_collector_tuned_for_serving() -> None:
    done = subprocess.run([PYTHON, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True)
    seen = json.loads(done.stdout)
    default_young, middle, oldest = seen["default"]
    assert default_young < YOUNG_GENERATION_THRESHOLD  # CPython's 700: the change is ours
    # Only the youngest generation's threshold moves; the older ones keep CPython's.
    assert seen["threshold"] == [YOUNG_GENERATION_THRESHOLD, middle, oldest]
    # Modules, settings and logging are out of the collector's sight before serving starts.
    assert seen["frozen"] > 10_000
    # A turn's worth of young containers sets off no collection (at 700 it would set off 7).
    assert seen["collections_after_5000"] == 0
