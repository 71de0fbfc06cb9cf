"""Requests for a token, forwarded through its tunnel: the token found, the request rewritten for
the backend, queued on the token's rendez-vous, and its outcome logged, counted and answered.

The log lines are the original's access log (SPEC §5): ``HTTP RCV`` when a request arrives,
``HTTP RET`` with its status once it is answered (for a streamed response: once its head goes
out). A body that was under way, either way, and broke off adds one ``HTTP ABORT`` line, with how
far it got and why (wstunnel.server.aborts); a request that ends cleanly has none.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

import trio

from wstunnel import framing
from wstunnel.config import ServerSettings
from wstunnel.headers import get as get_header
from wstunnel.headers import without_hop_by_hop
from wstunnel.logs import EventLogger
from wstunnel.server.aborts import AbortTally, Cut, StreamAbort
from wstunnel.server.admission import BLOCKED, SUBJECT_HEADER, Admission, Refusal
from wstunnel.server.audit import BACKEND_ERROR, ErrorLog
from wstunnel.server.hosts import HostMatch, HostRouting
from wstunnel.server.incoming import IncomingRequest
from wstunnel.server.messages import AnyResponse, StreamingResponse, simple_response
from wstunnel.server.metrics import Metrics
from wstunnel.server.rendezvous import Failure, QueueFull, Registry, Rendezvous
from wstunnel.tokens import Token

TOKEN_PREFIX = b"/_token/"
# Request headers that are the server's and stop here: the token, a client certificate's subject
# from a TLS frontend, and (host routing's credentials) the tunnel's own password.
_NOT_FOR_BACKENDS = frozenset({b"x-token", SUBJECT_HEADER.lower()})
_NOT_FOR_BACKENDS_AUTHORIZED = _NOT_FOR_BACKENDS | {b"authorization"}
QUEUE_FULL = Refusal(503, "Too many requests queued for this tunnel", [(b"Retry-After", b"1")])
NOT_FOUND = "Tunnel not found"


def requested_token(request: IncomingRequest) -> tuple[Token, bytes] | Refusal:
    """The token a request is for and the target the backend gets: from a ``/_token/<token>/``
    path, else from ``X-Token``; a Refusal (400) when it has neither."""
    if request.target.startswith(TOKEN_PREFIX):
        raw_token, target = _split_token_path(request.target)
        if not raw_token:
            return Refusal(400, "Malformed /_token/ path")
    else:
        header = request.header(b"x-token")
        if header is None or not header.strip():
            return Refusal(400, "Missing X-Token header")
        raw_token, target = header.strip(), request.target
    return Token(raw_token.decode("utf-8", "surrogateescape")), target


@dataclass(eq=False)
class Forwarder:
    registry: Registry
    admission: Admission
    metrics: Metrics
    log: EventLogger
    settings: Callable[[], ServerSettings] = field(kw_only=True)  # current: a reload swaps them
    started_at: float = field(kw_only=True)
    hosts: HostRouting = field(kw_only=True)
    # The server's last error answers, for the console.
    errors: ErrorLog = field(kw_only=True, default_factory=ErrorLog)

    async def forward(self, request: IncomingRequest, routed: HostMatch | None = None) -> AnyResponse:
        """Answer ``request`` through its token's tunnel, or refuse it. ``routed``: the tunnel its
        Host names (host routing), instead of X-Token or a /_token/ path."""
        consumed = _NOT_FOR_BACKENDS
        if routed is None:
            found = requested_token(request)
            if isinstance(found, Refusal):
                return found.response()
            token, target = found
        refusal = self.admission.braked(self.admission.client_address(request))
        if refusal is not None:
            return refusal.response()
        if routed is not None:
            checked = await self._routed(request, routed)
            if not isinstance(checked, Token):
                return checked
            token, target = checked, request.target
            if routed.named is not None and routed.named.credentials:
                consumed = _NOT_FOR_BACKENDS_AUTHORIZED  # the tunnel's password, not the app's
        started = trio.current_time()
        response = await self._exchange(request, token, target, consumed, started)
        # One count per request for a token, however it was answered (404, 503, 504 included);
        # a request whose HTTP client went away has no answer and is not counted. A streamed
        # body is still to come: it is counted once the front has sent what it could of it.
        if isinstance(response, StreamingResponse):
            earlier = response.on_finish  # _exchange's: the abort, if the body broke off

            def observe(streamed: StreamingResponse) -> None:
                self.metrics.observe(status=streamed.status, seconds=trio.current_time() - started,
                                     request_bytes=request.body_size(),
                                     response_bytes=streamed.sent_bytes)
                if earlier is not None:
                    earlier(streamed)
            response.on_finish = observe
        else:
            self.metrics.observe(status=response.status, seconds=trio.current_time() - started,
                                 request_bytes=request.body_size(), response_bytes=len(response.body))
        return response

    async def _routed(self, request: IncomingRequest, routed: HostMatch) -> Token | AnyResponse:
        """The token of a host-routed request, once its credentials (if its name has any) pass."""
        named = routed.named
        addr = self.admission.client_address(request)
        if named is not None and not await self.hosts.authorized(
                named, request.header(b"authorization")):
            if request.header(b"authorization") is not None:  # a browser asks first without
                self.log.warning("HTTP AUTH", host=named.name, addr=addr, err="wrong credentials")
                self.admission.failed(addr)
            return simple_response(401, "Credentials required",
                                   headers=[(b"WWW-Authenticate", named.realm)])
        if routed.token is None:
            self.admission.failed(addr)
            self.log.info("HTTP RET", status=404, err="unknown host name", addr=addr)
            return simple_response(404, "Tunnel not found")
        return routed.token

    async def _exchange(self, request: IncomingRequest, token: Token, target: bytes,
                        consumed: frozenset[bytes], started: float) -> AnyResponse:
        settings = self.settings()
        addr = self.admission.client_address(request)
        rendezvous = self.registry.get(token)
        if rendezvous is None:
            if self.admission.blocklist.blocks(token):
                return self._blocked(token, None, addr, request.method, target)
            rendezvous = await self.registry.await_registration(
                token, until=self.started_at + settings.restart_grace)
        if rendezvous is None:
            self.log.info("HTTP RET", token=token, status=404, url=_loggable(target),
                          err="tunnel not found")
            self.admission.failed(addr)
            self.errors.add(trio.current_time(), token, 404, NOT_FOUND, addr,
                            request.method, target)
            return simple_response(404, NOT_FOUND)
        if rendezvous.blocked:
            return self._blocked(token, rendezvous, addr, request.method, target)
        headers = without_hop_by_hop(request.headers, *consumed)
        forwarded = get_header(headers, b"x-forwarded-for")
        headers = [(k, v) for k, v in headers if k.lower() != b"x-forwarded-for"]
        peer = request.peer.encode()
        headers.append((b"X-Forwarded-For", forwarded + b", " + peer if forwarded else peer))
        # A v2 stream carries no body before its 101: an upgrade request with one (a strange
        # thing) goes as a plain request, its Upgrade header dropped with the hop-by-hop ones.
        upgrade = request.is_websocket_upgrade() and not request.body and request.body_source is None
        if upgrade:
            # Hop-by-hop as they are, these two are what the tunnel client passes on.
            headers += [(b"Connection", b"Upgrade"), (b"Upgrade", request.header(b"upgrade") or b"")]
        try:
            pending = rendezvous.new_request(
                framing.Request(request.method, target, headers, request.body)
            )
        except QueueFull:
            return self._queue_full(token, rendezvous, addr, request.method, target)
        pending.body_source = request.body_source
        pending.upgrade = upgrade
        pending.addr = addr
        pending.started = started
        self.log.info(
            "HTTP RCV", token=token, id=pending.id, verb=request.method, url=_loggable(target),
            addr=addr, **{"x-host": request.header(b"x-host") or b""}, try_="",
        )
        try:
            deadline = trio.current_time() + settings.httptimeout
            outcome = await rendezvous.exchange(pending, deadline=deadline)
        except QueueFull:
            return self._queue_full(token, rendezvous, addr, request.method, target,
                                    request_id=pending.id)
        now = trio.current_time()
        if isinstance(outcome, Failure):
            self.log.info("HTTP RET", token=token, id=pending.id, status=outcome.status,
                          err=outcome.text)
            self._error(rendezvous, now, outcome.status, outcome.text, addr, request.method, target)
            if outcome.cut is not None:
                self._aborted(rendezvous, outcome.tunnel_aborts, pending.id, outcome.cut,
                              size=request.body_size(), started=started)
            return simple_response(outcome.status, outcome.text)
        self.log.info("HTTP RET", token=token, id=pending.id, status=outcome.status)
        if outcome.status >= BACKEND_ERROR:
            self._error(rendezvous, now, outcome.status, outcome.reason, addr, request.method,
                        target)
        else:
            rendezvous.audit.succeeded(now, outcome.status, outcome.reason, addr)
        if isinstance(outcome, StreamingResponse):
            request_id = pending.id

            def finished(streamed: StreamingResponse) -> None:
                cut = streamed.cut
                if cut is None:
                    return
                size = (streamed.sent_bytes if cut.direction == "response"
                        else streamed.received_bytes or request.body_size())
                self._aborted(rendezvous, streamed.tunnel_aborts, request_id, cut, size=size,
                              started=started)
            outcome.on_finish = finished
        return outcome

    def _error(self, rendezvous: Rendezvous, at: float, status: int, reason: bytes | str,
               addr: str, method: bytes, target: bytes) -> None:
        """Remember an error answer: the token's last, and one of the server's last ones."""
        rendezvous.audit.failed(at, status, reason, addr)
        self.errors.add(at, rendezvous.token, status, reason, addr, method, target)

    def _blocked(self, token: Token, rendezvous: Rendezvous | None, addr: str, method: bytes,
                 target: bytes) -> framing.Response:
        self.log.info("HTTP RET", token=token, status=403, url=_loggable(target),
                      err="token blocked")
        now = trio.current_time()
        if rendezvous is not None:
            rendezvous.counters.errored += 1
            rendezvous.touch()
            self._error(rendezvous, now, 403, BLOCKED.text, addr, method, target)
        else:
            self.errors.add(now, token, 403, BLOCKED.text, addr, method, target)
        return BLOCKED.response()

    def _aborted(self, rendezvous: Rendezvous, tunnel: AbortTally | None, request_id: int,
                 cut: Cut, *, size: int, started: float) -> None:
        """A body broke off: its one ``HTTP ABORT`` line, its count, its records."""
        abort = StreamAbort(request_id, cut.direction, cut.cause, cut.reason, size,
                            trio.current_time() - started, time.time())
        self.log.info("HTTP ABORT", token=rendezvous.token, id=request_id, direction=cut.direction,
                      bytes=size, secs=round(abort.secs, 3), cause=str(cut.cause),
                      reason=cut.reason)
        self.metrics.aborted(cut.direction, cut.cause)
        rendezvous.aborts.add(abort)
        if tunnel is not None:
            tunnel.add(abort)

    def _queue_full(self, token: Token, rendezvous: Rendezvous, addr: str, method: bytes,
                    target: bytes, request_id: int | None = None) -> framing.Response:
        self.log.warning("HTTP RET", token=token, id=request_id, status=503, err="queue full")
        rendezvous.counters.errored += 1
        rendezvous.touch()
        self._error(rendezvous, trio.current_time(), 503, QUEUE_FULL.text, addr, method, target)
        return QUEUE_FULL.response()


def _split_token_path(target: bytes) -> tuple[bytes, bytes]:
    """``/_token/<token>/<rest>?q`` -> (token, ``/<rest>?q``); the token may be percent-encoded."""
    remainder = target[len(TOKEN_PREFIX):]
    cut = len(remainder)
    for separator in (b"/", b"?"):
        found = remainder.find(separator)
        if found >= 0:
            cut = min(cut, found)
    rest = remainder[cut:]
    return unquote_to_bytes(remainder[:cut]), rest if rest.startswith(b"/") else b"/" + rest


def _loggable(target: bytes) -> bytes:
    """A request target fit for a log line: never a whole /_token/ secret, never huge."""
    if target.startswith(TOKEN_PREFIX):
        token, _, rest = target[len(TOKEN_PREFIX):].partition(b"/")
        target = TOKEN_PREFIX + token[:8] + b".../" + rest
    return target[:200]
