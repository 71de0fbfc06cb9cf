"""Every tunnel loss says why: the server's ``WS   CLOSE`` line and the client's
``WS   RECONNECT`` line name the cause, over both transports, and are never empty.

The causes a fault brings (a peer killed: "vanished"; a silent cut: ping timeout, silence, a
long-poll session expired) are checked where those faults are made, in tests/test_faults.py and
tests/test_stream_faults.py; here are the ones a party decides: a client or a server shutting
down, a token revoked, a peer that breaks the protocol.
"""

from __future__ import annotations

import signal

import pytest
import trio
import trio_websocket

from tests.support import faultlog
from tests.support.harness import Client, Harness, Server, wait_until
from wstunnel import v2

TRANSPORTS = ["websocket", "longpoll"]


def server_closes(server: Server) -> list[dict[str, str]]:
    return faultlog.events(server.process.output(), "WS   CLOSE")


def reconnects(client: Client) -> list[str]:
    return [line["reason"] for line in faultlog.events(client.process.output(), "WS   RECONNECT")]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_client_shutting_down_is_named_by_the_server(harness: Harness, transport: str) -> None:
    server = harness.server()
    token = harness.new_token()
    client = harness.client(server, token, "-transport", transport)
    client.process.signal(signal.SIGTERM)
    assert client.process.wait_exit(15) == 0
    closes = wait_until(lambda: server_closes(server), what="the server's WS CLOSE line")
    expected = {"websocket": "client shutting down",
                "longpoll": "client closed the session: client shutting down"}[transport]
    assert closes[0]["reason"] == expected, closes
    assert closes[0]["code"] == ("1001" if transport == "websocket" else "1000")
    assert "tunnel_lost" not in str(server.status())  # nothing was in flight: nothing aborted


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_server_shutting_down_is_named_by_the_client(harness: Harness, transport: str) -> None:
    server = harness.server()
    token = harness.new_token()
    client = harness.client(server, token, "-transport", transport)
    server.process.signal(signal.SIGTERM)
    assert server.process.wait_exit(15) == 0
    reasons = wait_until(lambda: reconnects(client), what="the client's WS RECONNECT line")
    print(f"\n[server shutting down, {transport}] the client: {reasons[0]}")
    assert "server shutting down" in reasons[0], reasons
    if transport == "websocket":
        assert reasons[0] == "connection closed: server shutting down (code=1001)"
    closes = server_closes(server)
    assert len(closes) == 1 and closes[0]["reason"] == "server shutting down", closes


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_revoked_token_is_named_by_both_ends(harness: Harness, transport: str) -> None:
    token = harness.new_token()
    config = harness.directory / "srv.toml"
    config.write_text(f'allowed_tokens = ["{token}"]\n')
    config.chmod(0o600)
    server = harness.server("-config", str(config))
    client = harness.client(server, token, "-transport", transport)
    config.write_text('allowed_tokens = ["someone-else-entirely-1234567890"]\n')
    server.process.signal(signal.SIGHUP)
    closes = wait_until(lambda: server_closes(server), what="the server's WS CLOSE line")
    assert closes[0]["reason"] == "token revoked: no longer allowed", closes
    reasons = wait_until(lambda: reconnects(client), what="the client's WS RECONNECT line")
    print(f"\n[token revoked, {transport}] the client: {reasons[0]}")
    assert "token revoked" in reasons[0], reasons


async def test_a_protocol_error_names_the_frame_at_fault(harness: Harness) -> None:
    """A peer that sends DATA on a stream never opened: the server's close reason (whole in its
    log, cut to a Close frame's 123 bytes on the wire) says which frame."""
    server = await trio.to_thread.run_sync(harness.server)
    token = harness.new_token()
    with trio.fail_after(30):
        async with trio_websocket.open_websocket_url(
            f"{server.ws_url}/_tunnel", extra_headers=[(b"Origin", token.encode())],
            subprotocols=[v2.SUBPROTOCOL], connect_timeout=10, disconnect_timeout=5,
        ) as ws:
            await ws.send_message(v2.encode_frame(v2.Data(99, b"out of nowhere")))
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
    said = closed.value.reason
    assert said.code == 1002
    assert said.reason is not None and said.reason.startswith("protocol error: DATA frame on stream 99")
    closes = await trio.to_thread.run_sync(
        lambda: wait_until(lambda: server_closes(server), what="the server's WS CLOSE line"))
    assert closes[0]["code"] == "1002"
    assert closes[0]["reason"].startswith("protocol error: DATA frame on stream 99"), closes
