"""Wire compatibility with the original WStunnel 1.0.7, tested at the protocol level (SPEC §4).

The tests stand in for an original peer, written from the protocol alone:

* part A, a raw v1 *client* (a bare trio-websocket connection, token in ``Origin``, no subprotocol,
  no version header) against a real ``wstunnel srv`` process;
* part B, a raw v1 *server* (a bare trio-websocket server on ``/_tunnel``) against a real
  ``wstunnel cli`` process and the test backend.

HTTP messages inside tunnel messages are parsed with h11 here, never with ``wstunnel.framing``, so
these tests do not share a parser (or its bugs) with the code under test.
"""

from __future__ import annotations

import contextlib
import gzip
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from tests.support.harness import Harness, free_port
from tests.support.wire import (
    FRONT_MANAGED,
    HOP_BY_HOP,
    ParsedResponse,
    answer_forever,
    call,
    client_count,
    echoed,
    echoed_headers,
    exchange,
    lowered,
    next_request,
    ok,
    parse_response,
    raw_client,
    raw_v1_server,
    reply,
    split_message,
    start_client,
    start_server,
    wait_clients,
)

# -- part A: a raw v1 client against the real server --------------------------------------------


async def test_raw_client_receives_rewritten_requests_with_ids_from_one(harness: Harness) -> None:
    server = await start_server(harness)
    token, other = harness.new_token(), harness.new_token()
    with trio.fail_after(45):
        async with raw_client(server, token) as ws, trio.open_nursery() as nursery:
            await wait_clients(server, token, 1)

            # X-Token form: path and query as sent; the token itself never crosses the tunnel.
            pending = call(nursery, "GET", f"{server.url}/echo/a?x=1&y=%20z",
                           headers={"X-Token": token, "X-Custom": "kept", "Connection": "X-Hop",
                                    "X-Hop": "dropped"})
            request_id, payload, request = await next_request(ws)
            assert request_id == 1
            assert token.encode() not in payload
            assert (request.method, request.target) == (b"GET", b"/echo/a?x=1&y=%20z")
            assert request.header(b"x-custom") == b"kept"
            assert request.header(b"host") == f"127.0.0.1:{server.port}".encode()
            assert not request.names() & {b"x-token", b"connection", b"x-hop", b"transfer-encoding"}
            assert request.body == b""
            await ws.send_message(reply(request_id, ok(b"first")))
            response = await pending.result()
            assert (response.status_code, response.content) == (200, b"first")

            # /_token/<token>/<rest>?query form: rewritten to /<rest>?query.
            pending = call(nursery, "GET", f"{server.url}/_token/{token}/deep/path?q=1&r")
            request_id, payload, request = await next_request(ws)
            assert request_id == 2
            assert token.encode() not in payload
            assert request.target == b"/deep/path?q=1&r"
            await ws.send_message(reply(request_id, ok(b"second")))
            assert (await pending.result()).content == b"second"

            # A POST with a body: framed by Content-Length.
            pending = call(nursery, "POST", f"{server.url}/submit?k=v",
                           headers={"X-Token": token, "Content-Type": "application/x-thing"},
                           content=b"the body\r\n\x00\xff")
            request_id, payload, request = await next_request(ws)
            assert request_id == 3
            assert (request.method, request.target) == (b"POST", b"/submit?k=v")
            assert request.header(b"content-length") == b"12"
            assert request.header(b"content-type") == b"application/x-thing"
            assert request.body == b"the body\r\n\x00\xff"
            await ws.send_message(reply(request_id, ok(b"posted")))
            assert (await pending.result()).content == b"posted"

            # A chunked upload arrives whole, framed by Content-Length (any v1 reader copes).
            async def parts() -> AsyncIterator[bytes]:
                for part in (b"chunk one, ", b"chunk two"):
                    yield part

            pending = call(nursery, "PUT", f"{server.url}/upload", headers={"X-Token": token},
                           content=parts())
            request_id, payload, request = await next_request(ws)
            assert request_id == 4
            assert request.method == b"PUT"
            assert request.header(b"transfer-encoding") is None
            assert request.header(b"content-length") == b"20"
            assert request.body == b"chunk one, chunk two"
            await ws.send_message(reply(request_id, ok(b"put")))
            assert (await pending.result()).content == b"put"

            # Ids are per token: another token's first request is 1 again.
            async with raw_client(server, other) as ws2:
                await wait_clients(server, other, 1)
                pending = call(nursery, "GET", f"{server.url}/x", headers={"X-Token": other})
                request_id, _payload, _request = await next_request(ws2)
                assert request_id == 1
                await ws2.send_message(reply(request_id, ok(b"other")))
                assert (await pending.result()).content == b"other"


@dataclass(frozen=True)
class Framing:
    name: str
    method: str
    raw: bytes  # the HTTP response the raw client sends, after the id
    status: int
    reason: str
    body: bytes


FRAMINGS = [
    Framing("content-length", "GET",
            b"HTTP/1.1 201 Created\r\nX-A: 1\r\nContent-Length: 3\r\nSet-Cookie: a=1\r\n"
            b"Set-Cookie: b=2\r\n\r\nabc", 201, "Created", b"abc"),
    Framing("chunked", "GET",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-B: 2\r\n\r\n"
            b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n", 200, "OK", b"hello, world"),
    Framing("end of message", "GET",
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nno length:\r\n\r\nthe message ends it",
            200, "OK", b"no length:\r\n\r\nthe message ends it"),
    Framing("odd reason", "GET",
            b"HTTP/1.1 299 Fine, By Me (really)\r\nContent-Length: 2\r\n\r\nok",
            299, "Fine, By Me (really)", b"ok"),
    Framing("empty reason", "GET", b"HTTP/1.1 404 \r\nContent-Length: 4\r\n\r\ngone", 404, "", b"gone"),
    Framing("connection header", "GET",
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n!", 200, "OK", b"!"),
    Framing("204", "DELETE", b"HTTP/1.1 204 No Content\r\nX-C: 3\r\n\r\n", 204, "No Content", b""),
    Framing("304", "GET", b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n", 304, "Not Modified", b""),
    Framing("HEAD", "HEAD",
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-thing\r\nContent-Length: 1234\r\n\r\n",
            200, "OK", b""),
]


async def test_raw_client_responses_in_every_framing_reach_the_http_client(harness: Harness) -> None:
    server = await start_server(harness)
    token = harness.new_token()
    with trio.fail_after(45):
        async with raw_client(server, token) as ws, trio.open_nursery() as nursery:
            await wait_clients(server, token, 1)
            for number, case in enumerate(FRAMINGS, start=1):
                pending = call(nursery, case.method, f"{server.url}/f", headers={"X-Token": token})
                request_id, _payload, request = await next_request(ws)
                assert request_id == number, case.name
                assert request.method == case.method.encode()
                await ws.send_message(reply(request_id, case.raw))
                response = await pending.result()
                assert response.status_code == case.status, case.name
                assert response.reason_phrase == case.reason, case.name
                assert response.content == case.body, case.name
                # The headers as sent, in order, but for those the front rewrites per connection.
                sent = parse_response(case.raw, case.method.encode())
                expected = [(k, v) for k, v in lowered(sent.headers) if k not in FRONT_MANAGED]
                got = [(k, v) for k, v in lowered(response.headers.raw) if k not in FRONT_MANAGED]
                assert got == expected, case.name
                length = response.headers.get("content-length")
                if case.method == "HEAD":
                    assert length == "1234"
                elif case.status not in (204, 304):
                    assert length == str(len(case.body)), case.name


async def test_handshake_refusals_are_400_without_echoing_the_token(harness: Harness) -> None:
    server = await start_server(harness)
    short = harness.new_token()[:15]
    harness.tokens.add(short)
    with trio.fail_after(30):
        with pytest.raises(ConnectionRejected) as missing:
            async with raw_client(server, None):
                pass
        assert missing.value.status_code == 400

        with pytest.raises(ConnectionRejected) as too_short:
            async with raw_client(server, short):
                pass
        assert too_short.value.status_code == 400
        assert short.encode() not in (too_short.value.body or b"")
        assert all(short.encode() not in value for _name, value in too_short.value.headers)

        # A 16-character token is long enough.
        token = short + "x"
        harness.tokens.add(token)
        async with raw_client(server, token):
            await wait_clients(server, token, 1)


class Misbehaviour:
    """What a broken peer sends back instead of a response to request ``request_id``."""

    @staticmethod
    def text(request_id: int) -> bytes | str:
        return reply(request_id, ok(b"as text")).decode()

    @staticmethod
    def unknown_id(request_id: int) -> bytes | str:
        return reply(request_id + 0x100, ok(b"nobody asked"))

    @staticmethod
    def garbage(request_id: int) -> bytes | str:
        return b"\x00\xffnot a tunnel message at all"

    @staticmethod
    def too_short(request_id: int) -> bytes | str:
        return b"00"

    @staticmethod
    def oversized(request_id: int) -> bytes | str:
        # Over -max-body-size 1024 plus the server's allowance for the head.
        return reply(request_id, ok(b"x" * 400_000))


MISBEHAVIOURS = {
    "text message": (Misbehaviour.text, {1003}),
    "unknown id": (Misbehaviour.unknown_id, {1002}),
    "garbage": (Misbehaviour.garbage, {1002}),
    "too short": (Misbehaviour.too_short, {1002}),
    # 1006: the server may reset the socket while the rest of the message is still unread.
    "oversized": (Misbehaviour.oversized, {1009, 1006}),
}


@pytest.mark.parametrize("kind", list(MISBEHAVIOURS))
async def test_misbehaving_peer_loses_only_its_own_tunnel(harness: Harness, kind: str) -> None:
    misbehave, close_codes = MISBEHAVIOURS[kind]
    server = await start_server(harness, "-max-body-size", "1024")
    bad_token, good_token = harness.new_token(), harness.new_token()
    seen: list[tuple[str, int]] = []
    with trio.fail_after(45):
        async with raw_client(server, good_token) as good, trio.open_nursery() as nursery:
            nursery.start_soon(answer_forever, good, "good", seen)
            await wait_clients(server, good_token, 1)
            async with raw_client(server, bad_token) as bad:
                await wait_clients(server, bad_token, 1)
                # A POST is not idempotent: its tunnel dying fails it at once, no retry.
                pending = call(nursery, "POST", f"{server.url}/p", headers={"X-Token": bad_token},
                               content=b"data")
                request_id, _payload, _request = await next_request(bad)
                with contextlib.suppress(ConnectionClosed):
                    await bad.send_message(misbehave(request_id))
                with pytest.raises(ConnectionClosed):
                    while True:
                        await bad.get_message()
                assert bad.closed is not None
                assert bad.closed.code in close_codes, bad.closed
                response = await pending.result()
                assert response.status_code == 502
            await wait_clients(server, bad_token, 0)

            # The well-behaved tunnel on the other token never noticed.
            response = await call(nursery, "GET", f"{server.url}/after",
                                  headers={"X-Token": good_token}).result()
            assert (response.status_code, response.content) == (200, b"good")
            assert await client_count(server, good_token) == 1
            nursery.cancel_scope.cancel()
    assert server.process.alive()


async def test_unparseable_response_is_502_and_the_tunnel_stays(harness: Harness) -> None:
    server = await start_server(harness)
    token = harness.new_token()
    with trio.fail_after(30):
        async with raw_client(server, token) as ws, trio.open_nursery() as nursery:
            await wait_clients(server, token, 1)
            for broken in (b"this is not HTTP\r\n\r\n",
                           b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"):
                pending = call(nursery, "GET", f"{server.url}/u", headers={"X-Token": token})
                request_id, _payload, _request = await next_request(ws)
                await ws.send_message(reply(request_id, broken))
                assert (await pending.result()).status_code == 502
            # The id was well formed, so only that request failed: the tunnel still serves.
            pending = call(nursery, "GET", f"{server.url}/u", headers={"X-Token": token})
            request_id, _payload, _request = await next_request(ws)
            assert request_id == 3
            await ws.send_message(reply(request_id, ok(b"fine")))
            assert (await pending.result()).content == b"fine"


async def test_idempotent_request_is_retried_on_the_next_connection(harness: Harness) -> None:
    server = await start_server(harness)
    token = harness.new_token()
    with trio.fail_after(45):
        async with trio.open_nursery() as nursery, raw_client(server, token) as bad:
            await wait_clients(server, token, 1)
            pending = call(nursery, "GET", f"{server.url}/again?n=1", headers={"X-Token": token})
            first_id, first_payload, _request = await next_request(bad)
            async with raw_client(server, token) as good:
                await wait_clients(server, token, 2)
                await bad.send_message(reply(first_id + 1, ok(b"wrong id")))
                # The same request, same id, comes again on the surviving connection.
                retry_id, retry_payload, request = await next_request(good)
                assert retry_id == first_id
                assert retry_payload == first_payload
                assert request.target == b"/again?n=1"
                await good.send_message(reply(retry_id, ok(b"second try")))
                response = await pending.result()
                assert (response.status_code, response.content) == (200, b"second try")


async def test_pings_get_pongs_and_keep_a_quiet_tunnel_open(harness: Harness) -> None:
    server = await start_server(harness, "-wstimeout", "3")
    token = harness.new_token()
    with trio.fail_after(40):
        async with raw_client(server, token) as ws:
            await wait_clients(server, token, 1)
            # Ping every second for longer than wstimeout: each gets its pong, the tunnel stays.
            start = trio.current_time()
            while trio.current_time() - start < 4.5:
                with trio.fail_after(5):
                    await ws.ping(b"v1-ping")
                await trio.sleep(1)
            assert ws.closed is None
            assert await client_count(server, token) == 1
            # Silent from now on: the server closes the tunnel after wstimeout.
            with trio.fail_after(15), pytest.raises(ConnectionClosed):
                await ws.get_message()


async def test_two_raw_clients_on_one_token_share_the_requests(harness: Harness) -> None:
    server = await start_server(harness)
    token = harness.new_token()
    seen: list[tuple[str, int]] = []
    with trio.fail_after(45):
        async with raw_client(server, token) as one, raw_client(server, token) as two:
            await wait_clients(server, token, 2)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer_forever, one, "one", seen)
                nursery.start_soon(answer_forever, two, "two", seen)
                bodies = []
                for _ in range(8):
                    response = await call(nursery, "GET", f"{server.url}/s",
                                          headers={"X-Token": token}).result()
                    assert response.status_code == 200
                    bodies.append(response.content)
                nursery.cancel_scope.cancel()
    assert set(bodies) == {b"one", b"two"}, bodies
    assert [request_id for _name, request_id in seen] == list(range(1, 9))


# -- part B: a raw v1 server against the real client --------------------------------------------


async def test_raw_server_sees_a_v1_handshake_and_gets_backend_answers(harness: Harness) -> None:
    token = harness.new_token()
    with trio.fail_after(45):
        async with raw_v1_server() as raw:
            await start_client(harness, raw, token)
            handshake, ws = await raw.next_tunnel()
            assert handshake.path == "/_tunnel"
            assert handshake.header(b"origin") == token.encode()
            # Our cli offers v2; a plain v1 server must not have to pick it (nor any other).
            assert handshake.subprotocols in ((), ("wstunnel.v2.batch", "wstunnel.v2"))

            # GET: path and query as sent; X-Token and hop-by-hop headers stop at the client.
            response = await exchange(ws, 1, (
                b"GET /echo/x?a=1&b=%20c HTTP/1.1\r\nHost: public.example.com\r\n"
                b"X-Token: " + token.encode() + b"\r\nX-Custom: kept\r\n"
                b"Connection: keep-alive, X-Hop\r\nX-Hop: dropped\r\nKeep-Alive: timeout=5\r\n"
                b"TE: trailers\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nUpgrade: h2c\r\n"
                b"X-Forwarded-For: 10.1.2.3\r\n\r\n"))
            seen = echoed(response)
            assert (seen["method"], seen["path"]) == ("GET", "/echo/x?a=1&b=%20c")
            headers = echoed_headers(seen)
            names = {name for name, _ in headers}
            assert (b"x-custom", b"kept") in headers
            assert (b"x-forwarded-for", b"10.1.2.3") in headers
            assert not names & (HOP_BY_HOP | {b"x-token", b"x-hop"}), names
            assert b"accept-encoding" not in names  # none asked for: none added
            assert token not in response.body.decode()

            # POST with a Content-Length body.
            body = b'{"k": "v"}\r\n\x00binary'
            response = await exchange(ws, 2, (
                b"POST /echo/post HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)), b"POST")
            seen = echoed(response)
            assert (seen["method"], seen["path"]) == ("POST", "/echo/post")
            assert seen["body"] == body.decode("latin-1")
            assert (b"content-type", b"application/json") in echoed_headers(seen)

            # A chunked request body, as a Go server's Request.Write may produce.
            response = await exchange(ws, 3, (
                b"PUT /echo/put HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n"), b"PUT")
            seen = echoed(response)
            assert (seen["method"], seen["body"]) == ("PUT", "abcdefg")

            # The answer is one complete response: Content-Length framing, any v1 reader copes.
            response = await exchange(ws, 4, b"GET /plain HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (response.status, response.reason) == (200, b"OK")
            assert response.body == b"backend page /plain\n"
            assert response.header(b"content-length") == b"%d" % len(response.body)


async def test_raw_server_x_host_routing_with_regexp(harness: Harness) -> None:
    token = harness.new_token()
    backend = await trio.to_thread.run_sync(harness.backend)
    with trio.fail_after(45):
        async with raw_v1_server() as raw:
            await start_client(harness, raw, token, "-regexp", r"http://127\.0\.0\.1:[0-9]+",
                               backend=backend.url)
            _handshake, ws = await raw.next_tunnel()

            response = await exchange(ws, 1, (
                b"GET /echo/routed HTTP/1.1\r\nHost: h\r\nX-Host: %s\r\n\r\n" % backend.url.encode()))
            seen = echoed(response)
            assert seen["path"] == "/echo/routed"
            assert b"x-host" not in {name for name, _ in echoed_headers(seen)}

            # Not allowed, including values the regexp matches only in part.
            for refused in (b"http://example.com", backend.url.encode() + b".evil.example",
                            b"xhttp://127.0.0.1:1"):
                response = await exchange(ws, 2, b"GET /echo HTTP/1.1\r\nHost: h\r\nX-Host: %s\r\n\r\n"
                                          % refused)
                assert response.status == 403, refused

            # No X-Host: the -server default.
            seen = echoed(await exchange(ws, 3, b"GET /echo/default HTTP/1.1\r\nHost: h\r\n\r\n"))
            assert seen["path"] == "/echo/default"


async def test_raw_server_backend_unreachable_is_502_with_the_same_id(harness: Harness) -> None:
    token = harness.new_token()
    closed_port = free_port()
    with trio.fail_after(45):
        async with raw_v1_server() as raw:
            await start_client(harness, raw, token, backend=f"http://127.0.0.1:{closed_port}")
            _handshake, ws = await raw.next_tunnel()
            response = await exchange(ws, 0x00AB, b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
            assert response.status == 502
            # The tunnel is still up: the next request is answered too.
            response = await exchange(ws, 0xFFFF, b"POST /y HTTP/1.1\r\nHost: h\r\nContent-Length: 1"
                                                  b"\r\n\r\nz", b"POST")
            assert response.status == 502


async def test_raw_server_requests_in_flight_are_answered_by_id(harness: Harness) -> None:
    token = harness.new_token()
    with trio.fail_after(45):
        async with raw_v1_server() as raw:
            await start_client(harness, raw, token)
            _handshake, ws = await raw.next_tunnel()
            await ws.send_message(b"0001GET /slow?secs=2 HTTP/1.1\r\nHost: h\r\n\r\n")
            await ws.send_message(b"0002GET /echo/two HTTP/1.1\r\nHost: h\r\n\r\n")
            await ws.send_message(b"00aaGET /echo/aa HTTP/1.1\r\nHost: h\r\n\r\n")
            answers: dict[int, ParsedResponse] = {}
            order: list[int] = []
            while len(answers) < 3:
                request_id, payload = split_message(await ws.get_message())
                assert request_id not in answers
                answers[request_id] = parse_response(payload)
                order.append(request_id)
            assert answers[1].body == b"slow\n"
            assert echoed(answers[2])["path"] == "/echo/two"
            assert echoed(answers[0xAA])["path"] == "/echo/aa"
            # Handled concurrently: the slow request did not hold up the others.
            assert order[-1] == 1, order


async def test_raw_server_gets_backend_responses_untouched(harness: Harness) -> None:
    token = harness.new_token()
    with trio.fail_after(45):
        async with raw_v1_server() as raw:
            await start_client(harness, raw, token)
            _handshake, ws = await raw.next_tunnel()

            # A redirect is passed back, not followed.
            response = await exchange(ws, 1, b"GET /redirect HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (response.status, response.header(b"location")) == (302, b"/echo")
            assert response.body == b"moved\n"

            # A gzip body stays compressed, whatever the client said it accepts.
            response = await exchange(ws, 2, b"GET /gzip HTTP/1.1\r\nHost: h\r\n"
                                             b"Accept-Encoding: gzip\r\n\r\n")
            assert response.status == 200
            assert response.header(b"content-encoding") == b"gzip"
            assert gzip.decompress(response.body) == b"compressed body\n"

            # A chunked backend answer arrives whole.
            response = await exchange(ws, 3, b"GET /chunked HTTP/1.1\r\nHost: h\r\n\r\n")
            assert response.body == b"hello chunked world\n"

            # Error statuses and bodyless answers are passed through as they are.
            response = await exchange(ws, 4, b"GET /status/418 HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (response.status, response.body) == (418, b"status 418\n")
            response = await exchange(ws, 5, b"HEAD /bytes?size=100 HTTP/1.1\r\nHost: h\r\n\r\n",
                                      b"HEAD")
            assert (response.status, response.body) == (200, b"")
            assert response.header(b"content-length") == b"100"
            response = await exchange(ws, 6, b"DELETE /status/204 HTTP/1.1\r\nHost: h\r\n\r\n",
                                      b"DELETE")
            assert (response.status, response.body) == (204, b"")

            # A request the client cannot parse is answered, by id, and the tunnel stays.
            response = await exchange(ws, 7, b"this is not an HTTP request\r\n\r\n")
            assert response.status == 400
            response = await exchange(ws, 8, b"GET /still-here HTTP/1.1\r\nHost: h\r\n\r\n")
            assert response.body == b"backend page /still-here\n"
