"""wstunnel.client.origin against real servers on 127.0.0.1 (trio, in this process; TLS via trustme).

Each test scripts its server byte by byte, so framing cases (chunked, read-until-close, 1xx, a
backend closing an idle keep-alive connection) are exact, and counts accepted connections to see
reuse. Every wait is on a condition under a deadline; every server stops with its nursery.
"""

from __future__ import annotations

import functools
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
import trustme

from wstunnel.client.origin import OriginPool, Response, Timeouts, default_ssl_context
from wstunnel.client.wire import Target, parse_base
from wstunnel.errors import BackendTimeout, ConnectError, LocalRequestError, RemoteProtocolError

DEADLINE = 10.0


@dataclass
class Received:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


class Peer:
    """One accepted connection: read requests, write raw bytes."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def _take_line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not await self._fill():
                raise EOFError
        line, _, _ = bytes(self.buffer).partition(b"\r\n")
        del self.buffer[: len(line) + 2]
        return line

    async def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not await self._fill():
                raise EOFError
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def request(self) -> Received | None:
        """The next request, or None if the client closed the connection."""
        try:
            method, target, _ = (await self._take_line()).split(b" ", 2)
        except EOFError:
            return None
        headers = []
        while line := await self._take_line():
            name, _, value = line.partition(b":")
            headers.append((name, value.strip()))
        received = Received(method, target, headers, b"")
        if (length := received.header(b"content-length")) is not None:
            received.body = await self._take(int(length))
        elif received.header(b"transfer-encoding") == b"chunked":
            parts = []
            while size := int(await self._take_line(), 16):
                parts.append(await self._take(size))
                await self._take_line()
            await self._take_line()
            received.body = b"".join(parts)
        return received

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)


Handler = Callable[[Peer, "Server"], Awaitable[None]]


@dataclass
class Server:
    handler: Handler
    accepted: int = 0
    requests: list[Received] = field(default_factory=list)
    closed: int = 0  # connections whose handler has ended (and so closed them)
    port: int = 0
    changed: trio.Event = field(default_factory=trio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self.changed.wait()

    async def serve(self, stream: trio.abc.Stream) -> None:
        self.accepted += 1
        self.notify()
        try:
            await self.handler(Peer(stream), self)
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
            pass  # the client went away: what some tests are about
        finally:
            await trio.aclose_forcefully(stream)
            self.closed += 1
            self.notify()

    @property
    def target(self) -> Target:
        return parse_base(f"http://127.0.0.1:{self.port}")


@asynccontextmanager
async def serving(handler: Handler, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = Server(handler)

    async def accept(stream: trio.SocketStream) -> None:
        if tls is None:
            await server.serve(stream)
            return
        wrapped = trio.SSLStream(stream, tls, server_side=True)
        try:
            await wrapped.do_handshake()
        except trio.BrokenResourceError:
            await trio.aclose_forcefully(stream)  # the client refused our certificate
            return
        await server.serve(wrapped)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, accept, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


def pool(max_connections: int = 10, *, timeouts: Timeouts | None = None,
         context: ssl.SSLContext | None = None) -> OriginPool:
    return OriginPool(max_connections=max_connections, ssl_context=context or default_ssl_context(True),
                      timeouts=timeouts or Timeouts())


async def body_of(response: Response) -> bytes:
    try:
        return b"".join([chunk async for chunk in response])
    finally:
        await response.aclose()


def ok(body: bytes = b"hello", *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + b"".join(h + b"\r\n" for h in extra) + \
        b"Content-Length: %d\r\n\r\n" % len(body) + body


async def answer_all(peer: Peer, server: Server) -> None:
    """Keep-alive: answer every request with its target as the body, headers in odd case."""
    while (request := await peer.request()) is not None:
        server.requests.append(request)
        server.notify()
        await peer.send(ok(request.target, b"X-MiXed: 1", b"a-lower: 2"))


async def test_keep_alive_reuses_one_connection_and_passes_headers_untouched() -> None:
    with trio.fail_after(DEADLINE):
        async with serving(answer_all) as server:
            http = pool()
            for n in range(3):
                response = await http.request(server.target, b"GET", b"/n%d" % n, [(b"X-Up", b"v")])
                assert (response.status, response.reason) == (200, b"OK")
                assert response.headers == [(b"X-MiXed", b"1"), (b"a-lower", b"2"),
                                            (b"Content-Length", b"3")]
                assert await body_of(response) == b"/n%d" % n
            assert server.accepted == 1
            assert server.requests[0].headers[0] == (b"Host", b"127.0.0.1:%d" % server.port)
            assert (b"X-Up", b"v") in server.requests[0].headers
            assert http.open_connections == 1
            http.close()
            assert http.open_connections == 0


async def test_idle_connection_closed_by_the_backend_is_not_reused() -> None:
    async def answer_once(peer: Peer, server: Server) -> None:
        server.requests.append(await peer.request())
        await peer.send(ok())  # keep-alive as far as HTTP goes, then the socket closes

    with trio.fail_after(DEADLINE):
        async with serving(answer_once) as server:
            http = pool()
            assert await body_of(await http.request(server.target, b"GET", b"/", [])) == b"hello"
            await server.wait_for(lambda: server.closed == 1)
            # The FIN is in by the time the handler has closed (loopback): the idle socket is
            # readable, so the pool drops it instead of sending into it.
            streamed = _stream([b"x"])  # not replayable: passes only if no retry is needed
            response = await http.request(server.target, b"POST", b"/", [], streamed)
            assert await body_of(response) == b"hello"
            assert server.accepted == 2
            assert server.requests[1].body == b"x"


async def _stream(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        await trio.lowlevel.checkpoint()
        yield part


async def close_on_second_request(peer: Peer, server: Server) -> None:
    """Answer one request, then read the next and close without a byte: the keep-alive race.
    Later connections answer "fresh"."""
    if server.accepted > 1:
        while (request := await peer.request()) is not None:
            server.requests.append(request)
            await peer.send(ok(b"fresh"))
        return
    server.requests.append(await peer.request())
    await peer.send(ok())
    server.requests.append(await peer.request())


async def test_expired_idle_connections_of_any_origin_close_when_a_new_one_opens() -> None:
    with trio.fail_after(DEADLINE):
        async with serving(answer_all) as first, serving(answer_all) as second:
            http = pool(timeouts=Timeouts(keepalive=0.0))
            assert await body_of(await http.request(first.target, b"GET", b"/a", [])) == b"/a"
            assert http.open_connections == 1
            assert await body_of(await http.request(second.target, b"GET", b"/b", [])) == b"/b"
            await first.wait_for(lambda: first.closed == 1)
            assert http.open_connections == 1  # the second origin's, idle


async def test_request_lost_on_a_reused_connection_is_retried_once_when_replayable() -> None:
    with trio.fail_after(DEADLINE):
        async with serving(close_on_second_request) as server:
            http = pool()
            assert await body_of(await http.request(server.target, b"GET", b"/", [])) == b"hello"
            response = await http.request(server.target, b"PUT", b"/", [], b"payload")
            assert await body_of(response) == b"fresh"
            assert server.accepted == 2
            assert [r.body for r in server.requests[1:]] == [b"payload", b"payload"]


async def test_streamed_body_lost_on_a_reused_connection_is_not_replayed() -> None:
    with trio.fail_after(DEADLINE):
        async with serving(close_on_second_request) as server:
            http = pool()
            assert await body_of(await http.request(server.target, b"GET", b"/", [])) == b"hello"
            with pytest.raises(RemoteProtocolError):
                await http.request(server.target, b"POST", b"/", [(b"Content-Length", b"2")],
                                   _stream([b"a", b"b"]))
            assert server.accepted == 1
            assert http.open_connections == 0


async def test_content_length_body_over_several_reads_and_cut_short() -> None:
    async def answer(peer: Peer, server: Server) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nab")
        await server.wait_for(lambda: bool(server.requests))
        await peer.send(b"cdef")
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nab")  # then EOF

    with trio.fail_after(DEADLINE):
        async with serving(answer) as server:
            http = pool()
            response = await http.request(server.target, b"GET", b"/", [])
            assert await response.__anext__() == b"ab"
            assert not response.complete
            server.requests.append(Received(b"GET", b"/", [], b""))  # go on, peer
            server.notify()
            assert await body_of(response) == b"cdef"
            assert response.complete and http.open_connections == 1
            response = await http.request(server.target, b"GET", b"/", [])
            with pytest.raises(RemoteProtocolError, match="received 2 bytes, expected 6"):
                await body_of(response)
            assert http.open_connections == 0


@pytest.mark.parametrize(("method", "status"), [(b"HEAD", 200), (b"GET", 204), (b"GET", 304)])
async def test_bodyless_response_frees_its_connection_at_once(method: bytes, status: int) -> None:
    async def bodyless(peer: Peer, server: Server) -> None:
        while await peer.request() is not None:
            await peer.send(b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status)

    with trio.fail_after(DEADLINE):
        async with serving(bodyless) as server:
            http = pool()
            for _ in range(2):
                response = await http.request(server.target, method, b"/", [])
                assert response.complete  # the caller need not read a body that is not there
                assert http.open_connections == 1
                assert await body_of(response) == b""
            assert server.accepted == 1


async def test_request_head_is_checked_as_h11_would() -> None:
    http = pool()
    target = parse_base("http://127.0.0.1:1")
    for method, path, headers in [(b"G ET", b"/", []), (b"GET", b"/a b", []),
                                  (b"GET", b"/", [(b"X Y", b"1")]), (b"GET", b"/", [(b"X", b"a\r\nb")]),
                                  (b"GET", b"/", [(b"Content-Length", b"x")]),
                                  (b"GET", b"/", [(b"Host", b"other")])]:
        with pytest.raises(LocalRequestError):
            await http.request(target, method, path, headers)


async def test_connection_close_is_honoured() -> None:
    async def answer(peer: Peer, server: Server) -> None:
        await peer.request()
        await peer.send(ok(b"bye", b"Connection: close"))
        await peer.request()  # the client must not send more: EOF ends this

    with trio.fail_after(DEADLINE):
        async with serving(answer) as server:
            http = pool()
            for _ in range(2):
                assert await body_of(await http.request(server.target, b"GET", b"/", [])) == b"bye"
                assert http.open_connections == 0
            assert server.accepted == 2


@pytest.mark.parametrize(("raw", "body", "reusable"), [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
     b"abcde", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nwxyz", b"wxyz", True),
    (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", b"until the end", False),
    # Off the fast path, through h11: a bare LF, HTTP/1.0 (no keep-alive).
    (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nhi", b"hi", True),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi", b"hi", False),
    # On it: identical Content-Lengths are one; bytes past the body make the connection unfit.
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi", b"hi", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi, and junk", b"hi", False),
])
async def test_body_framings(raw: bytes, body: bytes, reusable: bool) -> None:
    async def answer(peer: Peer, server: Server) -> None:
        while await peer.request() is not None:
            await peer.send(raw)
            if not reusable:
                return

    with trio.fail_after(DEADLINE):
        async with serving(answer) as server:
            http = pool()
            response = await http.request(server.target, b"GET", b"/", [])
            chunks = [chunk async for chunk in response]
            assert response.complete
            await response.aclose()
            assert b"".join(chunks) == body
            assert http.open_connections == (1 if reusable else 0)
            if reusable:
                assert await body_of(await http.request(server.target, b"GET", b"/", [])) == body
                assert server.accepted == 1


async def test_complete_is_known_with_the_last_chunk() -> None:
    """What lets the v2 client put END_STREAM on its last DATA instead of a separate END."""
    with trio.fail_after(DEADLINE):
        async with serving(answer_all) as server:
            response = await pool().request(server.target, b"GET", b"/last", [])
            async for chunk in response:
                assert chunk == b"/last"
                assert response.complete
            await response.aclose()


@pytest.mark.parametrize(("method", "raw"), [
    (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
    (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
    (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\n\r\n"),
])
async def test_bodyless_responses(method: bytes, raw: bytes) -> None:
    async def answer(peer: Peer, server: Server) -> None:
        await peer.request()
        await peer.send(raw)
        await answer_all(peer, server)

    with trio.fail_after(DEADLINE):
        async with serving(answer) as server:
            http = pool()
            response = await http.request(server.target, method, b"/", [])
            assert response.headers == [tuple(line.split(b": ")) for line in raw.split(b"\r\n")[1:-2]]
            assert await body_of(response) == b""
            # Nothing was left unread: the same connection carries the next request.
            assert await body_of(await http.request(server.target, b"GET", b"/next", [])) == b"/next"
            assert server.accepted == 1


async def test_informational_responses_are_skipped() -> None:
    async def answer(peer: Peer, server: Server) -> None:
        server.requests.append(await peer.request())
        await peer.send(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        await peer.send(ok(b"final"))

    with trio.fail_after(DEADLINE):
        async with serving(answer) as server:
            response = await pool().request(server.target, b"POST", b"/", [(b"Expect", b"100-continue")],
                                            b"body")
            assert response.status == 200
            assert await body_of(response) == b"final"
            assert server.requests[0].body == b"body"


async def test_streamed_upload_with_length_or_chunked() -> None:
    with trio.fail_after(DEADLINE):
        async with serving(answer_all) as server:
            http = pool()
            await body_of(await http.request(server.target, b"PUT", b"/a", [(b"Content-Length", b"6")],
                                             _stream([b"abc", b"", b"def"])))
            await body_of(await http.request(server.target, b"PUT", b"/b", [], _stream([b"gh", b"ij"])))
            first, second = server.requests
            assert (first.header(b"content-length"), first.header(b"transfer-encoding")) == (b"6", None)
            assert first.body == b"abcdef"
            assert (second.header(b"content-length"), second.header(b"transfer-encoding")) == \
                (None, b"chunked")
            assert second.body == b"ghij"
            assert server.accepted == 1


async def test_an_upload_that_keeps_moving_outlives_the_io_timeout() -> None:
    """The exchange's deadline counts from the last chunk written: five chunks 0.1 s apart
    take twice the 0.2 s timeout, and go through; a gap past it ends the exchange."""

    async def paced(gaps: list[float]) -> AsyncIterator[bytes]:
        for gap in gaps:
            await trio.sleep(gap)
            yield b"chunk"

    with trio.fail_after(DEADLINE):
        async with serving(answer_all) as server:
            http = pool(timeouts=Timeouts(connect=5.0, io=0.2))
            response = await http.request(server.target, b"PUT", b"/a", [], paced([0.1] * 5))
            assert response.status == 200 and await body_of(response) == b"/a"
            assert server.requests[0].body == b"chunk" * 5
            with pytest.raises(BackendTimeout):
                await http.request(server.target, b"PUT", b"/b", [], paced([0.1, 0.6]))


async def test_cancelled_mid_body_closes_the_connection() -> None:
    async def answer(peer: Peer, server: Server) -> None:
        if server.accepted > 1:
            await answer_all(peer, server)
            return
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\nfirst")
        assert await peer.request() is None  # the client closes: no other request comes

    with trio.fail_after(DEADLINE):
        async with serving(answer) as server:
            http = pool()
            response = await http.request(server.target, b"GET", b"/", [])
            with trio.CancelScope() as scope:  # as a RESET from the tunnel does
                async for chunk in response:
                    assert chunk == b"first"
                    scope.cancel()
                    await trio.sleep_forever()
            await response.aclose()
            assert http.open_connections == 0
            await server.wait_for(lambda: server.closed == 1)
            assert await body_of(await http.request(server.target, b"GET", b"/again", [])) == b"/again"
            assert server.accepted == 2


async def test_pool_limit_queues_waiters() -> None:
    release = trio.Event()

    async def answer(peer: Peer, server: Server) -> None:
        while (request := await peer.request()) is not None:
            server.requests.append(request)
            server.notify()
            await release.wait()
            await peer.send(ok(request.target))

    with trio.fail_after(DEADLINE):
        async with serving(answer) as server:
            http = pool(max_connections=2)
            bodies: list[bytes] = []

            async def fetch(n: int) -> None:
                bodies.append(await body_of(await http.request(server.target, b"GET", b"/%d" % n, [])))

            async with trio.open_nursery() as nursery:
                for n in range(3):
                    nursery.start_soon(fetch, n)
                await server.wait_for(lambda: len(server.requests) == 2)
                await trio.testing.wait_all_tasks_blocked()  # the third is as far as it gets
                assert http._slots.statistics().tasks_waiting == 1
                assert server.accepted == 2
                release.set()
            assert sorted(bodies) == [b"/0", b"/1", b"/2"]
            assert server.accepted == 2
            assert http.open_connections <= 2


async def test_connect_refused_is_a_connect_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with trio.fail_after(DEADLINE), pytest.raises(ConnectError):
        await pool().request(parse_base(f"http://127.0.0.1:{port}"), b"GET", b"/", [])


async def test_silent_backend_times_out() -> None:
    async def silent(peer: Peer, server: Server) -> None:
        server.requests.append(await peer.request())
        await trio.sleep_forever()

    with trio.fail_after(DEADLINE):
        async with serving(silent) as server:
            http = pool(timeouts=Timeouts(connect=5.0, io=0.2))
            started = trio.current_time()
            with pytest.raises(BackendTimeout):
                await http.request(server.target, b"GET", b"/", [])
            assert 0.2 <= trio.current_time() - started < 0.2 + 1.0
            assert http.open_connections == 0


async def test_upgrade_hands_over_the_stream_with_bytes_read_past_the_101() -> None:
    async def switch(peer: Peer, server: Server) -> None:
        server.requests.append(await peer.request())
        await peer.send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
                        b"early")
        while data := await peer.stream.receive_some(100):
            await peer.send(data.upper())

    with trio.fail_after(DEADLINE):
        async with serving(switch) as server:
            http = pool()
            response = await http.request(server.target, b"GET", b"/ws",
                                          [(b"Connection", b"Upgrade"), (b"Upgrade", b"echo")])
            assert response.status == 101
            assert response.stream is not None
            assert await response.stream.receive_some(100) == b"early"
            await response.stream.send_all(b"ping")
            assert await response.stream.receive_some(100) == b"PING"
            await response.aclose()
            assert http.open_connections == 0


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


async def test_https_with_a_trusted_ca_reuses_the_connection(ca: trustme.CA) -> None:
    client = ssl.create_default_context()
    ca.configure_trust(client)
    with trio.fail_after(DEADLINE):
        async with serving(answer_all, tls=_server_context(ca)) as server:
            http = pool(context=client)
            for name in (b"127.0.0.1", b"localhost"):
                target = parse_base(f"https://{name.decode()}:{server.port}")
                assert await body_of(await http.request(target, b"GET", b"/tls", [])) == b"/tls"
            # One connection per origin: 127.0.0.1 and localhost are two.
            assert server.accepted == 2
            assert await body_of(await http.request(target, b"GET", b"/again", [])) == b"/again"
            assert server.accepted == 2


async def test_https_verification_failure_is_a_connect_error(ca: trustme.CA) -> None:
    with trio.fail_after(DEADLINE):
        async with serving(answer_all, tls=_server_context(ca)) as server:
            target = parse_base(f"https://127.0.0.1:{server.port}")
            with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await pool().request(target, b"GET", b"/", [])  # certifi's CAs do not know ours
            unchecked = pool(context=default_ssl_context(False))
            assert await body_of(await unchecked.request(target, b"GET", b"/any", [])) == b"/any"


def test_parse_base() -> None:
    assert parse_base("http://example.com") == Target(
        parse_base("http://example.com:80").origin, b"example.com", b"")
    assert parse_base("https://example.com").origin.port == 443
    v6 = parse_base("http://[::1]:8080/pre/fix")
    assert (v6.origin.host, v6.origin.port, v6.host_header, v6.prefix) == ("::1", 8080, b"[::1]:8080",
                                                                           b"/pre/fix")
    idn = parse_base("https://bücher.example:8443")
    assert idn.origin.host == "xn--bcher-kva.example"
    assert idn.host_header == b"xn--bcher-kva.example:8443"
    assert parse_base("http://user:pw@host:1").host_header == b"host:1"


@pytest.mark.parametrize("url", ["ftp://example.com", "http://", "http://host:99999", "example.com"])
def test_parse_base_refuses(url: str) -> None:
    from wstunnel.errors import InvalidURL

    with pytest.raises(InvalidURL):
        parse_base(url)


async def test_ipv6_literal() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    async with trio.open_nursery() as nursery:
        try:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, _echo_target, 0, host="::1"))
        except OSError:
            pytest.skip("no ::1 here")
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(DEADLINE):
            target = parse_base(f"http://[::1]:{port}")
            assert await body_of(await pool().request(target, b"GET", b"/six", [])) == b"[::1]:%d" % port
        nursery.cancel_scope.cancel()


async def _echo_target(stream: trio.SocketStream) -> None:
    """Answers with the Host header it got."""
    peer = Peer(stream)
    async with stream:
        request = await peer.request()
        assert request is not None
        await peer.send(ok(request.header(b"host") or b""))
