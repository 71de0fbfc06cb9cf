"""wstunnel.v2's opening agreement: the first window of request bodies the client offers and the
server takes, and what a V2Connection does with it, without sockets."""

from __future__ import annotations

import pytest

from wstunnel import v2
from wstunnel.errors import ProtocolError
from wstunnel.v2 import (
    FIRST_REQUEST_WINDOW,
    INITIAL_STREAM_WINDOW,
    MAX_WINDOW,
    REQUEST_WINDOW_HEADER,
    Data,
    Frame,
    StreamEnded,
    V2Connection,
    WindowLimits,
    accept_request_window,
    agreed_request_window,
    encode_frame,
    offered_request_window,
)

MiB = 1024 * 1024
HOST = [(b"Host", b"h")]


def test_the_header_and_the_offer() -> None:
    assert REQUEST_WINDOW_HEADER == b"X-Wstunnel-Request-Window"
    assert FIRST_REQUEST_WINDOW == 2 * 1024 * 1024
    assert offered_request_window(WindowLimits()) == FIRST_REQUEST_WINDOW
    assert offered_request_window(WindowLimits(stream=MiB)) == MiB  # within the configured limit
    # Limits at the protocol's windows (an end that never widens): no offer, no header.
    assert offered_request_window(WindowLimits(stream=INITIAL_STREAM_WINDOW)) is None


@pytest.mark.parametrize("offer", [b"2097152", b" 2097152 ", str(INITIAL_STREAM_WINDOW).encode(),
                                   str(MAX_WINDOW).encode()])
def test_the_server_takes_any_window_the_protocol_allows(offer: bytes) -> None:
    assert accept_request_window(offer) == int(offer)
    assert accept_request_window(None) is None  # no offer: the protocol's window


@pytest.mark.parametrize(("offer", "message"), [
    (b"", "must be a number of bytes"),
    (b"2 MiB", "must be a number of bytes"),
    (b"-2097152", "must be a number of bytes"),
    (b"0x200000", "must be a number of bytes"),
    (b"9" * 400, "must be a number of bytes"),
    (b"1024", "out of range"),  # below the protocol's own first window
    (str(MAX_WINDOW + 1).encode(), "out of range"),
])
def test_an_offer_that_is_not_a_window_is_refused_by_name(offer: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        accept_request_window(offer)
    assert "X-Wstunnel-Request-Window" in str(info.value)
    assert len(str(info.value)) < 200  # a long offer is not echoed whole


def test_the_client_uses_what_the_server_answered() -> None:
    offer = FIRST_REQUEST_WINDOW
    assert agreed_request_window(offer, b"2097152") == offer
    assert agreed_request_window(offer, b"1048576") == MiB  # a server may take less
    # No answer: a server from before the header, which keeps the protocol's window.
    assert agreed_request_window(offer, None) == INITIAL_STREAM_WINDOW
    assert agreed_request_window(None, None) == INITIAL_STREAM_WINDOW


@pytest.mark.parametrize(("offer", "answer"), [
    (FIRST_REQUEST_WINDOW, b"4194304"),  # more than offered: the client would refuse its DATA
    (None, b"2097152"),  # nothing was offered
    (FIRST_REQUEST_WINDOW, b"lots"),
    (FIRST_REQUEST_WINDOW, b"1000"),
])
def test_an_answer_the_client_did_not_offer_is_an_error(offer: int | None, answer: bytes) -> None:
    with pytest.raises(ValueError, match=r"X-Wstunnel-Request-Window|offered"):
        agreed_request_window(offer, answer)


def deliver(conn: V2Connection, *frames: Frame) -> list[v2.Event]:
    events: list[v2.Event] = []
    for frame in frames:
        events += conn.receive(encode_frame(frame))
    return events


def test_agreed_ends_send_a_whole_request_body_window_before_any_credit_comes_back() -> None:
    server = V2Connection("server", request_window=FIRST_REQUEST_WINDOW)
    client = V2Connection("client", request_window=FIRST_REQUEST_WINDOW)
    assert server.request_window == client.request_window == FIRST_REQUEST_WINDOW
    stream, head = server.send_request(b"POST", b"/up", HOST)
    assert deliver(client, head)[0].stream == stream  # no WINDOW frame is needed first
    assert server.send_capacity(stream) == FIRST_REQUEST_WINDOW
    body = bytes(3 * MiB // 2)
    frames, taken = server.data_frames(stream, body, end_stream=True)
    assert taken == len(body)  # all of it, in the first round trip
    events = deliver(client, *frames)
    assert isinstance(events[-1], StreamEnded)
    assert client.buffered_bytes == len(body)
    # The response's direction keeps the protocol's window: only request bodies were agreed on.
    deliver(server, client.send_response(stream, 200, b"OK", []))
    assert client.send_capacity(stream) == INITIAL_STREAM_WINDOW


def test_the_request_window_is_still_a_window() -> None:
    server = V2Connection("server", request_window=FIRST_REQUEST_WINDOW)
    client = V2Connection("client", request_window=FIRST_REQUEST_WINDOW)
    stream, head = server.send_request(b"POST", b"/up", HOST)
    deliver(client, head)
    frames, taken = server.data_frames(stream, bytes(3 * MiB))
    assert taken == FIRST_REQUEST_WINDOW and server.send_capacity(stream) == 0
    deliver(client, *frames)
    with pytest.raises(ProtocolError, match="exceeds its window"):
        deliver(client, Data(stream, b"x"))


def test_ends_that_did_not_agree_break_the_protocol() -> None:
    """Why the server must answer the offer: a server sending with a window the client never
    granted overruns it."""
    server = V2Connection("server", request_window=FIRST_REQUEST_WINDOW)
    client = V2Connection("client")
    stream, head = server.send_request(b"POST", b"/up", HOST)
    deliver(client, head)
    frames, _taken = server.data_frames(stream, bytes(MiB))
    with pytest.raises(ProtocolError, match="exceeds its window"):
        deliver(client, *frames)


def test_a_window_learned_on_the_tunnel_still_widens_a_request_above_the_agreed_one() -> None:
    client = V2Connection("client", request_window=FIRST_REQUEST_WINDOW)
    server = V2Connection("server", request_window=FIRST_REQUEST_WINDOW)
    client.start_window = 8 * MiB  # a window tuner reached it on an earlier upload...
    client.widen(0, 16 * MiB)  # ...and made the tunnel window room for two such streams
    stream, head = server.send_request(b"POST", b"/up", HOST)
    grants = [event.frame for event in deliver(client, head) if isinstance(event, v2.SendFrame)]
    assert grants == [v2.Window(stream, 8 * MiB - FIRST_REQUEST_WINDOW)]


@pytest.mark.parametrize("window", [0, MAX_WINDOW + 1])
def test_a_request_window_out_of_range_is_a_local_error(window: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        V2Connection("client", request_window=window)
