"""Who may use the console, and proof that an action comes from the console's own page.

Two ways in:

- **By address**, with no password: loopback callers, and trusted proxies themselves or the
  clients they relay from loopback or from another trusted address (``Admission.from_inside``,
  the rule of ``/_status`` and ``/_metrics``). A browser asked by a hostile page to fetch
  ``http://evil.example:8080/_admin/``, a name the attacker points at 127.0.0.1 (DNS
  rebinding), must not get in that way: a request that reaches the server directly must name
  the server by IP address, ``localhost`` or this machine's host name in ``Host``. Behind a
  trusted proxy that proxy chose which names reach us (nginx's ``server_name``).
- **By password**, from anywhere else, once ``admin_password`` holds a hash (``wstunnel admin
  passwd``): ``POST /_admin/api/login`` over HTTPS (a trusted proxy says
  ``X-Forwarded-Proto: https``) checks it with scrypt, one check at a time off the event loop,
  and opens a session: a random cookie (HttpOnly, Secure, SameSite=Strict), kept here only as
  its SHA-256, so neither a look-up's timing nor a memory dump gives it away. A wrong password
  counts as a failure for the address's brake, which then refuses the address (429) like any
  guesser of tokens.

Every POST that acts must carry ``X-CSRF-Token``, a value the page reads from the API (an HMAC
of the session, or of "address", under a key that lives as long as the process). A cross-site
page cannot read it, and cannot send the header without a CORS preflight, which the console
never allows; an ``Origin`` or ``Sec-Fetch-Site`` naming another site is refused as well.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import itertools
import json
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import trio

from wstunnel import framing
from wstunnel.config import ServerSettings
from wstunnel.logs import EventLogger
from wstunnel.password_hash import PasswordHash, parse_password_hash
from wstunnel.server.admission import Admission, is_loopback
from wstunnel.server.incoming import IncomingRequest

SESSION_COOKIE = "wstunnel_console"
COOKIE_PATH = "/_admin/"
SESSION_IDLE = 8 * 3600.0  # a session unused this long ends
SESSION_LIFE = 24 * 3600.0  # and every session ends this long after its login
MAX_SESSIONS = 64  # beyond it the oldest ends: logins cannot fill memory
CSRF_HEADER = b"x-csrf-token"


@dataclass(eq=False)
class Session:
    number: int  # for the log: who did what, without the cookie
    addr: str
    created: float
    used: float
    csrf: str


@dataclass(frozen=True)
class Grant:
    """A caller the console lets in, and how."""

    addr: str
    how: str  # "loopback", "trusted proxy" or "password"
    csrf: str
    session: Session | None = None

    def who(self) -> str:
        """For log lines and the block list: the address, and how it got in."""
        if self.session is not None:
            return f"{self.addr} (password, session {self.session.number})"
        return f"{self.addr} ({self.how})"


def json_answer(status: int, document: object,
                headers: list[tuple[bytes, bytes]] | None = None) -> framing.Response:
    """A JSON response that no cache keeps and no browser sniffs into something else."""
    return framing.Response(
        status=status, reason=_reason(status),
        headers=[(b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store"),
                 (b"X-Content-Type-Options", b"nosniff"), *(headers or [])],
        body=json.dumps(document, separators=(",", ":")).encode(),
    )


def refusal(status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None
            ) -> framing.Response:
    return json_answer(status, {"error": text}, headers)


def _reason(status: int) -> bytes:
    return {200: b"OK", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
            405: b"Method Not Allowed", 409: b"Conflict", 413: b"Content Too Large",
            429: b"Too Many Requests", 500: b"Internal Server Error"}.get(status, b"")


NOT_INSIDE = ("The console is for localhost and trusted proxies only; for remote access set "
              "admin_password (wstunnel admin passwd) and reach it through the TLS frontend")
BAD_HOST = ("The console answers direct requests only when Host names this server by IP address, "
            "localhost or its host name (a defence against DNS rebinding)")


@dataclass(eq=False)
class Gate:
    admission: Admission
    log: EventLogger
    settings: Callable[[], ServerSettings] = field(kw_only=True)  # current: a reload swaps them
    clock: Callable[[], float] = field(kw_only=True, default=trio.current_time)
    _key: bytes = field(init=False, default_factory=lambda: secrets.token_bytes(32))
    _sessions: dict[bytes, Session] = field(init=False, default_factory=dict)
    _numbers: itertools.count[int] = field(init=False, default_factory=lambda: itertools.count(1))
    # One scrypt check at a time: each takes 128 MiB and a few tenths of a second of a core.
    _checks: trio.CapacityLimiter = field(init=False, default_factory=lambda: trio.CapacityLimiter(1))
    _parsed: tuple[str, PasswordHash] | None = field(init=False, default=None)
    _host_names: frozenset[str] = field(init=False, default_factory=lambda: frozenset(
        {"localhost", socket.gethostname().lower()}))

    # -- who is calling --------------------------------------------------------------------

    def password(self) -> PasswordHash | None:
        """The configured password's hash (None: no remote access), parsed once per value."""
        secret = self.settings().admin_password
        if secret is None:
            return None
        text = secret.get_secret_value()
        if self._parsed is None or self._parsed[0] != text:
            self._parsed = (text, parse_password_hash(text))  # validated with the settings
        return self._parsed[1]

    def grant(self, request: IncomingRequest) -> Grant | framing.Response:
        """Who the caller is, or the answer that turns them away (403, 401, 429)."""
        addr = self.admission.client_address(request)
        if self.admission.from_inside(request):
            if not self._host_allowed(request):
                return refusal(403, BAD_HOST)
            how = "loopback" if is_loopback(addr) else "trusted proxy"
            return Grant(addr, how, self._csrf(b"address"))
        if self.password() is None:
            return refusal(403, NOT_INSIDE)
        braked = self.admission.braked(addr)
        if braked is not None:
            return refusal(braked.status, braked.text, list(braked.headers))
        session = self._session(request)
        if session is None:
            return refusal(401, "Log in first")
        return Grant(addr, "password", session.csrf, session)

    def page_refusal(self, request: IncomingRequest) -> framing.Response | None:
        """Why the page itself (HTML, CSS, script) is not served, or None: it goes to whoever
        may use the console or may log in to it."""
        if self.admission.from_inside(request):
            return None if self._host_allowed(request) else refusal(403, BAD_HOST)
        return None if self.password() is not None else refusal(403, NOT_INSIDE)

    def _host_allowed(self, request: IncomingRequest) -> bool:
        if request.header(b"x-forwarded-for") is not None and self.admission.trusted(request.peer):
            return True  # the proxy decided which names reach us
        host = (request.header(b"host") or b"").decode("latin-1").strip().lower()
        name = urlsplit(f"//{host}").hostname or ""
        if name in self._host_names or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    # -- actions: the page's proof ------------------------------------------------------------

    def csrf_refusal(self, request: IncomingRequest, grant: Grant) -> framing.Response | None:
        """None if a POST may act: it carries the grant's CSRF token and comes from our page."""
        if not self._same_site(request):
            return refusal(403, "Cross-site request refused")
        sent = request.header(CSRF_HEADER) or b""
        if not hmac.compare_digest(sent, grant.csrf.encode()):
            return refusal(403, "Missing or wrong X-CSRF-Token (read csrf_token from the API)")
        return None

    def _same_site(self, request: IncomingRequest) -> bool:
        fetch_site = request.header(b"sec-fetch-site")
        if fetch_site is not None and fetch_site not in (b"same-origin", b"none"):
            return False
        origin = request.header(b"origin")
        if origin is None:
            return True  # not a browser's cross-site request (those carry Origin on POST)
        # Host names only: a proxy may drop the port from Host (nginx's $host does).
        host = urlsplit("//" + (request.header(b"host") or b"").decode("latin-1")).hostname
        return urlsplit(origin.decode("latin-1")).hostname == host

    def _csrf(self, subject: bytes) -> str:
        return hmac.new(self._key, b"csrf:" + subject, hashlib.sha256).hexdigest()

    # -- sessions -----------------------------------------------------------------------------

    def _session(self, request: IncomingRequest) -> Session | None:
        cookie = _cookie(request.header(b"cookie"), SESSION_COOKIE)
        if not cookie:
            return None
        key = hashlib.sha256(cookie.encode("latin-1")).digest()
        session = self._sessions.get(key)
        now = self.clock()
        if session is None:
            return None
        if now - session.used > SESSION_IDLE or now - session.created > SESSION_LIFE:
            del self._sessions[key]
            return None
        session.used = now
        return session

    async def login(self, request: IncomingRequest, password: str) -> framing.Response:
        """Check ``password`` and open a session (its cookie in the answer)."""
        addr = self.admission.client_address(request)
        if self.admission.from_inside(request):
            if not self._host_allowed(request):
                return refusal(403, BAD_HOST)
            return json_answer(200, {"ok": True, "how": "address"})
        expected = self.password()
        if expected is None:
            return refusal(403, NOT_INSIDE)
        braked = self.admission.braked(addr)
        if braked is not None:
            return refusal(braked.status, braked.text, list(braked.headers))
        if not self._same_site(request):
            return refusal(403, "Cross-site request refused")
        if not self._over_tls(request):
            return refusal(403, "Log in over HTTPS, through the TLS frontend: the password "
                                "would cross the network in clear")
        async with self._checks:
            right = await trio.to_thread.run_sync(expected.matches, password)
        if not right:
            self.admission.failed(addr)
            self.log.warning("ADMIN LOGIN", addr=addr, result="wrong password")
            return refusal(401, "Wrong password")
        cookie = secrets.token_urlsafe(32)
        now = self.clock()
        session = Session(next(self._numbers), addr, now, now, "")
        session.csrf = self._csrf(b"session:%d:" % session.number + cookie.encode())
        if len(self._sessions) >= MAX_SESSIONS:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].used)
            del self._sessions[oldest]
        self._sessions[hashlib.sha256(cookie.encode()).digest()] = session
        self.log.info("ADMIN LOGIN", addr=addr, session=session.number, result="ok")
        attributes = (f"{SESSION_COOKIE}={cookie}; Path={COOKIE_PATH}; Max-Age={int(SESSION_LIFE)}; "
                      "HttpOnly; Secure; SameSite=Strict")
        return json_answer(200, {"ok": True, "how": "password"},
                           [(b"Set-Cookie", attributes.encode())])

    def logout(self, request: IncomingRequest, grant: Grant) -> framing.Response:
        cookie = _cookie(request.header(b"cookie"), SESSION_COOKIE)
        if cookie:
            self._sessions.pop(hashlib.sha256(cookie.encode("latin-1")).digest(), None)
        if grant.session is not None:
            self.log.info("ADMIN LOGOUT", addr=grant.addr, session=grant.session.number)
        expired = f"{SESSION_COOKIE}=; Path={COOKIE_PATH}; Max-Age=0; HttpOnly; Secure; SameSite=Strict"
        return json_answer(200, {"ok": True}, [(b"Set-Cookie", expired.encode())])

    def _over_tls(self, request: IncomingRequest) -> bool:
        """HTTPS as far as a trusted proxy says (the server itself speaks plain HTTP)."""
        proto = request.header(b"x-forwarded-proto")
        return proto is not None and proto.strip().lower() == b"https" and \
            self.admission.trusted(request.peer)


def _cookie(header: bytes | None, name: str) -> str | None:
    if not header:
        return None
    for part in header.decode("latin-1").split(";"):
        key, eq, value = part.strip().partition("=")
        if eq and key == name:
            return value.strip()
    return None
