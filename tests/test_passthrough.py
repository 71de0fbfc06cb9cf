"""WebSocket pass-through: an ``Upgrade: websocket`` request through real ``wstunnel srv`` and
``wstunnel cli`` processes reaches a real WebSocket server, and the two ends talk both ways.

The backend echo server and the WebSocket client are trio-websocket, in this test's trio loop; the
tunnel processes are the harness's. Over a v1 tunnel (a raw original-style client) the upgrade gets
a clear 501 instead.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from functools import partial

import httpx
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from tests.support.harness import Harness, Server
from tests.support.wire import (
    call,
    next_request,
    ok,
    raw_client,
    reply,
    start_server,
    wait_clients,
)

BIG = 4 * 1024 * 1024  # a message of several stream windows (256 KiB each)


class EchoBackend:
    """Echoes every message; "close-please" makes it close the connection itself."""

    def __init__(self) -> None:
        self.port = 0
        self.paths: list[str] = []
        self.closed_codes: list[int | None] = []
        self.closed = trio.Event()

    async def handler(self, request: WebSocketRequest) -> None:
        self.paths.append(request.path)
        ws = await request.accept()
        try:
            while True:
                message = await ws.get_message()
                if message == "close-please":
                    await ws.aclose(4001, "asked to")
                    break
                await ws.send_message(message)
        except ConnectionClosed:
            pass
        finally:
            self.closed_codes.append(ws.closed.code if ws.closed else None)
            self.closed.set()
            self.closed = trio.Event()


@pytest.fixture
async def echo_backend(nursery: trio.Nursery) -> AsyncIterator[EchoBackend]:
    backend = EchoBackend()
    server = await nursery.start(partial(
        serve_websocket, backend.handler, "127.0.0.1", 0, ssl_context=None,
        max_message_size=2 * BIG,
    ))
    backend.port = server.port
    yield backend


async def tunnel(harness: Harness, backend: EchoBackend) -> tuple[Server, str]:
    server = await start_server(harness)
    token = harness.new_token()
    await trio.to_thread.run_sync(partial(harness.client, server, token,
                                          backend=f"http://127.0.0.1:{backend.port}"))
    return server, token


def connect(server: Server, token: str, path: str = "/chat") -> AsyncIterator[WebSocketConnection]:
    return open_websocket_url(f"{server.ws_url}{path}", extra_headers=[(b"X-Token", token.encode())],
                              max_message_size=2 * BIG, connect_timeout=15, disconnect_timeout=5)


async def test_websocket_echo_through_the_tunnel_closed_by_the_client(
    harness: Harness, echo_backend: EchoBackend
) -> None:
    server, token = await tunnel(harness, echo_backend)
    big = random.Random(7).randbytes(BIG)
    with trio.fail_after(30):
        async with connect(server, token, "/chat?room=1") as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            await ws.send_message(b"\x00\x01binary\xff")
            assert await ws.get_message() == b"\x00\x01binary\xff"
            await ws.send_message(big)
            assert await ws.get_message() == big
            # Several messages in flight at once keep their order.
            for index in range(20):
                await ws.send_message(f"message {index}")
            for index in range(20):
                assert await ws.get_message() == f"message {index}"
            closed = echo_backend.closed
        await closed.wait()
    assert echo_backend.paths == ["/chat?room=1"]
    assert echo_backend.closed_codes == [1000]
    # The tunnel carries plain requests afterwards.
    assert (await trio.to_thread.run_sync(server.get, "/_health_check")).status_code == 200


async def test_websocket_closed_by_the_backend(harness: Harness, echo_backend: EchoBackend) -> None:
    server, token = await tunnel(harness, echo_backend)
    with trio.fail_after(30):
        async with connect(server, token) as ws:
            await ws.send_message("one")
            assert await ws.get_message() == "one"
            await ws.send_message("close-please")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 4001
    assert echo_backend.closed_codes == [4001]
    # Another WebSocket on the same tunnel still works.
    with trio.fail_after(30):
        async with connect(server, token) as ws:
            await ws.send_message("again")
            assert await ws.get_message() == "again"


async def test_websocket_over_a_v1_tunnel_is_501_and_streamed_uploads_arrive_whole(
    harness: Harness,
) -> None:
    server = await start_server(harness)
    token = harness.new_token()
    body = random.Random(3).randbytes(300_000)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 50_000):
            yield body[start:start + 50_000]

    with trio.fail_after(45):
        async with raw_client(server, token) as ws, trio.open_nursery() as nursery:
            await wait_clients(server, token, 1)
            # Chunked, so the front streams it: the v1 message still carries it whole.
            upload = call(nursery, "POST", f"{server.url}/up", headers={"X-Token": token},
                          content=chunks())
            request_id, _payload, request = await next_request(ws)
            assert request.body == body
            assert request.header(b"content-length") == b"%d" % len(body)
            await ws.send_message(reply(request_id, ok(b"got it")))
            assert (await upload.result()).text == "got it"
            headers = {"X-Token": token, "Connection": "Upgrade", "Upgrade": "websocket",
                       "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
            async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
                refused = await http.get(f"{server.url}/chat", headers=headers)
            assert refused.status_code == 501
            assert "protocol v2" in refused.text
            nursery.cancel_scope.cancel()


def test_upgrade_refused_by_a_plain_backend_is_its_ordinary_response(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token)
    headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    with httpx.Client(trust_env=False, timeout=30) as http:
        response = http.get(f"{server.url}/page", headers={**headers, "X-Token": token})
        assert response.status_code == 200
        assert response.text == "backend page /page\n"
        # Not switched: the connection goes on as HTTP.
        assert http.get(f"{server.url}/again", headers={"X-Token": token}).text == "backend page /again\n"


async def test_idle_websocket_is_closed_after_httptimeout(
    harness: Harness, echo_backend: EchoBackend
) -> None:
    server = await start_server(harness, "-httptimeout", "2")
    token = harness.new_token()
    await trio.to_thread.run_sync(partial(harness.client, server, token,
                                          backend=f"http://127.0.0.1:{echo_backend.port}"))
    with trio.fail_after(30):
        async with connect(server, token) as ws:
            # Traffic for longer than httptimeout keeps it open...
            for index in range(6):
                await ws.send_message(f"ping {index}")
                assert await ws.get_message() == f"ping {index}"
                await trio.sleep(0.5)  # the client's pace, not a synchronisation
            # ...silence for httptimeout ends it, at both ends.
            closed = echo_backend.closed
            started = trio.current_time()
            with pytest.raises(ConnectionClosed):
                await ws.get_message()
            assert trio.current_time() - started >= 1.5
            await closed.wait()
