"""Receive windows that follow the link (wstunnel.v2.WindowTuner, V2Connection.widen), no sockets:
a window grows when its consumer kept up with it for a round trip, never otherwise, up to its
limit; the WINDOW frames that widen it are plain v2, which a peer of any version takes."""

from __future__ import annotations

import pytest

from wstunnel import v2
from wstunnel.v2 import (
    INITIAL_STREAM_WINDOW,
    INITIAL_TUNNEL_WINDOW,
    DataReceived,
    V2Connection,
    Window,
    WindowLimits,
    WindowTuner,
)

KiB, MiB = 1024, 1024 * 1024


def open_download() -> tuple[V2Connection, V2Connection, int]:
    """A server (the receiver of a download) and a client with one stream answered."""
    server, client = V2Connection("server"), V2Connection("client")
    stream, head = server.send_request(b"GET", b"/big", [(b"Host", b"h")], end_stream=True)
    client.receive(v2.encode_frame(head))
    response = client.send_response(stream, 200, b"OK", [])
    server.receive(v2.encode_frame(response))
    return server, client, stream


def deliver(sender: V2Connection, receiver: V2Connection, stream: int, size: int) -> int:
    """Send up to ``size`` body bytes within the windows; the receiver consumes them all at once
    (its consumer keeps up) and its WINDOW frames go back. The bytes that went."""
    frames, taken = sender.data_frames(stream, b"x" * size)
    for frame in frames:
        for event in receiver.receive(v2.encode_frame(frame)):
            assert isinstance(event, DataReceived)
            for grant in receiver.consumed(stream, len(event.data)):
                sender.receive(v2.encode_frame(grant))
    return taken


RTT = 0.05


def round_trip(tuner: WindowTuner, sender: V2Connection, receiver: V2Connection, stream: int,
               size: int) -> list[Window]:
    """One probe: SAMPLE_ROUND_TRIPS round trips, in each of which up to ``size`` bytes are sent
    and consumed."""
    probe = tuner.start()
    for _ in range(v2.SAMPLE_ROUND_TRIPS):
        deliver(sender, receiver, stream, size)
    grants = tuner.finish(probe, RTT, RTT * v2.SAMPLE_ROUND_TRIPS)
    for grant in grants:
        sender.receive(v2.encode_frame(grant))
    return grants


def test_a_window_bound_stream_doubles_per_round_trip_up_to_its_limit() -> None:
    server, client, stream = open_download()
    tuner = WindowTuner(server, WindowLimits(stream=8 * MiB, tunnel=64 * MiB))
    sizes = []
    for _ in range(5):
        # The sender sends what its windows allow: the stream's window is what binds it. Each
        # probe spans two round trips: the window doubles twice.
        round_trip(tuner, client, server, stream, 64 * MiB)
        sizes.append(server.receiving_streams()[stream][1])
    assert sizes == [1 * MiB, 4 * MiB, 8 * MiB, 8 * MiB, 8 * MiB]  # then the limit
    assert tuner.probes == 5 and tuner.widest_stream == 8 * MiB
    # What the sender may send follows: the window it was granted is the new one.
    assert client.send_capacity(stream) == 8 * MiB


def test_the_sample_is_scaled_to_one_round_trip() -> None:
    """Bytes consumed over a longer time count for what one round trip of it took."""
    server, client, stream = open_download()
    tuner = WindowTuner(server, WindowLimits())
    probe = tuner.start()
    deliver(client, server, stream, INITIAL_STREAM_WINDOW)
    # One window in 0.2 s, round trips of 0.05 s: a quarter window a round trip, not bound.
    assert tuner.finish(probe, 0.05, 0.2) == []
    probe = tuner.start()
    deliver(client, server, stream, INITIAL_STREAM_WINDOW)
    assert tuner.finish(probe, 0.05, 0.05) != []  # the same in one round trip: bound


def test_a_round_trip_lengthened_by_a_queue_does_not_widen_the_window() -> None:
    """A pong that waited behind queued bytes times the queue, not the link: samples are scaled
    to the link's round trip, the shortest of the last probes' (BBR's min_rtt)."""

    def window_bound_probe(tuner: WindowTuner, client: V2Connection, server: V2Connection,
                           stream: int) -> list[Window]:
        # A window consumed in each of the two round trips, each round trip 50 ms long.
        probe = tuner.start()
        for _ in range(v2.SAMPLE_ROUND_TRIPS):
            deliver(client, server, stream, INITIAL_STREAM_WINDOW)
        return tuner.finish(probe, 0.05, 0.05 * v2.SAMPLE_ROUND_TRIPS)

    server, client, stream = open_download()
    tuner = WindowTuner(server, WindowLimits())
    assert tuner.finish(tuner.start(), 0.001, 0.002) == []  # the link's own: 1 ms, idle
    for _ in range(5):
        assert window_bound_probe(tuner, client, server, stream) == []
    assert server.receiving_streams()[stream][1] == INITIAL_STREAM_WINDOW
    assert server.tunnel_window == INITIAL_TUNNEL_WINDOW

    # The same samples on a link whose round trip is 50 ms do widen it.
    server, client, stream = open_download()
    tuner = WindowTuner(server, WindowLimits())
    assert window_bound_probe(tuner, client, server, stream) != []
    assert server.receiving_streams()[stream][1] > INITIAL_STREAM_WINDOW


def test_the_tunnel_window_grows_with_what_all_streams_consumed() -> None:
    server, client, stream = open_download()
    tuner = WindowTuner(server, WindowLimits(stream=16 * MiB, tunnel=16 * MiB))
    for _ in range(10):
        round_trip(tuner, client, server, stream, 64 * MiB)
    assert server.tunnel_window == 16 * MiB
    assert server.receiving_streams()[stream][1] == 16 * MiB


def test_a_slow_consumer_keeps_its_window() -> None:
    """Bytes the consumer takes in a round trip, not bytes the sender pushes, decide."""
    server, client, stream = open_download()
    tuner = WindowTuner(server, WindowLimits())
    frames, _ = client.data_frames(stream, b"x" * INITIAL_STREAM_WINDOW)  # the whole window...
    for frame in frames:
        server.receive(v2.encode_frame(frame))
    for _ in range(5):
        probe = tuner.start()
        server.consumed(stream, 16 * KiB)  # ...but only 16 KiB a round trip read by its client
        assert tuner.finish(probe) == []
    assert server.receiving_streams()[stream][1] == INITIAL_STREAM_WINDOW
    assert server.tunnel_window == INITIAL_TUNNEL_WINDOW
    assert server.buffered_bytes <= INITIAL_STREAM_WINDOW


def test_an_app_limited_sender_does_not_grow_the_window() -> None:
    """A backend slower than the window (half of it a round trip) leaves it as it is."""
    server, client, stream = open_download()
    tuner = WindowTuner(server, WindowLimits())
    for _ in range(5):
        assert round_trip(tuner, client, server, stream, INITIAL_STREAM_WINDOW // 2) == []


def test_a_stream_opened_during_a_probe_is_sampled_by_the_next_one() -> None:
    server, client = V2Connection("server"), V2Connection("client")
    tuner = WindowTuner(server, WindowLimits())
    probe = tuner.start()
    stream, head = server.send_request(b"GET", b"/", [(b"Host", b"h")], end_stream=True)
    client.receive(v2.encode_frame(head))
    server.receive(v2.encode_frame(client.send_response(stream, 200, b"OK", [])))
    deliver(client, server, stream, INITIAL_STREAM_WINDOW)
    assert tuner.finish(probe) == []  # no whole round trip of it was seen
    assert round_trip(tuner, client, server, stream, 8 * MiB) != []


def test_widen_only_grows_and_only_streams_still_receiving() -> None:
    server, client, stream = open_download()
    assert server.widen(stream, INITIAL_STREAM_WINDOW) == []
    assert server.widen(stream, 100) == []
    assert server.widen(stream, MiB) == [Window(stream, MiB - INITIAL_STREAM_WINDOW)]
    assert server.widen(0, 8 * MiB) == [Window(0, 8 * MiB - INITIAL_TUNNEL_WINDOW)]
    with pytest.raises(ValueError, match="out of range"):
        server.widen(0, 2**31)
    client.receive(v2.encode_frame(Window(stream, 1)))  # any v2 peer takes WINDOW frames
    for frame in client.data_frames(stream, b"", end_stream=True)[0]:
        server.receive(v2.encode_frame(frame))
    assert server.widen(stream, 2 * MiB) == []  # its side has ended


def test_after_widening_credit_goes_back_at_half_the_new_window() -> None:
    server, client, stream = open_download()
    for grant in server.widen(stream, MiB):
        client.receive(v2.encode_frame(grant))
    frames, taken = client.data_frames(stream, b"x" * MiB)
    assert taken == MiB
    for frame in frames:
        server.receive(v2.encode_frame(frame))
    assert server.consumed(stream, 256 * KiB) == []  # a quarter: not yet
    assert Window(stream, 512 * KiB) in server.consumed(stream, 256 * KiB)


def test_limits_are_checked_and_the_protocol_windows_mean_fixed() -> None:
    assert WindowLimits(INITIAL_STREAM_WINDOW, INITIAL_TUNNEL_WINDOW).fixed
    assert not WindowLimits().fixed
    with pytest.raises(ValueError, match="stream window limit"):
        WindowLimits(stream=1024)
    with pytest.raises(ValueError, match="tunnel window limit"):
        WindowLimits(tunnel=2**31)


def test_a_tuner_at_its_limits_has_nothing_to_probe() -> None:
    server, _client, _stream = open_download()
    tuner = WindowTuner(server, WindowLimits(INITIAL_STREAM_WINDOW, INITIAL_TUNNEL_WINDOW))
    assert not tuner.can_grow()
    assert WindowTuner(server, WindowLimits()).can_grow()


def test_later_streams_start_at_the_widest_window_the_tunnel_reached() -> None:
    server, client, stream = open_download()
    tuner = WindowTuner(server, WindowLimits(stream=4 * MiB, tunnel=64 * MiB))
    for _ in range(3):
        round_trip(tuner, client, server, stream, 64 * MiB)
    assert server.start_window == tuner.widest_stream == 4 * MiB
    # A new request: the server may grant its response that window with the request's HEAD
    # (tunnel_v2 sends what widen gives right behind it)...
    second, head = server.send_request(b"GET", b"/big", [(b"Host", b"h")], end_stream=True)
    client.receive(v2.encode_frame(head))
    server.receive(v2.encode_frame(client.send_response(second, 200, b"OK", [])))
    assert server.widen(second, server.start_window) == [Window(second, 4 * MiB - INITIAL_STREAM_WINDOW)]
    # ...and a stream that was not widened so gets it with its first DATA that is not its last.
    third, head = server.send_request(b"GET", b"/big", [(b"Host", b"h")], end_stream=True)
    client.receive(v2.encode_frame(head))
    server.receive(v2.encode_frame(client.send_response(third, 200, b"OK", [])))
    frames, _ = client.data_frames(third, b"x" * 1000)
    events = server.receive(v2.encode_frame(frames[0]))
    assert v2.SendFrame(Window(third, 4 * MiB - INITIAL_STREAM_WINDOW)) in events
    # A response that is one DATA frame with END_STREAM is over: nothing to widen.
    fourth, head = server.send_request(b"GET", b"/", [(b"Host", b"h")], end_stream=True)
    client.receive(v2.encode_frame(head))
    server.receive(v2.encode_frame(client.send_response(fourth, 200, b"OK", [])))
    frames, _ = client.data_frames(fourth, b"small", end_stream=True)
    assert not [e for e in server.receive(v2.encode_frame(frames[0])) if isinstance(e, v2.SendFrame)]


def test_a_client_whose_windows_grew_widens_a_request_body_at_once() -> None:
    server, client = V2Connection("server"), V2Connection("client")
    client.start_window = 2 * MiB
    stream, head = server.send_request(b"PUT", b"/up", [(b"Host", b"h")])
    events = client.receive(v2.encode_frame(head))
    assert v2.SendFrame(Window(stream, 2 * MiB - INITIAL_STREAM_WINDOW)) in events
    _bodiless, head = server.send_request(b"GET", b"/", [(b"Host", b"h")], end_stream=True)
    assert not [e for e in client.receive(v2.encode_frame(head)) if isinstance(e, v2.SendFrame)]


def test_the_first_window_is_two_mib_within_the_stream_limit_and_the_protocols_when_fixed() -> None:
    assert v2.first_window(WindowLimits()) == v2.FIRST_WINDOW == 2 * MiB
    assert v2.first_window(WindowLimits(stream=MiB)) == MiB
    fixed = WindowLimits(stream=INITIAL_STREAM_WINDOW, tunnel=INITIAL_TUNNEL_WINDOW)
    assert fixed.fixed and v2.first_window(fixed) == INITIAL_STREAM_WINDOW


def test_a_response_gets_its_first_window_with_the_request_and_can_send_it_at_once() -> None:
    server, client = V2Connection("server"), V2Connection("client")
    server.start_window = v2.first_window(WindowLimits())  # as a server's endpoint sets it
    stream, head = server.send_request(b"GET", b"/1MiB", [(b"Host", b"h")], end_stream=True)
    grants = server.widen(stream, server.opening_window)  # tunnel_v2 sends these behind the HEAD
    assert grants == [Window(stream, 2 * MiB - INITIAL_STREAM_WINDOW)]
    client.receive(v2.encode_frame(head))
    client.receive(v2.encode_frame(grants[0]))
    server.receive(v2.encode_frame(client.send_response(stream, 200, b"OK", [])))
    frames, taken = client.data_frames(stream, bytes(MiB), end_stream=True)
    assert taken == MiB  # the whole body in the first round trip
    for frame in frames:
        server.receive(v2.encode_frame(frame))
    assert server.buffered_bytes == MiB


def stall(server: V2Connection, client: V2Connection, window: int) -> int:
    """A response whose consumer reads nothing: it is granted the opening window and sent all of
    it; the window it got."""
    stream, head = server.send_request(b"GET", b"/big", [(b"Host", b"h")], end_stream=True)
    client.receive(v2.encode_frame(head))
    for grant in server.widen(stream, window):
        client.receive(v2.encode_frame(grant))
    server.receive(v2.encode_frame(client.send_response(stream, 200, b"OK", [])))
    frames, taken = client.data_frames(stream, bytes(16 * MiB))
    for frame in frames:
        server.receive(v2.encode_frame(frame))
    return taken


def test_stalled_consumers_take_half_of_what_is_left_not_a_whole_learned_window() -> None:
    server, client = V2Connection("server"), V2Connection("client")
    server.start_window = 16 * MiB  # a tuner reached it on an earlier transfer...
    for grant in server.widen(0, 32 * MiB):  # ...and widened the tunnel window to two such streams
        client.receive(v2.encode_frame(grant))
    assert server.opening_window == 16 * MiB
    held = [stall(server, client, server.opening_window) for _ in range(7)]
    # Each stalled stream took half of what the others left, not a whole 16 MiB: two of them
    # would have held the tunnel window, and every later stream would wait on them. It now
    # takes eight, as it takes sixteen at the protocol's 256 KiB windows.
    assert held == [16 * MiB >> shift for shift in range(7)]
    assert server.buffered_bytes == sum(held) == 32 * MiB - INITIAL_STREAM_WINDOW
    # So the stream that comes next still moves: its first window is within the tunnel's.
    stream, head = server.send_request(b"GET", b"/small", [(b"Host", b"h")], end_stream=True)
    client.receive(v2.encode_frame(head))
    server.receive(v2.encode_frame(client.send_response(stream, 200, b"OK", [])))
    assert server.opening_window == client.send_capacity(stream) == INITIAL_STREAM_WINDOW


def test_the_opening_window_never_drops_below_the_protocols_initial_window() -> None:
    server, client = V2Connection("server"), V2Connection("client")
    server.start_window = 2 * MiB
    held = [stall(server, client, server.opening_window) for _ in range(4)]
    assert held == [2 * MiB, MiB, MiB // 2, INITIAL_STREAM_WINDOW]
    assert server.opening_window == INITIAL_STREAM_WINDOW  # half of the 1/4 MiB left is less
