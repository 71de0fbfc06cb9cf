"""Bash completion for ``wstunnel`` (wstunnel.completion): drawn from the real parsers, run in bash.

The script is checked two ways: against the program (every flag a parser accepts is offered,
and every word offered is one the program accepts), and in a real bash, where ``_wstunnel`` is
called as readline would call it (``COMP_WORDS``, ``COMP_CWORD``) and its ``COMPREPLY`` read back.
That the Debian package installs it where bash-completion finds it is tested in test_deb.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wstunnel import commands
from wstunnel.completion import Leaf, leaves, script
from wstunnel.config import ClientSettings, ServerSettings
from wstunnel.flags import flag_name
from wstunnel.ops import admin, configcheck, status, token

BASH = shutil.which("bash") or "/bin/bash"
HELP = {"-h", "-help", "--help"}
# What each helper needs besides the flag under test, so that its parser gets to the flag.
REQUIRED = {("token", "new"): ["demo", "-tunnel", "ws://tunnel.example"]}


@pytest.fixture(scope="module")
def completion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "wstunnel"
    path.write_text(script())
    return path


def complete(script_path: Path, line: str, cwd: Path | None = None) -> list[str]:
    """What bash offers for the last word of ``line`` (an empty last word if it ends in a space)."""
    words = line.split(" ")
    # As readline splits it: "=" is a word break of its own.
    split: list[str] = []
    for word in words:
        if "=" in word and word.startswith("-"):
            name, _, value = word.partition("=")
            split += [name, "=", value]
        else:
            split.append(word)
    quoted = " ".join(_bash_quote(word) for word in split)
    program = (f'source {_bash_quote(str(script_path))}\n'
               f"COMP_WORDS=({quoted}); COMP_CWORD={len(split) - 1}\n"
               '_wstunnel; printf "%s\\n" "${COMPREPLY[@]}"\n')
    result = subprocess.run([BASH, "--norc", "--noprofile", "-c", program], capture_output=True,
                            text=True, timeout=30, cwd=cwd, check=False)
    assert result.returncode == 0, result.stderr
    return sorted(line for line in result.stdout.splitlines() if line)


def _bash_quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


def _by_words() -> dict[tuple[str, ...], Leaf]:
    return {leaf.words: leaf for leaf in leaves()}


def _names(leaf: Leaf) -> set[str]:
    return {name for option in leaf.options for name in option.names}


def test_script_is_valid_bash(completion: Path) -> None:
    result = subprocess.run([BASH, "-n", str(completion)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "complete -F _wstunnel wstunnel" in completion.read_text()


def test_module_prints_the_script() -> None:
    printed = subprocess.run([sys.executable, "-m", "wstunnel.completion"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    assert printed == script()


@pytest.mark.parametrize(("words", "model"), [(("srv",), ServerSettings), (("cli",), ClientSettings)])
def test_daemon_flags_are_every_setting(words: tuple[str, ...], model: type) -> None:
    expected = HELP | {f"{dashes}{flag_name(name)}" for name in model.model_fields
                       for dashes in ("-", "--")}
    assert _names(_by_words()[words]) == expected


def test_every_command_of_main_is_offered_and_each_is_real(completion: Path) -> None:
    assert complete(completion, "wstunnel ") == sorted(commands.COMMANDS)
    found = _by_words()
    assert {words[0] for words in found} == set(commands.COMMANDS) - {"version"}
    for words in found:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            commands.main([*words, "-help"])
        assert exited.value.code == 0
        assert out.getvalue().startswith(f"usage: wstunnel {' '.join(words)} "), out.getvalue()


def _parser_for(words: tuple[str, ...]) -> argparse.ArgumentParser:
    """The parser that main() itself uses for ``words``."""
    if words[0] in ("srv", "cli"):
        model = ServerSettings if words[0] == "srv" else ClientSettings
        return commands.daemon_parser(f"wstunnel {words[0]}", model)
    line = {"token": token, "config": configcheck, "status": status,
            "admin": admin}[words[0]].command_line()
    return line.parser


def test_every_offered_flag_is_accepted_by_the_real_parser() -> None:
    for words, leaf in _by_words().items():
        parser = _parser_for(words)
        for option in leaf.options:
            for name in option.names:
                if name in HELP:
                    continue
                argv = [*words[1:], *REQUIRED.get(words, []), name]
                if option.metavar and not option.metavar.startswith("["):
                    argv.append("1")
                _, unknown = parser.parse_known_args(argv)
                assert unknown == [], f"wstunnel {' '.join(words)} does not take {name}"


def test_every_flag_in_each_usage_line_is_offered() -> None:
    """A second reading of the parsers, from their usage lines: nothing the help lists is missed."""
    for words, leaf in _by_words().items():
        parser = _parser_for(words)
        usage = parser.format_usage()
        if len(words) == 2:  # the sub-command's own parser prints its own usage
            out = io.StringIO()
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
                parser.parse_args([words[1], *REQUIRED.get(words, [])[:1], "-help"])
            usage = out.getvalue().split("\n\n")[0]
        flags = set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", usage))
        assert flags, usage
        assert flags <= _names(leaf), f"wstunnel {' '.join(words)}: {sorted(flags - _names(leaf))}"


@pytest.mark.parametrize(("line", "expected"), [
    ("wstunnel s", ["srv", "status"]),
    ("wstunnel to", ["token"]),
    ("wstunnel token ", ["credential", "new"]),
    ("wstunnel config ", ["check"]),
    ("wstunnel srv --po", ["--port"]),
    ("wstunnel srv -po", ["-port"]),
    ("wstunnel cli -log-level ", ["debug", "error", "info", "warning"]),
    ("wstunnel cli --log-level=w", ["warning"]),
    ("wstunnel srv -log-target j", ["journal"]),
    ("wstunnel cli -transport ", ["auto", "longpoll", "websocket"]),
    ("wstunnel cli -insecure ", ["false", "true"]),
    ("wstunnel cli -insecure -tunn", ["-tunnel"]),
    ("wstunnel srv -port ", []),  # a number only the user knows
    ("wstunnel token new demo --tu", ["--tunnel"]),
    ("wstunnel token new demo -tunnel wss://x -con", ["-config-dir"]),
    ("wstunnel status --j", ["--json"]),
    ("wstunnel config check -", ["--client", "--help", "--server", "-client", "-h", "-help", "-server"]),
    ("wstunnel version ", []),
    ("wstunnel bogus -", []),
])
def test_bash_offers(completion: Path, line: str, expected: list[str]) -> None:
    assert complete(completion, line) == expected


def test_file_values_complete_file_names(completion: Path, tmp_path: Path) -> None:
    (tmp_path / "wstunsrv.toml").write_text("")
    (tmp_path / "wstuncli.d").mkdir()
    assert complete(completion, "wstunnel srv -config wst", cwd=tmp_path) == ["wstuncli.d", "wstunsrv.toml"]
    assert complete(completion, "wstunnel config check wstuns", cwd=tmp_path) == ["wstunsrv.toml"]
    assert complete(completion, "wstunnel token new demo -config-dir wst", cwd=tmp_path) == ["wstuncli.d"]
    assert "root" in complete(completion, "wstunnel token new demo -group roo")
