"""``wstunnel config check [FILE]``: validate a file as the daemon would, print what it would run.

The file is read through :func:`wstunnel.config.load_settings`, the daemons' own loader, so the
check accepts and refuses exactly what ``wstunnel srv``/``cli -config FILE`` would, and fails the
same way: exit 78 with a line naming the file and the key. The effective configuration (file over
built-in defaults) is printed as TOML with the secrets redacted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import tomli_w

from wstunnel.config import ClientSettings, ServerSettings, Settings, load_settings
from wstunnel.errors import ConfigError
from wstunnel.ops.common import CommandLine, parser
from wstunnel.tokens import redact

SERVER_FILE = Path("/etc/wstunnel/wstunsrv.toml")
CLIENT_DIRECTORY = "wstuncli.d"


def command_line() -> CommandLine:
    top = parser("wstunnel config", "Check configuration files.")
    commands = top.add_subparsers(dest="action", metavar="check", required=True)
    check = commands.add_parser("check", add_help=False, allow_abbrev=False,
                                help="validate a file and print the effective configuration")
    check.add_argument("-h", "-help", "--help", action="help", help="show the flags and exit")
    check.add_argument("file", metavar="FILE", nargs="?", type=Path, default=SERVER_FILE,
                       help=f"file to check (default {SERVER_FILE})")
    kind = check.add_mutually_exclusive_group()
    kind.add_argument("-client", "--client", dest="kind", action="store_const", const="client",
                      help=f"a client file (the default for files in {CLIENT_DIRECTORY}/)")
    kind.add_argument("-server", "--server", dest="kind", action="store_const", const="server",
                      help="a server file (the default elsewhere)")
    return CommandLine(top, {"check": check})


def main(argv: list[str]) -> int:
    args = command_line().parser.parse_args(argv)
    path: Path = args.file
    kind_name = args.kind or ("client" if path.parent.name == CLIENT_DIRECTORY else "server")
    settings: ServerSettings | ClientSettings = (
        check_file(path, ClientSettings) if kind_name == "client" else check_file(path, ServerSettings)
    )
    print(f"# {path}: effective {kind_name} configuration (secrets redacted)")
    print(render(settings), end="")
    return 0


def check_file(path: Path, model: type[Settings]) -> Settings:
    try:
        with _without_environment(model.model_config.get("env_prefix", "")):
            return load_settings(model, {"config": str(path)})
    except ConfigError as exc:
        # Errors not tied to a key (a missing setting, server-or-regexp) still name the file.
        lines = [line if line.startswith(str(path)) else f"{path}: {line}"
                 for line in str(exc).splitlines()]
        raise ConfigError("\n".join(lines)) from None


@contextlib.contextmanager
def _without_environment(prefix: str) -> Iterator[None]:
    """Hide ``WSTUNSRV_*``/``WSTUNCLI_*`` while loading.

    The unit runs the daemon without them, so the check is of the file alone: a variable left in
    the operator's shell must neither hide a bad value nor fill in a missing one.
    """
    hidden = {name: os.environ.pop(name) for name in list(os.environ)
              if name.upper().startswith(prefix.upper())}
    try:
        yield
    finally:
        os.environ.update(hidden)


def render(settings: ServerSettings | ClientSettings) -> str:
    values: dict[str, Any] = settings.model_dump(mode="json", exclude={"config"})
    if isinstance(settings, ServerSettings):
        values["allowed_tokens"] = [redact(t.get_secret_value()) for t in settings.allowed_tokens]
        values["host_names"] = {name: redact(token.get_secret_value())
                                for name, token in settings.host_names.items()}
    if isinstance(settings, ClientSettings):
        values["token"] = redact(settings.token.get_secret_value())
        if settings.proxy:
            values["proxy"] = _without_password(settings.proxy)
    # TOML has no null: a setting left unset is simply absent, as in the file.
    return tomli_w.dumps({key: value for key, value in values.items() if value is not None})


def _without_password(url: str) -> str:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
