"""wstunnel.tunnel._wsframes, the open WebSocket's frame codec, without sockets: RFC 6455's worked
examples, round trips, frames split at every byte, every protocol error, and wsproto (an
independent implementation) on the other side of generated conversations, both ways."""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable, Iterable

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Message, Ping, Pong, TextMessage

from wstunnel.tunnel import _wsframes as frames

LIMIT = 4 * 1024 * 1024
KEY = bytes.fromhex("37fa213d")  # RFC 6455 5.7's masking key


def server_reader(limit: int = LIMIT) -> frames.FrameReader:
    return frames.FrameReader(client=False, max_message_size=limit)


def client_reader(limit: int = LIMIT) -> frames.FrameReader:
    return frames.FrameReader(client=True, max_message_size=limit)


def describe(events: Iterable[object]) -> list[object]:
    """Events as plain values, to compare."""
    out: list[object] = []
    for event in events:
        if isinstance(event, bytes | str):
            out.append(event)
        elif isinstance(event, frames.Ping | frames.Pong):
            out.append((type(event).__name__, event.payload))
        elif isinstance(event, frames.Close | frames.Failure):
            out.append((type(event).__name__, event.code, event.reason))
        else:
            raise TypeError(f"not an event: {event!r}")
    return out


def read_in_pieces(reader: frames.FrameReader, data: bytes, cuts: Iterable[int]) -> list[object]:
    events: list[object] = []
    start = 0
    for cut in [*cuts, len(data)]:
        events += reader.receive(data[start:cut])
        start = cut
    return describe(events)


def frame(first: int, payload: bytes, *, key: bytes | None = None, length: bytes | None = None,
          ) -> bytes:
    """A frame built by hand: ``first`` is FIN/RSV/opcode; ``length`` overrides the encoding."""
    size = len(payload)
    if length is None:
        if size < 126:
            length = bytes((size,))
        elif size < 0x10000:
            length = bytes((126,)) + struct.pack("!H", size)
        else:
            length = bytes((127,)) + struct.pack("!Q", size)
    if key is None:
        return bytes((first,)) + length + payload
    return (bytes((first, length[0] | 0x80)) + length[1:] + key
            + bytes(b ^ key[i % 4] for i, b in enumerate(payload)))


# -- RFC 6455 5.7, the worked examples -----------------------------------------------------------

UNMASKED_HELLO = bytes.fromhex("810548656c6c6f")
MASKED_HELLO = bytes.fromhex("818537fa213d7f9f4d5158")


def test_rfc_examples_are_read() -> None:
    assert describe(client_reader().receive(UNMASKED_HELLO)) == ["Hello"]
    assert describe(server_reader().receive(MASKED_HELLO)) == ["Hello"]
    fragmented = bytes.fromhex("010348656c") + bytes.fromhex("80026c6f")
    assert describe(client_reader().receive(fragmented)) == ["Hello"]
    assert describe(client_reader().receive(bytes.fromhex("890548656c6c6f"))) == [
        ("Ping", b"Hello")]
    assert describe(server_reader().receive(bytes.fromhex("8a8537fa213d7f9f4d5158"))) == [
        ("Pong", b"Hello")]
    body = os.urandom(256)
    assert describe(client_reader().receive(bytes.fromhex("827e0100") + body)) == [body]
    body = os.urandom(65536)
    assert describe(client_reader().receive(bytes.fromhex("827f0000000000010000") + body)) == [
        body]


@pytest.mark.parametrize("mask", [frames.mask, frames.mask_in_python],
                         ids=["compiled", "python"])
def test_rfc_masking_example_and_masking_undoes_itself(mask: Callable[[bytes, bytes], bytes]) -> None:
    assert mask(b"Hello", KEY) == bytes.fromhex("7f9f4d5158")
    for size in (0, 1, 3, 4, 5, 15, 16, 17, 1023, 1024, 1025, 4099, 70_001):
        payload = os.urandom(size)
        masked = mask(payload, KEY)
        assert masked == bytes(b ^ KEY[i % 4] for i, b in enumerate(payload))
        assert mask(masked, KEY) == payload


def test_masking_is_compiled_where_we_run() -> None:
    """The declared websockets brings its C masking function; without it every transfer costs
    each daemon twice the CPU, which no other test would notice."""
    assert frames.MASK_IS_COMPILED


def test_rfc_examples_are_written() -> None:
    assert frames.encode_message("Hello", masked=False) == UNMASKED_HELLO
    assert frames.encode_message(b"\x00" * 256, masked=False)[:4] == bytes.fromhex("827e0100")
    assert frames.encode_message(b"\x00" * 65536, masked=False)[:10] == bytes.fromhex(
        "827f0000000000010000")
    masked = frames.encode_message("Hello", masked=True)
    assert masked[:2] == bytes.fromhex("8185")
    assert frames.mask(masked[6:], masked[2:6]) == b"Hello"
    assert frames.encode_ping(b"Hello", masked=False) == bytes.fromhex("890548656c6c6f")


# -- round trips ---------------------------------------------------------------------------------

SIZES = (0, 1, 125, 126, 127, 1024, 65535, 65536, 65537, 1024 * 1024)


@pytest.mark.parametrize("size", SIZES)
def test_messages_round_trip_both_ways(size: int) -> None:
    payload = os.urandom(size)
    text = ("h\u00e9\u4e16\U0001f600" * (size // 10 + 1))[:size]
    for message in (payload, text):
        up = frames.encode_message(message, masked=True)  # client to server
        down = frames.encode_message(message, masked=False)
        assert describe(server_reader().receive(up)) == [message]
        assert describe(client_reader().receive(down)) == [message]


def test_a_bytearray_is_sent_as_binary() -> None:
    assert describe(client_reader().receive(
        frames.encode_message(bytearray(b"ab"), masked=False))) == [b"ab"]


def test_control_frames_round_trip() -> None:
    reader = server_reader()
    stream = (frames.encode_ping(b"p" * 125, masked=True) + frames.encode_pong(b"", masked=True)
              + frames.encode_close(1001, "going away", masked=True))
    assert describe(reader.receive(stream)) == [
        ("Ping", b"p" * 125), ("Pong", b""), ("Close", 1001, "going away")]


def test_close_frames_as_wsproto_writes_them() -> None:
    assert frames.encode_close(None, None, masked=False) == b"\x88\x00"
    assert frames.encode_close(1005, "", masked=False) == b"\x88\x00"  # no code: none sent
    assert frames.encode_close(1006, None, masked=False) == b"\x88\x02\x03\xe8"  # local: 1000
    with pytest.raises(TypeError):
        frames.encode_close(None, "a reason needs a code", masked=False)
    assert describe(client_reader().receive(b"\x88\x00")) == [("Close", 1005, "")]
    # The reason is cut to the 123 bytes that fit, never inside a character.
    long = frames.encode_close(1000, "\u00e9" * 100, masked=False)
    assert len(long) == 2 + 2 + 122
    assert describe(client_reader().receive(long)) == [("Close", 1000, "\u00e9" * 61)]


def test_a_control_payload_over_125_bytes_is_refused() -> None:
    with pytest.raises(ValueError):
        frames.encode_ping(b"x" * 126, masked=True)


def test_the_client_masks_with_a_fresh_key_each_time() -> None:
    keys = {frames.encode_message(b"same", masked=True)[2:6] for _ in range(20)}
    assert len(keys) > 1


# -- one stream, read in every way it can arrive -------------------------------------------------

def conversation(*, masked: bool) -> tuple[bytes, list[object]]:
    """A fragmented binary message with a ping in its middle, a text message split inside a
    character, a 16-bit and a 64-bit length, an empty message, a pong, and a Close."""
    key = KEY if masked else None
    big = bytes(range(256)) * 260  # 66,560 bytes: a 64-bit length
    parts = [
        frame(0x02, b"first "), frame(0x89, b"ping!", key=key), frame(0x00, b"second "),
        frame(0x80, b"third"),
        frame(0x01, "caf\u00e9 \u4e16".encode()[:5]), frame(0x80, "caf\u00e9 \u4e16".encode()[5:]),
        frame(0x82, b"m" * 300), frame(0x82, big), frame(0x82, b""), frame(0x8A, b"", key=key),
        frame(0x88, b"\x03\xe8bye", key=key),
    ]
    if masked:  # data frames too
        parts = [p if p[1] & 0x80 else frame(p[0], _payload(p), key=key) for p in parts]
    expected: list[object] = [
        ("Ping", b"ping!"), b"first second third", "caf\u00e9 \u4e16", b"m" * 300, big, b"",
        ("Pong", b""), ("Close", 1000, "bye"),
    ]
    return b"".join(parts), expected


def _payload(unmasked_frame: bytes) -> bytes:
    size = unmasked_frame[1] & 0x7F
    start = {126: 4, 127: 10}.get(size, 2)
    return unmasked_frame[start:]


@pytest.mark.parametrize("masked", [False, True], ids=["to the client", "to the server"])
def test_a_stream_split_at_every_byte_reads_the_same(masked: bool) -> None:
    stream, expected = conversation(masked=masked)
    new_reader = server_reader if masked else client_reader
    assert describe(new_reader().receive(stream)) == expected
    # Headers and the short frames: cut once at each of their bytes, and in three places.
    boundaries = range(1, len(stream) - 66_560 + 40)
    for cut in boundaries:
        assert read_in_pieces(new_reader(), stream, [cut]) == expected, cut
    for cut in range(1, 60):
        assert read_in_pieces(new_reader(), stream, [cut, cut + 13, len(stream) - cut]) == expected
    # Byte by byte.
    assert read_in_pieces(new_reader(), stream, range(1, len(stream))) == expected


def test_nothing_is_read_after_a_close() -> None:
    reader = client_reader()
    assert describe(reader.receive(b"\x88\x00" + UNMASKED_HELLO)) == [("Close", 1005, "")]
    assert reader.receive(UNMASKED_HELLO) == []


# -- protocol errors -----------------------------------------------------------------------------

ERRORS: dict[str, tuple[bool, bytes, int, str]] = {
    # name: (read by the client?, bytes, close code, reason starts with)
    "reserved bit 1": (True, frame(0xC2, b"x"), 1002, "Reserved bit set"),
    "reserved bit 3": (True, frame(0x92, b"x"), 1002, "Reserved bit set"),
    "opcode 3": (True, frame(0x83, b"x"), 1002, "Invalid opcode 0x3"),
    "opcode 0xB": (True, frame(0x8B, b""), 1002, "Invalid opcode 0xb"),
    "fragmented ping": (True, frame(0x09, b""), 1002, "Invalid attempt to fragment control"),
    "ping over 125": (True, frame(0x89, b"x" * 126), 1002, "Control frame with payload len"),
    "masked to the client": (True, frame(0x82, b"x", key=KEY), 1002,
                             "client received unexpected masked frame"),
    "unmasked to the server": (False, frame(0x82, b"x"), 1002,
                               "server received unexpected unmasked frame"),
    "16-bit length under 126": (True, frame(0x82, b"x" * 125, length=b"\x7e\x00\x7d"), 1002,
                                "Payload length used 2 bytes"),
    "64-bit length under 65536": (True, frame(0x82, b"x" * 3, length=b"\x7f" + bytes(7) + b"\x03"),
                                  1002, "Payload length used 8 bytes"),
    "64-bit length with its top bit": (True, b"\x82\x7f\x80" + bytes(7), 1002,
                                       "8-byte payload length with non-zero MSB"),
    "continuation of nothing": (True, frame(0x80, b"x"), 1002, "unexpected CONTINUATION"),
    "new message inside one": (True, frame(0x02, b"x") + frame(0x81, b"y"), 1002,
                               "expected CONTINUATION"),
    "text that is not UTF-8": (True, frame(0x81, b"\xff"), 1007, "'utf-8' codec can't decode"),
    "fragmented text not UTF-8": (True, frame(0x01, b"\xc3") + frame(0x80, b"("), 1007,
                                  "'utf-8' codec can't decode"),
    "close with 1 byte": (True, frame(0x88, b"\x03"), 1002, "CLOSE with 1 byte payload"),
    "close code 999": (True, frame(0x88, b"\x03\xe7"), 1002, "CLOSE with invalid code"),
    "close code 5000": (True, frame(0x88, b"\x13\x88"), 1002, "CLOSE with invalid code"),
    "close code 1005": (True, frame(0x88, b"\x03\xed"), 1002, "remote CLOSE with local-only"),
    "close code 1006": (True, frame(0x88, b"\x03\xee"), 1002, "remote CLOSE with local-only"),
    "close code 1015": (True, frame(0x88, b"\x03\xf7"), 1002, "remote CLOSE with local-only"),
    "close code 1004": (True, frame(0x88, b"\x03\xec"), 1002, "CLOSE with unknown reserved"),
    "close code 2999": (True, frame(0x88, b"\x0b\xb7"), 1002, "CLOSE with unknown reserved"),
    "close reason not UTF-8": (True, frame(0x88, b"\x03\xe8\xff"), 1007,
                               "Error decoding CLOSE reason"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_each_protocol_error_fails_with_its_code_after_what_came_before(name: str) -> None:
    to_client, bad, code, reason = ERRORS[name]
    before = frames.encode_message(b"fine", masked=not to_client)
    after = frames.encode_message(b"never read", masked=not to_client)
    for cuts in ([], [len(before) + 1], range(1, len(before) + len(bad))):
        reader = client_reader() if to_client else server_reader()
        events = read_in_pieces(reader, before + bad + after, cuts)
        assert events[0] == b"fine"
        assert len(events) == 2 and events[1][:2] == ("Failure", code), events  # type: ignore[index]
        assert events[1][2].startswith(reason), events  # type: ignore[index]
        assert reader.receive(after) == []


@pytest.mark.parametrize("name", list(ERRORS))
def test_wsproto_fails_the_same_frames_with_the_same_code(name: str) -> None:
    to_client, bad, code, reason = ERRORS[name]
    theirs = Connection(ConnectionType.CLIENT if to_client else ConnectionType.SERVER)
    theirs.receive_data(bad)
    closes = [e for e in theirs.events() if isinstance(e, CloseConnection)]
    assert [(c.code, str(c.reason).startswith(reason.split(" 0x")[0])) for c in closes] == [
        (code, True)]


def test_a_message_over_the_limit_fails_with_1009_as_its_header_comes() -> None:
    reason = "Exceeded maximum message size: 1000 bytes"
    assert describe(client_reader(1000).receive(frame(0x82, b"x" * 1000))) == [b"x" * 1000]
    # One frame: refused on its header, before its payload is held.
    assert describe(client_reader(1000).receive(frame(0x82, b"x" * 1001)[:4])) == [
        ("Failure", 1009, reason)]
    # Fragments whose sum is over.
    fragments = frame(0x02, b"x" * 600) + frame(0x89, b"") + frame(0x80, b"y" * 401)
    assert describe(client_reader(1000).receive(fragments)) == [
        ("Ping", b""), ("Failure", 1009, reason)]
    # The control frames between fragments do not count.
    fragments = frame(0x02, b"x" * 600) + frame(0x89, b"z" * 125) + frame(0x80, b"y" * 400)
    assert describe(client_reader(1000).receive(fragments)) == [
        ("Ping", b"z" * 125), b"x" * 600 + b"y" * 400]


# -- wsproto on the other side, generated conversations ------------------------------------------

def generated_messages(rng: random.Random, count: int) -> list[tuple[bytes | str, int]]:
    """(message, number of fragments wsproto sends it in)."""
    sizes = [0, 1, 2, 124, 125, 126, 127, 1000, 65535, 65536, 65537, 200_000]
    out: list[tuple[bytes | str, int]] = []
    for _ in range(count):
        size = rng.choice(sizes) if rng.random() < 0.5 else rng.randrange(0, 5000)
        if rng.random() < 0.3:
            text = "".join(rng.choice("ab\u00e9\u4e16\U0001f600") for _ in range(size // 3 + 1))
            out.append((text, rng.choice([1, 1, 2, 3])))
        else:
            out.append((rng.randbytes(size), rng.choice([1, 1, 2, 5])))
    return out


def wsproto_sends(connection: Connection, message: bytes | str, fragments: int,
                  rng: random.Random) -> tuple[bytes, int]:
    """``message`` in ``fragments`` frames (text cut between characters), with a ping between
    two of them now and then; and how many pings."""
    data, pings = b"", 0
    cuts = sorted(rng.randrange(0, len(message) + 1) for _ in range(fragments - 1))
    pieces = [message[a:b] for a, b in zip([0, *cuts], [*cuts, len(message)], strict=True)]
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        event: Message[bytes] | Message[str] = (
            TextMessage(piece, message_finished=last) if isinstance(piece, str)
            else BytesMessage(piece, message_finished=last))
        data += connection.send(event)
        if not last and rng.random() < 0.3:
            data += connection.send(Ping(b"between"))
            pings += 1
    return data, pings


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("to_client", [False, True], ids=["wsproto client", "wsproto server"])
def test_what_wsproto_sends_we_read(seed: int, to_client: bool) -> None:
    rng = random.Random(seed)
    theirs = Connection(ConnectionType.SERVER if to_client else ConnectionType.CLIENT)
    expected: list[object] = []
    stream = b""
    for message, fragments in generated_messages(rng, 25):
        data, pings = wsproto_sends(theirs, message, fragments, rng)
        stream += data
        expected += [("Ping", b"between")] * pings  # complete before the message they split
        expected.append(message)
    stream += theirs.send(CloseConnection(1000, "done"))
    expected.append(("Close", 1000, "done"))
    ours = client_reader() if to_client else server_reader()
    assert read_in_pieces(ours, stream, sorted(rng.sample(range(1, len(stream)), 40))) == expected


def wsproto_reads(connection: Connection, data: bytes) -> list[object]:
    """What wsproto makes of ``data``: messages joined, control frames, the close."""
    out: list[object] = []
    parts: list[bytes | str] = []
    connection.receive_data(data)
    event: Event
    for event in connection.events():
        if isinstance(event, BytesMessage | TextMessage):
            parts.append(event.data)
            if event.message_finished:
                out.append(b"".join(parts) if isinstance(event, BytesMessage)  # type: ignore[arg-type]
                           else "".join(parts))  # type: ignore[arg-type]
                parts = []
        elif isinstance(event, Ping | Pong):
            out.append((type(event).__name__, bytes(event.payload)))
        elif isinstance(event, CloseConnection):
            out.append(("Close", event.code, event.reason))
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("client", [False, True], ids=["our server", "our client"])
def test_what_we_send_wsproto_reads(seed: int, client: bool) -> None:
    rng = random.Random(seed)
    expected: list[object] = []
    stream = b""
    for message, _ in generated_messages(rng, 25):
        stream += frames.encode_message(message, masked=client)
        expected.append(message)
        if rng.random() < 0.2:
            payload = rng.randbytes(rng.randrange(0, 126))
            kind, encode = rng.choice([("Ping", frames.encode_ping), ("Pong", frames.encode_pong)])
            stream += encode(payload, masked=client)
            expected.append((kind, payload))
    stream += frames.encode_close(4000, "private reason", masked=client)
    expected.append(("Close", 4000, "private reason"))
    theirs = Connection(ConnectionType.SERVER if client else ConnectionType.CLIENT)
    assert wsproto_reads(theirs, stream) == expected
    # And ours reads its own stream the same way.
    ours = server_reader() if client else client_reader()
    assert describe(ours.receive(stream)) == expected
