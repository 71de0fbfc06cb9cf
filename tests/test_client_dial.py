"""End to end: how ``wstunnel cli`` reaches the server (HTTP CONNECT proxy, TLS, source ports).

Real processes only: a tinyproxy, a TLS terminator (tests/support/tls_terminator.py) in front of the
server, and sockets held by the test to fill the client's source-port range.
"""

from __future__ import annotations

import contextlib
import random
import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fronts import (
    PROXY_PASSWORD,
    PROXY_USER,
    Tinyproxy,
    TlsFront,
    needs_tinyproxy,
    start_tinyproxy,
    start_tls_front,
)
from tests.support.harness import (
    Client,
    Harness,
    Server,
    environ,
    free_port,
    wait_until,
)

WRONG_PASSWORD = "bad-" + secrets.token_hex(8)
# Retry quickly: the reconnect delay is then 0.5..1 s.
FAST_RETRY = ("-reconnect-max-delay", "1")

# ----------------------------------------------------------------------------------------- helpers


def _tunnel_works(server: Server, token: str) -> None:
    response = server.get("/dial-check", token=token)
    assert response.status_code == 200, response.text
    assert "/dial-check" in response.text


def _event(line: str, name: str) -> bool:
    """Whether a log line is the ``WS <name>`` event (the original pads it: ``WS   DIAL``)."""
    return re.search(rf"\bWS +{name}\b", line) is not None


def _reconnects(client: Client, pattern: str) -> int:
    """How many ``WS RECONNECT`` lines of the client give a reason matching ``pattern``."""
    return sum(
        1 for line in client.process.output().splitlines()
        if _event(line, "RECONNECT") and "reason=" in line
        and re.search(pattern, line.partition("reason=")[2], re.IGNORECASE)
    )


def _wait_retrying(client: Client, pattern: str, times: int = 2) -> None:
    try:
        wait_until(lambda: _reconnects(client, pattern) >= times, timeout=20,
                   what=f"{times} reconnects because of /{pattern}/")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- client log:\n{client.process.output()}") from None


def _assert_never_registered(server: Server, client: Client) -> None:
    assert client.process.alive(), client.process.output()
    assert server.clients(client.token) == 0
    assert not any(_event(line, "CONNECTED") for line in client.process.output().splitlines())


@pytest.fixture
def tinyproxy(harness: Harness, tmp_path: Path) -> Iterator[tuple[Server, Tinyproxy]]:
    """A server, and a tinyproxy (Basic auth) that allows CONNECT to that server's port only."""
    server = harness.server()
    proxy = start_tinyproxy(harness, tmp_path, server.port)
    yield server, proxy
    for token in harness.tokens:
        assert token not in proxy.log(), "a whole token in the tinyproxy log"
    assert PROXY_PASSWORD not in proxy.log()


@pytest.fixture
def tls_front(harness: Harness, tmp_path: Path) -> TlsFront:
    return start_tls_front(harness, tmp_path)


def _local_range_start() -> int:
    """The kernel's first ephemeral port: ports below it are not handed out to other sockets."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 32768


def _free_port_range(size: int) -> list[int]:
    """``size`` consecutive ports, all bindable now, below the ephemeral range."""
    high = _local_range_start() - size
    for _ in range(200):
        first = random.randint(max(1024, high - 12000), high)
        ports = list(range(first, first + size))
        with contextlib.ExitStack() as stack:
            try:
                for port in ports:
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        return ports
    raise AssertionError("no free range of ports found")


def _connected_local_port(client: Client) -> int:
    """The local port the client reports for its (latest) tunnel connection."""
    ports = wait_until(lambda: re.findall(r"\bWS +CONNECTED .*\blocal=\S+:(\d+)",
                                          client.process.output()),
                       what="the client's WS CONNECTED line")
    return int(ports[-1])


def _established(local_port: int, remote_port: int) -> bool:
    """Whether the kernel has an ESTABLISHED TCP connection local_port -> remote_port."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if (state == "01" and int(local.rsplit(":", 1)[1], 16) == local_port
                    and int(remote.rsplit(":", 1)[1], 16) == remote_port):
                return True
    return False


# ------------------------------------------------------------------------------------------- proxy


@needs_tinyproxy
def test_proxy_flag_tunnels_through_connect(harness: Harness,
                                            tinyproxy: tuple[Server, Tinyproxy]) -> None:
    server, proxy = tinyproxy
    token = harness.new_token("proxyflag-")
    client = harness.client(server, token, "-proxy", proxy.url())
    _tunnel_works(server, token)
    assert proxy.connects_to(server.port) >= 1, proxy.log()
    # The proxy is named, masked.
    output = client.process.wait_output(f"{PROXY_USER}:***@127.0.0.1:{proxy.port}")
    assert PROXY_PASSWORD not in output


@needs_tinyproxy
@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"])
def test_proxy_from_environment(harness: Harness, tinyproxy: tuple[Server, Tinyproxy],
                                variable: str) -> None:
    server, proxy = tinyproxy
    token = harness.new_token("proxyenv-")
    client = harness.client(server, token, env=environ(**{variable: proxy.url()}))
    _tunnel_works(server, token)
    assert proxy.connects_to(server.port) >= 1, proxy.log()
    assert PROXY_PASSWORD not in client.process.output()


@needs_tinyproxy
@pytest.mark.parametrize(
    ("user", "password", "status"),
    [
        pytest.param(PROXY_USER, WRONG_PASSWORD, "401", id="wrong-password"),  # tinyproxy: 401
        pytest.param(None, "", "407", id="no-credentials"),
    ],
)
def test_proxy_refusal_is_logged_and_retried(harness: Harness, tinyproxy: tuple[Server, Tinyproxy],
                                             user: str | None, password: str, status: str) -> None:
    server, proxy = tinyproxy
    token = harness.new_token("proxybad-")
    client = harness.client(server, token, "-proxy", proxy.url(user, password), *FAST_RETRY,
                            wait=False)
    _wait_retrying(client, rf"proxy\S* .*refused CONNECT: {status}\b")
    _assert_never_registered(server, client)
    assert proxy.connects_to(server.port) >= 2, proxy.log()
    output = client.process.output()
    assert WRONG_PASSWORD not in output
    assert PROXY_PASSWORD not in output


@pytest.mark.parametrize("variable", ["NO_PROXY", "no_proxy"])
def test_no_proxy_bypasses_the_environment_proxy(harness: Harness, variable: str) -> None:
    server = harness.server()
    dead_proxy = f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{free_port()}"  # nobody listens
    token = harness.new_token("noproxy-")
    client = harness.client(server, token, env=environ(HTTPS_PROXY=dead_proxy, **{variable: "127.0.0.1"}))
    _tunnel_works(server, token)
    dials = [line for line in client.process.wait_output("DIAL").splitlines() if _event(line, "DIAL")]
    assert dials and not any("proxy=http" in line for line in dials), dials


def test_environment_proxy_is_used_without_no_proxy(harness: Harness) -> None:
    """The control for the NO_PROXY test: the same dead proxy, not bypassed, stops the client."""
    server = harness.server()
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    token = harness.new_token("deadproxy-")
    client = harness.client(server, token, *FAST_RETRY, env=environ(HTTPS_PROXY=dead_proxy),
                            wait=False)
    _wait_retrying(client, r"all attempts to connect|connection refused")
    _assert_never_registered(server, client)


# --------------------------------------------------------------------------------------------- TLS


def test_wss_with_certfile(harness: Harness, tls_front: TlsFront) -> None:
    token = harness.new_token("tlsca-")
    harness.client(tls_front.url, token, "-certfile", str(tls_front.ca_pem), wait=False)
    tls_front.server.wait_clients(token, 1)
    _tunnel_works(tls_front.server, token)


def test_wss_without_certfile_fails_verification(harness: Harness, tls_front: TlsFront) -> None:
    token = harness.new_token("tlsnoca-")
    client = harness.client(tls_front.url, token, *FAST_RETRY, wait=False)
    _wait_retrying(client, r"certificate.verify.failed")
    _assert_never_registered(tls_front.server, client)


def test_wss_insecure_skips_verification(harness: Harness, tls_front: TlsFront) -> None:
    token = harness.new_token("tlsinsec-")
    harness.client(tls_front.url, token, "-insecure", wait=False)
    tls_front.server.wait_clients(token, 1)
    _tunnel_works(tls_front.server, token)


# ------------------------------------------------------------------------------------ client ports


def test_client_ports_source_port_in_range(harness: Harness) -> None:
    server = harness.server()
    ports = _free_port_range(3)
    token = harness.new_token("ports-")
    client = harness.client(server, token, "-client-ports", f"{ports[0]}..{ports[-1]}")
    _tunnel_works(server, token)
    local_port = _connected_local_port(client)
    assert local_port in ports
    # Not just the client's word for it: the kernel has that connection to the server.
    assert _established(local_port, server.port)


def test_client_ports_all_busy_logs_and_retries(harness: Harness) -> None:
    server = harness.server()
    ports = _free_port_range(3)
    token = harness.new_token("portsbusy-")
    with contextlib.ExitStack() as held:
        for port in ports:
            sock = held.enter_context(socket.socket())
            sock.bind(("0.0.0.0", port))
        client = harness.client(server, token, "-client-ports", f"{ports[0]}..{ports[-1]}",
                                *FAST_RETRY, wait=False)
        _wait_retrying(client, rf"no free source port among {len(ports)}\b")
        _assert_never_registered(server, client)
    # Ports released: the next attempt gets one.
    server.wait_clients(token, 1)
    local_port = _connected_local_port(client)
    assert local_port in ports
    assert _established(local_port, server.port)
    _tunnel_works(server, token)
