"""The tunnel client, ``wstunnel cli`` ("wstuncli"): keep a tunnel open and serve what comes in.

One session per connection: dial, handshake (token in ``Origin``), then three tasks in the
session's nursery: the receiver, which starts one handler task per request; the keepalive, which
pings every ``timeout/3`` seconds and ends the session when a pong is ``timeout`` late; and the
handlers themselves. When a session ends, for whatever reason, the client waits a capped,
jittered, exponentially growing delay and dials again, forever.
"""

from __future__ import annotations

import random
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio
import trio_websocket

from wstunnel import __version__, daemon, framing, procstats, v2
from wstunnel.client import dial, longpoll
from wstunnel.client import proxy as proxies
from wstunnel.client.backend import Backend
from wstunnel.client.session_v1 import ClientSessionV1
from wstunnel.client.session_v2 import ClientSessionV2
from wstunnel.config import ClientSettings
from wstunnel.errors import DialError, TunnelMessageError, sole_exception
from wstunnel.headers import basic_credentials, get
from wstunnel.logs import EventLogger
from wstunnel.service import ServiceNotifier
from wstunnel.tokens import Token
from wstunnel.tunnel import websocket
from wstunnel.tunnel.longpoll import POLL_PATH
from wstunnel.tunnel.transport import VERSION_HEADER, WS_RECEIVE_SIZE, MessageTransport

# Refusals long-poll would get just as well (a password, a brake, a restart, a proxy that cannot
# reach the server): a fallback would only double the dials of every client of a busy or
# restarting server, and leave them on long-poll for websocket_retry once it is back.
NO_FALLBACK_STATUSES = frozenset({401, 429, 502, 503, 504})
IDLE_CHECK_SECS = 0.2  # how often a fallback long-poll session looks for a quiet moment
# A reload cannot re-dial by itself or move the pid file; these wait for a restart.
RESTART_ONLY_SETTINGS = ("token", "tunnel", "proxy", "client_ports", "certfile", "insecure", "pidfile",
                         "client_cert", "client_key")


# The reason of our Close frame (or long-poll DELETE) when the client stops.
SHUTTING_DOWN = "client shutting down"


class PingTimeout(Exception):
    pass


@dataclass
class Backoff:
    """Exponential backoff with "equal jitter": half the delay fixed, half random."""

    initial: float = 1.0
    cap: float = 30.0
    attempts: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * 2.0 ** min(self.attempts, 30))
        self.attempts += 1
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempts = 0


def write_statusfile(path: Path, now: float | None = None) -> None:
    """The original's format: ``Unix: <epoch>`` and ``Time: <RFC 3339 UTC>``; replaced atomically."""
    now = time.time() if now is None else now
    text = f"Unix: {int(now)}\nTime: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now))}\n"
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


class TunnelClient:
    def __init__(self, settings: ClientSettings, log: EventLogger,
                 notifier: ServiceNotifier | None = None) -> None:
        self.settings = settings
        self.log = log
        self.notifier = notifier or ServiceNotifier(environ={})
        self.token = Token(settings.token.get_secret_value())
        self.address = dial.TunnelAddress.from_url(settings.tunnel)
        self.backoff = Backoff(cap=settings.reconnect_max_delay)
        self.context: ssl.SSLContext | None = (
            dial.ssl_context(certfile=settings.certfile, insecure=settings.insecure,
                             client_cert=settings.client_cert, client_key=settings.client_key)
            if self.address.secure else None
        )
        self.proxy = proxies.choose_proxy(settings.proxy, self.address.host)
        self.limiter = trio.CapacityLimiter(settings.max_concurrent_requests)
        self.sessions = 0
        self.stopping = False
        self._goodbye_said = trio.Event()
        self.stopped = trio.Event()
        self._backoff_scope = trio.CancelScope()
        self.backend: Backend | None = None
        self._ws: MessageTransport | None = None
        # transport "auto": when the WebSocket was refused and long-poll took over (trio clock).
        self._longpoll_since: float | None = None
        self._redial_now = False  # the next dial follows at once (a change of transport)
        self._http: httpx.AsyncClient | None = None  # long-poll's requests
        self._session_v2: ClientSessionV2 | None = None
        self._ended_v2: ClientSessionV2 | None = None  # the last one, until its end is told
        # Streams that broke off, by cause, over every session: the STATS line shows them.
        self.stream_aborts: Counter[str] = Counter()

    async def run(self) -> None:
        backend_verify: ssl.SSLContext | bool = True
        if self.settings.insecure:
            backend_verify = False
        elif self.settings.certfile is not None:
            backend_verify = dial.ssl_context(certfile=self.settings.certfile, insecure=False)
        backend = self.backend = Backend(
            server=self.settings.server, regexp=self.settings.regexp,
            max_body_size=self.settings.max_body_size, max_stream_size=self.settings.max_stream_size,
            max_connections=self.settings.max_concurrent_requests, verify=backend_verify,
            log=self.log,
        )
        try:
            while True:
                reason = await self._session(backend)
                if self.stopping:
                    return
                delay = 0.0 if self._redial_now else self.backoff.next_delay()
                self._redial_now = False
                self.log.info("WS   RECONNECT", token=self.token, reason=reason,
                              delay_secs=round(delay, 1))
                self.notifier.status(f"reconnecting in {delay:.0f} s: {reason}")
                self._backoff_scope = trio.CancelScope()  # a scope is entered only once
                with self._backoff_scope:
                    await trio.sleep(delay)
                if self.stopping:
                    return
        finally:
            with trio.CancelScope(shield=True):
                await backend.aclose()
                if self._http is not None:
                    await self._http.aclose()
            self.stopped.set()

    async def _session(self, backend: Backend) -> str:
        """One connection, from dial to close; returns why it ended."""
        connected_before, fallback = self.sessions, self._longpoll_since is not None
        try:
            await self._connect_and_serve(backend)
        except BaseException as exc:
            if fallback and self.sessions == connected_before:
                # Long-poll as a fallback did not connect either: the next dial tries the
                # WebSocket again, so a refusal both ways never pins us to the fallback.
                self._longpoll_since = None
            sole = _first_session_ending(exc, self.settings.timeout)
            if self.stopping and isinstance(sole, trio_websocket.ConnectionClosed):
                self._tell_cut_streams("client shutting down")
                return "client stopping"  # our own Close frame, sent by close()
            reason = _describe_session_end(sole, self.settings.timeout)
            if reason is None:
                raise
            self._tell_cut_streams(reason)
            if self._falls_back(sole):
                reason += "; falling back to long-poll"
            return reason
        self._tell_cut_streams("connection closed")
        return "connection closed"

    def _tell_cut_streams(self, reason: str) -> None:
        """The streams the end of the session cut off: one WS ABORT line each, with its cause."""
        session, self._ended_v2 = self._ended_v2, None
        if session is not None:
            for stream in session.cut_by_end:
                session.tell_abort(stream, "tunnel_lost", f"tunnel lost: {reason}")
            session.cut_by_end.clear()

    def _uses_longpoll(self) -> bool:
        return self.settings.transport == "longpoll" or (
            self.settings.transport == "auto" and self._longpoll_since is not None
        )

    def _falls_back(self, ending: BaseException) -> bool:
        """With transport auto, a WebSocket handshake refused (by the server, or by a proxy that
        strips Upgrade) sends the next dial, at once, to long-poll."""
        if self.settings.transport != "auto" or self._uses_longpoll():
            return False
        if not isinstance(ending, trio_websocket.HandshakeError):
            return False
        if isinstance(ending, trio_websocket.ConnectionRejected) and \
                ending.status_code in NO_FALLBACK_STATUSES:
            return False
        self._longpoll_since = trio.current_time()
        self._redial_now = True
        return True

    async def _connect_and_serve(self, backend: Backend) -> None:
        if self._uses_longpoll():
            await self._connect_longpoll(backend)
            return
        url = self.address.url + self.address.resource
        offer = v2.offered_request_window(self.settings.window_limits)
        self.log.info("WS   DIAL", token=self.token, url=url,
                      proxy=str(self.proxy) if self.proxy else None)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(self.settings.timeout):
                stream, tcp = await dial.open_stream(
                    self.address, proxy=self.proxy,
                    source_ports=self.settings.source_ports, context=self.context,
                )
                try:
                    ws = await websocket.connect(
                        stream, self.address.host_header, self.address.resource,
                        extra_headers=self._handshake_headers(offer),
                        # v2 if the server picks it (batched if it knows how); an original
                        # server picks none and we speak v1.
                        subprotocols=[v2.BATCH_SUBPROTOCOL, v2.SUBPROTOCOL],
                        max_message_size=self.settings.max_body_size + framing.MAX_HEAD_SIZE,
                        receive_size=WS_RECEIVE_SIZE,
                    )
                    request_window = self._agreed_request_window(offer, ws.answer_headers)
                except BaseException:
                    # Refused, timed out, or the server went in the middle of the handshake:
                    # the socket is ours to close (it leaked, one per failed handshake).
                    await trio.aclose_forcefully(stream)
                    raise
            local = tcp.socket.getsockname()
            await self._run_connected(nursery, ws, backend, url, request_window,
                                      local=f"{local[0]}:{local[1]}")

    async def _connect_longpoll(self, backend: Backend) -> None:
        base = longpoll.poll_base(self.settings.tunnel)
        offer = v2.offered_request_window(self.settings.window_limits)
        self.log.info("WS   DIAL", token=self.token, url=base + POLL_PATH,
                      proxy=str(self.proxy) if self.proxy else None, transport="longpoll")
        if self._http is None:
            self._http = longpoll.http_client(proxy=self.proxy, context=self.context,
                                              timeout=self.settings.timeout)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(self.settings.timeout):
                transport = await longpoll.connect(nursery, self._http, base, token=self.token,
                                                   headers=self._handshake_headers(offer),
                                                   request_timeout=self.settings.timeout)
            try:
                request_window = self._agreed_request_window(offer, transport.answer_headers)
            except DialError:
                await transport.aclose(1002, "bad request window answer")
                raise
            if self.settings.transport == "auto":
                nursery.start_soon(self._retry_websocket_later, transport)
            await self._run_connected(nursery, transport, backend, base + POLL_PATH,
                                      request_window, session=transport.sid)

    async def _run_connected(self, nursery: trio.Nursery, ws: MessageTransport,
                             backend: Backend, url: str, request_window: int,
                             **details: object) -> None:
        """Serve a connected transport until it ends; then close it and stop its tasks
        (``request_window``: the first window of request bodies the opening agreed on)."""
        transport = "longpoll" if isinstance(ws, longpoll.LongPollTransport) else "websocket"
        self.sessions += 1
        self.backoff.reset()
        v2_tunnel = self._protocol(ws) == "v2"
        self.log.info("WS   CONNECTED", token=self.token, url=url, **details,
                      protocol=self._protocol(ws), transport=transport,
                      request_window=request_window if v2_tunnel else None)
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.notifier.status(f"connected to {url} ({transport}) since {since}")
        self._ws = ws
        try:
            if not self.stopping:  # else close() came while we connected: no transport to close
                await self._serve(ws, backend, request_window)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                if self.stopping:
                    # close() is mid-close-handshake: let it read the reply before we hang up.
                    # If it came before self._ws was set, the goodbye is said here (a second
                    # close is harmless), so the server still learns why the client went.
                    await self._goodbye_said.wait()
                    await ws.aclose(1001, SHUTTING_DOWN)
                else:
                    await ws.aclose()
            self._ws = None
            nursery.cancel_scope.cancel()

    async def _retry_websocket_later(self, transport: longpoll.LongPollTransport) -> None:
        """Long-poll was a fallback: after websocket_retry, once no request is in progress, end
        it so that the next dial tries the WebSocket again (and falls back again if refused)."""
        while True:
            await trio.sleep(self.settings.websocket_retry)
            # Wait for a moment without requests, but not forever: a busy tunnel tries next time.
            for _check in range(max(1, int(self.settings.websocket_retry / IDLE_CHECK_SECS))):
                if self._session_v2 is None or not self._session_v2.streams:
                    break
                await trio.sleep(IDLE_CHECK_SECS)
            else:
                continue
            self.log.info("WS   TRY WEBSOCKET", token=self.token,
                          longpoll_secs=round(trio.current_time() - (self._longpoll_since or 0)))
            self._longpoll_since = None
            self._redial_now = True
            await transport.aclose(1000, "trying the WebSocket again")
            return

    def _handshake_headers(self, offer: int | None) -> list[tuple[bytes, bytes]]:
        """Our opening's headers (``offer``: the first window of request bodies we offer)."""
        headers = [
            (b"Origin", self.token.reveal().encode("utf-8", "surrogateescape")),
            (VERSION_HEADER, __version__.encode()),
            (b"User-Agent", f"wstunnel/{__version__}".encode()),
        ]
        if offer is not None:
            headers.append((v2.REQUEST_WINDOW_HEADER, str(offer).encode()))
        if self.settings.password is not None:
            # The later Go fork's scheme: HTTP Basic, the token as user name.
            headers.append((b"Authorization", basic_credentials(
                self.token.reveal(), self.settings.password.get_secret_value()
            )))
        return headers

    @staticmethod
    def _agreed_request_window(offer: int | None, answer: tuple[tuple[bytes, bytes], ...]) -> int:
        """The first window of request bodies: ours if the server took our offer, else v2's."""
        try:
            return v2.agreed_request_window(offer, get(answer, v2.REQUEST_WINDOW_HEADER.lower()))
        except ValueError as exc:
            raise DialError(f"bad opening answer: {exc}") from None

    def apply(self, settings: ClientSettings) -> tuple[list[str], list[str]]:
        """Take new settings without a restart; returns (applied, needing a restart)."""
        changed = daemon.changed_settings(self.settings, settings)
        fixed = [name for name in changed if name in RESTART_ONLY_SETTINGS]
        kept = {name: getattr(self.settings, name) for name in RESTART_ONLY_SETTINGS}
        self.settings = settings.model_copy(update=kept)
        self.backoff.cap = self.settings.reconnect_max_delay
        self.limiter.total_tokens = self.settings.max_concurrent_requests
        if self.backend is not None:
            self.backend.reconfigure(server=self.settings.server, regexp=self.settings.regexp,
                                     max_body_size=self.settings.max_body_size,
                                     max_stream_size=self.settings.max_stream_size)
        return [name for name in changed if name not in fixed], fixed

    async def close(self) -> None:
        """Say goodbye to the server with a Close frame (1001, going away), if connected."""
        self.stopping = True
        self._backoff_scope.cancel()  # no point waiting out a reconnect delay
        try:
            if self._ws is not None:
                with trio.move_on_after(2):
                    await self._ws.aclose(1001, SHUTTING_DOWN)
        finally:
            self._goodbye_said.set()

    @staticmethod
    def _protocol(ws: MessageTransport) -> str:
        return "v2" if ws.subprotocol in (v2.SUBPROTOCOL, v2.BATCH_SUBPROTOCOL) else "v1"

    async def _serve(self, ws: MessageTransport, backend: Backend, request_window: int) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keepalive, ws)
            if self._protocol(ws) == "v2":
                session = self._session_v2 = self._ended_v2 = ClientSessionV2(
                    ws, backend, limiter=self.limiter, log=self.log, token=self.token,
                    batched=ws.subprotocol == v2.BATCH_SUBPROTOCOL, aborts=self.stream_aborts,
                    limits=self.settings.window_limits, request_window=request_window,
                )
                try:
                    await session.run()
                finally:
                    self._session_v2 = None
                return
            await ClientSessionV1(ws, backend, limiter=self.limiter, log=self.log,
                                  token=self.token).run()

    def report(self) -> None:
        """One STATS line: what the process holds and how its tunnel's flow control stands (on
        SIGUSR1; the client has no HTTP endpoint to read them from)."""
        session = self._session_v2
        flow: dict[str, int] = {}
        if session is not None:
            flow = {"streams": len(session.streams), **session.endpoint.flow()}
        rss = procstats.resident_bytes()
        self.log.info("STATS", token=self.token, tasks=procstats.trio_tasks(),
                      fds=procstats.open_fds(), rss_kib=rss // 1024 if rss is not None else None,
                      py_blocks=procstats.python_blocks(), sessions=self.sessions,
                      connected=self._ws is not None, **flow,
                      aborted=sum(self.stream_aborts.values()),
                      **{f"aborted_{cause}": n for cause, n in sorted(self.stream_aborts.items())})

    async def _keepalive(self, ws: MessageTransport) -> None:
        interval = self.settings.timeout / 3
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(self.settings.timeout) as waiting:
                await ws.ping()
            if waiting.cancelled_caught:
                raise PingTimeout(f"ping timeout: no pong within {self.settings.timeout:g}s")
            if self.settings.statusfile is not None:
                try:
                    write_statusfile(self.settings.statusfile)
                except OSError as exc:
                    self.log.warning("STATUSFILE", err=str(exc))


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _first_session_ending(exc: BaseException, timeout: float) -> BaseException:
    """The error that ended a session, even when several tasks saw the end at once.

    A lost connection reaches the receiver and an in-flight ping together, so the nursery
    raises a group of two ConnectionClosed; that is one ending, not a bug. Anything else in
    the group (a real bug, or only cancellation) comes back as it is, to propagate.
    """
    sole = sole_exception(exc)
    if not isinstance(sole, BaseExceptionGroup):
        return sole
    real = [leaf for leaf in _leaves(sole) if not isinstance(leaf, trio.Cancelled)]
    if real and all(_describe_session_end(leaf, timeout) is not None for leaf in real):
        return real[0]
    return sole


def _describe_close(closed: trio_websocket.CloseReason | None) -> str:
    """A transport's close, in words, never empty: the server's Close frame's reason (server
    shutting down, token revoked, silent too long, protocol error...), or what our transport saw
    (the server vanished without a Close frame, a long-poll session expired)."""
    if closed is None:
        return "the transport ended"
    words = closed.reason or f"no reason given ({closed.name})"
    return f"{words} (code={closed.code})"


def _describe_session_end(exc: BaseException, timeout: float) -> str | None:
    """Why a session ended, for the log; None for what must propagate (cancellation, bugs)."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out connecting"
    if isinstance(exc, trio_websocket.ConnectionRejected):
        return f"handshake refused: HTTP {exc.status_code}"
    if isinstance(exc, trio_websocket.ConnectionClosed):
        return f"connection closed: {_describe_close(exc.reason)}"
    if isinstance(exc, PingTimeout):
        return f"ping timeout: no pong within {timeout:g}s"
    if isinstance(exc, TunnelMessageError):
        return f"protocol error from server: {exc}"
    if isinstance(exc, OSError | ssl.SSLError | trio.BrokenResourceError | DialError
                  | trio_websocket.HandshakeError):
        return f"{type(exc).__name__}: {exc}"
    return None
