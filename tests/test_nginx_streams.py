"""What a web app behind a tunnel gets through the nginx files we ship, next to wstunnel srv
reached directly: the same page, streams and hang-ups by each route (``direct``, ``nginx`` with
``wstunnel.conf``, ``cluster`` with ``wstunnel-cluster.conf`` in front of three instances).

* A real browser (Debian's Chromium, through chromium-driver) loads a page of the test backend
  via ``/_token/<token>/app/``; the page checks a fetch with a body, an EventSource and a
  WebSocket echoing a 64 KiB message, and the test reads its results back (a screenshot of each
  run is kept in the test's directory).
* Server-sent events arrive one by one and uncompressed; an upload reaches the backend while it
  is being sent; ``Expect: 100-continue``; large request and response heads; trailers (which
  nginx cannot pass on: the one difference, asserted as such).
* An HTTP client hanging up, mid-download or mid-upload, cancels the backend's request.
* 256 MiB each way through nginx, compared by SHA-256; a long-poll tunnel through nginx.

The nginx files are the shipped ones with only their CHANGE lines adapted, behind a throwaway CA.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

import h11
import httpx
import pytest

from tests.support.backend_app import BLOCK, big_body, big_body_sha256
from tests.support.browser import NEEDS_CHROMIUM, chromium, load_page
from tests.support.harness import Harness, wait_until
from tests.support.nginx_config import parse_nginx
from tests.support.nginx_frontend import (
    CURL,
    NEEDS_CURL,
    NEEDS_NGINX,
    ROUTES,
    SITE,
    Deployment,
    deploy,
)

MiB = 1024 * 1024
EVENT_GAP = 0.4  # seconds between the backend's server-sent events


def _routes(*routes: str) -> list:
    """``routes`` as parameters, those through nginx marked to need it."""
    return [pytest.param(route, marks=[NEEDS_NGINX] if route != "direct" else []) for route in routes]


def open_tunnel(harness: Harness, tmp_path: Path, route: str,
                *client_flags: str) -> tuple[Deployment, str]:
    """The route's servers, and one ``wstunnel cli`` registered through it; (deployment, token)."""
    deployment = deploy(harness, tmp_path, route)
    token = harness.new_token(f"{route[:7]:-<7}-")
    harness.client(deployment.tunnel_url, token, *deployment.client_flags(),
                   *client_flags, wait=False)
    deployment.wait_clients(token, 1)
    return deployment, token


def backend_state(harness: Harness) -> dict[str, int]:
    return httpx.get(f"{harness.backend().url}/_backend/state", timeout=5).json()


def shipped_protocol() -> str:
    """What a browser speaks to nginx with the shipped TLS listener: h2 if it says http2."""
    server = next(s for s in parse_nginx(SITE.read_text()).all("server")
                  if any("ssl" in listen.args for listen in s.all("listen")))
    return "h2" if all("http2" in listen.args for listen in server.all("listen")) else "http/1.1"


# ------------------------------------------------------------------------------- the browser


@NEEDS_CHROMIUM
@pytest.mark.parametrize("route", _routes(*ROUTES))
def test_browser_page_uses_fetch_eventsource_and_websocket(harness: Harness, tmp_path: Path,
                                                           route: str) -> None:
    deployment, token = open_tunnel(harness, tmp_path, route)
    trust = [deployment.certs.cert_pem] if deployment.certs else []
    with chromium(tmp_path / "browser", trust=trust) as browser:
        results = load_page(browser, f"{deployment.url}/_token/{token}/app/",
                            tmp_path / f"page-{route}.png")
    outcome = {name: check["ok"] for name, check in results["checks"].items()}
    assert outcome == {"fetch": True, "EventSource": True, "WebSocket": True}, results["checks"]
    assert results["protocol"] == ("http/1.1" if route == "direct" else shipped_protocol())
    # The echo came from the backend's own WebSocket, through the tunnel.
    assert backend_state(harness)["websockets"] == 1


# ------------------------------------------------------------------------------- streams


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """(a response head, the bytes read after it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _read_json_response(sock: socket.socket) -> tuple[int, dict]:
    head, body = _read_head(sock)
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of a response body"
        body += chunk
    return int(head.split(b" ")[1]), json.loads(body)


def _post_head(path: str, *fields: str) -> bytes:
    return "\r\n".join([f"POST {path} HTTP/1.1", "Host: localhost", *fields, "", ""]).encode()


def _events_arrive_one_by_one(deployment: Deployment, token: str) -> None:
    count = 4
    url = f"{deployment.url}/_token/{token}/sse?n={count}&gap={EVENT_GAP}"
    latencies, buffer = [], b""
    # Asking for gzip: nothing may compress (and so hold back) the stream on the way.
    with httpx.stream("GET", url, verify=deployment.verify(), timeout=30,
                      headers={"Accept-Encoding": "gzip"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert "content-encoding" not in response.headers
        for chunk in response.iter_raw():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                written = float(re.search(rb"written at ([\d.]+)", event).group(1))  # type: ignore[union-attr]
                assert event.startswith(b"id: %d\n" % len(latencies)), event
                latencies.append(time.monotonic() - written)
    assert len(latencies) == count
    # Each event came on its own, before the backend wrote the next one.
    assert max(latencies) < EVENT_GAP, latencies


def _upload_reaches_the_backend_as_it_is_sent(deployment: Deployment, token: str,
                                              harness: Harness) -> None:
    with deployment.connect() as sock:
        sock.sendall(_post_head(f"/_token/{token}/sink", "Transfer-Encoding: chunked")
                     + b"5\r\nfirst\r\n")
        # The backend reads the first chunk while the rest is still with the HTTP client.
        wait_until(lambda: backend_state(harness)["sink_bytes"] == 5, what="the first chunk at the backend")
        sock.sendall(b"4\r\nrest\r\n0\r\n\r\n")
        status, answer = _read_json_response(sock)
    assert (status, answer) == (200, {"size": 9, "sha256": hashlib.sha256(b"firstrest").hexdigest()})


def _continue_then_body(deployment: Deployment, token: str) -> None:
    body = BLOCK * 4  # 256 KiB: streamed, not taken whole first
    with deployment.connect() as sock:
        sock.sendall(_post_head(f"/_token/{token}/sink", f"Content-Length: {len(body)}",
                                "Expect: 100-continue"))
        interim, rest = _read_head(sock)
        assert interim.startswith(b"HTTP/1.1 100 ") and not rest, interim
        sock.sendall(body)
        status, answer = _read_json_response(sock)
    assert (status, answer["sha256"]) == (200, hashlib.sha256(body).hexdigest())


def _trailers(deployment: Deployment, token: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The body and trailer fields of a chunked response that has some, read with h11."""
    client = h11.Connection(h11.CLIENT)
    body = b""
    with deployment.connect() as sock:
        sock.sendall(client.send(h11.Request(method="GET", target=f"/_token/{token}/trailers",
                                             headers=[("Host", "localhost"), ("TE", "trailers")])))
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return body, [(bytes(k), bytes(v)) for k, v in event.headers.raw_items()]


@pytest.mark.parametrize("route", _routes(*ROUTES))
def test_events_uploads_heads_and_trailers(harness: Harness, tmp_path: Path, route: str) -> None:
    deployment, token = open_tunnel(harness, tmp_path, route)
    _events_arrive_one_by_one(deployment, token)
    _upload_reaches_the_backend_as_it_is_sent(deployment, token, harness)
    _continue_then_body(deployment, token)

    # Heads as large as the server carries: a 20 KB cookie in, a 60 KB header field out.
    with httpx.Client(base_url=f"{deployment.url}/_token/{token}", verify=deployment.verify(),
                      timeout=30) as http:
        cookie = "session=" + "c" * 20000
        echoed = http.get("/echo/cookie", headers={"Cookie": cookie})
        assert echoed.status_code == 200, echoed.text[:200]
        assert ["Cookie", cookie] in echoed.json()["headers"]
        large = http.get("/head?size=60000")
        assert large.status_code == 200, large.text[:200]
        assert len(large.headers["x-filler"]) == 60000

    # Trailers pass the tunnel, but nginx's HTTP proxy drops those of a response (no directive
    # passes them on; the shipped files say so): the body itself is whole either way.
    body, trailers = _trailers(deployment, token)
    assert body == b"first,second"
    assert trailers == ([(b"X-Checksum", b"sha256=abc")] if route == "direct" else [])


@pytest.mark.parametrize("route", _routes(*ROUTES))
def test_a_client_hanging_up_cancels_the_backend_request(harness: Harness, tmp_path: Path,
                                                         route: str) -> None:
    deployment, token = open_tunnel(harness, tmp_path, route)
    # Mid-download: the backend is writing a 1 GiB body when the HTTP client goes.
    with httpx.stream("GET", f"{deployment.url}/_token/{token}/big?size={1024 * MiB}",
                      verify=deployment.verify(), timeout=30) as response:
        received = 0
        for chunk in response.iter_raw():
            received += len(chunk)
            if received >= 2 * MiB:
                break
    wait_until(lambda: backend_state(harness)["bigs_cut"] == 1, timeout=20,
               what="the backend to see the download's client gone")
    # Mid-upload: the backend has read part of a 64 MiB body when the HTTP client goes.
    with deployment.connect() as sock:
        sock.sendall(_post_head(f"/_token/{token}/sink", f"Content-Length: {64 * MiB}") + BLOCK * 16)
        wait_until(lambda: backend_state(harness)["sink_bytes"] >= 512 * 1024, what="the upload under way")
    wait_until(lambda: backend_state(harness)["sinks_cut"] == 1, timeout=20,
               what="the backend to see the upload's client gone")
    assert backend_state(harness)["sinks_done"] == 0
    # The tunnel goes on.
    answer = httpx.get(f"{deployment.url}/_token/{token}/echo/after", verify=deployment.verify(), timeout=30)
    assert answer.status_code == 200


# ------------------------------------------------------------------------------- volume


@NEEDS_NGINX
@NEEDS_CURL
def test_256_mib_each_way_through_nginx(harness: Harness, tmp_path: Path) -> None:
    """curl, as a user would run it (HTTP/2 if the shipped listener offers it), compared by hash."""
    deployment, token = open_tunnel(harness, tmp_path, "nginx")
    assert deployment.certs is not None
    size = 256 * MiB
    url = f"{deployment.url}/_token/{token}"
    curl = [CURL, "-sS", "--fail", "--cacert", str(deployment.certs.ca_pem)]

    started = time.monotonic()
    download = subprocess.Popen([*curl, "-o", "-", f"{url}/big?size={size}"], stdout=subprocess.PIPE)
    digest, received = hashlib.sha256(), 0
    assert download.stdout is not None
    while chunk := download.stdout.read(MiB):
        digest.update(chunk)
        received += len(chunk)
    assert download.wait(120) == 0
    down = time.monotonic() - started
    assert (received, digest.hexdigest()) == (size, big_body_sha256(size))

    # Uploaded from a pipe: curl sends it as it comes, chunked (HTTP/1.1) or in DATA frames (h2).
    started = time.monotonic()
    upload = subprocess.Popen([*curl, "-T", "-", "-X", "POST", "-w", "\n%{http_version}",
                               f"{url}/sink"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert upload.stdin is not None and upload.stdout is not None
    feeder = threading.Thread(target=_feed, args=(upload.stdin, size), daemon=True)
    feeder.start()
    output = upload.stdout.read()
    assert upload.wait(120) == 0
    feeder.join(10)
    up = time.monotonic() - started
    answer, _, version = output.decode().rpartition("\n")
    assert json.loads(answer) == {"size": size, "sha256": big_body_sha256(size)}
    print(f"\n256 MiB through nginx (HTTP/{version} from curl): download {down:.1f}s, upload {up:.1f}s")


def _feed(pipe: IO[bytes], size: int) -> None:
    with pipe:
        for part in big_body(size):
            pipe.write(part)


@pytest.mark.parametrize("route", _routes("nginx", "cluster"))
def test_longpoll_tunnel_through_nginx(harness: Harness, tmp_path: Path, route: str) -> None:
    """A client whose WebSocket cannot pass: long-poll through the same nginx files, batched
    bodies both ways."""
    deployment, token = open_tunnel(harness, tmp_path, route, "-transport", "longpoll")
    assert all(c["transport"] == "longpoll" for s in deployment.servers for t in s.status()["tunnels"]
               for c in t["clients"])
    size = 3 * MiB  # several batches of at most 1 MiB
    with httpx.Client(base_url=f"{deployment.url}/_token/{token}", verify=deployment.verify(),
                      timeout=60) as http:
        download = http.get(f"/big?size={size}")
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == big_body_sha256(size)
        upload = http.post("/sink", content=big_body(size))
        assert upload.json() == {"size": size, "sha256": big_body_sha256(size)}
    _events_arrive_one_by_one(deployment, token)
