"""Reading the nginx files we ship (``nginx/``): just enough of nginx's syntax for our own files.

Used by the tests that check the shipped directives against the server's own settings; these need
only the files, not an nginx binary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass
class Block:
    """One nginx directive; ``children`` is its ``{ }`` block, if it has one."""

    name: str
    args: list[str]
    children: list[Block] | None = None

    def all(self, name: str) -> list[Block]:
        return [child for child in self.children or [] if child.name == name]

    def one(self, name: str) -> Block:
        found = self.all(name)
        assert len(found) == 1, f"expected one {name!r} in {self.name} {self.args}, found {len(found)}"
        return found[0]

    def value(self, name: str) -> list[str]:
        return self.one(name).args

    def headers(self) -> dict[str, str]:
        return {b.args[0].lower(): b.args[1] for b in self.all("proxy_set_header")}


_TOKEN = re.compile(r"""#[^\n]*|"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)'|([{};])|([^\s{};"'#]+)""")


def parse_nginx(text: str) -> Block:
    """Just enough of nginx's syntax for our own files: directives, blocks, quotes, comments."""
    root = Block("<file>", [], [])
    stack, words = [root], []
    for match in _TOKEN.finditer(text):
        dq, sq, punct, bare = match.groups()
        if match.group(0).startswith("#") and dq is None and sq is None:
            continue
        if punct == ";":
            stack[-1].children.append(Block(words[0], words[1:]))  # type: ignore[union-attr]
            words = []
        elif punct == "{":
            block = Block(words[0], words[1:], [])
            stack[-1].children.append(block)  # type: ignore[union-attr]
            stack.append(block)
            words = []
        elif punct == "}":
            assert not words, f"unterminated directive {words}"
            stack.pop()
        else:
            words.append(next(g for g in (dq, sq, bare) if g is not None))
    assert len(stack) == 1 and not words, "unbalanced braces in the shipped file"
    return root


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value).groups()  # type: ignore[union-attr]
    return int(number) * units[unit or "s"]


def size_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", value).groups()  # type: ignore[union-attr]
    return int(number) * {"": 1, "k": 1024, "m": MiB, "g": 1024 * MiB}[unit.lower()]
