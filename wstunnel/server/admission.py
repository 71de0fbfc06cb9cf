"""Who may open a tunnel, and whose word about an address the server believes.

:class:`Admission` holds every check a tunnel opening passes, whatever its transport (the token in
``Origin``, the failure brake, ``allowed_tokens``, passwords, ``max_clients_per_token``, a server
that is draining), the turns of WebSocket handshakes, and the trusted proxies whose
``X-Forwarded-For`` names the real client (and whose ``X-Client-Subject`` names the client
certificate it verified). A check that fails is a :class:`Refusal`: the HTTP
answer the client gets, on either transport.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from wstunnel import framing
from wstunnel.config import ServerSettings, password_pairs
from wstunnel.headers import Headers
from wstunnel.logs import EventLogger
from wstunnel.server.blocklist import Blocklist
from wstunnel.server.guard import BASIC_REALM, FailureBrake, HandshakeTurns, PasswordBook
from wstunnel.server.incoming import IncomingRequest
from wstunnel.server.messages import simple_response
from wstunnel.server.rendezvous import Registry
from wstunnel.tokens import MIN_LENGTH, Token

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Refusal:
    """Why a request or a tunnel is refused, as the HTTP answer it gets."""

    status: int
    text: str
    headers: Headers = field(default_factory=list)

    def response(self) -> framing.Response:
        return simple_response(self.status, self.text, headers=list(self.headers))


def too_many_failures(wait: int) -> Refusal:
    """The failure brake's answer, for anything that carries a token (or a session id)."""
    return Refusal(429, "Too many failed attempts from this address", [(b"Retry-After", b"%d" % wait)])


SHUTTING_DOWN = Refusal(503, "Server shutting down")
CERTIFICATE_REQUIRED = Refusal(403, "A client certificate signed by the server's CA is required")
# The verified subject of a client certificate, from a TLS frontend (nginx's $ssl_client_s_dn):
# believed from trusted proxies only, and never passed on to a backend.
SUBJECT_HEADER = b"X-Client-Subject"
_SUBJECT_KEY = SUBJECT_HEADER.lower()
BLOCKED = Refusal(403, "Token blocked on this server")


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class Admission:
    def __init__(self, settings: ServerSettings, log: EventLogger, registry: Registry, *,
                 draining: Callable[[], bool], blocklist: Blocklist | None = None) -> None:
        self.log = log
        self.registry = registry
        self._draining = draining
        # Tokens blocked from the console; none by default (a server built without one).
        self.blocklist = blocklist or Blocklist(Path(settings.state_file))
        self.brake = FailureBrake(limit=settings.failure_limit, window=settings.failure_window,
                                  clock=trio.current_time)
        self.handshakes = HandshakeTurns(settings.max_handshakes)
        self._settings = settings
        self._passwords = PasswordBook()
        self._trusted: list[Network] = []
        self.apply(settings)

    def apply(self, settings: ServerSettings) -> None:
        """Take the limits, tokens, passwords and proxies of new settings (a reload)."""
        self._settings = settings
        self.brake.limit = settings.failure_limit
        self.brake.window = settings.failure_window
        self.handshakes.limit = settings.max_handshakes
        self._passwords = PasswordBook(password_pairs(settings.passwords) if settings.passwords else ())
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in settings.trusted_proxies]

    # -- addresses --------------------------------------------------------------------------

    def client_address(self, request: IncomingRequest) -> str:
        """The HTTP client's address: X-Forwarded-For's last hop, from trusted proxies only."""
        peer = request.peer
        forwarded = request.header(b"x-forwarded-for")
        if forwarded and self.trusted(peer):
            hops = [h.strip() for h in forwarded.decode("latin-1").split(",") if h.strip()]
            while hops:
                hop = hops.pop()
                if not self.trusted(hop):
                    return hop
        return peer

    def client_subject(self, request: IncomingRequest) -> str | None:
        """The subject of the client's verified certificate: from our own TLS, else from the
        header a trusted proxy sets; None without one."""
        subject = request.client_subject
        if subject is None and self._trusted:
            forwarded = request.header(_SUBJECT_KEY)
            if forwarded and self.trusted(request.peer):
                subject = forwarded.decode("utf-8", "replace")
        return subject

    def certified(self, request: IncomingRequest, *, tunnel: bool) -> bool:
        """False when ``require_client_cert`` asks for a certificate that the request lacks."""
        required = self._settings.require_client_cert
        if required == "no" or (required == "tunnel" and not tunnel):
            return True
        return self.client_subject(request) is not None

    def from_inside(self, request: IncomingRequest) -> bool:
        """Loopback or a trusted proxy itself; client_address() believes X-Forwarded-For only
        from a trusted proxy, so a proxy relaying an outsider is refused like the outsider."""
        caller = self.client_address(request)
        return is_loopback(caller) or self.trusted(caller)

    def trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)

    # -- the brake ----------------------------------------------------------------------------

    def braked(self, addr: str) -> Refusal | None:
        """The brake's refusal if ``addr`` failed too often lately, else None."""
        wait = self.brake.retry_after(addr)
        return None if wait is None else too_many_failures(wait)

    def failed(self, addr: str) -> None:
        """``addr`` presented an unknown token or session, or failed a handshake."""
        self.brake.failed(addr)

    # -- tunnels ------------------------------------------------------------------------------

    def allows(self, token: Token) -> bool:
        """Any token, or only those of ``allowed_tokens`` when that list is set."""
        allowed = self._settings.allowed_tokens
        # Compare with every entry (no early exit): the time taken says nothing of the list.
        matches = [token == Token(entry.get_secret_value()) for entry in allowed]
        return not allowed or any(matches)

    def admit(self, request: IncomingRequest, addr: str) -> Token | Refusal:
        """The checks every tunnel opening passes, whatever its transport: the token (in
        ``Origin``), the failure brake, allowed_tokens, passwords and max_clients_per_token."""
        origin = request.header(b"origin")
        wait = self.brake.retry_after(addr)
        if wait is not None:
            self.log.warning("WS   REFUSE", addr=addr, err="too many failures", retry_after=wait)
            return too_many_failures(wait)
        if not self.certified(request, tunnel=True):
            self.log.warning("WS   REFUSE", addr=addr, err="no client certificate")
            return CERTIFICATE_REQUIRED
        if not origin or len(origin) < MIN_LENGTH:
            self.log.warning("WS   REFUSE", addr=addr, err="missing or short token")
            self.failed(addr)
            return Refusal(400, f"Token (Origin header) missing or shorter than {MIN_LENGTH} characters")
        token = Token(origin.decode("utf-8", "surrogateescape"))
        if self._draining():
            return SHUTTING_DOWN
        if self.blocklist.blocks(token):
            # Not a failure for the brake: a blocked client redials as its backoff says, which
            # is no sign of guessing.
            self.log.warning("WS   REFUSE", token=token, addr=addr, err="token blocked")
            return BLOCKED
        if not self.allows(token):
            self.log.warning("WS   REFUSE", token=token, addr=addr, err="token not allowed")
            self.failed(addr)
            return Refusal(403, "Token not allowed on this server")
        if not self._passwords.admits(token, request.header(b"authorization")):
            self.log.warning("WS   REFUSE", token=token, addr=addr, err="wrong or missing password")
            self.failed(addr)
            return Refusal(401, "Tunnel password required", [(b"WWW-Authenticate", BASIC_REALM)])
        limit = self._settings.max_clients_per_token
        existing = self.registry.get(token)
        if limit and existing is not None and len(existing.connections) >= limit:
            self.log.warning("WS   REFUSE", token=token, addr=addr, err="too many clients")
            return Refusal(429, "Too many clients for this token")
        return token
