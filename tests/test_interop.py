"""Interoperability with the original Go WStunnel 1.0.7, the real binary, on loopback (SPEC §4).

Both pairings run the same tests: our ``wstunnel srv`` with the original's ``cli``, and the
original's ``srv`` with our ``wstunnel cli`` (which speaks protocol v1 there, since the original
negotiates nothing). Where the two servers answer differently, each is held to what it is
documented to do: ours to SPEC §2 and README.md, the original to its 1.0.7 behaviour as the SPEC
records it. The binary comes from tests/support/reference.py (skip or, in CI, fail without it).

Where they overlap, tests/test_wire_compat.py checks the same wire protocol against Python
stand-ins for a v1 peer at the byte level; here it is the real peer, end to end.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from tests.support import reference
from tests.support.harness import Backend, Harness, free_port, wait_until
from tests.support.reference import OUR_SRV, PAIRINGS, Pairing, open_pairing, pending_requests
from tests.support.wire import exchange, raw_v1_server
from wstunnel import framing
from wstunnel.alarms import Alarms
from wstunnel.server.rendezvous import Failure, Rendezvous
from wstunnel.tokens import Token

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def binary() -> Path:
    return reference.reference_binary()


@dataclass
class Shared:
    """One pairing for the tests that leave it as they found it: a backend, and an address on
    which nothing listens; the client's ``-regexp`` allows exactly these two as ``X-Host``."""

    pairing: Pairing
    backend: Backend
    dead_url: str


@pytest.fixture(scope="module", params=PAIRINGS)
def shared(request: pytest.FixtureRequest, binary: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    harness = Harness(tmp_path_factory.mktemp(request.param))
    try:
        backend = harness.backend()
        dead_port = free_port()
        # Go's regexp and Python's read this alike; both clients want it to match the whole X-Host.
        regexp = rf"http://127\.0\.0\.1:({backend.port}|{dead_port})"
        pairing = open_pairing(harness, binary, request.param, cli_flags=("-regexp", regexp),
                               backend=backend.url)
        yield Shared(pairing, backend, f"http://127.0.0.1:{dead_port}")
    finally:
        harness.close()
    leaks = harness.leaked_tokens()
    assert not leaks, f"whole tokens in logs: {leaks}"


def header_names(echoed: dict) -> set[str]:
    return {name.lower() for name, _ in echoed["headers"]}


# -- traffic ------------------------------------------------------------------------------------


def test_get_reaches_the_backend_with_path_query_and_headers(shared: Shared) -> None:
    pairing = shared.pairing
    response = pairing.get("/echo/a?x=1&y=%20z", headers={"X-Custom": "kept"})
    assert response.status_code == 200
    echoed = response.json()
    assert (echoed["method"], echoed["path"]) == ("GET", "/echo/a?x=1&y=%20z")
    assert ["X-Custom", "kept"] in echoed["headers"]
    # Our srv keeps the token out of the tunnel; the original srv sends X-Token along and then
    # our cli removes it (SPEC §3): either way the backend never sees it.
    assert "x-token" not in header_names(echoed)

    by_path = httpx.get(f"{pairing.server.url}/_token/{pairing.token}/echo/b?q=1", timeout=30)
    assert by_path.status_code == 200
    assert by_path.json()["path"] == "/echo/b?q=1"

    # The backend's own statuses and reason phrases come back as they are.
    teapot = pairing.get("/status/418")
    assert (teapot.status_code, teapot.text) == (418, "status 418\n")
    missing = pairing.get("/status/404")
    assert (missing.status_code, missing.text) == (404, "status 404\n")


def test_post_with_a_body_in_either_framing(shared: Shared) -> None:
    pairing = shared.pairing
    body = b"interop \x00\xff body " * 100
    response = pairing.get("/echo/post", method="POST", content=body,
                           headers={"Content-Type": "application/x-test"})
    assert response.status_code == 200
    echoed = response.json()
    assert (echoed["method"], echoed["body"].encode("latin-1")) == ("POST", body)
    assert ["Content-Type", "application/x-test"] in echoed["headers"]

    # A chunked request body: the original srv forwards it chunked inside the tunnel message,
    # our srv as Content-Length; each cli must take what the other srv writes (SPEC §4).
    chunked = pairing.get("/echo/chunked", method="PUT", content=iter([b"first ", b"second"]))
    assert chunked.status_code == 200
    assert (chunked.json()["method"], chunked.json()["body"]) == ("PUT", "first second")


def test_one_mib_request_body(shared: Shared) -> None:
    body = random.Random(22).randbytes(MIB)
    response = shared.pairing.get("/sha256", method="POST", content=body)
    assert response.status_code == 200
    assert response.headers["x-body-length"] == str(MIB)
    assert response.text == hashlib.sha256(body).hexdigest()


def test_one_mib_response_body(shared: Shared) -> None:
    response = shared.pairing.get(f"/bytes?size={MIB}")
    assert response.status_code == 200
    expected = bytes(i % 251 for i in range(MIB))
    assert len(response.content) == MIB
    assert hashlib.sha256(response.content).digest() == hashlib.sha256(expected).digest()


def test_x_host_allowed_by_the_regexp_is_where_the_request_goes(shared: Shared) -> None:
    pairing = shared.pairing
    routed = pairing.get("/echo/routed", headers={"X-Host": shared.backend.url})
    assert routed.status_code == 200
    assert "x-host" not in header_names(routed.json())
    # Allowed too, but nothing listens there: the 502 shows that X-Host, not -server (which
    # would have answered), picked the backend. Both clients report it as a 502.
    unreachable = pairing.get("/echo/routed", headers={"X-Host": shared.dead_url})
    assert unreachable.status_code == 502


@pytest.mark.parametrize("x_host", ["http://127.0.0.1:1", "{backend}0", "{backend}/x", "x{backend}"],
                         ids=["other-port", "longer-port", "with-path", "prefixed"])
def test_x_host_not_allowed_by_the_regexp_is_403(shared: Shared, x_host: str) -> None:
    # The regexp must match the whole value (SPEC §3): a value it only contains is refused.
    refused = shared.pairing.get("/echo", headers={"X-Host": x_host.format(backend=shared.backend.url)})
    assert refused.status_code == 403


# -- the error table (SPEC §2) ------------------------------------------------------------------


def test_no_token_is_400(shared: Shared) -> None:
    server = shared.pairing.server
    missing = httpx.get(f"{server.url}/page", timeout=10)
    assert (missing.status_code, missing.text.strip()) == (400, "Missing X-Token header")
    # Ours says "Malformed /_token/ path", the original "Missing token in URI".
    malformed = httpx.get(f"{server.url}/_token/", timeout=10)
    assert malformed.status_code == 400


def test_unknown_token_is_404(shared: Shared) -> None:
    response = shared.pairing.server.get("/page", "never-registered-token-0123456789")
    # The original adds "(or not seen in a long time)".
    assert response.status_code == 404
    assert response.text.startswith("Tunnel not found")


def test_backend_unreachable_or_answering_garbage_is_502(shared: Shared) -> None:
    pairing = shared.pairing
    assert pairing.get("/echo", headers={"X-Host": shared.dead_url}).status_code == 502
    assert pairing.get("/garbage").status_code == 502
    assert pairing.get("/echo/still").status_code == 200


def test_response_with_a_nul_in_a_header_is_502(shared: Shared) -> None:
    pairing = shared.pairing
    response = pairing.get("/nul-header")
    assert response.status_code == 502
    if pairing.server_is_ours:
        # The original cli (Go 1.19's HTTP client) passes the NUL on; our srv cannot parse the
        # tunnel message: "unparseable response from the client side", 502 (the original srv
        # used 506 for what it could not parse, SPEC §2).
        assert response.text.strip() == "Bad response from tunnel client"
    # Else our cli refuses the backend's response and answers 502 itself, which the original
    # srv relays. (Our cli never writes a message the original srv cannot parse, so its 506
    # cannot be provoked from this pairing.)
    assert pairing.get("/echo/still").status_code == 200


# -- our server's endpoints with the original's client connected --------------------------------


@pytest.mark.parametrize("shared", [OUR_SRV], indirect=True)
def test_our_endpoints_with_the_original_client_connected(shared: Shared) -> None:
    pairing = shared.pairing
    server = pairing.server
    health = server.get("/_health_check")
    assert (health.status_code, health.content) == (200, b"WSTUNSRV RUNNING\n")

    stats = server.get("/_stats").text
    lines = stats.splitlines()
    assert lines[0] == "tunnels=1"
    keys = [line.split("=", 1)[0] for line in lines if "=" in line]
    # The original's keys, in its order; ours add theirs after (SPEC §2).
    original = ["tunnels", "tunnel00_token", "tunnel00_req_pending", "tunnel00_tun_addr",
                "tunnel00_idle_secs"]
    assert keys[:len(original)] == original
    assert keys[-2:] == ["req_pending", "dead_tunnels"]
    assert f"tunnel00_token={pairing.token[:8]}...\n" in stats
    assert "tunnel00_tun_addr=127.0.0.1\n" in stats
    assert "\nreq_pending=0\n" in stats and "\ndead_tunnels=0\n" in stats

    (tunnel,) = server.status()["tunnels"]
    assert tunnel["token"] == pairing.token[:8] + "..."
    (client,) = tunnel["clients"]
    assert client["protocol"] == "v1"
    assert client["transport"] == "websocket"
    assert client["address"] == "127.0.0.1"
    # The original sends no version header at all; "unknown" is what ours reports for that.
    assert client["client_version"] == "unknown"
    assert tunnel["completed"] >= 1  # whatever the other tests of this pairing sent


# -- timeouts, reconnects and lost tunnels: a pairing of their own each --------------------------


@pytest.mark.parametrize("name", PAIRINGS)
def test_http_timeout_is_504_and_the_late_answer_does_no_harm(
        harness: Harness, binary: Path, name: str) -> None:
    backend = harness.backend()
    pairing = open_pairing(harness, binary, name, srv_flags=("-httptimeout", "2"), backend=backend.url)
    started = time.monotonic()
    response = pairing.get("/slow?secs=4")
    elapsed = time.monotonic() - started
    assert (response.status_code, response.text.strip()) == (504, "Tunnel timeout")
    assert 1.9 <= elapsed < 4, f"504 after {elapsed:.2f}s"
    # The client answers once the backend does, for a request the server has given up on: the
    # server drops that answer and the tunnel carries on.
    wait_until(lambda: pairing.responses_sent() == 1, what="the late answer to enter the tunnel")
    after = pairing.get("/echo/after")
    assert (after.status_code, after.json()["path"]) == (200, "/echo/after")
    assert pairing.connections_made() == 1


@pytest.mark.parametrize("name", PAIRINGS)
def test_requests_wait_while_the_client_reconnects_and_a_full_queue_is_refused(
        harness: Harness, binary: Path, name: str) -> None:
    backend = harness.backend()
    if name == OUR_SRV:
        depth, flags = 2, ("-max-requests-per-tunnel", "2")
    else:
        depth, flags = 20, ()  # the original's fixed queue depth (MAX_REQ)
    pairing = open_pairing(harness, binary, name, srv_flags=flags, backend=backend.url)
    # Its first tunnel in its log before it dies: a killed client loses the lines it still held.
    wait_until(lambda: pairing.connections_made() == 1, what="the client's first tunnel in its log")
    pairing.kill_clients()
    with ThreadPoolExecutor(depth) as pool:
        waiting = [pool.submit(pairing.get, f"/echo/queued/{i}") for i in range(depth)]
        wait_until(lambda: pending_requests(pairing.server) == depth, what=f"{depth} queued requests")
        full = pairing.get("/echo/overflow")
        if pairing.server_is_ours:
            # Ours: 503 with Retry-After, documented in README.md's error table.
            assert (full.status_code, full.headers.get("retry-after")) == (503, "1")
        else:
            # The original: 504 (SPEC §2 records it).
            assert (full.status_code, full.text.strip()) == (
                504, "Too many requests in-flight, tunnel broken?")
        assert not any(future.done() for future in waiting)
        pairing.start_client()
        answered = [future.result(timeout=60) for future in waiting]
    assert [r.status_code for r in answered] == [200] * depth
    assert sorted(r.json()["path"] for r in answered) == sorted(f"/echo/queued/{i}" for i in range(depth))
    wait_until(lambda: pairing.connections_made() == 2, what="the client's second tunnel in its log")


def test_requests_in_flight_when_the_original_client_dies(harness: Harness, binary: Path) -> None:
    """Our srv, SPEC §2: a request in flight on a lost tunnel fails fast with 502, or, when its
    method is idempotent, is retried on the next connection; never a silent wait."""
    backend = harness.backend()
    pairing = open_pairing(harness, binary, OUR_SRV, backend=backend.url)
    (doomed,) = pairing.clients
    with ThreadPoolExecutor(2) as pool:
        # The backend would take 30 s over the POST: a 502 long before that is the fast failure.
        post = pool.submit(pairing.get, "/slow?secs=30", method="POST", content=b"once only")
        get = pool.submit(pairing.get, "/slow?secs=1")
        wait_until(lambda: doomed.process.output().count('msg="HTTP issuing request"') == 2,
                   what="both requests to reach the original cli")
        killed = time.monotonic()
        pairing.kill_clients()
        lost = post.result(timeout=30)
        assert lost.status_code == 502
        assert time.monotonic() - killed < 10
        pairing.start_client()
        retried = get.result(timeout=30)
    assert (retried.status_code, retried.text) == (200, "slow\n")


# -- request ids --------------------------------------------------------------------------------


async def test_the_original_client_reads_request_ids_only_up_to_7fff(
        harness: Harness, binary: Path) -> None:
    """Why our srv wraps its ids at 0x7fff: the original cli reads them into an int16."""
    backend = await trio.to_thread.run_sync(harness.backend)
    token = harness.new_token()
    request = b"GET /echo HTTP/1.1\r\nHost: tunnel\r\n\r\n"
    with trio.fail_after(60):
        async with raw_v1_server() as raw:
            client = await trio.to_thread.run_sync(
                partial(reference.start_client, harness, binary, raw.url, token, backend=backend.url))
            _handshake, ws = await raw.next_tunnel()
            for request_id in (1, 0x7FFF):
                assert (await exchange(ws, request_id, request)).status == 200
            await ws.send_message(b"8000" + request)
            await trio.to_thread.run_sync(partial(
                wait_until, lambda: "integer overflow on token 8000" in client.process.output(),
                what="the original cli to refuse id 8000"))
    assert "WS   cannot read request ID" in client.process.output()


async def test_our_server_assigns_ids_from_1_to_7fff_then_wraps() -> None:
    rendezvous = Rendezvous(Token("unit-test-token-0123456789"), alarms=Alarms(), max_requests=1)
    ids = []
    for _ in range(0x7FFF + 2):
        pending = rendezvous.new_request(framing.Request(b"GET", b"/"))
        ids.append(pending.id)
        pending.finish(Failure(504, "done"))
        rendezvous.release(pending)
    assert ids == [*range(1, 0x8000), 1, 2]
