"""What every ops helper shares: its error type, its exit statuses, and its parser's shape."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field

from wstunnel.errors import WStunnelError

EX_USAGE = 2  # what argparse itself exits with on a bad command line
EX_FAILURE = 1


class OpsError(WStunnelError):
    """A helper cannot do what it was asked; the message is one line for the operator."""

    def __init__(self, message: str, exit_code: int = EX_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class CommandLine:
    """A helper's parser, and the parsers of its sub-commands by name (``token new``).

    Each helper builds it in one function that its ``main`` parses with, so that what reads
    the parsers from outside (the shell completion, wstunnel.completion) sees the real ones.
    """

    parser: argparse.ArgumentParser
    actions: Mapping[str, argparse.ArgumentParser] = field(default_factory=dict)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser taking ``-help`` as the daemons do (see commands.daemon_parser)."""
    result = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     add_help=False)
    result.add_argument("-h", "-help", "--help", action="help", help="show the flags and exit")
    return result
