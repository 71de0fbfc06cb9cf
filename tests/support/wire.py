"""Stand-ins for an original (protocol v1) peer, written from the wire protocol alone.

A raw v1 *client* (a bare trio-websocket connection, token in ``Origin``, no subprotocol) and a raw
v1 *server* (a bare trio-websocket server on ``/_tunnel``), and the HTTP inside their messages parsed
with h11, never with ``wstunnel.framing``, so that tests built on them do not share a parser (or its
bugs) with the code under test. Used by the wire-compatibility, v2 and pass-through tests.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial

import h11
import httpx
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from tests.support.harness import Harness, Server

Headers = list[tuple[bytes, bytes]]
ID_PATTERN = re.compile(rb"[0-9a-f]{4}")
# The front replaces these: Content-Length is recomputed, the others are per connection.
FRONT_MANAGED = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authorization", b"proxy-authenticate", b"te",
    b"trailer", b"transfer-encoding", b"upgrade",
})


# -- HTTP inside tunnel messages, parsed with h11 ------------------------------------------------


@dataclass
class _Parsed:
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return first_header(self.headers, name)


@dataclass
class ParsedRequest(_Parsed):
    method: bytes
    target: bytes

    def names(self) -> set[bytes]:
        return {k.lower() for k, _ in self.headers}


@dataclass
class ParsedResponse(_Parsed):
    status: int
    reason: bytes


def first_header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _drain_body(conn: h11.Connection) -> bytes:
    chunks: list[bytes] = []
    event = conn.next_event()
    while isinstance(event, h11.Data):
        chunks.append(bytes(event.data))
        event = conn.next_event()
    assert isinstance(event, h11.EndOfMessage), f"HTTP body incomplete: {event!r}"
    return b"".join(chunks)


def parse_request(payload: bytes) -> ParsedRequest:
    """Exactly one complete HTTP/1.1 request, or an AssertionError."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(payload)
    event = conn.next_event()
    assert isinstance(event, h11.Request), f"not an HTTP request head: {event!r} in {payload[:200]!r}"
    assert event.http_version == b"1.1"
    body = _drain_body(conn)
    assert conn.trailing_data[0] == b"", "bytes after the request in the tunnel message"
    headers = [(bytes(k), bytes(v)) for k, v in event.headers.raw_items()]
    return ParsedRequest(headers, body, bytes(event.method), bytes(event.target))


def parse_response(payload: bytes, method: bytes = b"GET") -> ParsedResponse:
    """Exactly one complete HTTP/1.1 response (the message's end ends an unframed body)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "tunnel")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(payload)
    conn.receive_data(b"")
    event = conn.next_event()
    assert isinstance(event, h11.Response), f"not an HTTP response head: {event!r} in {payload[:200]!r}"
    assert event.http_version == b"1.1"
    body = _drain_body(conn)
    assert conn.trailing_data[0] == b"", "bytes after the response in the tunnel message"
    headers = [(bytes(k), bytes(v)) for k, v in event.headers.raw_items()]
    return ParsedResponse(headers, body, event.status_code, bytes(event.reason))


def split_message(message: bytes | str) -> tuple[int, bytes]:
    assert isinstance(message, bytes), "tunnel messages must be binary"
    assert ID_PATTERN.fullmatch(message[:4]), f"no lowercase 4-hex-digit id: {message[:16]!r}"
    return int(message[:4], 16), message[4:]


# -- part A helpers: a raw v1 client and HTTP calls to the server -------------------------------


async def start_server(harness: Harness, *flags: str) -> Server:
    return await trio.to_thread.run_sync(partial(harness.server, *flags))


async def wait_clients(server: Server, token: str, count: int) -> None:
    await trio.to_thread.run_sync(partial(server.wait_clients, token, count, 20.0))


async def client_count(server: Server, token: str) -> int:
    return await trio.to_thread.run_sync(server.clients, token)


def raw_client(server: Server, token: str | None) -> contextlib.AbstractAsyncContextManager[
        WebSocketConnection]:
    """A v1 tunnel client as the original dialled: token in Origin, nothing else."""
    headers = [] if token is None else [(b"Origin", token.encode())]
    return trio_websocket.open_websocket_url(
        f"{server.ws_url}/_tunnel", extra_headers=headers, connect_timeout=10, disconnect_timeout=5,
    )


@dataclass
class Call:
    """An HTTP request to the server, running in a nursery; ``await call.result()``."""

    response: httpx.Response | None = None
    done: trio.Event = field(default_factory=trio.Event)

    async def result(self) -> httpx.Response:
        await self.done.wait()
        assert self.response is not None
        return self.response


def call(nursery: trio.Nursery, method: str, url: str, **kwargs: object) -> Call:
    pending = Call()

    async def run() -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            pending.response = await client.request(method, url, **kwargs)  # type: ignore[arg-type]
        pending.done.set()

    nursery.start_soon(run)
    return pending


async def next_request(ws: WebSocketConnection) -> tuple[int, bytes, ParsedRequest]:
    """The next tunnel message: its id, its raw payload and the request in it."""
    message = await ws.get_message()
    request_id, payload = split_message(message)
    return request_id, payload, parse_request(payload)


def reply(request_id: int, raw_response: bytes) -> bytes:
    return b"%04x" % request_id + raw_response


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body), body)


async def answer_forever(ws: WebSocketConnection, name: str, seen: list[tuple[str, int]]) -> None:
    """A well-behaved v1 client: answers every request with its own name as the body."""
    while True:
        try:
            request_id, _payload, _request = await next_request(ws)
            seen.append((name, request_id))
            await ws.send_message(reply(request_id, ok(name.encode())))
        except ConnectionClosed:
            return


def lowered(headers: Headers) -> Headers:
    return [(k.lower(), v) for k, v in headers]


# -- a raw v1 server against the real client -----------------------------------------------


@dataclass
class Handshake:
    path: str
    headers: Headers
    subprotocols: tuple[str, ...]

    def header(self, name: bytes) -> bytes | None:
        return first_header(self.headers, name)


class RawV1Server:
    """A v1 tunnel server reduced to its wire protocol: accepts tunnels, hands them to the test."""

    def __init__(self) -> None:
        self.port = 0
        self._send, self._receive = trio.open_memory_channel[tuple[Handshake, WebSocketConnection]](8)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def handle(self, request: WebSocketRequest) -> None:
        handshake = Handshake(request.path, list(request.headers), request.proposed_subprotocols)
        ws = await request.accept()
        await self._send.send((handshake, ws))
        await trio.sleep_forever()  # the connection lives until the server stops

    async def next_tunnel(self) -> tuple[Handshake, WebSocketConnection]:
        with trio.fail_after(20):
            return await self._receive.receive()


@contextlib.asynccontextmanager
async def raw_v1_server() -> AsyncIterator[RawV1Server]:
    raw = RawV1Server()
    async with trio.open_nursery() as nursery:
        ws_server = await nursery.start(
            partial(trio_websocket.serve_websocket, raw.handle, "127.0.0.1", 0, None)
        )
        raw.port = ws_server.port
        yield raw
        nursery.cancel_scope.cancel()


async def start_client(harness: Harness, raw: RawV1Server, token: str, *flags: str,
                       backend: str | None = None) -> None:
    await trio.to_thread.run_sync(
        partial(harness.client, raw.url, token, *flags, backend=backend, wait=False)
    )


async def exchange(ws: WebSocketConnection, request_id: int, raw_request: bytes,
                   method: bytes = b"GET") -> ParsedResponse:
    """Send one v1 request message, return the parsed response carrying the same id."""
    await ws.send_message(b"%04x" % request_id + raw_request)
    with trio.fail_after(20):
        message = await ws.get_message()
    answered_id, payload = split_message(message)
    assert answered_id == request_id
    return parse_response(payload, method)


def echoed(response: ParsedResponse) -> dict[str, object]:
    assert response.status == 200, response
    document: dict[str, object] = json.loads(response.body)
    return document


def echoed_headers(document: dict[str, object]) -> Headers:
    pairs = document["headers"]
    assert isinstance(pairs, list)
    return [(k.lower().encode(), v.encode()) for k, v in pairs]
