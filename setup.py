"""The build's one step that pyproject.toml cannot say: compile the request path with mypyc.

The modules are listed in wstunnel/compiled.py (with why and what it buys). Set
WSTUNNEL_PURE_PYTHON=1 to build without them: the same sources then run interpreted.
"""

import os
import runpy

from setuptools import setup


def compiled_extensions() -> list:
    if os.environ.get("WSTUNNEL_PURE_PYTHON") == "1":
        return []
    from mypyc.build import mypycify

    listing = runpy.run_path(os.path.join("wstunnel", "compiled.py"))
    paths = [listing["source_path"](module) for module in listing["COMPILED_MODULES"]]
    # mypyc type-checks what it compiles. The build environment holds the build's requirements
    # only, not trio or h11: their types are unknown here (Any), which compiles to the same
    # generic operations the interpreter does. The project's strict checking is scripts/test's
    # job (pyproject.toml [tool.mypy]), so the build reads no configuration file.
    options = ["--config-file", os.devnull, "--python-version", "3.11",
               "--ignore-missing-imports", "--follow-imports", "silent"]
    return mypycify(options + paths, opt_level="3", debug_level="1", group_name="wstunnel")


setup(ext_modules=compiled_extensions())
