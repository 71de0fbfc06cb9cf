"""``/_admin/``: the operator's console, its page and the JSON API the page uses (docs/admin-api.md).

| path under /_admin/ | method | what |
|---|---|---|
| (the page) ``/``, ``console.css``, ``console.js`` | GET | the page, from the package's files |
| ``api/state`` | GET | the whole state, JSON, with ``csrf_token`` |
| ``api/events`` | GET | the same as server-sent events, then updates as they happen |
| ``api/login``, ``api/logout`` | POST | password sessions, for remote access |
| ``api/tunnels/<id>/disconnect``, ``.../block``, ``.../unblock`` | POST | actions |
| ``api/drain`` | POST | start a drain |

Access is :mod:`wstunnel.server.console.access`'s; every POST but login needs the CSRF token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

import trio

from wstunnel import framing
from wstunnel.config import ServerSettings
from wstunnel.logs import EventLogger
from wstunnel.server.admission import Admission
from wstunnel.server.audit import ErrorLog
from wstunnel.server.console.access import Gate, Grant, json_answer, refusal
from wstunnel.server.console.actions import Actions
from wstunnel.server.console.events import LiveFeed
from wstunnel.server.console.snapshot import ServerFacts, StateReader
from wstunnel.server.incoming import IncomingRequest
from wstunnel.server.messages import AnyResponse, BodyError, StreamingResponse
from wstunnel.server.metrics import Metrics
from wstunnel.server.rendezvous import Registry

PREFIX = b"/_admin"
MAX_BODY = 4096  # a login's JSON; actions take none
EVENTS_IDLE_TIMEOUT = 60.0  # longer than the feed's keepalive
# The page's files, served as they are in the package (wstunnel/server/console/static/).
STATIC = {
    b"/_admin/": ("index.html", b"text/html; charset=utf-8"),
    b"/_admin/console.css": ("console.css", b"text/css; charset=utf-8"),
    b"/_admin/console.js": ("console.js", b"text/javascript; charset=utf-8"),
}
# Nothing but our own files, no framing by other sites, no referrer leaving the page.
PAGE_HEADERS = [
    (b"Content-Security-Policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
     b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"Cache-Control", b"no-cache"),
]
_ACTION = re.compile(rb"/_admin/api/tunnels/([0-9a-f]{32})/(disconnect|block|unblock)")


def handles(path: bytes) -> bool:
    """``/_admin`` or below. Asked of every request: no allocation, a prefix test first."""
    return path.startswith(PREFIX) and (len(path) == len(PREFIX) or path[len(PREFIX)] == 0x2F)


def _load_static() -> dict[bytes, framing.Response]:
    folder = resources.files("wstunnel.server.console") / "static"
    return {
        path: framing.Response(200, b"OK", [(b"Content-Type", kind), *PAGE_HEADERS],
                               (folder / name).read_bytes())
        for path, (name, kind) in STATIC.items()
    }


@dataclass(eq=False)
class Console:
    registry: Registry
    admission: Admission
    metrics: Metrics
    errors: ErrorLog
    log: EventLogger
    facts: ServerFacts
    settings: Callable[[], ServerSettings] = field(kw_only=True)
    start_drain: Callable[[], bool] = field(kw_only=True)
    gate: Gate = field(init=False)
    reader: StateReader = field(init=False)
    feed: LiveFeed = field(init=False)
    actions: Actions = field(init=False)
    _static: dict[bytes, framing.Response] = field(init=False, default_factory=_load_static)

    def __post_init__(self) -> None:
        blocklist = self.admission.blocklist
        self.gate = Gate(self.admission, self.log, settings=self.settings)
        self.reader = StateReader(self.registry, self.metrics, self.errors, blocklist, self.facts)
        self.feed = LiveFeed(self.reader)
        self.actions = Actions(self.registry, blocklist, self.log, start_drain=self.start_drain)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The console's own tasks: the rate meter and the live feed."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.reader.meter.run)
            nursery.start_soon(self.feed.run)
            task_status.started()

    async def respond(self, request: IncomingRequest) -> AnyResponse:
        path = request.path
        if path == PREFIX:
            return framing.Response(308, b"Permanent Redirect", [(b"Location", b"/_admin/")], b"")
        page = self._static.get(path)
        if page is not None:
            if request.method not in (b"GET", b"HEAD"):
                return _not_allowed(b"GET, HEAD")
            return self.gate.page_refusal(request) or page
        if path == b"/_admin/api/login":
            if request.method != b"POST":
                return _not_allowed(b"POST")
            return await self._login(request)
        grant = self.gate.grant(request)
        if not isinstance(grant, Grant):
            return grant
        if path == b"/_admin/api/state":
            if request.method != b"GET":
                return _not_allowed(b"GET")
            document = self.reader.document(self.reader.collect())
            feed = self.feed.costs.document(len(self.feed))
            return json_answer(200, {**document, "feed": feed, **_viewer(grant)})
        if path == b"/_admin/api/events":
            if request.method != b"GET":
                return _not_allowed(b"GET")
            return self._events(grant)
        if request.method != b"POST":
            known = path in (b"/_admin/api/logout", b"/_admin/api/drain") or _ACTION.fullmatch(path)
            return _not_allowed(b"POST") if known else refusal(404, "No such console endpoint")
        refused = self.gate.csrf_refusal(request, grant)
        if refused is not None:
            return refused
        return await self._act(request, grant)

    def _events(self, grant: Grant) -> StreamingResponse:
        subscriber = self.feed.subscribe(_viewer(grant))
        return StreamingResponse(
            status=200, reason=b"OK",
            headers=[(b"Content-Type", b"text/event-stream; charset=utf-8"),
                     (b"Cache-Control", b"no-store"), (b"X-Content-Type-Options", b"nosniff"),
                     # nginx: pass each event on as it comes.
                     (b"X-Accel-Buffering", b"no")],
            body=subscriber, idle_timeout=EVENTS_IDLE_TIMEOUT,
        )

    async def _login(self, request: IncomingRequest) -> framing.Response:
        body = await _small_body(request)
        if body is None:
            return refusal(413, f"A login is a JSON object of at most {MAX_BODY} bytes")
        try:
            document = json.loads(body or b"{}")
        except ValueError:
            document = None
        password = document.get("password") if isinstance(document, dict) else None
        if not isinstance(password, str):
            return refusal(400, 'Send {"password": "..."} as JSON')
        return await self.gate.login(request, password)

    async def _act(self, request: IncomingRequest, grant: Grant) -> framing.Response:
        path, who = request.path, grant.who()
        if path == b"/_admin/api/logout":
            return self.gate.logout(request, grant)
        if path == b"/_admin/api/drain":
            started = self.actions.drain(who)
            return json_answer(200, {"ok": True, "draining": True, "already": not started})
        found = _ACTION.fullmatch(path)
        if found is None:
            return refusal(404, "No such console endpoint")
        tunnel_id, action = found.group(1).decode(), found.group(2)
        rendezvous = self.reader.ids.find(self.registry, tunnel_id)
        try:
            if action == b"unblock":
                entry = await self.actions.unblock(tunnel_id, who, rendezvous)
                if entry is None:
                    return refusal(409, "That token is not blocked")
                return json_answer(200, {"ok": True, "id": tunnel_id, "blocked": False})
            if rendezvous is None:
                return refusal(404, "No tunnel with that id (gone, or forgotten after its idle time)")
            if action == b"disconnect":
                clients = await self.actions.disconnect(rendezvous, who)
                return json_answer(200, {"ok": True, "id": tunnel_id, "clients": clients})
            if rendezvous.blocked:
                return refusal(409, "That token is blocked already")
            await self.actions.block(rendezvous, who)
            return json_answer(200, {"ok": True, "id": tunnel_id, "blocked": True})
        except OSError as exc:
            # The block list could not be saved: nothing changed.
            where = self.admission.blocklist.path
            self.log.warning("ADMIN ERR", action=action, by=who, err=f"{where}: {exc.strerror or exc}")
            return refusal(500, f"Cannot save the block list in {where}: {exc.strerror or exc}; "
                                "nothing changed (see state_file)")


def _viewer(grant: Grant) -> dict[str, object]:
    """What the caller learns of itself: the token for its POSTs, and how it got in."""
    return {"csrf_token": grant.csrf, "viewer": {"address": grant.addr, "access": grant.how}}


async def _small_body(request: IncomingRequest) -> bytes | None:
    """The request body if it is at most MAX_BODY bytes, else None."""
    if request.body_source is None:
        return request.body if len(request.body) <= MAX_BODY else None
    chunks: list[bytes] = []
    size = 0
    try:
        while (chunk := await request.body_source.receive()) is not None:
            size += len(chunk)
            if size > MAX_BODY:
                return None
            chunks.append(chunk)
    except BodyError:
        return None
    return b"".join(chunks)


def _not_allowed(allow: bytes) -> framing.Response:
    return refusal(405, "Method not allowed", [(b"Allow", allow)])
