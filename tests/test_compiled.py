"""The request path runs compiled (wstunnel/compiled.py), built from the sources beside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.harness import ROOT
from wstunnel import compiled


@pytest.mark.skipif(os.environ.get("WSTUNNEL_PURE_PYTHON") == "1",
                    reason="built without mypyc on purpose (WSTUNNEL_PURE_PYTHON=1)")
def test_every_listed_module_runs_compiled() -> None:
    # The suite runs against what the package ships: a module left interpreted here would be
    # tested in a form nobody runs.
    assert compiled.interpreted() == [], "run scripts/setup: it builds them (setup.py)"


def test_each_listed_module_has_its_source_and_nothing_else_is_compiled() -> None:
    for module in compiled.COMPILED_MODULES:
        assert (ROOT / compiled.source_path(module)).is_file(), module
    built = {str(path.relative_to(ROOT)).split(".", 1)[0].replace("/", ".")
             for path in (ROOT / "wstunnel").rglob("*.so")}
    assert built <= set(compiled.COMPILED_MODULES)


def test_the_same_sources_run_interpreted(tmp_path: Path) -> None:
    # A copy of the package without its extensions imports from the .py files: what a build with
    # WSTUNNEL_PURE_PYTHON=1 runs. A v2 head goes through the interpreted codec and back.
    shutil.copytree(ROOT / "wstunnel", tmp_path / "wstunnel",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    script = (
        "from wstunnel import compiled, v2\n"
        "assert sorted(compiled.interpreted()) == sorted(compiled.COMPILED_MODULES)\n"
        "head = v2.request_head(b'GET', b'/x', [(b'host', b'example')])\n"
        "print(v2.parse_request_head(head))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={
        **os.environ, "PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "b'/x'" in result.stdout
