"""The client's end of the HTTPS long-poll transport (docs/longpoll.md has the endpoints).

:class:`LongPollTransport` satisfies :class:`wstunnel.tunnel.transport.MessageTransport` (and has the
``ping`` the keepalive uses), so the unchanged protocol v2 session runs over it. Underneath, two
tasks share one httpx client: the *poller* keeps exactly one ``GET /_tunnel/poll`` outstanding and
hands the frames of each answer to ``get_message``; the *sender* posts whatever ``send_message``
has queued, batched into one ``POST`` at a time (one at a time keeps the frames in order). Both are
ordinary bounded HTTP requests with a Content-Length, so they pass buffering proxies, the HTTP
CONNECT proxy (https://) and plain forwarding proxies (http://) alike.

Batches are numbered both ways (``X-Wstunnel-Seq``; a poll acknowledges the last batch received in
``X-Wstunnel-Ack``), so a request whose connection fails is simply sent again, a few times: the
server repeats a batch whose answer was lost and takes a repeated POST once. A request that still
fails, or gets an unexpected answer, ends the transport: ``get_message``/``send_message`` raise
ConnectionClosed and the agent dials again, exactly as after a dropped WebSocket.
"""

from __future__ import annotations

import contextlib
import ssl
from urllib.parse import urlsplit, urlunsplit

import httpx
import trio

from wstunnel import v2
from wstunnel.client.proxy import Proxy
from wstunnel.errors import DialError
from wstunnel.headers import Headers
from wstunnel.tokens import Token
from wstunnel.tunnel import longpoll as wire
from wstunnel.tunnel import pollbody
from wstunnel.tunnel.transport import CloseReason, ConnectionClosed

# A poll or a POST whose connection failed is sent again, this many times in all: numbered
# batches make that safe, and some proxies drop a kept-alive connection just as it is reused.
ATTEMPTS = 3
RETRY_DELAY = 0.1  # seconds, times the attempt's number
# Codes for the CloseReason of a transport that broke, as a WebSocket would report them.
ABNORMAL = 1006
GOING_AWAY = 1001


class LongPollRefused(DialError):
    """The server (or a proxy) would not open a long-poll session."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"long-poll session refused: HTTP {status} {text[:200]}".rstrip())
        self.status = status


def poll_base(tunnel: str) -> str:
    """``ws://host/path`` -> ``http://host/path`` (and wss -> https): where the endpoints live."""
    parts = urlsplit(tunnel)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def http_client(*, proxy: Proxy | None, context: ssl.SSLContext | None,
                timeout: float) -> httpx.AsyncClient:
    """The client for the long-poll requests: our proxy choice (NO_PROXY was applied by
    ``choose_proxy``) and TLS settings, never the environment's own, and no redirects."""
    httpx_proxy = None
    if proxy is not None:
        auth = (proxy.username, proxy.password or "") if proxy.username is not None else None
        host = f"[{proxy.host}]" if ":" in proxy.host else proxy.host
        httpx_proxy = httpx.Proxy(f"http://{host}:{proxy.port}", auth=auth)
    return httpx.AsyncClient(
        proxy=httpx_proxy, verify=context if context is not None else True, trust_env=False,
        follow_redirects=False, timeout=httpx.Timeout(timeout),
        # One poll, one POST, and a ping or the closing DELETE beside them.
        limits=httpx.Limits(max_connections=4, max_keepalive_connections=4),
    )


async def connect(nursery: trio.Nursery, http: httpx.AsyncClient, base: str, *, token: Token,
                  headers: Headers, request_timeout: float) -> LongPollTransport:
    """Open a session (``headers`` carry the token and password as in the WebSocket handshake)
    and start its tasks."""
    try:
        routing = [(name.encode(), value.encode("utf-8", "surrogateescape"))
                   for name, value in _routing(token).items()]
        response = await http.post(base + wire.OPEN_PATH, content=b"", headers=[*headers, *routing])
    except httpx.HTTPError as exc:
        raise DialError(f"long-poll open failed: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise LongPollRefused(response.status_code, response.text.strip())
    try:
        opened = wire.SessionOpened.decode(response.content)
    except ValueError:
        raise DialError("long-poll open: the answer is not a session") from None
    transport = LongPollTransport(http, base, opened.session, poll_wait=opened.poll_wait,
                                  timeout=request_timeout, routing=_routing(token),
                                  answer_headers=tuple(response.headers.raw))
    nursery.start_soon(transport.run)
    return transport


def _routing(token: Token) -> dict[str, str]:
    """``X-Token`` on every long-poll request: the server does not need it (the session id says
    whose session it is), but a cluster front such as nginx/wstunnel-cluster.conf picks the
    instance by it, and a session's requests must all reach the instance that holds it."""
    return {"X-Token": token.reveal()}


class LongPollTransport(wire.PolledMessages):
    """One long-poll session, seen from the client (the poller fills the inbox; the sender
    waits on ``_frames_ready`` and posts the outbox batch by batch)."""

    subprotocol = v2.SUBPROTOCOL

    def __init__(self, http: httpx.AsyncClient, base: str, sid: str, *, poll_wait: float,
                 timeout: float, routing: dict[str, str] | None = None,
                 answer_headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__()
        self.http = http
        # The headers of the server's answer to the open (what else it agreed to).
        self.answer_headers = answer_headers
        self._routing = routing or {}
        self.url = base + wire.POLL_PATH
        self.sid = Token(sid)  # str() shows a prefix only
        self.poll_wait = poll_wait
        self.timeout = timeout
        self._tasks = trio.CancelScope()
        # ping() asks the sender for a POST (with or without frames) and waits for its answer.
        # The first one goes out at once, beside the first poll: from then on the client keeps
        # two connections (one polling, one posting), and a draining server, which accepts no
        # new connection, still gets our frames on them.
        self._ping_wanted = True
        self._posted = trio.Event()
        self._received_seq = 0  # the last batch received from the server
        self._post_seq = 0  # the last POST sent

    @property
    def _headers(self) -> dict[str, str]:
        return {**self._routing, wire.SESSION_HEADER: self.sid.reveal()}

    # -- MessageTransport ---------------------------------------------------------------------

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close, and tell the server (best effort: it drops a silent session anyway)."""
        if self._closed is not None:
            return
        self._end(code, reason)
        headers = self._headers
        if reason:
            headers[wire.REASON_HEADER] = reason.encode()[:wire.MAX_REASON].decode("ascii", "ignore")
        with trio.move_on_after(min(2.0, self.timeout)):
            # On failure the server's silence watch ends the session instead.
            with contextlib.suppress(httpx.HTTPError):
                await self.http.delete(self.url, headers=headers)

    async def ping(self, payload: bytes | None = None) -> None:
        """A round trip that proves the session alive: the sender's next POST, frames or none.

        Through the sender, so that a ping never needs a third connection.
        """
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        posted = self._posted
        self._ping_wanted = True
        self._frames_ready.unpark_all()
        await posted.wait()
        if self._closed is not None:
            raise ConnectionClosed(self._closed)

    # -- the tasks ----------------------------------------------------------------------------

    async def run(self) -> None:
        with self._tasks:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._poll_forever)
                nursery.start_soon(self._send_forever)

    async def _poll_forever(self) -> None:
        # Read timeout: the server's longest hold, plus the time any answer may take.
        timeout = httpx.Timeout(self.timeout, read=self.poll_wait + self.timeout)
        while self._closed is None:
            headers = {**self._headers, wire.ACK_HEADER: str(self._received_seq)}
            try:
                response = await self._send("GET", headers, b"", timeout)
            except httpx.HTTPError as exc:
                self._end(ABNORMAL, f"server unreachable: poll failed: {type(exc).__name__}")
                return
            if not self._accepted(response, 200, "poll"):
                return
            try:
                seq = int(response.headers.get(wire.SEQ_HEADER, ""))
                messages = pollbody.decode(response.content, max_message=pollbody.MAX_MESSAGE)
            except (ValueError, pollbody.PollBodyError) as exc:
                self._end(1002, f"malformed poll answer: {exc}")
                return
            if seq == self._received_seq:
                continue  # nothing new (an empty answer)
            if seq != self._received_seq + 1 or not messages:
                self._end(1002, f"poll answer {seq} after {self._received_seq}")
                return
            self._received_seq = seq
            for message in messages:
                try:
                    await self._inbox_in.send(message)  # waits while the session is behind
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    return  # closed meanwhile

    async def _send_forever(self) -> None:
        while self._closed is None:
            while not self._outbox and not self._ping_wanted and self._closed is None:
                await self._frames_ready.park()
            # One turn for the tasks that just became runnable: a response's HEAD, DATA and END
            # usually come in one go, and one POST for them all saves a round trip.
            await trio.lowlevel.cancel_shielded_checkpoint()
            batch = self._take_batch()
            # Pings waiting from now on are answered by this POST's round trip.
            self._ping_wanted = False
            posted, self._posted = self._posted, trio.Event()
            try:
                await self._post(pollbody.encode(batch))
            except ConnectionClosed:
                return
            finally:
                posted.set()

    async def _post(self, body: bytes) -> None:
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        self._post_seq += 1
        headers = {**self._headers, wire.SEQ_HEADER: str(self._post_seq)}
        try:
            response = await self._send("POST", headers, body, httpx.Timeout(self.timeout))
        except httpx.HTTPError as exc:
            self._end(ABNORMAL, f"server unreachable: post failed: {type(exc).__name__}")
            raise ConnectionClosed(self._closed) from None
        if not self._accepted(response, 204, "post"):
            raise ConnectionClosed(self._closed)

    async def _send(self, method: str, headers: dict[str, str], body: bytes,
                    deadlines: httpx.Timeout) -> httpx.Response:
        """One request, sent again (same numbers) when its connection fails, ATTEMPTS in all."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                response = await self.http.request(method, self.url, headers=headers,
                                                   content=body, timeout=deadlines)
            except httpx.TransportError:
                if attempt == ATTEMPTS:
                    raise
                await trio.sleep(RETRY_DELAY * attempt)
                continue
            # httpx's Response and its stream refer to each other, so every request would leave
            # some forty objects (its request, the pool's bookkeeping, both heads) to the cycle
            # collector, and the process's memory would swing with the collector's timing. The
            # body is read and the stream closed: a stream of those bytes, not bound to the
            # response, lets reference counting free it all as soon as the caller is done.
            response.stream = httpx.ByteStream(response.content)
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _accepted(self, response: httpx.Response, expected: int, what: str) -> bool:
        if response.status_code == expected:
            return True
        if response.status_code == 404:
            # The server does not know the session (any more): dropped as silent, or restarted.
            self._end(GOING_AWAY, "long-poll session expired: unknown to the server")
        elif response.status_code == 410:
            # Closed at the server while we asked: its answer says why.
            said = response.text.strip()[:200].removeprefix("Long-poll session closed: ")
            self._end(GOING_AWAY, f"long-poll session closed by the server: {said or 'no reason'}")
        else:
            self._end(ABNORMAL, f"{what} answered HTTP {response.status_code}")
        return False

    def _end(self, code: int, reason: str | None) -> None:
        """Closed: wake every waiter, stop both tasks; get_message reports ``reason``."""
        self._close_queues(CloseReason(code, reason))
        self._posted.set()  # a ping waiting for a POST that will never come
        self._tasks.cancel()

