"""Host routing's settings, checked: the domains, the names that stand for tokens, and the HTTP
Basic credentials of named hosts, kept as scrypt hashes.

Shared by the settings (``wstunnel.config`` validates with it), the server (which routes with
it, ``wstunnel.server.hosts``) and ``wstunnel token credential`` (which makes the hashes).

A credential is ``user:scrypt$LN$R$P$SALT$HASH``: scrypt with N = 2**LN, block size R and
parallelism P, salt and hash in unpadded URL-safe base64. No comma and no colon after the user's,
so a list of them fits a flag (``name=user:hash,...``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

# A DNS label as browsers send it in Host: lowercase letters, digits and inner hyphens.
LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Hashing: 16 MiB and about 50 ms per check, once per new set of credentials (srv remembers
# those it has verified). Accepted bounds keep a hostile config from asking for gigabytes.
DEFAULT_LN, DEFAULT_R, DEFAULT_P = 14, 8, 1
MAX_LN, MAX_R, MAX_P = 17, 16, 4
SALT_BYTES = 16
HASH_BYTES = 32
SCHEME = "scrypt"


def normalise_domain(value: str) -> str:
    """``*.Tunnel.Example.com.`` -> ``tunnel.example.com``; ValueError if not a host name."""
    domain = value.strip().lower().removeprefix("*.").strip(".")
    labels = domain.split(".")
    if not domain or len(domain) > 253 or not all(LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{value!r} is not a domain name (labels of a-z, 0-9 and -)")
    return domain


def check_label(name: str, what: str) -> str:
    if not LABEL.fullmatch(name):
        raise ValueError(f"{what} {name!r} is not a lowercase DNS label (a-z, 0-9, inner -, "
                         "at most 63 characters)")
    return name


@dataclass(frozen=True, slots=True)
class Credential:
    """One user's HTTP Basic credentials for a named host, as a hash."""

    user: bytes
    log2_n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> Credential:
        """``user:scrypt$LN$R$P$SALT$HASH``; ValueError saying what is wrong (never the hash)."""
        user, colon, hashed = text.partition(":")
        if not colon or not user:
            raise ValueError("is not user:hash")
        fields = hashed.split("$")
        if len(fields) != 6 or fields[0] != SCHEME:
            raise ValueError(f"user {user!r}: the hash is not {SCHEME}$LN$R$P$SALT$HASH "
                             "(make one with `wstunnel token credential`)")
        try:
            log2_n, r, p = int(fields[1]), int(fields[2]), int(fields[3])
            salt, digest = _b64decode(fields[4]), _b64decode(fields[5])
        except (ValueError, binascii.Error):
            raise ValueError(f"user {user!r}: the hash has a malformed field") from None
        if not (10 <= log2_n <= MAX_LN and 1 <= r <= MAX_R and 1 <= p <= MAX_P):
            raise ValueError(f"user {user!r}: scrypt parameters out of bounds "
                             f"(LN 10..{MAX_LN}, R 1..{MAX_R}, P 1..{MAX_P})")
        if len(salt) < 8 or len(digest) < 16:
            raise ValueError(f"user {user!r}: salt or hash too short")
        return cls(user.encode(), log2_n, r, p, salt, digest)

    @classmethod
    def make(cls, user: str, password: str) -> str:
        """A new credential line for ``user`` (a fresh salt each time)."""
        if not user or ":" in user:
            raise ValueError("the user name must be non-empty and hold no ':'")
        salt = secrets.token_bytes(SALT_BYTES)
        digest = _scrypt(password.encode(), salt, DEFAULT_LN, DEFAULT_R, DEFAULT_P, HASH_BYTES)
        return (f"{user}:{SCHEME}${DEFAULT_LN}${DEFAULT_R}${DEFAULT_P}$"
                f"{_b64encode(salt)}${_b64encode(digest)}")

    def matches(self, user: bytes, password: bytes) -> bool:
        """Slow on purpose (scrypt): run it in a worker thread."""
        computed = _scrypt(password, self.salt, self.log2_n, self.r, self.p, len(self.digest))
        return hmac.compare_digest(user, self.user) & hmac.compare_digest(computed, self.digest)


def _scrypt(password: bytes, salt: bytes, log2_n: int, r: int, p: int, size: int) -> bytes:
    memory = 128 * r * (2 ** log2_n) * (p + 1) + 1024 * 1024
    return hashlib.scrypt(password, salt=salt, n=2 ** log2_n, r=r, p=p, dklen=size, maxmem=memory)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_host_names(value: str) -> dict[str, str]:
    """``name=token,name=token`` as a dict; ValueError naming the entry, never its token."""
    names: dict[str, str] = {}
    for index, item in enumerate(value.split(","), start=1):
        if not item.strip():
            continue
        name, equals, token = (part.strip() for part in item.partition("="))
        if not equals or not name or not token:
            raise ValueError(f"entry {index} is not name=token")
        if name in names:
            raise ValueError(f"entry {index}: the name {name!r} comes twice")
        names[name] = token
    return names


def parse_credentials(entries: list[str]) -> dict[str, list[Credential]]:
    """``name=user:hash`` entries, by name; ValueError naming the entry."""
    found: dict[str, list[Credential]] = {}
    for index, entry in enumerate(entries, start=1):
        name, equals, credential = (part.strip() for part in entry.partition("="))
        if not equals or not name:
            raise ValueError(f"entry {index} is not name=user:hash")
        try:
            found.setdefault(name, []).append(Credential.parse(credential))
        except ValueError as exc:
            raise ValueError(f"entry {index} ({name}): {exc}") from None
    return found
