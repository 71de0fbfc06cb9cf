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
from wstunnel.server.admission import Admission, Refusal
from wstunnel.server.front import IncomingRequest
from wstunnel.server.messages import AnyResponse, StreamingResponse, simple_response
from wstunnel.server.metrics import Metrics
from wstunnel.server.rendezvous import Failure, QueueFull, Registry, Rendezvous
from wstunnel.tokens import Token

TOKEN_PREFIX = b"/_token/"
QUEUE_FULL = Refusal(503, "Too many requests queued for this tunnel", [(b"Retry-After", b"1")])


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

    async def forward(self, request: IncomingRequest) -> AnyResponse:
        """Answer ``request`` through its token's tunnel, or refuse it."""
        found = requested_token(request)
        if isinstance(found, Refusal):
            return found.response()
        token, target = found
        refusal = self.admission.braked(self.admission.client_address(request))
        if refusal is not None:
            return refusal.response()
        started = trio.current_time()
        response = await self._exchange(request, token, target, started)
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

    async def _exchange(self, request: IncomingRequest, token: Token, target: bytes,
                        started: float) -> AnyResponse:
        settings = self.settings()
        rendezvous = self.registry.get(token)
        if rendezvous is None:
            rendezvous = await self.registry.await_registration(
                token, until=self.started_at + settings.restart_grace)
        if rendezvous is None:
            self.log.info("HTTP RET", token=token, status=404, url=_loggable(target),
                          err="tunnel not found")
            self.admission.failed(self.admission.client_address(request))
            return simple_response(404, "Tunnel not found")
        addr = self.admission.client_address(request)
        headers = without_hop_by_hop(request.headers, b"x-token")
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
            return self._queue_full(token)
        pending.body_source = request.body_source
        pending.upgrade = upgrade
        self.log.info(
            "HTTP RCV", token=token, id=pending.id, verb=request.method, url=_loggable(target),
            addr=addr, **{"x-host": request.header(b"x-host") or b""}, try_="",
        )
        try:
            deadline = trio.current_time() + settings.httptimeout
            outcome = await rendezvous.exchange(pending, deadline=deadline)
        except QueueFull:
            return self._queue_full(token, request_id=pending.id)
        if isinstance(outcome, Failure):
            self.log.info("HTTP RET", token=token, id=pending.id, status=outcome.status,
                          err=outcome.text)
            if outcome.cut is not None:
                self._aborted(rendezvous, outcome.tunnel_aborts, pending.id, outcome.cut,
                              size=request.body_size(), started=started)
            return simple_response(outcome.status, outcome.text)
        self.log.info("HTTP RET", token=token, id=pending.id, status=outcome.status)
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

    def _queue_full(self, token: Token, request_id: int | None = None) -> framing.Response:
        self.log.warning("HTTP RET", token=token, id=request_id, status=503, err="queue full")
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
