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

:class:`TunnelServer` builds them and owns the lifecycle: start, reload, graceful stop.
"""

from __future__ import annotations

import dataclasses

import trio

from wstunnel import __version__, daemon, limits
from wstunnel.config import ServerSettings
from wstunnel.logs import EventLogger
from wstunnel.server import accept
from wstunnel.server.admission import Admission
from wstunnel.server.capacity import LIMITED_HEADER_TIMEOUT, FileBudget, is_reserved
from wstunnel.server.forwarding import Forwarder
from wstunnel.server.front import FrontLimits, HttpConnection, IncomingRequest
from wstunnel.server.handshake import TunnelAcceptor
from wstunnel.server.longpoll import LongPoll
from wstunnel.server.messages import AnyResponse, StreamingResponse
from wstunnel.server.metrics import Metrics
from wstunnel.server.rendezvous import Carrier, Registry
from wstunnel.server.router import Router

# A reload cannot move the listening socket or the pid file; these wait for a restart.
RESTART_ONLY_SETTINGS = ("host", "port", "pidfile")
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
        self.files = FileBudget(open_files.soft, log, others=limits.count_open_files() or 0,
                                count=limits.count_open_files, clock=trio.current_time)
        self.draining = False
        self.stop_requested = trio.Event()
        self.registry = Registry(
            max_requests=settings.max_requests_per_tunnel,
            token_idle_timeout=settings.token_idle_timeout,
            max_bytes=settings.max_queued_bytes,
        )
        self.metrics = Metrics(__version__)
        self.admission = Admission(settings, log, self.registry, draining=self._is_draining)
        self.longpoll = LongPoll(self.admission, self.registry, log, settings=self._settings)
        self.acceptor = TunnelAcceptor(self.admission, self.registry, log,
                                       settings=self._settings, draining=self._is_draining)
        forwarder = Forwarder(self.registry, self.admission, self.metrics, log,
                              settings=self._settings, started_at=self.started_at)
        self.router = Router(self.registry, self.admission, self.metrics, forwarder,
                             started_at=self.started_at, draining=self._is_draining,
                             files=self.files)
        self.limits = _front_limits(settings)
        self._active_requests = 0
        self._idle = trio.Event()
        self._idle.set()

    def _settings(self) -> ServerSettings:
        return self.settings

    def _is_draining(self) -> bool:
        return self.draining

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, serve, and on :meth:`stop` drain gracefully; ``started`` gets the port."""
        try:
            listeners = await trio.open_tcp_listeners(self.settings.port, host=self.settings.host)
        except OSError as exc:
            where = f"{self.settings.host}:{self.settings.port}"
            raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror or exc}") from None
        port = listeners[0].socket.getsockname()[1]
        self.log.info("Listening", port=port, host=self.settings.host)
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
            root.start_soon(self.registry.reap_forever, self.log)
            root.start_soon(files.watch)
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

    def apply(self, settings: ServerSettings) -> tuple[list[str], list[str]]:
        """Take new settings without a restart; returns (applied, needing a restart)."""
        changed = daemon.changed_settings(self.settings, settings)
        fixed = [name for name in changed if name in RESTART_ONLY_SETTINGS]
        # What cannot change live keeps its running value, so what we report stays true.
        kept = {name: getattr(self.settings, name) for name in RESTART_ONLY_SETTINGS}
        self.settings = settings.model_copy(update=kept)
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
                    closers.start_soon(connection.close, 1008, "token no longer allowed")
            self.registry.forget(rendezvous.token)

    async def _accept(self, listeners: list[trio.SocketListener], nursery: trio.Nursery,
                      scope: trio.CancelScope) -> None:
        with scope:
            try:
                await accept.serve(listeners, self._handle_socket, nursery, self.files)
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

        async def close(connection: Carrier) -> None:
            nonlocal answered
            if await connection.close(1001, "server shutting down", deadline=deadline):
                answered += 1

        async with trio.open_nursery() as closers:
            for connection in connections:
                closers.start_soon(close, connection)
        self.log.info("Closed tunnels", tunnels=len(connections), answered=answered,
                      secs=round(trio.current_time() - began, 2))

    # -- HTTP ------------------------------------------------------------------------------

    async def _handle_socket(self, stream: trio.SocketStream, limited: bool) -> None:
        try:
            peer = str(stream.socket.getpeername()[0])
        except OSError:
            await stream.aclose()
            return
        if limited:
            await self._serve_limited(stream, peer)
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
            respond=respond, is_tunnel=_is_tunnel, take_tunnel=self.acceptor.take_tunnel,
            draining=lambda: self.draining and not polling,
        )
        await connection.serve()

    async def _serve_limited(self, stream: trio.SocketStream, peer: str) -> None:
        """A connection accepted past the high-water mark: one request, the server's own
        endpoints only (from the reserve of descriptors), 503 for anything else."""

        files = self.files
        silent = trio.CancelScope()  # cancelled if the server needs the descriptor back first

        async def respond(request: IncomingRequest) -> AnyResponse:
            files.head_received(silent)
            if is_reserved(request.path):
                return await self._respond(request)
            return files.refuse().response()

        header_timeout = min(self.limits.header_timeout, LIMITED_HEADER_TIMEOUT)
        connection = HttpConnection(
            stream, peer, dataclasses.replace(self.limits, header_timeout=header_timeout),
            respond=respond, is_tunnel=_never, take_tunnel=self.acceptor.take_tunnel,
            draining=lambda: True,  # close after the answer: the descriptor goes back
        )
        files.waiting_for_head(silent)
        try:
            with silent:
                await connection.serve()
        finally:
            files.head_received(silent)

    async def _respond(self, request: IncomingRequest) -> AnyResponse:
        if self.longpoll.handles(request.path):
            # A tunnel's transport, not a tunnelled request: a graceful stop does not wait for
            # a held poll, and the session's requests drain through it meanwhile.
            return await self.longpoll.respond(request)
        self._active_requests += 1
        self._idle = trio.Event() if self._active_requests == 1 else self._idle
        streaming = False
        try:
            response = await self.router.route(request)
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


def _is_tunnel(request: IncomingRequest) -> bool:
    return request.path == b"/_tunnel" and request.is_websocket_upgrade()


def _never(request: IncomingRequest) -> bool:
    """A limited connection's tunnel handshake is answered as a request: with a 503."""
    return False


def _front_limits(settings: ServerSettings) -> FrontLimits:
    return FrontLimits(
        max_header_size=settings.max_header_size,
        max_header_count=settings.max_header_count,
        max_body_size=settings.max_body_size,
        header_timeout=settings.header_timeout,
    )
