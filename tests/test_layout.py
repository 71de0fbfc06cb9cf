"""The shape of the code, checked: no import cycles among our modules, no other library's private
modules or members, every imported library declared, no test module importing another.

Read from the source with ``ast``, so every import counts: at module level, inside functions, and
under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.harness import ROOT

PACKAGE = ROOT / "wstunnel"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(folder: Path) -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(folder.rglob("*.py"))}


def _imports(path: Path, module: str) -> Iterator[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement in ``path``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            yield base, [alias.name for alias in node.names], node.lineno


def _import_graph() -> dict[str, set[str]]:
    """Our module -> our modules it imports. ``from package import module`` is an edge to the
    module; ``from package import name`` one to the package (its ``__init__``)."""
    modules = _sources(PACKAGE)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for base, names, _line in _imports(path, name):
            submodules = {f"{base}.{n}" for n in names} & modules.keys()
            graph[name] |= submodules
            if base in modules and (not names or len(submodules) < len(names)):
                graph[name].add(base)
        graph[name].discard(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert _cycles(_import_graph()) == []


def _third_party(module: str) -> str | None:
    top = module.partition(".")[0]
    if not top or top == "wstunnel" or top in sys.stdlib_module_names or top == "__future__":
        return None
    return top


def test_no_private_modules_or_members_of_other_libraries() -> None:
    private = re.compile(r"(^|\.)_[A-Za-z]")  # "_abnf", "h11._readers"; not "__future__"
    documented = {"os._exit"}  # public, whatever its name says
    offenders = []
    for name, path in _sources(PACKAGE).items():
        for base, names, line in _imports(path, name):
            if base.partition(".")[0] == "wstunnel":
                continue
            if private.search(base) or any(private.match(n) for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: from {base} import {names}")
        # A private member of a module we import, reached as an attribute: ``logging._lock``.
        tree = ast.parse(path.read_text())
        imported = {alias.asname or alias.name for node in ast.walk(tree)
                    if isinstance(node, ast.Import) for alias in node.names}
        offenders += [
            f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id in imported and private.match(node.attr)
            and f"{node.value.id}.{node.attr}" not in documented
        ]
    assert offenders == []


def test_every_imported_library_is_declared() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared_names = {re.split(r"[<>=!~;\[ ]", entry, maxsplit=1)[0].lower().replace("_", "-")
                      for entry in declared}
    distributions = importlib.metadata.packages_distributions()
    missing = set()
    for name, path in _sources(PACKAGE).items():
        for base, _names, _line in _imports(path, name):
            top = _third_party(base)
            if top is None:
                continue
            providers = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
            if not providers & declared_names:
                missing.add(f"{top} (from {path.relative_to(ROOT)})")
    assert sorted(missing) == []


@pytest.mark.parametrize("path", sorted((ROOT / "tests").glob("test_*.py")), ids=lambda p: p.name)
def test_test_modules_import_no_other_test_module(path: Path) -> None:
    for base, names, line in _imports(path, _module_name(path)):
        assert not re.match(r"tests\.test_", base), f"{path.name}:{line} imports {base}"
        assert not (base == "tests" and any(n.startswith("test_") for n in names)), \
            f"{path.name}:{line} imports {names} from tests"
