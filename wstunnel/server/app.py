"""The tunnel server: listens, hands each connection to the HTTP front, and runs until told to stop.

The parts, and the path of a request through them:

- the listener accepts sockets; :class:`~wstunnel.server.front.HttpConnection` speaks HTTP/1.1;
- a ``/_tunnel`` WebSocket upgrade leaves HTTP for the
  :class:`~wstunnel.server.handshake.TunnelAcceptor`; a long-poll request goes to
  :class:`~wstunnel.server.longpoll.LongPoll`; any other request to the
  :class:`~wstunnel.server.router.Router`: a built-in endpoint, or the
  :class:`~wstunnel.server.forwarding.Forwarder`, which queues it on its token's
  :class:`~wstunnel.server.rendezvous.Rendezvous` for a tunnel connection to carry;
- :class:`~wstunnel.server.admission.Admission` decides who may open a tunnel and whose
  ``X-Forwarded-For`` is believed;
- the :class:`~wstunnel.server.capacity.FileBudget` counts connections against the open-files
  limit: past its high-water mark a new connection may only ask for the server's own endpoints
  (:mod:`wstunnel.server.accept` is the accept loop that asks it).

Before any of that, a request's Host may name a tunnel (:mod:`wstunnel.server.hosts`: everything
for that host goes to the Forwarder); otherwise, with ``base_path``, its target loses that prefix
(or is answered 404 outside it). With ``tls_cert`` the listener on ``port`` (or the one on
``tls_port``, beside the plain one) speaks TLS first (:mod:`wstunnel.server.tlsfront`).

:class:`TunnelServer` builds them and owns the lifecycle: start, reload, graceful stop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable
from functools import partial

import trio

from wstunnel import __version__, daemon, limits, procstats, tls
from wstunnel.alarms import Alarms
from wstunnel.config import ServerSettings
from wstunnel.errors import ConfigError
from wstunnel.logs import EventLogger
from wstunnel.server import accept
from wstunnel.server.admission import CERTIFICATE_REQUIRED, Admission
from wstunnel.server.audit import ErrorLog
from wstunnel.server.blocklist import Blocklist
from wstunnel.server.capacity import LIMITED_HEADER_TIMEOUT, FileBudget, is_reserved
from wstunnel.server.console import api as console_api
from wstunnel.server.console.api import Console
from wstunnel.server.console.snapshot import ServerFacts
from wstunnel.server.forwarding import Forwarder
from wstunnel.server.front import FrontLimits, HttpConnection
from wstunnel.server.handshake import TunnelAcceptor
from wstunnel.server.hosts import HostRouting
from wstunnel.server.incoming import IncomingRequest
from wstunnel.server.longpoll import LongPoll
from wstunnel.server.messages import AnyResponse, StreamingResponse, simple_response
from wstunnel.server.metrics import Metrics
from wstunnel.server.rendezvous import Carrier, Registry
from wstunnel.server.router import Router
from wstunnel.server.tlsfront import TLSFront
from wstunnel.tunnel.sockets import DirectSocketStream

# A reload cannot move the listening sockets or the pid file; these wait for a restart.
RESTART_ONLY_SETTINGS = ("host", "port", "tls_port", "pidfile", "state_file")
# Nor turn TLS on or off: a listener is plain or TLS from its start (the files may change).
TLS_FILES = ("tls_cert", "tls_key")
TUNNEL_PATH = b"/_tunnel"
# On stop, how long all tunnels together wait for their peers' Close replies (one deadline).
STOP_CLOSE_WAIT = 1.0


class TunnelServer:
    def __init__(self, settings: ServerSettings, log: EventLogger, *,
                 open_files: limits.OpenFilesLimit | None = None) -> None:
        """``open_files``: the limit the daemon raised at start (default: the process's own)."""
        self.settings = settings
        self.log = log
        self.started_at = trio.current_time()
        if open_files is None:
            soft = limits.soft_open_files_limit()
            open_files = limits.OpenFilesLimit(soft=soft, hard=soft, started_with=soft)
        self.open_files = open_files
        self.files = FileBudget(open_files.soft, log, others=procstats.open_fds() or 0,
                                count=procstats.open_fds, clock=trio.current_time)
        self.draining = False
        self.stop_requested = trio.Event()
        # Deadlines that something else nearly always beats (a request's answer), without a
        # cancel scope each: alarms.run, in the root nursery, fires those that came due.
        self.alarms = Alarms()
        self.registry = Registry(
            alarms=self.alarms,
            max_requests=settings.max_requests_per_tunnel,
            token_idle_timeout=settings.token_idle_timeout,
            max_bytes=settings.max_queued_bytes,
        )
        self.metrics = Metrics(__version__)
        self.tls: TLSFront | None = None
        if settings.tls_cert is not None:
            try:
                self.tls = TLSFront(settings, log)
            except tls.TLSFileError as exc:  # the files changed since the settings were read
                raise ConfigError(f"tls_cert/tls_key: {exc}") from None
        self.hosts = HostRouting(settings)
        self._paths(settings)
        # Read before anything listens: a state file that cannot be read stops the start.
        blocklist = Blocklist.load(settings.state_file)
        self.admission = Admission(settings, log, self.registry, draining=self._is_draining,
                                   blocklist=blocklist)
        self.longpoll = LongPoll(self.admission, self.registry, log, settings=self._settings)
        self.acceptor = TunnelAcceptor(self.admission, self.registry, log,
                                       settings=self._settings, draining=self._is_draining)
        errors = ErrorLog()
        forwarder = Forwarder(self.registry, self.admission, self.metrics, log,
                              settings=self._settings, started_at=self.started_at,
                              hosts=self.hosts, errors=errors)
        self.listening: list[str] = []
        self.console = Console(
            self.registry, self.admission, self.metrics, errors, log,
            ServerFacts(__version__, self.started_at, listening=self._listening,
                        draining=self._is_draining),
            settings=self._settings, start_drain=self.start_drain,
        )
        self.router = Router(self.registry, self.admission, self.metrics, forwarder,
                             started_at=self.started_at, draining=self._is_draining,
                             console=self.console, files=self.files)
        self._root: trio.Nursery | None = None
        self.limits = _front_limits(settings)
        self._active_requests = 0
        self._polling: set[HttpConnection] = set()  # connections that carried long-poll requests
        self._idle = trio.Event()
        self._idle.set()

    def _settings(self) -> ServerSettings:
        return self.settings

    def _paths(self, settings: ServerSettings) -> None:
        """What every request is checked against, worked out once per (re)load."""
        self._base = settings.base_path.encode()
        self._tunnel_path = self._base + TUNNEL_PATH
        self._require_all = settings.require_client_cert == "all"

    def _is_draining(self) -> bool:
        return self.draining

    def _listening(self) -> list[str]:
        return self.listening

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, serve, and on :meth:`stop` drain gracefully; ``started`` gets the first port
        (the plain one when there are two)."""
        settings = self.settings
        # (port, speaks TLS): one listener, plain or TLS, or a plain one and a TLS one.
        wanted = [(settings.port, self.tls is not None and settings.tls_port is None)]
        if self.tls is not None and settings.tls_port is not None:
            wanted.append((settings.tls_port, True))
        bound: list[tuple[list[trio.SocketListener], bool]] = []
        for port, secure in wanted:
            try:
                listeners = await trio.open_tcp_listeners(port, host=settings.host)
            except OSError as exc:
                for earlier, _secure in bound:
                    for listener in earlier:
                        await listener.aclose()
                where = f"{settings.host}:{port}"
                raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror or exc}") from None
            bound.append((listeners, secure))
            self.listening += [_address(listener) for listener in listeners]
            got = listeners[0].socket.getsockname()[1]
            if secure:
                self.log.info("Listening", port=got, host=settings.host, tls="yes")
            else:
                self.log.info("Listening", port=got, host=settings.host)
        first_port = bound[0][0][0].socket.getsockname()[1]
        files = self.files
        files.settle()  # the listeners are open now
        # What one instance holds, as it runs: each tunnel and each HTTP connection is one of
        # ``connections``; past them it refuses (503) all but its own endpoints.
        extra: dict[str, int] = {}
        if self.open_files.raised:
            extra["raised_from"] = self.open_files.started_with
        backlog = limits.listen_backlog()  # unknown under the unit: ProcSubset=pid hides /proc/sys
        if backlog is not None:
            extra["listen_backlog"] = backlog
        self.log.info("Limits", open_files=files.limit, connections=files.capacity(),
                      reserve=files.reserve, **extra)
        async with trio.open_nursery() as root:
            self._root = root
            root.start_soon(self.alarms.run)
            root.start_soon(self.registry.reap_forever, self.log)
            root.start_soon(files.watch)
            await root.start(self.longpoll.run)
            await root.start(self.console.run)
            async with trio.open_nursery() as connections:
                accepting = trio.CancelScope()
                connections.start_soon(self._accept, bound, connections, accepting)
                task_status.started(first_port)
                await self.stop_requested.wait()
                accepting.cancel()
                await self._drain()
                connections.cancel_scope.cancel()
            root.cancel_scope.cancel()
        self.log.info("Stopped")

    def stop(self) -> None:
        self.stop_requested.set()

    def start_drain(self) -> bool:
        """Drain without stopping (the console's action): no new tunnels or requests, those in
        flight finish, then the tunnels close. False if draining (or stopping) already."""
        if self.draining or self._root is None:
            return False
        self.draining = True
        self._root.start_soon(self._drain)
        return True
    def report(self) -> None:
        """One STATS line: what the process holds (on SIGUSR1; /_metrics has the same)."""
        connections = list(self.registry.connections())
        flows = [flow for connection in connections if (flow := connection.flow()) is not None]
        rss = procstats.resident_bytes()
        self.log.info("STATS", tasks=procstats.trio_tasks(), fds=procstats.open_fds(),
                      rss_kib=rss // 1024 if rss is not None else None,
                      py_blocks=procstats.python_blocks(), tunnels=len(self.registry),
                      clients=len(connections),
                      streams=sum(flow["streams"] for flow in flows),
                      requests=self._active_requests)

    def apply(self, settings: ServerSettings) -> tuple[list[str], list[str]]:
        """Take new settings without a restart; returns (applied, needing a restart)."""
        changed = daemon.changed_settings(self.settings, settings)
        restart_only: tuple[str, ...] = RESTART_ONLY_SETTINGS
        if (self.settings.tls_cert is None) != (settings.tls_cert is None):
            restart_only += TLS_FILES
        fixed = [name for name in changed if name in restart_only]
        # What cannot change live keeps its running value, so what we report stays true.
        kept = {name: getattr(self.settings, name) for name in restart_only}
        self.settings = settings.model_copy(update=kept)
        if self.tls is not None:
            self.tls.reload(self.settings)  # whether the paths changed or not: renewed files
        self.hosts.apply(self.settings)
        self._paths(self.settings)
        self.registry.resize(self.settings.max_requests_per_tunnel, self.settings.max_queued_bytes)
        self.registry.token_idle_timeout = self.settings.token_idle_timeout
        self.admission.apply(self.settings)
        self.limits = _front_limits(self.settings)
        return [name for name in changed if name not in fixed], fixed

    async def revoke_disallowed(self) -> None:
        """After a reload narrowed ``allowed_tokens``: close those tunnels, forget the tokens."""
        for rendezvous in list(self.registry):
            if self.admission.allows(rendezvous.token):
                continue
            self.log.warning("WS   REVOKE", token=rendezvous.token,
                             clients=len(rendezvous.connections))
            async with trio.open_nursery() as closers:
                for connection in list(rendezvous.connections):
                    closers.start_soon(connection.close, 1008, "token revoked: no longer allowed")
            self.registry.forget(rendezvous.token)

    async def _accept(self, bound: list[tuple[list[trio.SocketListener], bool]],
                      nursery: trio.Nursery, scope: trio.CancelScope) -> None:
        """Accept on every listener (plain, TLS) until ``scope`` is cancelled; the connections'
        tasks go in ``nursery``, which outlives the accepting."""
        with scope:
            try:
                async with trio.open_nursery() as acceptors:
                    for listeners, secure in bound:
                        acceptors.start_soon(
                            accept.serve, listeners, partial(self._handle_socket, secure=secure),
                            nursery, self.files)
            finally:
                for listeners, _secure in bound:
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

        async def close(connection: Carrier) -> None:
            nonlocal answered
            if await connection.close(1001, "server shutting down", deadline=deadline):
                answered += 1

        async with trio.open_nursery() as closers:
            for connection in connections:
                closers.start_soon(close, connection)
        # A long-poll client learns of the close from the answer to its held poll ("server
        # shutting down"): let those answers go out, within the same deadline, before the
        # connections are cancelled.
        with trio.move_on_at(deadline):
            for polled in list(self._polling):
                await polled.wait_idle()
        self.log.info("Closed tunnels", tunnels=len(connections), answered=answered,
                      secs=round(trio.current_time() - began, 2))

    # -- HTTP ------------------------------------------------------------------------------

    async def _handle_socket(self, tcp: trio.SocketStream, limited: bool, *,
                             secure: bool = False) -> None:
        try:
            peer = str(tcp.socket.getpeername()[0])
        except OSError:
            await tcp.aclose()
            return
        stream: trio.abc.Stream = DirectSocketStream(tcp)
        subject = None
        if secure:
            assert self.tls is not None
            opened = await self.tls.handshake(tcp, peer)
            if opened is None:
                return
            stream, subject = opened
        if limited:
            await self._serve_limited(stream, peer, subject)
            return
        # A draining server closes each connection after its response, except a long-poll
        # client's: it has to keep polling, on the connections it has, while its in-flight
        # requests finish (new connections are no longer accepted by then).
        polling = False
        connection: HttpConnection | None = None

        async def respond(request: IncomingRequest) -> AnyResponse:
            nonlocal polling
            # Known before the answer: a held poll is what a stop waits to see answered.
            polling = self._is_poll(request)
            if polling and connection is not None:
                self._polling.add(connection)
            return await self._respond(request)

        connection = HttpConnection(
            stream, peer, self.limits,
            respond=respond, is_tunnel=self._is_tunnel, take_tunnel=self.acceptor.take_tunnel,
            draining=lambda: self.draining and not polling, alarms=self.alarms,
            client_subject=subject,
        )
        try:
            await connection.serve()
        finally:
            self._polling.discard(connection)
            # respond() holds the connection, and the connection respond(): let go here,
            # the pair (with its socket, h11 state and last request) is freed now by
            # reference counting, not at the cycle collector's next pass.
            connection = None

    def _is_tunnel(self, request: IncomingRequest) -> bool:
        if request.path != self._tunnel_path or not request.is_websocket_upgrade():
            return False
        # On a host that names a tunnel, /_tunnel is the app's.
        return not (self.hosts.enabled and self.hosts.match(request.header(b"host")) is not None)

    async def _serve_limited(self, stream: trio.abc.Stream, peer: str, subject: str | None) -> None:
        """A connection accepted past the high-water mark: one request, the server's own
        endpoints only (from the reserve of descriptors), 503 for anything else."""

        files = self.files
        silent = trio.CancelScope()  # cancelled if the server needs the descriptor back first

        async def respond(request: IncomingRequest) -> AnyResponse:
            files.head_received(silent)
            path = self._local_path(request)
            if path is not None and is_reserved(path):
                return await self._respond(request)
            return files.refuse().response()

        header_timeout = min(self.limits.header_timeout, LIMITED_HEADER_TIMEOUT)
        connection = HttpConnection(
            stream, peer, dataclasses.replace(self.limits, header_timeout=header_timeout),
            respond=respond, is_tunnel=_never, take_tunnel=self.acceptor.take_tunnel,
            draining=lambda: True,  # close after the answer: the descriptor goes back
            alarms=self.alarms, client_subject=subject,
        )
        files.waiting_for_head(silent)
        try:
            with silent:
                await connection.serve()
        finally:
            files.head_received(silent)

    async def _respond(self, request: IncomingRequest) -> AnyResponse:
        if self._require_all and not self.admission.certified(request, tunnel=False):
            return CERTIFICATE_REQUIRED.response()
        routed = self.hosts.match(request.header(b"host")) if self.hosts.enabled else None
        if routed is not None:
            return await self._active(self.router.route(request, routed))
        if self._base and not self._strip_base(request):
            return simple_response(404, f"Not found: this server serves under {self._base.decode()}/")
        if self.longpoll.handles(request.path):
            # A tunnel's transport, not a tunnelled request: a graceful stop does not wait for
            # a held poll, and the session's requests drain through it meanwhile.
            return await self.longpoll.respond(request)
        if request.target.startswith(console_api.PREFIX) and console_api.handles(request.path):
            # Nor for the console's event streams, open as long as a page shows them.
            return await self.router.route(request)
        return await self._active(self.router.route(request))

    def _local_path(self, request: IncomingRequest) -> bytes | None:
        """The path ``_respond`` will route ``request`` by: under the base path, without it; None
        for a request outside the base path or on a host that names a tunnel (the app's)."""
        if self.hosts.enabled and self.hosts.match(request.header(b"host")) is not None:
            return None
        path = request.path
        if self._base:
            if not path.startswith(self._base):
                return None
            path = path[len(self._base):]
        return path

    def _is_poll(self, request: IncomingRequest) -> bool:
        """Whether ``_respond`` will give ``request`` to the long-poll server."""
        path = self._local_path(request)
        return path is not None and self.longpoll.handles(path)

    def _strip_base(self, request: IncomingRequest) -> bool:
        """``/base/x?q`` -> ``/x?q`` and ``/base`` -> ``/``; False for a target outside it."""
        target, base = request.target, self._base
        if not target.startswith(base):
            return False
        rest = target[len(base):]
        if not rest or rest[:1] == b"?":
            rest = b"/" + rest
        elif rest[:1] != b"/":
            return False  # /basement is not under /base
        request.target = rest
        return True

    async def _active(self, routing: Awaitable[AnyResponse]) -> AnyResponse:
        """A request a graceful stop waits for, until its response (streamed body included)
        has gone out."""
        self._active_requests += 1
        self._idle = trio.Event() if self._active_requests == 1 else self._idle
        streaming = False
        try:
            response = await routing
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


def _never(request: IncomingRequest) -> bool:
    """A limited connection's tunnel handshake is answered as a request: with a 503."""
    return False


def _front_limits(settings: ServerSettings) -> FrontLimits:
    return FrontLimits(
        max_header_size=settings.max_header_size,
        max_header_count=settings.max_header_count,
        max_body_size=settings.max_body_size,
        header_timeout=settings.header_timeout,
        max_stream_size=settings.max_stream_size or math.inf,
    )


def _address(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
