"""Tokens an operator blocked from the console, kept across restarts in the server's state file.

A blocked token's tunnels are closed and refused (403 at the handshake), and every request for it
gets 403 (``wstunnel.server.admission`` and ``wstunnel.server.forwarding`` ask here).

No token is stored, whole or hashed plainly: an entry holds the token's 8-character prefix (for
people) and a keyed fingerprint, HMAC-SHA256 under a random key kept in this file alone (mode
0600), so that the console's JSON, where the fingerprint is a tunnel's ``id``, does not let
anyone test guesses of a token offline.

The file (``state_file``, ``/var/lib/wstunnel/wstunsrv-state.json`` by default, the unit's
``StateDirectory=``) is replaced atomically: written whole to a temporary file beside it, flushed
to disk, then renamed over the old one, so a crash leaves the old list or the new one, never half
of one. A file that cannot be read at start stops the server (exit 78), naming it: starting with
an empty list would silently unblock every token.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

from wstunnel.errors import ConfigError
from wstunnel.tokens import Token

FORMAT_VERSION = 1
FINGERPRINT_HEX = 32  # 128 bits of HMAC-SHA256: unique among any number of tokens


@dataclass(frozen=True)
class BlockedToken:
    id: str  # the token's fingerprint
    token: str  # its prefix form, "abcdefgh..."
    since: str  # RFC 3339, UTC
    by: str  # who blocked it: address and how the console let them in


class Blocklist:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._key = secrets.token_bytes(32)
        self._entries: dict[str, BlockedToken] = {}
        self._saving = trio.Lock()

    @classmethod
    def load(cls, path: Path) -> Blocklist:
        """The list in ``path``; an empty one if the file does not exist yet."""
        blocklist = cls(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return blocklist
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the state file: {exc.strerror}") from None
        try:
            blocklist._read(json.loads(text))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path}: not a wstunnel state file ({exc}); fix or remove it "
                              "(removing it unblocks every token)") from None
        return blocklist

    def _read(self, document: Any) -> None:
        version = document.get("version")
        if version != FORMAT_VERSION:
            raise ValueError(f"unknown format version {version!r}")
        self._key = bytes.fromhex(document["key"])
        for item in document["blocked"]:
            entry = BlockedToken(id=str(item["id"]), token=str(item["token"]),
                                 since=str(item["since"]), by=str(item["by"]))
            self._entries[entry.id] = entry

    def __len__(self) -> int:
        return len(self._entries)

    def fingerprint(self, token: Token) -> str:
        secret = token.reveal().encode("utf-8", "surrogateescape")
        return hmac.new(self._key, secret, hashlib.sha256).hexdigest()[:FINGERPRINT_HEX]

    def blocks(self, token: Token) -> bool:
        """Whether ``token`` is blocked. Free while nothing is blocked; else one HMAC."""
        return bool(self._entries) and self.fingerprint(token) in self._entries

    def entries(self) -> list[BlockedToken]:
        return list(self._entries.values())

    def get(self, fingerprint: str) -> BlockedToken | None:
        return self._entries.get(fingerprint)

    async def block(self, token: Token, by: str) -> BlockedToken:
        """Block ``token`` and save the list; OSError (nothing changed) if it cannot be saved."""
        entry = BlockedToken(id=self.fingerprint(token), token=str(token),
                             since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), by=by)
        await self._change({**self._entries, entry.id: entry})
        return entry

    async def unblock(self, fingerprint: str) -> BlockedToken | None:
        """Unblock and save; the entry removed, or None if it was not blocked."""
        entry = self._entries.get(fingerprint)
        if entry is not None:
            await self._change({k: v for k, v in self._entries.items() if k != fingerprint})
        return entry

    async def _change(self, entries: dict[str, BlockedToken]) -> None:
        async with self._saving:  # one writer at a time, each with the list of its turn
            document = self._document(entries)
            await trio.to_thread.run_sync(write_atomically, self.path, document)
            self._entries = entries

    def _document(self, entries: dict[str, BlockedToken]) -> bytes:
        document: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "key": self._key.hex(),
            "blocked": [asdict(entry) for entry in entries.values()],
        }
        return (json.dumps(document, indent=2) + "\n").encode()


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` whole (mode 0600): a temporary file in the same directory,
    fsync, rename, fsync of the directory. OSError if any step fails; ``path`` is then as it was."""
    directory = path.parent
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_fd)  # the rename itself reaches the disk
    finally:
        os.close(directory_fd)
