"""V2Endpoint (wstunnel.tunnel.endpoint), the part of a v2 tunnel both ends run, over a transport
that the test drives: what its tasks do when the transport closes under them."""

from __future__ import annotations

import trio
from trio_websocket import CloseReason, ConnectionClosed

from wstunnel import v2
from wstunnel.tunnel.endpoint import V2Endpoint

VANISHED = CloseReason(1006, "client vanished (connection reset, no Close frame)")


class ClosingTransport:
    """Delivers the messages it is given; its ping finds the tunnel gone, as a ping does whose
    peer vanished while it waited for the pong."""

    subprotocol: str | None = None

    def __init__(self) -> None:
        self.closed: CloseReason | None = None
        self.inbox_send, self.inbox = trio.open_memory_channel[bytes](16)
        self.pings = 0

    async def get_message(self) -> bytes:
        return await self.inbox.receive()

    async def send_message(self, message: str | bytes) -> None:
        pass

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = CloseReason(code, reason)

    async def ping(self, payload: bytes | None = None) -> None:
        self.pings += 1
        self.closed = VANISHED
        raise ConnectionClosed(VANISHED)


class Reader:
    """A handler whose consumer keeps up: it takes every byte."""

    def __init__(self) -> None:
        self.received = 0

    def on_request(self, event: v2.RequestReceived) -> None: ...
    def on_response(self, event: v2.ResponseReceived) -> None: ...
    def on_end(self, event: v2.StreamEnded) -> None: ...
    def on_reset(self, event: v2.StreamReset) -> None: ...

    def on_data(self, event: v2.DataReceived) -> bool:
        self.received += len(event.data)
        return True


async def test_the_window_tuner_ends_quietly_when_its_probe_finds_the_tunnel_closed() -> None:
    # A download's receiver grants credit back, so the tuner times a round trip with a ping;
    # the peer vanishes meanwhile. The tuner's task must end, not raise: out of the tunnel's
    # nursery, ConnectionClosed ended the whole server.
    transport, reader = ClosingTransport(), Reader()
    endpoint = V2Endpoint("server", transport, reader, batched=False)
    peer = v2.V2Connection("client")
    stream, head = endpoint.conn.send_request(b"GET", b"/big", [(b"Host", b"h")], end_stream=True)
    peer.receive(v2.encode_frame(head))
    await transport.inbox_send.send(v2.encode_frame(peer.send_response(stream, 200, b"OK", [])))
    body, taken = peer.data_frames(stream, b"x" * v2.INITIAL_STREAM_WINDOW)
    assert taken == v2.INITIAL_STREAM_WINDOW
    for frame in body:
        await transport.inbox_send.send(v2.encode_frame(frame))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(endpoint.run_tuner)
            for _ in range(1 + len(body)):
                await endpoint.receive()
            endpoint.credit(stream, reader.received)  # the consumer kept up: a grant, a probe
            # run_tuner returns on its own; the nursery ends with it, with no error.
    assert reader.received == v2.INITIAL_STREAM_WINDOW
    assert transport.pings == 1
