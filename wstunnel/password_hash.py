"""The console's admin password, kept as a scrypt hash: made by ``wstunnel admin passwd``, checked
by the server.

scrypt comes with the standard library (``hashlib.scrypt``, OpenSSL's) and is memory-hard, so a
stolen configuration file is expensive to attack offline: each guess costs what a login costs,
128 MiB and a few tenths of a second of one core with the parameters below (OWASP's minimum for
scrypt: N = 2^17, r = 8, p = 1). The server checks at most one password at a time, off its event
loop, and the failure brake bounds how often one address may try.

The stored form names its parameters, so stronger ones can come later without breaking old
hashes: ``scrypt$ln=17,r=8,p=1$<salt, base64>$<hash, base64>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

SCHEME = "scrypt"
LOG2_N = 17
BLOCK_SIZE = 8
PARALLELISM = 1
SALT_BYTES = 16
HASH_BYTES = 32
# Parameters a hash may name: enough for the future, not enough for a configuration file to make
# the server spend gigabytes or minutes on one login.
MAX_LOG2_N = 20
MAX_BLOCK_SIZE = 16
MAX_PARALLELISM = 4
_FORM = re.compile(r"scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)")


@dataclass(frozen=True)
class PasswordHash:
    log2_n: int
    block_size: int
    parallelism: int
    salt: bytes
    digest: bytes

    def __str__(self) -> str:
        salt = base64.b64encode(self.salt).decode()
        digest = base64.b64encode(self.digest).decode()
        return (f"{SCHEME}$ln={self.log2_n},r={self.block_size},p={self.parallelism}"
                f"${salt}${digest}")

    def derive(self, password: str) -> bytes:
        n, r, p = 1 << self.log2_n, self.block_size, self.parallelism
        # OpenSSL refuses anything over maxmem (32 MiB unless told): 128 * N * r, plus room.
        return hashlib.scrypt(password.encode(), salt=self.salt, n=n, r=r, p=p,
                              maxmem=128 * n * r * p + 2**20, dklen=len(self.digest))

    def matches(self, password: str) -> bool:
        """Whether ``password`` is the one hashed; the comparison takes the same time whatever
        the bytes (and the derivation the same time whatever the password)."""
        return hmac.compare_digest(self.derive(password), self.digest)


def hash_password(password: str, *, log2_n: int = LOG2_N) -> PasswordHash:
    """A new hash of ``password`` with a fresh random salt."""
    blank = PasswordHash(log2_n, BLOCK_SIZE, PARALLELISM, secrets.token_bytes(SALT_BYTES),
                         bytes(HASH_BYTES))
    return PasswordHash(log2_n, BLOCK_SIZE, PARALLELISM, blank.salt, blank.derive(password))


def parse_password_hash(text: str) -> PasswordHash:
    """The stored form read back; ValueError, which never repeats the text, if it is not one."""
    found = _FORM.fullmatch(text.strip())
    if found is None:
        raise ValueError("is not a password hash (scrypt$ln=..,r=..,p=..$salt$hash); "
                         "write it with `wstunnel admin passwd`, never the password itself")
    log2_n, block_size, parallelism = (int(found.group(i)) for i in (1, 2, 3))
    if not (10 <= log2_n <= MAX_LOG2_N and 1 <= block_size <= MAX_BLOCK_SIZE
            and 1 <= parallelism <= MAX_PARALLELISM):
        raise ValueError(f"names scrypt parameters out of range (ln 10..{MAX_LOG2_N}, "
                         f"r 1..{MAX_BLOCK_SIZE}, p 1..{MAX_PARALLELISM})")
    try:
        salt = base64.b64decode(found.group(4), validate=True)
        digest = base64.b64decode(found.group(5), validate=True)
    except binascii.Error:
        raise ValueError("is not a password hash: bad base64 in its salt or hash") from None
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("is not a password hash: its salt or hash is too short")
    return PasswordHash(log2_n, block_size, parallelism, salt, digest)


def check_password_hash(text: str) -> None:
    """ValueError if ``text`` is not a stored password hash (config validation)."""
    parse_password_hash(text)
