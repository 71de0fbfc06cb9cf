"""wstunnel.tunnel.websocket against trio-websocket (the other end of every test), on loopback sockets:
both handshakes, messages both ways, pings, the close handshake from either side, size limits,
refusals, and a peer that vanishes."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing
import trio_websocket
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, BytesMessage, Request
from wsproto.handshake import H11Handshake

from wstunnel.tunnel import websocket
from wstunnel.tunnel.websocket import WebSocket

LIMIT = 2 * 1024 * 1024
RECEIVE = 64 * 1024


@asynccontextmanager
async def tcp_server(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
) -> AsyncIterator[int]:
    """A loopback TCP server running ``handler`` per connection; yields its port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def dial(port: int, **options: object) -> WebSocket:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    settings: dict = {"subprotocols": ["two", "one"], "extra_headers": [(b"X-Test", b"yes")],
                      "max_message_size": LIMIT, "receive_size": RECEIVE} | options
    return await websocket.connect(stream, "127.0.0.1", "/_tunnel", **settings)


@asynccontextmanager
async def their_server(
    serve: Callable[[trio_websocket.WebSocketConnection], Awaitable[None]],
) -> AsyncIterator[int]:
    """trio-websocket serving ``serve`` on loopback (picks subprotocol "one")."""
    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        assert (b"x-test", b"yes") in [(k.lower(), v) for k, v in request.headers]
        await serve(await request.accept(subprotocol="one"))

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0,
                                     None)
        yield server.port
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def our_server(
    serve: Callable[[WebSocket], Awaitable[None]], *, max_message_size: int = LIMIT,
) -> AsyncIterator[int]:
    async def handler(stream: trio.SocketStream) -> None:
        ws = await websocket.accept(stream, subprotocol="one", extra_headers=[(b"X-Ours", b"1")],
                                    max_message_size=max_message_size, receive_size=RECEIVE)
        await serve(ws)

    async with tcp_server(handler) as port:
        yield port


async def echo(ws: trio_websocket.WebSocketConnection) -> None:
    try:
        while True:
            await ws.send_message(await ws.get_message())
    except ConnectionClosed:
        pass


async def read_until_closed(ws: WebSocket) -> None:
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed:
        pass


async def test_client_talks_to_trio_websocket_both_ways() -> None:
    with trio.fail_after(10):
        async with their_server(echo) as port:
            ws = await dial(port)
            assert ws.subprotocol == "one"
            big = bytes(range(256)) * 4096  # 1 MiB: many reads each way
            for message in (b"\x00binary", "text \u00e9", big):
                await ws.send_message(message)
                assert await ws.get_message() == message
            await ws.aclose()
            assert ws.closed is not None and ws.closed.code == 1000


async def test_server_talks_to_trio_websocket_and_answers_its_pings() -> None:
    got: list[bytes | str] = []

    async def serve(ws: WebSocket) -> None:
        try:
            while True:
                message = await ws.get_message()
                got.append(message)
                await ws.send_message(message)
        except ConnectionClosed:
            pass

    with trio.fail_after(10):
        async with our_server(serve) as port, trio_websocket.open_websocket(
            "127.0.0.1", port, "/", use_ssl=False, subprotocols=["one"],
            max_message_size=LIMIT,
        ) as theirs:
            assert theirs.subprotocol == "one"
            assert ("x-ours", "1") in [(k.decode().lower(), v.decode())
                                       for k, v in theirs.handshake_headers]
            await theirs.ping(b"1234")  # answered by our receive loop
            big = b"x" * (LIMIT - 1)
            await theirs.send_message(big)
            assert await theirs.get_message() == big
            await theirs.send_message("caf\u00e9")
            assert await theirs.get_message() == "caf\u00e9"
    assert got == [big, "caf\u00e9"]


async def test_our_ping_waits_for_its_pong() -> None:
    with trio.fail_after(10):
        async with their_server(echo) as port:
            ws = await dial(port)
            # Nobody reads yet, so no pong can arrive: a second ping like the first is refused,
            # and a ping given up on leaves nothing behind.
            async with trio.open_nursery() as pingers:
                pingers.start_soon(ws.ping, b"same")
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(ValueError):
                    await ws.ping(b"same")
                pingers.cancel_scope.cancel()
            async with trio.open_nursery() as nursery:
                # trio-websocket answers pings itself; our pong arrives through our reader.
                nursery.start_soon(read_until_closed, ws)
                await ws.ping()
                await ws.ping(b"same")
                await ws.aclose()
            assert ws.closed is not None


async def test_the_peers_close_reaches_the_reader_with_its_code_and_reason() -> None:
    async def close_at_once(ws: trio_websocket.WebSocketConnection) -> None:
        await ws.send_message(b"last words")
        await ws.aclose(1001, "going away")

    with trio.fail_after(10):
        async with their_server(close_at_once) as port:
            ws = await dial(port)
            assert await ws.get_message() == b"last words"  # what came before the Close
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert (closed.value.reason.code, closed.value.reason.reason) == (1001, "going away")
            with pytest.raises(ConnectionClosed):
                await ws.send_message(b"too late")
            await ws.aclose()  # harmless afterwards


async def test_our_close_is_answered_and_the_peer_sees_our_reason() -> None:
    seen: list[trio_websocket.CloseReason | None] = []
    peer_done = trio.Event()

    async def read_until_closed(ws: trio_websocket.WebSocketConnection) -> None:
        with pytest.raises(ConnectionClosed):
            await ws.get_message()
        seen.append(ws.closed)
        peer_done.set()

    with trio.fail_after(10):
        async with their_server(read_until_closed) as port:
            ws = await dial(port)
            # Nobody reads ours: aclose reads the reply itself.
            await ws.aclose(1001, "client shutting down")
            await peer_done.wait()
    assert seen[0] is not None and (seen[0].code, seen[0].reason) == (1001, "client shutting down")


async def test_aclose_lets_a_running_reader_take_the_reply() -> None:
    with trio.fail_after(10):
        async with their_server(echo) as port:
            ws = await dial(port)
            async with trio.open_nursery() as nursery:
                reader_saw: list[BaseException] = []

                async def read() -> None:
                    try:
                        await ws.get_message()
                    except ConnectionClosed as exc:
                        reader_saw.append(exc)

                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                await ws.aclose(1000, "done")
            assert reader_saw and reader_saw[0].reason.code == 1000


async def test_a_message_over_the_limit_closes_with_1009() -> None:
    seen: list[trio_websocket.CloseReason | None] = []
    ours_done = trio.Event()

    async def read(ws: WebSocket) -> None:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        seen.append(closed.value.reason)
        ours_done.set()

    with trio.fail_after(10):
        async with our_server(read, max_message_size=1000) as port:
            async with trio_websocket.open_websocket(
                "127.0.0.1", port, "/", use_ssl=False, subprotocols=["one"],
            ) as theirs:
                await theirs.send_message(b"y" * 1001)
                with pytest.raises(ConnectionClosed):
                    await theirs.get_message()
                assert theirs.closed is not None and theirs.closed.code == 1009
            await ours_done.wait()
    assert seen[0] is not None and seen[0].code == 1009


async def test_concurrent_senders_never_interleave_frames() -> None:
    count, senders = 200, 4
    with trio.fail_after(20):
        async with their_server(echo) as port:
            ws = await dial(port)
            received: list[bytes | str] = []

            async def send(index: int) -> None:
                for number in range(count):
                    await ws.send_message(b"%d:%d:" % (index, number) + b"z" * 20_000)

            async with trio.open_nursery() as nursery:
                for index in range(senders):
                    nursery.start_soon(send, index)
                nursery.start_soon(ws.ping)
                while len(received) < count * senders:
                    received.append(await ws.get_message())
            await ws.aclose()
    for index in range(senders):
        mine = [m for m in received if isinstance(m, bytes) and m.startswith(b"%d:" % index)]
        assert [int(m.split(b":")[1]) for m in mine] == list(range(count))  # each in order


async def test_a_vanished_peer_ends_readers_and_pings_with_1006() -> None:
    hang_up = trio.Event()

    async def accept_then_vanish(stream: trio.SocketStream) -> None:
        ws = await websocket.accept(stream, subprotocol=None, extra_headers=[],
                                    max_message_size=LIMIT, receive_size=RECEIVE)
        await hang_up.wait()
        await stream.aclose()  # TCP gone, no Close frame
        del ws

    with trio.fail_after(10):
        async with tcp_server(accept_then_vanish) as port:
            ws = await dial(port)
            assert ws.subprotocol is None
            async with trio.open_nursery() as nursery:
                ping_failed = trio.Event()

                async def ping() -> None:
                    with pytest.raises(ConnectionClosed):
                        await ws.ping()
                    ping_failed.set()

                nursery.start_soon(ping)
                await trio.testing.wait_all_tasks_blocked()
                hang_up.set()
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1006
                # Never an empty reason: who went, and how.
                assert re.fullmatch(r"server vanished \(connection (closed|reset|broken while "
                                    r"sending), no Close frame\)", closed.value.reason.reason)
                await ping_failed.wait()
            await ws.aclose()


async def test_aclose_cut_short_by_the_callers_deadline_still_closes_the_stream() -> None:
    """A peer cut off takes no more bytes: the Close frame's send blocks, the caller's deadline
    (shorter than CLOSE_TIMEOUT) ends aclose, and the socket must be closed all the same."""
    connected = trio.Event()
    hold = trio.Event()

    async def accept_and_never_read(stream: trio.SocketStream) -> None:
        await websocket.accept(stream, subprotocol=None, extra_headers=[],
                               max_message_size=LIMIT, receive_size=RECEIVE)
        connected.set()
        await hold.wait()

    with trio.fail_after(20):
        async with tcp_server(accept_and_never_read) as port:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            ws = await websocket.connect(stream, "127.0.0.1", "/_tunnel", subprotocols=[],
                                         extra_headers=[], max_message_size=LIMIT,
                                         receive_size=RECEIVE)
            await connected.wait()
            # Fill both socket buffers: the peer reads nothing.
            with trio.move_on_after(1):
                while True:
                    await ws.send_message(b"x" * 65536)
            with trio.move_on_after(0.2):
                await ws.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await stream.send_all(b"after close")
            hold.set()


async def refuse(stream: trio.SocketStream, response: bytes) -> None:
    await stream.receive_some(65536)
    await stream.send_all(response)
    await stream.aclose()


@pytest.mark.parametrize(("response", "status", "body"), [
    (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\n\r\nforbidden", 403, b"forbidden"),
    (b"HTTP/1.1 429 Too Many\r\nRetry-After: 3\r\nConnection: close\r\n\r\nslow down", 429,
     b"slow down"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", 200, b"hi"),  # a proxy that strips Upgrade
])
async def test_a_refusal_raises_connection_rejected_with_status_and_body(
    response: bytes, status: int, body: bytes,
) -> None:
    with trio.fail_after(10):
        async with tcp_server(lambda stream: refuse(stream, response)) as port:
            with pytest.raises(ConnectionRejected) as rejected:
                await dial(port)
    assert rejected.value.status_code == status
    assert rejected.value.body == body
    if status == 429:
        assert (b"retry-after", b"3") in rejected.value.headers


async def test_a_101_without_the_right_accept_key_is_a_handshake_error() -> None:
    bad = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n")
    with trio.fail_after(10):
        async with tcp_server(lambda stream: refuse(stream, bad)) as port:
            with pytest.raises(HandshakeError, match="accept"):
                await dial(port)


async def test_a_connection_closed_mid_handshake_is_a_broken_resource() -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.aclose()

    with trio.fail_after(10):
        async with tcp_server(hang_up) as port:
            with pytest.raises(trio.BrokenResourceError):
                await dial(port)


async def test_the_server_answers_a_request_that_is_no_upgrade_with_400() -> None:
    failures: list[BaseException] = []

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await websocket.accept(stream, subprotocol=None, extra_headers=[],
                                   max_message_size=LIMIT, receive_size=RECEIVE)
        except HandshakeError as exc:
            failures.append(exc)
        await stream.aclose()

    with trio.fail_after(10):
        async with tcp_server(handler) as port:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /_tunnel HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
            await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert failures and "upgrade" in str(failures[0]).lower()


def accept_and_send_at_once(done: trio.Event, *messages: bytes
                            ) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A server (wsproto's, independent of ours) that sends ``messages`` in the write of its
    101, then nothing more until ``done``."""

    async def serve(stream: trio.SocketStream) -> None:
        handshake = H11Handshake(ConnectionType.SERVER)
        while not any(isinstance(event, Request) for event in handshake.events()):
            handshake.receive_data(await stream.receive_some(65536))
        opening = handshake.send(AcceptConnection())
        connection = handshake.connection
        assert connection is not None
        await stream.send_all(opening + b"".join(connection.send(BytesMessage(m)) for m in messages))
        await done.wait()  # and nothing more on the socket
        await stream.aclose()

    return serve


async def test_a_message_in_the_same_read_as_the_101_is_delivered_at_once() -> None:
    """A server may send its first frame right behind the 101 (ours sends a waiting request as
    soon as the tunnel is registered): both can arrive in one read, and the message must not
    wait for the next bytes."""
    done = trio.Event()
    with trio.fail_after(10):
        async with tcp_server(accept_and_send_at_once(done, b"right behind the 101")) as port:
            ws = await dial(port)
            with trio.fail_after(2):
                assert await ws.get_message() == b"right behind the 101"
            done.set()
            await ws.aclose()


async def test_frames_behind_the_101_are_read_even_when_one_is_cut_by_the_read() -> None:
    """The handshake is given its head alone: the bytes after the 101 are frames, whole or not
    (here a 100 KiB message whose start shares the 101's read)."""
    big = bytes(range(256)) * 400
    done = trio.Event()
    with trio.fail_after(10):
        async with tcp_server(accept_and_send_at_once(done, b"first", big)) as port:
            ws = await dial(port, receive_size=1024)  # the 101's read ends inside the frame
            assert await ws.get_message() == b"first"
            assert await ws.get_message() == big
            done.set()
            await ws.aclose()


async def test_no_extension_is_agreed_either_way() -> None:
    """The frame codec knows no extension: our server agrees to none a client offers, and our
    client refuses a 101 that names one (permessage-deflate) as a handshake error."""
    with trio.fail_after(10):
        async with our_server(read_until_closed) as port:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(
                b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Protocol: one\r\n"
                b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += await stream.receive_some(65536)
            await stream.aclose()
        assert answer.startswith(b"HTTP/1.1 101 ")
        assert b"sec-websocket-extensions" not in answer.lower()

        async def agree_to_deflate(stream: trio.SocketStream) -> None:
            request = await stream.receive_some(65536)
            key = re.search(rb"(?i)sec-websocket-key: *([^\r\n]+)", request)
            assert key is not None
            token = base64.b64encode(hashlib.sha1(  # RFC 6455 4.2.2's accept token
                key.group(1) + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            await stream.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + token + b"\r\n"
                b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n")
            await stream.aclose()

        async with tcp_server(agree_to_deflate) as port:
            with pytest.raises(HandshakeError, match="extension"):
                await dial(port)
