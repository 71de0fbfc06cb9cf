"""A fixed number of libFuzzer runs over the framing modules, in every test run.

The fuzzer itself is tests/fuzz/fuzz_framing.py (atheris, coverage-guided); here it runs with a
fixed seed and count, so CI does the same bounded work each time, and a finding fails the
suite with the input that caused it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.harness import ROOT

RUNS = 100_000
SEED = 1


def test_framing_survives_coverage_guided_fuzzing(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fuzz" / "fuzz_framing.py"), f"-runs={RUNS}",
         f"-seed={SEED}", f"-artifact_prefix={tmp_path}/", "-max_len=4096"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    findings = sorted(tmp_path.iterdir())
    assert result.returncode == 0 and not findings, (
        f"fuzzer finding(s) {[p.name for p in findings]}:\n{result.stderr[-3000:]}"
    )
    assert f"Done {RUNS} runs" in result.stderr
