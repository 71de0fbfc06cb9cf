"""Host routing: a request for ``<label>.<domain>`` goes through a tunnel without ``X-Token``.

For browsers, which cannot add ``X-Token``, and web apps that use absolute paths (which a
``/_token/<token>/`` prefix breaks). With ``host_domains`` set, the Host of a request is looked at
first: its first label names the tunnel, and every path of that host (``/_tunnel`` and the
server's own endpoints included) belongs to the app behind it. The label is

- a name of ``host_names``, which the server maps to a token (the secret stays out of the URL,
  the DNS query and the TLS SNI), optionally behind HTTP Basic (``host_credentials``, as scrypt
  hashes; srv checks them, and the backend never sees them); or
- with ``host_tokens`` (the default), the token itself (then a lowercase DNS label).

Cost on the request path: nothing when no domain is configured (the caller checks
:attr:`HostRouting.enabled`), else one header look-up and one set look-up, and one dict look-up
for the label. A password is checked with scrypt once, in a worker thread; credentials that
passed are remembered (by a keyed hash), so a browser's further requests cost one look-up.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import trio

from wstunnel.config import ServerSettings
from wstunnel.headers import parse_basic
from wstunnel.hostnames import Credential, parse_credentials
from wstunnel.tokens import Token

# Verified credentials remembered at most (then forgotten all at once: each costs one check).
MAX_REMEMBERED = 4096
# Password checks at once: each takes ~16 MiB and ~50 ms of a core.
CHECKS_AT_ONCE = 2


@dataclass(frozen=True, slots=True)
class NamedHost:
    name: str
    token: Token
    credentials: tuple[Credential, ...]

    @property
    def realm(self) -> bytes:
        return b'Basic realm="%s", charset="UTF-8"' % self.name.encode()


@dataclass(frozen=True, slots=True)
class HostMatch:
    """A request's Host is ``<label>.<domain>``: the tunnel it is for. ``token`` is None for a
    label that names nothing (when labels are not tokens)."""

    token: Token | None
    named: NamedHost | None = None


class HostRouting:
    def __init__(self, settings: ServerSettings) -> None:
        self.enabled = False
        self._domains: frozenset[bytes] = frozenset()
        self._names: dict[bytes, NamedHost] = {}
        self._labels_are_tokens = True
        self._checks = trio.CapacityLimiter(CHECKS_AT_ONCE)
        self.apply(settings)

    def apply(self, settings: ServerSettings) -> None:
        """Take the domains, names and credentials of new settings (a reload)."""
        credentials = parse_credentials(settings.host_credentials)
        self._domains = frozenset(domain.encode() for domain in settings.host_domains)
        self._names = {
            name.encode(): NamedHost(name, Token(token.get_secret_value()),
                                     tuple(credentials.get(name, ())))
            for name, token in settings.host_names.items()
        }
        self._labels_are_tokens = settings.host_tokens
        # A new key: what was verified under the old credentials is forgotten.
        self._remember_key = secrets.token_bytes(32)
        self._verified: set[bytes] = set()
        self.enabled = bool(self._domains)

    def match(self, host: bytes | None) -> HostMatch | None:
        """The tunnel a request with this Host header is for; None if the Host is not
        ``<label>.<one of host_domains>`` (the request is routed as usual)."""
        if not host:
            return None
        dot = host.find(b".")
        if dot <= 0:
            return None
        rest = host[dot + 1:]
        if rest.endswith(b"]"):
            return None  # an IPv6 literal
        colon = rest.rfind(b":")
        if colon >= 0:
            rest = rest[:colon]
        if rest.lower().rstrip(b".") not in self._domains:
            return None
        label = host[:dot].lower()
        named = self._names.get(label)
        if named is not None:
            return HostMatch(named.token, named)
        if self._labels_are_tokens:
            return HostMatch(Token(label.decode("ascii", "replace")))
        return HostMatch(None)

    async def authorized(self, named: NamedHost, authorization: bytes | None) -> bool:
        """True if ``named`` needs no credentials, or ``authorization`` holds one of them."""
        if not named.credentials:
            return True
        if not authorization:
            return False
        remembered = hashlib.blake2b(named.name.encode() + b"\0" + authorization,
                                     key=self._remember_key, digest_size=16).digest()
        if remembered in self._verified:
            return True
        user, password = parse_basic(authorization)
        if not user:
            return False
        key = self._remember_key
        async with self._checks:
            # Every credential is checked, the user's or not: the time says nothing of who exists.
            ok = await trio.to_thread.run_sync(
                lambda: sum(c.matches(user, password) for c in named.credentials) > 0)
        if ok and key is self._remember_key:  # not across a reload that changed them
            if len(self._verified) >= MAX_REMEMBERED:
                self._verified.clear()
            self._verified.add(remembered)
        return ok
