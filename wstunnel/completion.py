"""Bash completion for ``wstunnel``, written from the program's own argument parsers.

``python -m wstunnel.completion`` prints the script; the Debian package generates it at build
time into /usr/share/bash-completion/completions/wstunnel, where bash-completion loads it the
first time ``wstunnel`` is completed. Nothing in it is written by hand: the commands come from
:data:`wstunnel.commands.COMMANDS`, each command's flags from the very parser its ``main`` uses
(read through ``format_help``, argparse's public view of them), and the values a flag takes from
the settings model behind it (a ``Literal``'s choices, a ``Path``'s file names), so a flag added
to the program is completed by the next build.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic_settings import BaseSettings

from wstunnel.commands import COMMANDS, daemon_parser
from wstunnel.config import ClientSettings, ServerSettings
from wstunnel.ops import admin, configcheck, status, token
from wstunnel.ops.common import CommandLine

# "  -port PORT, --port PORT    help...": an option's line in a parser's help; the invocation
# is never wrapped, and is followed by two spaces or the end of the line.
_OPTION_LINE = re.compile(r"^  (-\S+(?: \S+)?(?:, -\S+(?: \S+)?)*)(?: {2,}|$)")
# "  FILE    file to check": a positional argument's line (its metavar is upper case).
_POSITIONAL_LINE = re.compile(r"^  ([A-Z][A-Z_]*)(?: {2,}|$)")
# What a value is, for the helpers' flags (no settings model behind them).
_METAVAR_VALUES = {"FILE": "file", "CONFIG_DIR": "directory", "GROUP": "group"}
_BOOLEAN = ("true", "false")


@dataclass(frozen=True)
class Option:
    names: tuple[str, ...]  # "-port", "--port"
    metavar: str | None  # None: a switch; "[BOOL]": a value may follow
    values: tuple[str, ...] | str | None = None  # words, "file", "directory", "group" or None


@dataclass(frozen=True)
class Leaf:
    """A command line that takes flags: ``srv``, ``token new``, ..."""

    words: tuple[str, ...]  # the words after "wstunnel" that name it
    options: tuple[Option, ...]
    positionals: tuple[str, ...]  # metavars, in order


def options_of(parser: argparse.ArgumentParser,
               model: type[BaseSettings] | None = None) -> tuple[Option, ...]:
    """Every option ``parser`` accepts, as its help lists them."""
    found = []
    for line in parser.format_help().splitlines():
        match = _OPTION_LINE.match(line)
        if not match:
            continue
        parts = [part.split(" ", 1) for part in match.group(1).split(", ")]
        metavar = parts[0][1] if len(parts[0]) > 1 else None
        found.append(Option(tuple(part[0] for part in parts), metavar, _values(metavar, model)))
    return tuple(found)


def positionals_of(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    lines = parser.format_help().split("\npositional arguments:\n", 1)
    if len(lines) == 1:
        return ()
    section = lines[1].split("\n\n", 1)[0]
    return tuple(m.group(1) for m in map(_POSITIONAL_LINE.match, section.splitlines()) if m)


def _values(metavar: str | None, model: type[BaseSettings] | None) -> tuple[str, ...] | str | None:
    if metavar is None:
        return None
    if metavar.strip("[]") == "BOOL":
        return _BOOLEAN
    if metavar in _METAVAR_VALUES:
        return _METAVAR_VALUES[metavar]
    field = model.model_fields.get(metavar.lower()) if model is not None else None
    if field is None:
        return None
    kinds = _kinds(field.annotation)
    literals = tuple(str(value) for kind in kinds if typing.get_origin(kind) is typing.Literal
                     for value in typing.get_args(kind))
    if literals:
        return literals
    return "file" if Path in kinds else None


def _kinds(annotation: object) -> list[object]:
    """``Path | None`` as [Path, None]; anything else as itself."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return [kind for arg in typing.get_args(annotation) for kind in _kinds(arg)]
    return [annotation]


def leaves() -> list[Leaf]:
    """Every command of ``wstunnel`` that takes flags, with the parser ``main`` uses for it."""
    daemons: dict[str, tuple[argparse.ArgumentParser, type[BaseSettings]]] = {
        "srv": (daemon_parser("wstunnel srv", ServerSettings), ServerSettings),
        "cli": (daemon_parser("wstunnel cli", ClientSettings), ClientSettings),
    }
    helpers: dict[str, CommandLine] = {
        "token": token.command_line(),
        "config": configcheck.command_line(),
        "status": status.command_line(),
        "admin": admin.command_line(),
    }
    found = []
    for command in COMMANDS:
        if command in daemons:
            parser, model = daemons[command]
            found.append(Leaf((command,), options_of(parser, model), positionals_of(parser)))
        elif command in helpers:
            line = helpers[command]
            targets: Mapping[str, argparse.ArgumentParser] = line.actions or {"": line.parser}
            for action, parser in targets.items():
                words = (command, action) if action else (command,)
                found.append(Leaf(words, options_of(parser), positionals_of(parser)))
    return found


def _words(words: Sequence[str]) -> str:
    return shlex.quote(" ".join(words))


def _reply(values: tuple[str, ...] | str, current: str = '"$cur"') -> str:
    if values == "file":
        return f"compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- {current}))"
    if values == "directory":
        return f"compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -d -- {current}))"
    if values == "group":
        return f"COMPREPLY=($(compgen -g -- {current}))"
    assert isinstance(values, tuple)
    return f"COMPREPLY=($(compgen -W {_words(values)} -- {current}))"


def _leaf_case(leaf: Leaf) -> Iterator[str]:
    yield f"        {shlex.quote(' '.join(leaf.words))})"
    arms = []
    for option in leaf.options:
        names = "|".join(option.names)
        if option.metavar is None or option.values is None:
            continue
        if option.metavar.startswith("["):  # a value may follow, or the next flag
            arms.append(f"{names}) [[ $cur == -* ]] || {{ {_reply(option.values)}; return; }} ;;")
        else:
            arms.append(f"{names}) {_reply(option.values)}; return ;;")
    # A value only the user knows (a port, a URL, a token): offer nothing rather than flags.
    typed = [name for option in leaf.options if option.metavar and option.values is None
             for name in option.names]
    if typed:
        arms.append(f"{'|'.join(typed)}) return ;;")
    if arms:
        yield "            case $prev in"
        yield from (f"                {arm}" for arm in arms)
        yield "            esac"
    flags = [name for option in leaf.options for name in option.names]
    if "FILE" in leaf.positionals:
        yield f'            [[ $cur == -* ]] || {{ {_reply("file")}; return; }}'
    yield f"            {_reply(tuple(flags))}"
    yield "            ;;"


def script() -> str:
    """The completion script for bash."""
    found = leaves()
    groups: dict[str, list[str]] = {}
    for leaf in found:
        if len(leaf.words) == 2:
            groups.setdefault(leaf.words[0], []).append(leaf.words[1])
    lines = [
        "# bash completion for wstunnel(1): its commands, flags and the values they take.",
        "# Generated by `python -m wstunnel.completion` from the program's own argument parsers;",
        "# do not edit (the Debian package writes it at build time).",
        "",
        "_wstunnel()",
        "{",
        "    local cur=${COMP_WORDS[COMP_CWORD]} prev=",
        "    ((COMP_CWORD > 0)) && prev=${COMP_WORDS[COMP_CWORD-1]}",
        '    # "--name=value": bash hands the "=" over as a word of its own.',
        "    if [[ $cur == = ]]; then",
        "        cur=",
        "    elif [[ $prev == = ]] && ((COMP_CWORD > 1)); then",
        "        prev=${COMP_WORDS[COMP_CWORD-2]}",
        "    fi",
        "    COMPREPLY=()",
        "    if ((COMP_CWORD == 1)); then",
        f"        {_reply(COMMANDS)}",
        "        return",
        "    fi",
        "    local command=${COMP_WORDS[1]}",
        "    case $command in",
    ]
    for command, actions in groups.items():
        lines += [
            f"        {command})",
            "            if ((COMP_CWORD == 2)); then",
            f"                {_reply(tuple(actions))}",
            "                return",
            "            fi",
            '            command="$command ${COMP_WORDS[2]}"',
            "            ;;",
        ]
    lines += ["    esac", "    case $command in"]
    for leaf in found:
        lines += list(_leaf_case(leaf))
    lines += ["    esac", "}", "", "complete -F _wstunnel wstunnel", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in ([], ["bash"]):
        print("usage: python -m wstunnel.completion [bash]", file=sys.stderr)
        return 2
    sys.stdout.write(script())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
