"""The daemons' command lines, read as the original WStunnel's Go flag package read them.

One flag per setting (``wstunnel.config``'s models), both ``-name`` and ``--name``, with dashes
for the setting's underscores: ``-port 8080``, ``-port=8080``, ``--port 8080``. Values stay the
strings they were given: the settings models check them, with the file's and the environment's.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from pydantic_settings import BaseSettings

__all__ = ["FlagParser", "add_flags", "flag_name", "parse_flags"]


def flag_name(field: str) -> str:
    return field.replace("_", "-")


class FlagParser(argparse.ArgumentParser):
    """The daemons' flags, read as Go's flag package reads them.

    No abbreviations, ``-help`` as well as ``-h``, and a flag that takes a value takes the next
    argument whatever it looks like (see parse_flags). Which flags take one is kept here, as
    add_flags declares them: argparse has no public list of its own.
    """

    def __init__(self, prog: str) -> None:
        # add_help=False: argparse's own -h would read -help as -h with a stray "elp".
        super().__init__(prog=prog, allow_abbrev=False, add_help=False)
        self.add_argument("-h", "-help", "--help", action="help", help="show the flags and exit")
        self.value_flags: set[str] = set()


def add_flags(parser: FlagParser, model: type[BaseSettings]) -> None:
    """One flag per setting, both ``-name`` and ``--name``; values stay strings for pydantic."""
    for name, info in model.model_fields.items():
        flag = flag_name(name)
        options = (f"-{flag}", f"--{flag}")
        help_text = info.description or ""
        if info.annotation is bool:
            # Go's flag package: -insecure alone means true, -insecure=false is allowed, and a
            # boolean never takes the next argument as its value.
            parser.add_argument(
                *options, dest=name, nargs="?", const="true",
                default=None, metavar="BOOL", help=help_text,
            )
        else:
            parser.add_argument(
                *options, dest=name, default=None,
                metavar=flag.upper().replace("-", "_"), help=help_text,
            )
            parser.value_flags.update(options)


def _join_flag_values(value_flags: set[str], argv: Sequence[str]) -> list[str]:
    """``-flag value`` pairs as ``-flag=value`` for every flag that takes a value.

    Go's flag package hands such a flag the next argument whatever it looks like, so the
    original takes ``-token -s3cr3t...``; argparse would read ``-s3cr3t...`` as a flag of its own
    and refuse the command line. Boolean flags never take a separate value in Go.
    """
    joined: list[str] = []
    items = iter(argv)
    for item in items:
        if item == "--":
            joined += [item, *items]
            break
        value = next(items, None) if item in value_flags else None
        joined.append(item if value is None else f"{item}={value}")
    return joined


def parse_flags(parser: FlagParser, argv: Sequence[str]) -> dict[str, Any]:
    """The flags given in ``argv``, by setting name, as strings; exits 2 on a usage error."""
    namespace = parser.parse_args(_join_flag_values(parser.value_flags, argv))
    return {key: value for key, value in vars(namespace).items() if value is not None}
