"""``wstunnel admin passwd [FILE]``: set the console's password, as a scrypt hash in the server's
configuration file (``admin_password``), for remote access to ``/_admin/``.

The password is read from the terminal twice (or one line from standard input with ``-stdin``,
for scripts) and never written anywhere: only its hash goes into the file. The file is edited in
place, comments and all: an ``admin_password`` line is replaced, else the key goes below its
commented sample, else at the end (before any table). The new text is checked to parse and the
file replaced atomically. A file holding a password hash is a secret like one holding tokens: it
loses any permission for other users (and goes to the ``wstunnel`` group when run as root, so
the daemon can still read it). ``systemctl reload wstunsrv`` then applies it.
"""

from __future__ import annotations

import contextlib
import getpass
import grp
import os
import re
import stat
import sys
import tomllib
from pathlib import Path

from wstunnel.ops.common import EX_USAGE, CommandLine, OpsError, parser
from wstunnel.password_hash import hash_password

SERVER_FILE = Path("/etc/wstunnel/wstunsrv.toml")
KEY = "admin_password"
MIN_LENGTH = 12
DAEMON_GROUP = "wstunnel"
_ACTIVE = re.compile(rf"^[ \t]*{KEY}[ \t]*=.*$", re.MULTILINE)
_SAMPLE = re.compile(rf"^#[ \t]*{KEY}[ \t]*=.*$", re.MULTILINE)
_TABLE = re.compile(r"^[ \t]*\[", re.MULTILINE)


def command_line() -> CommandLine:
    top = parser("wstunnel admin", "Manage the operator's console (/_admin/).")
    commands = top.add_subparsers(dest="action", metavar="passwd", required=True)
    passwd = commands.add_parser("passwd", add_help=False, allow_abbrev=False,
                                 help="set the console's password (stored as a hash)")
    passwd.add_argument("-h", "-help", "--help", action="help", help="show the flags and exit")
    passwd.add_argument("file", metavar="FILE", nargs="?", type=Path, default=SERVER_FILE,
                        help=f"the server's configuration file (default {SERVER_FILE})")
    passwd.add_argument("-stdin", "--stdin", action="store_true",
                        help="read the password from one line of standard input")
    return CommandLine(top, {"passwd": passwd})


def main(argv: list[str]) -> int:
    args = command_line().parser.parse_args(argv)
    path: Path = args.file
    password = _read_password(args.stdin)
    text = _current_text(path)
    updated = with_password_hash(text, str(hash_password(password)))
    try:
        tomllib.loads(updated)
    except tomllib.TOMLDecodeError as exc:
        raise OpsError(f"{path}: is not valid TOML, left unchanged: {exc}") from None
    note = _write(path, updated)
    print(f"Set {KEY} in {path}{note}. Apply it with: systemctl reload wstunsrv")
    return 0


def with_password_hash(text: str, hashed: str) -> str:
    """``text`` with ``admin_password`` set to ``hashed``, comments and layout kept."""
    line = f'{KEY} = "{hashed}"'
    if _ACTIVE.search(text):
        return _ACTIVE.sub(lambda _: line, text, count=1)
    sample = _SAMPLE.search(text)
    if sample is not None:
        return text[: sample.end()] + "\n" + line + text[sample.end():]
    block = f"\n# Hash of the console's password (wstunnel admin passwd).\n{line}\n"
    table = _TABLE.search(text)
    if table is not None:  # keys after a [table] header would belong to that table
        return text[: table.start()] + block.lstrip("\n") + "\n" + text[table.start():]
    return text + ("" if text.endswith("\n") or not text else "\n") + block


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        try:
            password = getpass.getpass("New console password: ")
            again = getpass.getpass("Again: ")
        except (EOFError, KeyboardInterrupt):
            raise OpsError("no password given", EX_USAGE) from None
        if password != again:
            raise OpsError("the two passwords differ; nothing changed", EX_USAGE)
    if len(password) < MIN_LENGTH:
        raise OpsError(f"the password must be at least {MIN_LENGTH} characters", EX_USAGE)
    return password


def _current_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OpsError(f"{path}: no such file (give the server's configuration file)") from None
    except OSError as exc:
        raise OpsError(f"{path}: cannot read: {exc.strerror}") from None


def _write(path: Path, text: str) -> str:
    """Replace ``path`` atomically with ``text``, private to owner and group; a note on any
    permission change."""
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode) & ~0o007 | 0o040  # no one else; the group reads
    gid = info.st_gid
    if os.geteuid() == 0:
        with contextlib.suppress(KeyError):
            gid = grp.getgrnam(DAEMON_GROUP).gr_gid
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if gid != info.st_gid or info.st_uid != os.geteuid():
            os.chown(temporary, info.st_uid, gid)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise OpsError(f"{path}: cannot write: {exc.strerror}") from None
    changes = []
    if mode != stat.S_IMODE(info.st_mode):
        changes.append(f"mode {stat.S_IMODE(info.st_mode):04o} -> {mode:04o}")
    if gid != info.st_gid:
        changes.append(f"group -> {DAEMON_GROUP}")
    return f" ({', '.join(changes)}: it holds a secret now)" if changes else ""
