"""A short run of the v2 soak (scripts/soak.py --v2): every kind of stream over both transports
while a client is killed and the server stopped and killed, about a minute in all.

The 30-minute run is for a person to start (README, Benchmarks); this one checks that the soak
works and that, even in half a minute of faults, nothing is lost and every abort has a fault
near it.
"""

from __future__ import annotations

import json
import time

from tests.support.harness import PYTHON, ROOT, Harness, wait_until

SECONDS = 30


def _report(output: str) -> dict | None:
    """The soak's JSON report: the last thing it prints."""
    lines = output.splitlines()
    if "{" not in lines or not output.rstrip().endswith("}"):
        return None
    start = len(lines) - 1 - lines[::-1].index("{")
    try:
        return json.loads("\n".join(lines[start:]))
    except ValueError:
        return None


def test_v2_soak_smoke_loses_nothing(harness: Harness) -> None:
    started = time.monotonic()
    soak = harness.start("soak", [PYTHON, str(ROOT / "scripts" / "soak.py"), "--v2",
                                  "--duration", str(SECONDS), "--flap-every", "10",
                                  "--restart-every", "14", "--workers", "6",
                                  "--logdir", str(harness.directory / "soak-logs")])
    report = wait_until(lambda: not soak.alive() and _report(soak.output()), timeout=SECONDS + 90,
                        what="the soak's report")
    secs = time.monotonic() - started
    print(f"\n[soak --v2, {SECONDS}s] {report['requests']} requests in {secs:.0f}s: "
          + ", ".join(f"{o} {report[o]}" for o in ("answered", "aborted", "errored", "refused", "lost"))
          + f"; aborts by reason: {report['aborted_by_reason']}; events {report['events']}")
    assert soak.popen.returncode == 0
    assert report["lost"] == 0, report["lost_examples"]
    assert report["unexplained_aborts"] == 0, report["unexplained_examples"]
    assert report["events"].get("client kills", 0) >= 2
    assert report["events"].get("server restarts", 0) + report["events"].get("server kills", 0) >= 2
    for kind in ("small", "download", "upload", "sse", "websocket"):
        answered = sum(counts["answered"] for name, counts in report["by_kind"].items()
                       if name.startswith(kind + " "))
        assert answered > 0, (kind, report["by_kind"])
    assert {name.split(" ")[1] for name in report["by_kind"]} == {"(websocket)", "(longpoll)"}
