"""Long links on loopback, and peers of another version, for the tests of windows that follow
the link (tests/test_long_links.py).

A link is tests/support/delay_relay.py: a relay holding each direction's bytes a fixed time. A peer
of another version is that version's ``wstunnel`` package, taken from git into a directory of
the test's, which ``python -m wstunnel`` then runs from (Harness.server/client ``cwd``).
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from tests.support.harness import PYTHON, ROOT, SUPPORT, Harness, Process, free_port, wait_until

# The last commit whose v2 windows were fixed (256 KiB a stream, 4 MiB a tunnel): a peer from
# before windows followed the link.
FIXED_WINDOWS_COMMIT = "612d1a6"


def _accepts(process: Process, port: int) -> bool:
    assert process.alive(), f"{process.name} exited early:\n{process.output()}"
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def start_link(harness: Harness, target_port: int, one_way_ms: float,
               mb_per_s: float | None = None) -> int:
    """A relay to 127.0.0.1:``target_port`` that delays each direction ``one_way_ms`` (and, with
    ``mb_per_s``, passes no more than that, backing its sender up); its port."""
    port = free_port()
    rate = [] if mb_per_s is None else [str(mb_per_s)]
    process = harness.start("link", [PYTHON, str(SUPPORT / "delay_relay.py"), str(port),
                                     str(target_port), str(one_way_ms), *rate])
    wait_until(lambda: _accepts(process, port), timeout=10, what="the delaying relay")
    return port


def older_version(directory: Path, commit: str = FIXED_WINDOWS_COMMIT) -> Path | None:
    """The ``wstunnel`` package of ``commit``, unpacked in ``directory`` (the tree to run it
    from); None if this checkout has no such commit (a shallow clone)."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit, "wstunnel"],
                                 capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    tree = directory / f"wstunnel-{commit}"
    tree.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True, timeout=60)
    return tree
