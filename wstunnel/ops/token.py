"""``wstunnel token new NAME``: a fresh token and the client file ``wstuncli@NAME`` reads;
``wstunnel token credential NAME USER``: an HTTP Basic credential for a named host (host routing).

The file is ``CONFIG_DIR/NAME.toml``, mode 0640, owner root:wstunnel, so the unit's user can read
the token and nobody else can. It is written to a temporary file (mode and owner set before any
content goes in) and hard-linked into place: atomic like a rename, but unlike a rename it fails if
the name exists, so an existing tunnel's token is never replaced, even by a concurrent run.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import grp
import os
import re
import secrets
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import tomli_w
from pydantic import ValidationError

from wstunnel.config import ClientSettings
from wstunnel.hostnames import Credential, check_label
from wstunnel.ops.common import EX_USAGE, CommandLine, OpsError, parser

CONFIG_DIR = Path("/etc/wstunnel/wstuncli.d")
DEFAULT_GROUP = "wstunnel"
FILE_MODE = 0o640
TOKEN_BYTES = 32  # 256 bits; token_urlsafe makes 43 characters of [A-Za-z0-9_-]
UNIT = "wstuncli@{name}.service"
# A systemd instance name that needs no escaping and is a plain file name: no slash, and not
# starting with "." (hidden, or "..") or "-" (read as an option by systemctl and others).
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Unit names are at most 255 characters.
MAX_NAME = 255 - len(UNIT.format(name=""))


def command_line() -> CommandLine:
    top = parser("wstunnel token", "Make tunnel tokens, and credentials for named hosts.")
    commands = top.add_subparsers(dest="action", metavar="new|credential", required=True)
    new = commands.add_parser("new", add_help=False, allow_abbrev=False,
                              help="make a token and the client file wstuncli@NAME reads")
    new.add_argument("-h", "-help", "--help", action="help", help="show the flags and exit")
    new.add_argument("name", metavar="NAME", help="tunnel name: systemctl start wstuncli@NAME")
    new.add_argument("-tunnel", "--tunnel", required=True, help="tunnel server URL, ws:// or wss://")
    new.add_argument("-server", "--server", help="default backend URL, http:// or https://")
    new.add_argument("-regexp", "--regexp", help="X-Host values allowed (whole-value match)")
    new.add_argument("-config-dir", "--config-dir", type=Path, default=CONFIG_DIR,
                     help=f"where client files go (default {CONFIG_DIR})")
    new.add_argument("-group", "--group", default=DEFAULT_GROUP,
                     help=f"group that may read the file (default {DEFAULT_GROUP})")
    new.add_argument("-host-label", "--host-label", action="store_true",
                     help="a token that is also a DNS label (lowercase, 52 characters), for "
                          "host routing's https://<token>.<domain>/")
    credential = commands.add_parser(
        "credential", add_help=False, allow_abbrev=False,
        help="hash a password (read from stdin) for host_credentials")
    credential.add_argument("-h", "-help", "--help", action="help", help="show the flags and exit")
    credential.add_argument("host", metavar="NAME", help="the host_names entry it protects")
    credential.add_argument("user", metavar="USER", help="the user name browsers send")
    return CommandLine(top, {"new": new, "credential": credential})


def main(argv: list[str]) -> int:
    args = command_line().parser.parse_args(argv)
    if args.action == "credential":
        return new_credential(args.host, args.user)
    return new_tunnel(args.name, tunnel=args.tunnel, server=args.server, regexp=args.regexp,
                      config_dir=args.config_dir, group=args.group, host_label=args.host_label)


def new_credential(host: str, user: str) -> int:
    """Print ``NAME=USER:scrypt$...``, a host_credentials entry, for the password on stdin (or
    asked for on the terminal): the password itself is never an argument, which ps would show."""
    try:
        check_label(host, "the name")
    except ValueError as exc:
        raise OpsError(str(exc), EX_USAGE) from None
    password = getpass.getpass(f"Password for {user}: ") if sys.stdin.isatty() \
        else sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise OpsError("the password is empty", EX_USAGE)
    try:
        line = f"{host}={Credential.make(user, password)}"
    except ValueError as exc:
        raise OpsError(str(exc), EX_USAGE) from None
    print(line)
    return 0


def new_tunnel(name: str, *, tunnel: str, server: str | None, regexp: str | None,
               config_dir: Path, group: str, host_label: bool = False) -> int:
    check_name(name)
    token = new_host_label_token() if host_label else new_token()
    settings = validated(token=token, tunnel=tunnel, server=server, regexp=regexp)
    path = config_dir / f"{name}.toml"
    if not config_dir.is_dir():
        raise OpsError(f"{config_dir}: no such directory (is wstunnel installed?)")
    if path.exists() or path.is_symlink():
        raise OpsError(f"{path} exists; not overwritten (remove it first to replace its token)")
    gid = group_id(group)
    owner = write_new_file(path, render(name, settings), gid=gid)
    # The one place the whole token is shown: the operator learns it here, to give it to whoever
    # sends requests through the tunnel. It goes to stdout only, never to a log line.
    curl = shlex.join(["curl", "-H", f"X-Token: {token}", http_url(settings.tunnel)])
    print(f"Wrote {path} (mode {FILE_MODE:04o}, owner {owner}).")
    print("Start the tunnel, and have it start at boot:")
    print(f"  systemctl start {UNIT.format(name=name).removesuffix('.service')}")
    print(f"  systemctl enable {UNIT.format(name=name).removesuffix('.service')}")
    print("Reach the backend through the server:")
    print(f"  {curl}")
    return 0


def check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise OpsError(
            f"bad tunnel name {name!r}: use letters, digits, '_', '.' and '-' "
            "(not first: '.' or '-'), as in wstuncli@NAME",
            EX_USAGE,
        )
    if len(name) > MAX_NAME:
        raise OpsError(f"tunnel name longer than {MAX_NAME} characters", EX_USAGE)


def group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise OpsError(
            f"group {group!r} does not exist: create it (groupadd --system {group}) "
            "or pass --group with the group the client runs as"
        ) from None


def new_token() -> str:
    while True:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        # A leading '-' reads as a flag to many tools an operator may paste the token into.
        if not token.startswith("-"):
            return token


def new_host_label_token() -> str:
    """256 bits as 52 lowercase base32 characters: a DNS label, which browsers send unchanged in
    Host (they lowercase it), so the token works as https://<token>.<domain>/."""
    return base64.b32encode(secrets.token_bytes(TOKEN_BYTES)).decode().rstrip("=").lower()


def validated(*, token: str, tunnel: str, server: str | None, regexp: str | None) -> ClientSettings:
    """The file's settings through the client's own model, so the client will accept the file."""
    values: dict[str, Any] = {"token": token, "tunnel": tunnel}
    if server is not None:
        values["server"] = server
    if regexp is not None:
        values["regexp"] = regexp
    try:
        return ClientSettings(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = f"--{error['loc'][0]}" if error["loc"] else "--server or --regexp"
        message = str(error["msg"]).removeprefix("Value error, ")
        raise OpsError(f"{where}: {message}", EX_USAGE) from None


def render(name: str, settings: ClientSettings) -> bytes:
    values: dict[str, Any] = {"token": settings.token.get_secret_value(), "tunnel": settings.tunnel}
    if settings.server is not None:
        values["server"] = settings.server
    if settings.regexp is not None:
        values["regexp"] = settings.regexp
    header = (
        f"# wstunnel client for wstuncli@{name}, written by `wstunnel token new`.\n"
        "# Holds the tunnel's token: keep it mode 0640, owner root:wstunnel.\n"
        "# Every setting of `wstunnel cli -help` can go here (see example.toml.sample).\n"
    )
    return header.encode() + tomli_w.dumps(values).encode()


def write_new_file(path: Path, content: bytes, *, gid: int) -> str:
    """Create ``path`` with ``content``, or fail if it exists; returns the owner it got."""
    as_root = os.geteuid() == 0
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as file:
            # Mode and owner before content: the token is never readable by anyone else.
            os.fchmod(file.fileno(), FILE_MODE)
            if as_root:
                os.fchown(file.fileno(), 0, gid)
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            raise OpsError(f"{path} exists; not overwritten") from None
    finally:
        temp.unlink(missing_ok=True)
    _sync_directory(path.parent)
    if as_root:
        return f"root:{grp.getgrgid(gid).gr_name}"
    stat = path.stat()
    print(f"wstunnel token: not running as root, so {path} is left owned by uid {stat.st_uid}; "
          f"as root: chown root:{grp.getgrgid(gid).gr_name} {shlex.quote(str(path))}", file=sys.stderr)
    return f"uid {stat.st_uid}, gid {stat.st_gid}"


def _sync_directory(directory: Path) -> None:
    # The new name survives a crash only once the directory itself is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def http_url(tunnel: str) -> str:
    """The server's HTTP address for the tunnel URL: same host, port and path, http(s)."""
    parts = urlsplit(tunnel)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/", "", ""))
