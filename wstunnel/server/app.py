"""The tunnel server: routes HTTP requests, accepts tunnels, and runs until told to stop.

Layers, outermost first: the listener accepts sockets; :class:`~wstunnel.server.front.
HttpConnection` speaks HTTP/1.1 on each; :class:`TunnelServer` routes each request to a built-in
endpoint or to a token's :class:`~wstunnel.server.tunnels.Rendezvous`, and turns ``/_tunnel``
upgrades into :class:`~wstunnel.server.tunnels.TunnelConnection` objects.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

import trio

from wstunnel import __version__, daemon, framing, v2
from wstunnel.config import ServerSettings, password_pairs
from wstunnel.headers import Headers, without_hop_by_hop
from wstunnel.headers import get as get_header
from wstunnel.logs import EventLogger
from wstunnel.server import metrics, status
from wstunnel.server.front import (
    AnyResponse,
    FrontLimits,
    HttpConnection,
    IncomingRequest,
    StreamingResponse,
    simple_response,
)
from wstunnel.server.guard import BASIC_REALM, FailureBrake, HandshakeTurns, PasswordBook
from wstunnel.server.longpoll import LongPoll
from wstunnel.server.tunnels import Failure, QueueFull, Registry, Rendezvous, TunnelConnection
from wstunnel.server.tunnels_v2 import TunnelConnectionV2
from wstunnel.tokens import MIN_LENGTH, Token
from wstunnel.tunnel import websocket
from wstunnel.tunnel.transport import VERSION_HEADER, WS_RECEIVE_SIZE, ActivityStream, HandshakeError

TOKEN_PREFIX = b"/_token/"
# A reload cannot move the listening socket or the pid file; these wait for a restart.
RESTART_ONLY_SETTINGS = ("host", "port", "pidfile")
# On stop, how long all tunnels together wait for their peers' Close replies (one deadline).
STOP_CLOSE_WAIT = 1.0
# Distinct unknown tokens that may wait during restart_grace; beyond it, 404 at once.
MAX_AWAITED_TOKENS = 10_000


@dataclass(frozen=True)
class Refusal:
    """Why a client may not open a tunnel, as the HTTP answer it gets (either transport)."""

    status: int
    text: str
    headers: Headers = field(default_factory=list)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class TunnelServer:
    def __init__(self, settings: ServerSettings, log: EventLogger) -> None:
        self.settings = settings
        self.log = log
        self.registry = Registry(
            max_requests=settings.max_requests_per_tunnel,
            token_idle_timeout=settings.token_idle_timeout,
            max_bytes=settings.max_queued_bytes,
        )
        self.brake = FailureBrake(limit=settings.failure_limit, window=settings.failure_window,
                                  clock=trio.current_time)
        self.passwords = _password_book(settings)
        self.handshakes = HandshakeTurns(settings.max_handshakes)
        self._awaited: dict[Token, trio.Event] = {}
        self.limits = _front_limits(settings)
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in settings.trusted_proxies]
        self.started_at = trio.current_time()
        self.metrics = metrics.Metrics(__version__)
        self.draining = False
        self.stop_requested = trio.Event()
        self._active_requests = 0
        self._idle = trio.Event()
        self._idle.set()
        self.longpoll = LongPoll(self)

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, serve, and on :meth:`stop` drain gracefully; ``started`` gets the port."""
        try:
            listeners = await trio.open_tcp_listeners(self.settings.port, host=self.settings.host)
        except OSError as exc:
            where = f"{self.settings.host}:{self.settings.port}"
            raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror or exc}") from None
        port = listeners[0].socket.getsockname()[1]
        self.log.info("Listening", port=port, host=self.settings.host)
        async with trio.open_nursery() as root:
            root.start_soon(self.registry.reap_forever, self.log)
            await root.start(self.longpoll.run)
            async with trio.open_nursery() as connections:
                accepting = trio.CancelScope()
                connections.start_soon(self._accept, listeners, connections, accepting)
                task_status.started(port)
                await self.stop_requested.wait()
                accepting.cancel()
                await self._drain()
                connections.cancel_scope.cancel()
            root.cancel_scope.cancel()
        self.log.info("Stopped")

    def stop(self) -> None:
        self.stop_requested.set()

    def allows(self, token: Token) -> bool:
        """Any token, or only those of ``allowed_tokens`` when that list is set."""
        allowed = self.settings.allowed_tokens
        # Compare with every entry (no early exit): the time taken says nothing of the list.
        matches = [token == Token(entry.get_secret_value()) for entry in allowed]
        return not allowed or any(matches)

    async def revoke_disallowed(self) -> None:
        """After a reload narrowed ``allowed_tokens``: close those tunnels, forget the tokens."""
        for rendezvous in list(self.registry):
            if self.allows(rendezvous.token):
                continue
            self.log.warning("WS   REVOKE", token=rendezvous.token,
                             clients=len(rendezvous.connections))
            async with trio.open_nursery() as closers:
                for connection in list(rendezvous.connections):
                    closers.start_soon(connection.close, 1008, "token no longer allowed")
            self.registry.forget(rendezvous.token)

    def apply(self, settings: ServerSettings) -> tuple[list[str], list[str]]:
        """Take new settings without a restart; returns (applied, needing a restart)."""
        changed = daemon.changed_settings(self.settings, settings)
        fixed = [name for name in changed if name in RESTART_ONLY_SETTINGS]
        # What cannot change live keeps its running value, so what we report stays true.
        kept = {name: getattr(self.settings, name) for name in RESTART_ONLY_SETTINGS}
        self.settings = settings.model_copy(update=kept)
        self.registry.resize(self.settings.max_requests_per_tunnel, self.settings.max_queued_bytes)
        self.brake.limit = self.settings.failure_limit
        self.brake.window = self.settings.failure_window
        self.handshakes.limit = self.settings.max_handshakes
        self.passwords = _password_book(self.settings)
        self.registry.token_idle_timeout = self.settings.token_idle_timeout
        self.limits = _front_limits(self.settings)
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in self.settings.trusted_proxies]
        return [name for name in changed if name not in fixed], fixed

    async def _accept(self, listeners: list[trio.SocketListener], nursery: trio.Nursery,
                      scope: trio.CancelScope) -> None:
        with scope:
            try:
                await trio.serve_listeners(self._handle_socket, listeners, handler_nursery=nursery)
            finally:
                for listener in listeners:
                    await listener.aclose()

    async def _drain(self) -> None:
        self.draining = True
        self.log.info("Draining", in_flight=self._active_requests,
                      grace_secs=self.settings.shutdown_grace)
        with trio.move_on_after(self.settings.shutdown_grace):
            await self._idle.wait()
        await self._close_tunnels()

    async def _close_tunnels(self) -> None:
        """Send every tunnel its Close (1001, going away: clients redial with their backoff),
        all at once, and wait for the answers until one deadline shared by all of them.

        Waiting up to CLOSE_TIMEOUT for each peer (the tasks ran concurrently, but a co-hosted
        or busy peer answers thousands of Closes slowly) kept a server with 10,000 idle tunnels
        past systemd's 10 s stop timeout. A tunnel unanswered at the deadline has had its Close
        frame all the same; its socket is just closed without the reply.
        """
        connections = list(self.registry.connections())
        began = trio.current_time()
        deadline = began + STOP_CLOSE_WAIT
        answered = 0

        async def close(connection: TunnelConnection) -> None:
            nonlocal answered
            if await connection.close(1001, "server shutting down", deadline=deadline):
                answered += 1

        async with trio.open_nursery() as closers:
            for connection in connections:
                closers.start_soon(close, connection)
        self.log.info("Closed tunnels", tunnels=len(connections), answered=answered,
                      secs=round(trio.current_time() - began, 2))

    # -- HTTP ------------------------------------------------------------------------------

    async def _handle_socket(self, stream: trio.SocketStream) -> None:
        try:
            peer = str(stream.socket.getpeername()[0])
        except OSError:
            await stream.aclose()
            return
        # A draining server closes each connection after its response, except a long-poll
        # client's: it has to keep polling, on the connections it has, while its in-flight
        # requests finish (new connections are no longer accepted by then).
        polling = False

        async def respond(request: IncomingRequest) -> AnyResponse:
            nonlocal polling
            polling = self.longpoll.handles(request.path)
            return await self._respond(request)

        connection = HttpConnection(
            stream, peer, self.limits,
            respond=respond, is_tunnel=self._is_tunnel, take_tunnel=self._take_tunnel,
            draining=lambda: self.draining and not polling,
        )
        await connection.serve()

    def client_address(self, request: IncomingRequest) -> str:
        """The HTTP client's address: X-Forwarded-For's last hop, from trusted proxies only."""
        peer = request.peer
        forwarded = request.header(b"x-forwarded-for")
        if forwarded and self._trusted(peer):
            hops = [h.strip() for h in forwarded.decode("latin-1").split(",") if h.strip()]
            while hops:
                hop = hops.pop()
                if not self._trusted(hop):
                    return hop
        return peer

    def _from_inside(self, request: IncomingRequest) -> bool:
        """Loopback or a trusted proxy itself; client_address() believes X-Forwarded-For only
        from a trusted proxy, so a proxy relaying an outsider is refused like the outsider."""
        caller = self.client_address(request)
        return _is_loopback(caller) or self._trusted(caller)

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted)

    def _is_tunnel(self, request: IncomingRequest) -> bool:
        return request.path == b"/_tunnel" and request.is_websocket_upgrade()

    async def _respond(self, request: IncomingRequest) -> AnyResponse:
        if self.longpoll.handles(request.path):
            # A tunnel's transport, not a tunnelled request: a graceful stop does not wait for
            # a held poll, and the session's requests drain through it meanwhile.
            return await self.longpoll.respond(request)
        self._active_requests += 1
        self._idle = trio.Event() if self._active_requests == 1 else self._idle
        streaming = False
        try:
            response = await self._route(request)
            if isinstance(response, StreamingResponse):
                # Its body is still to come: the request stays active (a graceful stop waits
                # for it) until the front has sent the body, or given up on it.
                streaming = True
                earlier = response.on_finish

                def finished(sent: StreamingResponse) -> None:
                    if earlier is not None:
                        earlier(sent)
                    self._request_done()

                response.on_finish = finished
            return response
        finally:
            if not streaming:
                self._request_done()

    def _request_done(self) -> None:
        self._active_requests -= 1
        if self._active_requests == 0:
            self._idle.set()

    async def _route(self, request: IncomingRequest) -> AnyResponse:
        path = request.path
        if path == b"/_health_check":
            return simple_response(200, status.HEALTH_TEXT)
        if path == b"/_stats":
            detailed = _is_loopback(self.client_address(request))
            return simple_response(200, status.render_stats(self.registry, detailed=detailed))
        if path == b"/_status":
            # Token prefixes and client addresses are for operators, as /_stats details are.
            if not self._from_inside(request):
                return simple_response(403, "Status is for localhost and trusted proxies only")
            body = status.render_status(self.registry, started_at=self.started_at)
            response = simple_response(200, body)
            response.headers = [(b"Content-Type", b"application/json")]
            return response
        if path == b"/_metrics":
            # The counts tell outsiders how busy the server is.
            if not self._from_inside(request):
                return simple_response(403, "Metrics are for localhost and trusted proxies only")
            body = self.metrics.render(metrics.Gauges.of(self.registry),
                                       uptime=trio.current_time() - self.started_at)
            response = simple_response(200, body)
            response.headers = [(b"Content-Type", metrics.CONTENT_TYPE)]
            return response
        if path == b"/_tunnel":
            return simple_response(400, "The tunnel endpoint takes WebSocket upgrades only")
        if self.draining:
            return simple_response(503, "Server shutting down", headers=[(b"Retry-After", b"5")])
        if request.target.startswith(TOKEN_PREFIX):
            raw_token, target = _split_token_path(request.target)
            if not raw_token:
                return simple_response(400, "Malformed /_token/ path")
        else:
            header = request.header(b"x-token")
            if header is None or not header.strip():
                return simple_response(400, "Missing X-Token header")
            raw_token, target = header.strip(), request.target
        token = Token(raw_token.decode("utf-8", "surrogateescape"))
        wait = self.brake.retry_after(self.client_address(request))
        if wait is not None:
            return _too_many_failures(wait)
        return await self._tunnel_request(request, token, target)

    async def _tunnel_request(
        self, request: IncomingRequest, token: Token, target: bytes
    ) -> AnyResponse:
        started = trio.current_time()
        response = await self._exchange(request, token, target)
        # One count per request for a token, however it was answered (404, 503, 504 included);
        # a request whose HTTP client went away has no answer and is not counted. A streamed
        # body is still to come: it is counted once the front has sent what it could of it.
        if isinstance(response, StreamingResponse):
            def observe(streamed: StreamingResponse) -> None:
                self.metrics.observe(status=streamed.status, seconds=trio.current_time() - started,
                                     request_bytes=request.body_size(),
                                     response_bytes=streamed.sent_bytes)
            response.on_finish = observe
        else:
            self.metrics.observe(status=response.status, seconds=trio.current_time() - started,
                                 request_bytes=request.body_size(), response_bytes=len(response.body))
        return response

    async def _exchange(
        self, request: IncomingRequest, token: Token, target: bytes
    ) -> AnyResponse:
        rendezvous = self.registry.get(token)
        if rendezvous is None:
            rendezvous = await self._await_registration(token)
        if rendezvous is None:
            self.log.info("HTTP RET", token=token, status=404, url=_loggable(target),
                          err="tunnel not found")
            self.brake.failed(self.client_address(request))
            return simple_response(404, "Tunnel not found")
        addr = self.client_address(request)
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
            deadline = trio.current_time() + self.settings.httptimeout
            outcome = await rendezvous.exchange(pending, deadline=deadline)
        except QueueFull:
            return self._queue_full(token, request_id=pending.id)
        if isinstance(outcome, Failure):
            self.log.info("HTTP RET", token=token, id=pending.id, status=outcome.status,
                          err=outcome.text)
            return simple_response(outcome.status, outcome.text)
        self.log.info("HTTP RET", token=token, id=pending.id, status=outcome.status)
        return outcome

    def _queue_full(self, token: Token, request_id: int | None = None) -> framing.Response:
        self.log.warning("HTTP RET", token=token, id=request_id, status=503, err="queue full")
        return simple_response(503, "Too many requests queued for this tunnel",
                               headers=[(b"Retry-After", b"1")])

    async def _await_registration(self, token: Token) -> Rendezvous | None:
        """Just after a (re)start no token is known yet, though clients are on their way back:
        for ``restart_grace`` seconds a request for an unknown token waits for its tunnel
        instead of a 404 that would only mean "too early"."""
        grace_end = self.started_at + self.settings.restart_grace
        if trio.current_time() >= grace_end or len(self._awaited) >= MAX_AWAITED_TOKENS:
            return None
        arrival = self._awaited.get(token)
        if arrival is None:
            arrival = self._awaited[token] = trio.Event()
        with trio.move_on_at(grace_end):
            await arrival.wait()
        if self._awaited.get(token) is arrival and not arrival.is_set():
            del self._awaited[token]
        return self.registry.get(token)

    # -- tunnels ---------------------------------------------------------------------------

    async def _take_tunnel(self, request: IncomingRequest, stream: ActivityStream) -> None:
        origin = request.header(b"origin")
        addr = self.client_address(request)  # behind nginx: the client's, not nginx's
        if request.method != b"GET":
            await _raw_reply(stream, 400, "The tunnel endpoint takes GET upgrades only")
            return
        key, ws_version = request.header(b"sec-websocket-key"), request.header(b"sec-websocket-version")
        # A missing or short token is admit()'s to refuse, and to count as a failure.
        if origin and len(origin) >= MIN_LENGTH and (key is None or ws_version != b"13"):
            await _raw_reply(stream, 400, "Not a WebSocket version 13 handshake")
            return
        admitted = self.admit(request, addr)
        if isinstance(admitted, Refusal):
            await _raw_reply(stream, admitted.status, admitted.text, headers=admitted.headers)
            return
        token = admitted
        version = (request.header(VERSION_HEADER.lower()) or b"").decode("latin-1") or "unknown"
        # Our cli offers v2 and then gets it (batched if it offers that); an original client
        # offers nothing and gets v1, whose message can be a whole body.
        offered = _offered_subprotocols(request)
        subprotocol = next((name for name in (v2.BATCH_SUBPROTOCOL, v2.SUBPROTOCOL)
                            if name.encode() in offered), None)
        offers_v2 = subprotocol is not None
        if subprotocol == v2.BATCH_SUBPROTOCOL:
            max_message = v2.MAX_BATCH_SIZE
        elif offers_v2:
            max_message = v2.MAX_MESSAGE_SIZE
        else:
            max_message = self.settings.max_body_size + framing.MAX_HEAD_SIZE + framing.ID_DIGITS
        if not await self.handshakes.acquire():
            self.log.warning("WS   REFUSE", token=token, addr=addr, err="too many handshakes")
            await _raw_reply(stream, 503, "Too many tunnel handshakes at once",
                             headers=[(b"Retry-After", b"1")])
            return
        try:
            if self.draining:  # it began while we waited for our turn
                await _raw_reply(stream, 503, "Server shutting down")
                return
            with trio.fail_after(self.settings.header_timeout):
                ws = await websocket.accept(
                    stream, subprotocol=subprotocol,
                    extra_headers=[(VERSION_HEADER, __version__.encode())],
                    max_message_size=max_message, receive_size=WS_RECEIVE_SIZE,
                )
        except HandshakeError as exc:
            self.log.warning("WS   REFUSE", token=token, addr=addr, err=str(exc))
            return
        finally:
            self.handshakes.release()
        rendezvous = self.registered(token)
        connection: TunnelConnection
        if offers_v2:
            connection = TunnelConnectionV2(
                rendezvous, ws, stream, addr=addr, client_version=version,
                transport="websocket", wstimeout=self.settings.wstimeout, log=self.log,
                httptimeout=self.settings.httptimeout,
                max_streams=self.settings.max_streams_per_tunnel,
                batched=subprotocol == v2.BATCH_SUBPROTOCOL,
            )
        else:
            connection = TunnelConnection(
                rendezvous, ws, stream, addr=addr, client_version=version,
                transport="websocket", wstimeout=self.settings.wstimeout, log=self.log,
            )
        self.log.info("WS   NEW", token=token, addr=addr, version=version,
                      protocol=connection.protocol, clients=len(rendezvous.connections) + 1)
        try:
            await connection.serve()
        finally:
            reason = connection.closing_reason or (ws.closed.reason if ws.closed else None)
            self.log.info("WS   CLOSE", token=token, addr=addr, reason=reason)
            await connection.close()

    def admit(self, request: IncomingRequest, addr: str) -> Token | Refusal:
        """The checks every tunnel opening passes, whatever its transport: the token (in
        ``Origin``), the failure brake, allowed_tokens, passwords and max_clients_per_token."""
        origin = request.header(b"origin")
        wait = self.brake.retry_after(addr)
        if wait is not None:
            self.log.warning("WS   REFUSE", addr=addr, err="too many failures", retry_after=wait)
            return Refusal(429, "Too many failed attempts from this address",
                           [(b"Retry-After", b"%d" % wait)])
        if not origin or len(origin) < MIN_LENGTH:
            self.log.warning("WS   REFUSE", addr=addr, err="missing or short token")
            self.brake.failed(addr)
            return Refusal(400, f"Token (Origin header) missing or shorter than {MIN_LENGTH} characters")
        token = Token(origin.decode("utf-8", "surrogateescape"))
        if self.draining:
            return Refusal(503, "Server shutting down")
        if not self.allows(token):
            self.log.warning("WS   REFUSE", token=token, addr=addr, err="token not allowed")
            self.brake.failed(addr)
            return Refusal(403, "Token not allowed on this server")
        if not self.passwords.admits(token, request.header(b"authorization")):
            self.log.warning("WS   REFUSE", token=token, addr=addr, err="wrong or missing password")
            self.brake.failed(addr)
            return Refusal(401, "Tunnel password required", [(b"WWW-Authenticate", BASIC_REALM)])
        limit = self.settings.max_clients_per_token
        existing = self.registry.get(token)
        if limit and existing is not None and len(existing.connections) >= limit:
            self.log.warning("WS   REFUSE", token=token, addr=addr, err="too many clients")
            return Refusal(429, "Too many clients for this token")
        return token

    def registered(self, token: Token) -> Rendezvous:
        """The token's rendez-vous for a new tunnel; requests waiting for it may go now."""
        rendezvous = self.registry.register(token)
        arrival = self._awaited.pop(token, None)
        if arrival is not None:
            arrival.set()
        return rendezvous


def _offered_subprotocols(request: IncomingRequest) -> list[bytes]:
    offered = b",".join(value for name, value in request.headers
                        if name.lower() == b"sec-websocket-protocol")
    return [part.strip() for part in offered.split(b",")]


def _front_limits(settings: ServerSettings) -> FrontLimits:
    return FrontLimits(
        max_header_size=settings.max_header_size,
        max_header_count=settings.max_header_count,
        max_body_size=settings.max_body_size,
        header_timeout=settings.header_timeout,
    )


def _password_book(settings: ServerSettings) -> PasswordBook:
    return PasswordBook(password_pairs(settings.passwords) if settings.passwords else ())


def _too_many_failures(wait: int) -> framing.Response:
    return simple_response(429, "Too many failed attempts from this address",
                           headers=[(b"Retry-After", b"%d" % wait)])


async def _raw_reply(stream: ActivityStream, status_code: int, text: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer a handshake we refuse, before any WebSocket layer exists; the caller closes."""
    response = simple_response(status_code, text,
                               headers=[*(headers or []), (b"Connection", b"close")])
    response.headers.append((b"Content-Length", b"%d" % len(response.body)))
    head = [b"HTTP/1.1 %d %s\r\n" % (status_code, response.reason)]
    head += [b"%s: %s\r\n" % header for header in response.headers]
    with trio.move_on_after(5):
        await stream.send_all(b"".join([*head, b"\r\n", response.body]))


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
