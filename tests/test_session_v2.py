"""ClientSessionV2 (wstunnel.client.session_v2) over a transport the test drives, against a real
HTTP backend on loopback: when a response's frames leave the client."""

from __future__ import annotations

from functools import partial

import trio
import trio.testing

from wstunnel import v2
from wstunnel.client.backend import Backend
from wstunnel.client.session_v2 import ClientSessionV2
from wstunnel.logs import EventLogger
from wstunnel.tokens import Token

TOKEN = Token("0123456789abcdef0123456789abcdef")
BODY = b"hello"


async def answer_forever(stream: trio.SocketStream) -> None:
    """A keep-alive backend: every request head gets the same small response."""
    received = b""
    while data := await stream.receive_some(65536):
        received += data
        while b"\r\n\r\n" in received:
            _, _, received = received.partition(b"\r\n\r\n")
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                  % (len(BODY), BODY))


class Tunnel:
    """The server's end, as the test plays it: it hands the session messages and reads what the
    session sends, noting how many requests held a place in the limiter as the response ended."""

    subprotocol: str | None = None

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self.limiter = limiter
        self.to_client, self.inbox = trio.open_memory_channel[bytes](16)
        self.server = v2.V2Connection("server")
        self.events: list[v2.Event] = []
        self.arrived = trio.Event()
        self.held_at_end: int | None = None  # the limiter's places taken as the response ended

    async def get_message(self) -> bytes:
        return await self.inbox.receive()

    async def send_message(self, message: str | bytes) -> None:
        assert isinstance(message, bytes)
        events = [event for frame in v2.unpack_batch(message)
                  for event in self.server.receive(frame)]
        self.events += events
        if any(type(event) is v2.StreamEnded for event in events):
            self.held_at_end = self.limiter.borrowed_tokens
            self.arrived.set()

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        await self.to_client.aclose()

    async def ping(self, payload: bytes | None = None) -> None:
        pass


async def test_a_lone_response_leaves_before_its_handler_tidies_up() -> None:
    # One request alone on the tunnel: its answer's last frame goes from the handler's task
    # as soon as it is put, while the request still holds its place in the limiter (and its
    # backend connection), not after the handler has given those back. The server waits for
    # that frame; the tidying up need not be in its way.
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, answer_forever, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        backend = Backend(server=f"http://127.0.0.1:{port}", regexp=None, max_body_size=1 << 20,
                          max_connections=4)
        limiter = trio.CapacityLimiter(4)
        tunnel = Tunnel(limiter)
        # Batched, as between our two ends (wstunnel.v2.batch): the HEAD, DATA and end in one
        # message.
        session = ClientSessionV2(tunnel, backend, limiter=limiter, log=EventLogger("WStuncli"),
                                  token=TOKEN, batched=True)
        nursery.start_soon(session.run)
        _, head = tunnel.server.send_request(b"GET", b"/", [(b"Host", b"backend")], end_stream=True)
        with trio.fail_after(10):
            await tunnel.to_client.send(v2.pack_batch([v2.encode_frame(head)]))
            await tunnel.arrived.wait()
            await trio.testing.wait_all_tasks_blocked()
        # And the handler did let go of its place afterwards.
        assert limiter.borrowed_tokens == 0
        await backend.aclose()
        nursery.cancel_scope.cancel()
    responses = [event for event in tunnel.events if type(event) is v2.ResponseReceived]
    assert [event.status for event in responses] == [200]
    body = b"".join(bytes(event.data) for event in tunnel.events if type(event) is v2.DataReceived)
    assert body == BODY
    assert tunnel.held_at_end == 1
