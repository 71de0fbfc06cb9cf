"""The server's end of the HTTPS long-poll transport: tunnel sessions made of plain HTTP requests.

For networks where a WebSocket cannot pass (proxies that strip ``Upgrade`` or cut long-lived
connections), a client keeps its tunnel with ordinary, bounded HTTP requests instead; docs/longpoll.md
specifies the endpoints. Each session is a :class:`PollSession`, which satisfies
:class:`wstunnel.tunnel.transport.MessageTransport`, so an unchanged
:class:`~wstunnel.server.tunnel_v2.TunnelConnectionV2` serves it: long-poll always carries protocol
v2 frames, one per message, with the length-prefixed body codec of :mod:`wstunnel.tunnel.pollbody`.

Liveness: the client is present while one of its requests is being served, and its silence is
counted from the end of its last request; the connection's usual silence watch drops a session that
misses its polls for ``wstimeout``, and its in-flight requests are then retried or failed exactly as
for a dropped WebSocket. A poll is held at most half of ``wstimeout``, so a live client always polls
again in time.

Session ids are secrets like tokens: they travel in a header (never in a URL, which proxies and
access logs record), are logged as a prefix only, and a request naming an unknown one counts as a
failure for the address's brake, like an unknown token.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

from wstunnel import framing, v2
from wstunnel.config import ServerSettings
from wstunnel.logs import EventLogger
from wstunnel.server.admission import Admission, Refusal
from wstunnel.server.connection import TunnelConnection
from wstunnel.server.handshake import (
    client_version,
    new_connection,
    offered_request_window,
    request_window_answer,
)
from wstunnel.server.incoming import IncomingRequest
from wstunnel.server.messages import BodyError, BodyTooLarge, RequestBodySource, simple_response
from wstunnel.server.rendezvous import Registry
from wstunnel.tokens import Token
from wstunnel.tunnel import longpoll as wire
from wstunnel.tunnel import pollbody
from wstunnel.tunnel.transport import CloseReason, ConnectionClosed

# Request paths and header names as the HTTP front gives them: bytes, header names lowercase.
_OPEN = wire.OPEN_PATH.encode()
_POLL = wire.POLL_PATH.encode()
_SESSION = wire.SESSION_HEADER.lower().encode()
_SEQ = wire.SEQ_HEADER.lower().encode()
_ACK = wire.ACK_HEADER.lower().encode()
_REASON = wire.REASON_HEADER.lower().encode()
NO_CACHE = (b"Cache-Control", b"no-store")


class SessionGone(Exception):
    """The session was closed; the text is its close reason."""


class SequenceError(Exception):
    """A request's sequence number or acknowledgement cannot follow from what was exchanged."""


class PollSession(wire.PolledMessages):
    """One long-poll tunnel session: a message transport fed and drained by HTTP requests (a
    POST fills the inbox; a poll waits on ``_frames_ready`` and takes a batch of the outbox)."""

    subprotocol = v2.SUBPROTOCOL

    def __init__(self, sid: str) -> None:
        super().__init__()
        self.sid = Token(sid)  # str() shows a prefix only
        self._requests_active = 0
        self._last_request_end = trio.current_time()
        self._held_poll: trio.CancelScope | None = None
        # Each direction numbers its non-empty batches, so that a request whose answer was lost
        # (a proxy that drops a kept-alive connection, say) can be repeated without losing or
        # doubling frames: the last batch we sent stays until the client's next poll acknowledges
        # it, and a POST already taken is taken only once.
        self._sent_seq = 0
        self._unacked: list[bytes] = []
        self._received_seq = 0
        self._delivering = trio.Lock()
        # Pings waiting for the client's next request (see ping).
        self._pongs: list[trio.Event] = []

    @property
    def held_bytes(self) -> int:
        """What the session holds for the client: messages queued, and the last batch sent until
        the client acknowledges it."""
        return self.queued_bytes + sum(len(message) for message in self._unacked)

    # -- MessageTransport (the tunnel connection's side) ------------------------------------

    @property
    def last_receive(self) -> float:
        """Now while the client has a request with us, else when its last one ended."""
        return trio.current_time() if self._requests_active else self._last_request_end

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        if self._closed is None:
            # A closed session answers no more polls: what waited for one goes now.
            self._close_queues(CloseReason(code, reason))
            self._unacked = []
            self._answer_pings()

    async def ping(self, payload: bytes | None = None) -> None:
        """A round trip: the held poll is answered now (with what waits, or nothing), and the
        client's next request, which follows its answer at once, is the pong."""
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        pong = trio.Event()
        self._pongs.append(pong)
        if self._held_poll is not None:
            self._held_poll.cancel()
        await pong.wait()
        if self._closed is not None:
            raise ConnectionClosed(self._closed)

    def _answer_pings(self) -> None:
        for pong in self._pongs:
            pong.set()
        self._pongs.clear()

    # -- the HTTP side ------------------------------------------------------------------------

    async def deliver(self, seq: int | None, messages: list[bytes]) -> None:
        """Hand the messages of POST number ``seq`` (None: the next) to the connection, in
        order, once; SessionGone if closed, SequenceError if POSTs went missing."""
        with self._request():
            async with self._delivering:  # a repeated POST waits for the first to be taken
                seq = self._received_seq + 1 if seq is None else seq
                if seq <= self._received_seq:
                    return  # taken already; the client did not get our answer
                if seq != self._received_seq + 1:
                    raise SequenceError(f"POST {seq} after {self._received_seq}")
                self._received_seq = seq
                for message in messages:
                    try:
                        await self._inbox_in.send(message)
                    except (trio.ClosedResourceError, trio.BrokenResourceError):
                        raise SessionGone(self._reason()) from None

    async def poll(self, wait: float, ack: int | None) -> tuple[int, list[bytes]]:
        """The next batch and its number, as soon as there are frames, or (n, []) after ``wait``.

        ``ack`` is the last batch the client received; if that is not our last one, its answer
        was lost and the same batch goes again. A newer poll ends an older one still held (with
        no frames), so that one client never has two readers splitting its frames between them.
        """
        with self._request():
            if self._held_poll is not None:
                self._held_poll.cancel()
            ack = self._sent_seq if ack is None else ack
            if self._unacked and ack == self._sent_seq - 1:
                return self._sent_seq, self._unacked
            if ack != self._sent_seq:
                raise SequenceError(f"acknowledgement {ack} after batch {self._sent_seq}")
            self._unacked = []
            with trio.move_on_after(wait) as held:
                self._held_poll = held
                while not self._outbox and self._closed is None:
                    await self._frames_ready.park()
            # One turn for the tasks that just became runnable, so that frames made together
            # (a request's HEAD and body) leave in one answer.
            await trio.lowlevel.cancel_shielded_checkpoint()
            if self._held_poll is held:
                self._held_poll = None
            if not self._outbox and self._closed is not None:
                raise SessionGone(self._reason())
            batch = self._take_batch()
            if batch:
                self._sent_seq += 1
                self._unacked = batch
            return self._sent_seq, batch

    def _reason(self) -> str:
        return (self._closed.reason if self._closed else None) or "session closed"

    @contextmanager
    def _request(self) -> Iterator[None]:
        """A request being served counts as the client's presence while it lasts."""
        if self._pongs:
            self._answer_pings()
        self._requests_active += 1
        try:
            yield
        finally:
            self._requests_active -= 1
            self._last_request_end = trio.current_time()


@dataclass(eq=False)
class LongPoll:
    """The ``/_tunnel/poll`` endpoints, and the sessions they serve."""

    admission: Admission
    registry: Registry
    log: EventLogger
    settings: Callable[[], ServerSettings] = field(kw_only=True)  # current: a reload swaps them
    sessions: dict[str, PollSession] = field(init=False, default_factory=dict)
    _nursery: trio.Nursery | None = field(init=False, default=None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery the sessions run in: they outlive the requests that open them."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    @staticmethod
    def handles(path: bytes) -> bool:
        return path == _POLL or path.startswith(_POLL + b"/")

    async def respond(self, request: IncomingRequest) -> framing.Response:
        method, path = request.method, request.path
        if path == _OPEN:
            if method != b"POST":
                return _not_allowed(b"POST")
            return await self._open(request)
        if path != _POLL:
            return simple_response(404, "Unknown long-poll endpoint")
        if method not in (b"GET", b"POST", b"DELETE"):
            return _not_allowed(b"GET, POST, DELETE")
        addr = self.admission.client_address(request)
        refusal = self.admission.braked(addr)
        if refusal is not None:
            return refusal.response()
        session = self._find(request)
        if session is None:
            self.admission.failed(addr)
            return simple_response(404, "Unknown long-poll session")
        try:
            if method == b"GET":
                return await self._poll(session, _number(request, _ACK))
            if method == b"POST":
                return await self._receive(session, request, _number(request, _SEQ))
            await session.aclose(1000, _closing_reason(request))
            return _no_content()
        except SessionGone as gone:
            return simple_response(410, f"Long-poll session closed: {gone}", headers=[NO_CACHE])
        except (SequenceError, ValueError) as exc:
            # Frames are missing one way or the other: the session cannot go on, as a WebSocket
            # with a broken frame cannot.
            self.log.warning("WS   ERR", session=session.sid, err=str(exc))
            await session.aclose(1002, f"long-poll protocol error: {exc}")
            return simple_response(400, f"Long-poll protocol error: {exc}")

    def _find(self, request: IncomingRequest) -> PollSession | None:
        sid = request.header(_SESSION)
        if sid is None:
            return None
        return self.sessions.get(sid.decode("latin-1"))

    async def _open(self, request: IncomingRequest) -> framing.Response:
        addr = self.admission.client_address(request)
        request_window = offered_request_window(request, addr, self.log)
        if isinstance(request_window, Refusal):
            return request_window.response()
        admitted = self.admission.admit(request, addr)
        if isinstance(admitted, Refusal):
            return admitted.response()
        sid = secrets.token_urlsafe(32)
        session = PollSession(sid)
        connection = new_connection(
            self.registry.register(admitted), session, session, self.settings(), self.log,
            subprotocol=v2.SUBPROTOCOL, addr=addr, version=client_version(request),
            transport="longpoll", client_subject=self.admission.client_subject(request),
            request_window=request_window,
        )
        self.sessions[sid] = session
        assert self._nursery is not None, "LongPoll.run() is not running"
        await self._nursery.start(self._serve, session, connection)
        body = wire.SessionOpened(sid, self.poll_wait()).encode()
        return framing.Response(200, b"OK", [(b"Content-Type", b"application/json"), NO_CACHE,
                                             *request_window_answer(request_window, session.subprotocol)],
                                body)

    async def _serve(self, session: PollSession, connection: TunnelConnection, *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await connection.serve_logged(task_status=task_status, transport="longpoll",
                                          session=session.sid)
        finally:
            self.sessions.pop(session.sid.reveal(), None)

    def poll_wait(self) -> float:
        return min(wire.MAX_POLL_WAIT, self.settings().wstimeout / 2)

    async def _poll(self, session: PollSession, ack: int | None) -> framing.Response:
        seq, batch = await session.poll(self.poll_wait(), ack)
        return framing.Response(200, b"OK", [
            (b"Content-Type", b"application/octet-stream"), NO_CACHE,
            (wire.SEQ_HEADER.encode(), b"%d" % seq),
        ], pollbody.encode(batch))

    async def _receive(self, session: PollSession, request: IncomingRequest,
                       seq: int | None) -> framing.Response:
        body = request.body
        if request.body_source is not None:  # over front.SMALL_BODY: still on the socket
            if request.declared_length() > wire.MAX_POST_BODY:
                return _too_large()
            try:
                body = await _read_bounded(request.body_source, wire.MAX_POST_BODY)
            except BodyError as exc:
                return simple_response(exc.status, exc.text)
        if len(body) > wire.MAX_POST_BODY:
            return _too_large()
        try:
            messages = pollbody.decode(body, max_message=pollbody.MAX_MESSAGE)
        except pollbody.PollBodyError as exc:
            raise ValueError(f"malformed body: {exc}") from None
        await session.deliver(seq, messages)
        return _no_content()


def _closing_reason(request: IncomingRequest) -> str:
    """Why the client closes its session (its DELETE's reason header, printable and short)."""
    given = (request.header(_REASON) or b"")[:wire.MAX_REASON].decode("utf-8", "replace")
    given = "".join(ch for ch in given if ch.isprintable()).strip()
    return f"client closed the session: {given}" if given else "client closed the session"


def _number(request: IncomingRequest, name: bytes) -> int | None:
    """A sequence header's value; None when absent, ValueError when not a small number."""
    value = request.header(name)
    if value is None:
        return None
    if not value.isdigit() or len(value) > 19:
        raise ValueError(f"{name.decode()} is not a number")
    return int(value)


async def _read_bounded(source: RequestBodySource, limit: int) -> bytes:
    """The whole body, or BodyTooLarge as soon as it passes ``limit`` (a chunked one may)."""
    chunks: list[bytes] = []
    size = 0
    while (chunk := await source.receive()) is not None:
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large() -> framing.Response:
    return simple_response(413, f"Long-poll body over {wire.MAX_POST_BODY} bytes")


def _no_content() -> framing.Response:
    return framing.Response(204, b"No Content", [NO_CACHE], b"")


def _not_allowed(allow: bytes) -> framing.Response:
    return simple_response(405, "Method not allowed here", headers=[(b"Allow", allow)])

