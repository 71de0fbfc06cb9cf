"""Where a request goes: a built-in endpoint of the server, or a token's tunnel.

The built-in endpoints answer from the server's own state: ``/_health_check`` and ``/_stats`` to
anyone (``/_stats`` details to loopback callers only, as the original), ``/_status`` and
``/_metrics`` to loopback and trusted proxies; ``/_admin`` and below is the operator's console
(``wstunnel.server.console``). Everything else is a request for a token, which the
:class:`~wstunnel.server.forwarding.Forwarder` takes, unless the server is draining.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from wstunnel import framing
from wstunnel.server import status
from wstunnel.server.admission import SHUTTING_DOWN, Admission, Refusal, is_loopback
from wstunnel.server.capacity import FileBudget
from wstunnel.server.console import api as console_api
from wstunnel.server.forwarding import Forwarder
from wstunnel.server.hosts import HostMatch
from wstunnel.server.incoming import IncomingRequest
from wstunnel.server.messages import AnyResponse, simple_response
from wstunnel.server.metrics import CONTENT_TYPE, Gauges, Metrics
from wstunnel.server.rendezvous import Registry

Endpoint = Callable[[IncomingRequest], framing.Response]
# A draining server still answers its own endpoints; a tunnelled request is told to come back.
DRAINING = Refusal(SHUTTING_DOWN.status, SHUTTING_DOWN.text, [(b"Retry-After", b"5")])


@dataclass(eq=False)
class Router:
    registry: Registry
    admission: Admission
    metrics: Metrics
    forwarder: Forwarder
    started_at: float = field(kw_only=True)
    draining: Callable[[], bool] = field(kw_only=True)
    console: console_api.Console | None = field(kw_only=True, default=None)
    files: FileBudget | None = field(default=None, kw_only=True)  # open files, for status/metrics
    _endpoints: dict[bytes, Endpoint] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._endpoints = {
            b"/_health_check": self._health_check,
            b"/_stats": self._stats,
            b"/_status": self._status,
            b"/_metrics": self._metrics,
            b"/_tunnel": self._tunnel_without_upgrade,
        }

    async def route(self, request: IncomingRequest, routed: HostMatch | None = None) -> AnyResponse:
        """``routed``: the request's Host names a tunnel (host routing), whose app then owns
        every path, our endpoints' included."""
        if routed is None:
            path = request.path
            endpoint = self._endpoints.get(path)
            if endpoint is not None:
                return endpoint(request)
            if self.console is not None and console_api.handles(path):
                return await self.console.respond(request)
        if self.draining():
            return DRAINING.response()
        return await self.forwarder.forward(request, routed)

    def _health_check(self, request: IncomingRequest) -> framing.Response:
        return simple_response(200, status.HEALTH_TEXT)

    def _stats(self, request: IncomingRequest) -> framing.Response:
        detailed = is_loopback(self.admission.client_address(request))
        return simple_response(200, status.render_stats(self.registry, detailed=detailed))

    def _status(self, request: IncomingRequest) -> framing.Response:
        # Token prefixes and client addresses are for operators, as /_stats details are.
        if not self.admission.from_inside(request):
            return simple_response(403, "Status is for localhost and trusted proxies only")
        files = self.files.snapshot().as_dict() if self.files is not None else None
        body = status.render_status(self.registry, started_at=self.started_at, open_files=files)
        response = simple_response(200, body)
        response.headers = [(b"Content-Type", b"application/json")]
        return response

    def _metrics(self, request: IncomingRequest) -> framing.Response:
        # The counts tell outsiders how busy the server is.
        if not self.admission.from_inside(request):
            return simple_response(403, "Metrics are for localhost and trusted proxies only")
        body = self.metrics.render(Gauges.of(self.registry),
                                   uptime=trio.current_time() - self.started_at,
                                   files=self.files.snapshot() if self.files is not None else None)
        response = simple_response(200, body)
        response.headers = [(b"Content-Type", CONTENT_TYPE)]
        return response

    def _tunnel_without_upgrade(self, request: IncomingRequest) -> framing.Response:
        return simple_response(400, "The tunnel endpoint takes WebSocket upgrades only")
