"""Faults in the middle of streams, with real processes, over both tunnel transports.

Each test runs the four long-lived kinds of exchange at once through one tunnel (a download, an
upload, server-sent events and a WebSocket pass-through: tests/support/streams.py), strikes once
they are all well under way, and checks, for each, what the HTTP client saw (an abort it can tell
from a whole response, or an explicit error status; never a clean short one), that the backend's
request was cancelled (tests/support/backend_app.py records the requests cut off), what the logs
say (one ``HTTP ABORT`` line per stream on the server, ``WS   ABORT`` on the client, the tunnel's
close with its cause) and what ``/_metrics`` and ``/_status`` count. Where the tunnel survives the
fault, another stream on it, in flight across the fault, must finish whole.

The faults: the client killed (kill -9), the server killed, the tunnel cut silently (packets
dropped in a network namespace, no FIN or reset), the backend dying in the middle of the bodies,
the HTTP clients vanishing.
"""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from tests.support import faultlog, netns
from tests.support.harness import PYTHON, SUPPORT, Backend, Client, Harness, Server, free_port, wait_until
from tests.support.streams import KINDS, Download, Events, Probe, Upload, unread_bytes

TIMEOUT = 3.0  # the client's -timeout: pings every second, a pong 3 s late ends the tunnel
WSTIMEOUT = 3.0  # the server's: a tunnel silent for 3 s is dropped (a long-poll session expires)
# Whatever the fault, an HTTP client must see one of these: an abort it can tell, or an error.
ABORTED_OR_REFUSED = ("aborted", "status 502")


# Exchanges meant to end whole: a few seconds at most.
SMALL = {Download: {"size": 4 * 1024 * 1024}, Upload: {"size": 4 * 1024 * 1024},
         Events: {"events": 20}}


def start_probes(host: str, port: int, token: str, prefix: str, *,
                 x_host: str | None = None, small: bool = False) -> dict[str, Probe]:
    """One exchange of each kind, tagged ``<prefix>-<kind>``, all started at once (``small``:
    short ones, to finish whole)."""
    probes = {kind.kind: kind(host, port, token, f"{prefix}-{kind.kind}", x_host=x_host,
                              **(SMALL.get(kind, {}) if small else {}))  # type: ignore[arg-type]
              for kind in KINDS}
    for probe in probes.values():
        probe.start()
    return probes


def wait_under_way(probes: dict[str, Probe] | list[Probe]) -> None:
    for probe in probes.values() if isinstance(probes, dict) else probes:
        wait_until(lambda p=probe: p.mid.is_set() or not p.is_alive(), timeout=30,  # type: ignore[misc]
                   what=f"the {probe.kind} to be under way")
        assert probe.is_alive(), f"{probe.tag} ended before the fault: {probe.outcome} {probe.detail}"


def finish(probes: dict[str, Probe]) -> dict[str, str]:
    return {kind: probe.finish() for kind, probe in probes.items()}


def hang_with_input_pending(backend: Backend, websocket_peer: int, probe: Probe,
                            attempts: int = 5) -> None:
    """Stop the backend once its WebSocket holds input it has not read. Killed without, it
    would end those bytes with a FIN, which the tunnel rightly passes on as a clean end. The
    probe sends its next message a pace step after each echo, so input comes, unless the stop
    fell between reading a message and echoing it: then the backend is let run until the probe
    has its echo (stopped again at once, a backend the machine had not scheduled meanwhile would
    be caught in the same place every time), and stopped again. Bytes are counted only once
    every thread has stopped: a thread still in its read would take them (3 runs in 38 under
    load did, and their kills closed with a FIN)."""
    for _ in range(attempts):
        echoed = probe.progress
        backend.process.freeze()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if (unread_bytes(backend.port, websocket_peer) or 0) > 0:
                return
            time.sleep(0.02)
        backend.process.signal(signal.SIGCONT)
        wait_until(lambda echoed=echoed: probe.progress > echoed, timeout=15,
                   what="the WebSocket probe's next echo")
    raise AssertionError(f"the backend's WebSocket never held unread input in {attempts} stops")


def backend_state(backend: Backend) -> dict:
    return httpx.get(f"{backend.url}/_backend/state", timeout=5).json()


def wait_cancelled_at_backend(backend: Backend, tags: list[str], timeout: float = 20) -> None:
    """The backend saw each of these requests cut off (its client, the tunnel client, went)."""
    wait_until(lambda: set(tags) <= set(backend_state(backend)["cut_tags"]), timeout=timeout,
               what=f"the backend to see {tags} cut off")


def describe(probes: dict[str, Probe]) -> str:
    return "; ".join(f"{kind}: {p.outcome} ({p.detail})" for kind, p in probes.items())


def tell(fault: str, transport: str, probes: dict[str, Probe], *, server: Server | None,
         client: Client, backend: Backend | None) -> None:
    """One row per stream: what the HTTP client, the backend and both logs saw (``pytest -s``;
    the rows of every test make the fault table of issue 18)."""
    server_lines = faultlog.aborts_by_tag(server.process.output()) if server is not None else {}
    server_rets = ({} if server is None else
                   {tag: line for tag, request_id in faultlog.ids_by_tag(server.process.output()).items()
                    for line in faultlog.events(server.process.output(), "HTTP RET")
                    if line["id"] == request_id})
    client_lines = faultlog.aborts_by_tag(client.process.output(), server=False)
    cut = set(backend_state(backend)["cut_tags"]) if backend is not None else set()
    for kind, probe in probes.items():
        said = server_lines.get(probe.tag)
        ret = server_rets.get(probe.tag, {})
        server_text = (f"HTTP ABORT {said['direction']} {said['cause']}" if said else
                       f"RET {ret.get('status', '?')}" + (f" ({ret['err']})" if ret.get("err") else ""))
        if said and ret.get("status", "200") != "200":
            server_text = f"RET {ret['status']} + {server_text}"
        cli = client_lines.get(probe.tag)
        seen = "killed" if backend is None else "cancelled" if probe.tag in cut else "-"
        print(f"[table] {fault} | {kind} | {transport} | HTTP client: {probe.outcome} "
              f"({probe.detail[:60]}) | backend: {seen}"
              f" | srv: {server_text if server is not None else '(killed)'}"
              f" | cli: {'WS ABORT ' + cli['cause'] if cli else '-'}")


def start_client(harness: Harness, server: Server | str, token: str, *flags: str,
                 backend: str | None = None) -> Client:
    """The tunnel's client (over the transport the test runs with: both_transports)."""
    return harness.client(server, token, "-timeout", f"{TIMEOUT:g}", "-reconnect-max-delay", "1",
                          *flags, backend=backend)


def tunnel_status(server: Server, token: str) -> dict:
    return next(t for t in server.status()["tunnels"] if t["token"] == token[:8] + "...")


def wait_tunnel_lost_lines(server: Server, tags: set[str]) -> str:
    """srv's output once it holds the lost tunnel's CLOSE line and an ABORT line for each stream
    in ``tags`` (srv writes lines a few milliseconds after it logs them)."""
    def logged() -> str:
        output = server.process.output()
        done = faultlog.events(output, "WS   CLOSE") and set(faultlog.aborts_by_tag(output)) >= tags
        return output if done else ""
    return wait_until(logged, what="the lost tunnel's CLOSE line and its streams' ABORT lines")


# -- 1. the tunnel client killed --------------------------------------------------------------


@pytest.mark.both_transports
def test_client_killed_mid_stream_aborts_every_stream_and_says_why(
        harness: Harness, transport: str | None) -> None:
    transport = transport or "websocket"
    server = harness.server("-wstimeout", f"{WSTIMEOUT:g}")
    backend = harness.backend()
    token = harness.new_token()
    client = start_client(harness, server, token)
    probes = start_probes("127.0.0.1", server.port, token, "killcli")
    wait_under_way(probes)
    killed = time.monotonic()
    client.process.kill()
    outcomes = finish(probes)
    secs = time.monotonic() - killed
    print(f"\n[client kill -9, {transport}] after {secs:.1f}s: {describe(probes)}")
    assert outcomes["download"] == outcomes["sse"] == outcomes["websocket"] == "aborted", outcomes
    assert outcomes["upload"] in ABORTED_OR_REFUSED, outcomes
    # The killed client's sockets closed with it: the backend saw every request go.
    wait_cancelled_at_backend(backend, [p.tag for p in probes.values()])

    tags = {p.tag for p in probes.values()}
    output = wait_tunnel_lost_lines(server, tags)
    why = "client vanished" if transport == "websocket" else "long-poll session expired"
    closes = faultlog.events(output, "WS   CLOSE")
    assert len(closes) == 1 and why in closes[0]["reason"], closes
    aborts = faultlog.aborts_by_tag(output)
    assert set(aborts) == tags, aborts
    for tag, line in aborts.items():
        assert line["cause"] == "tunnel_lost", line
        assert line["reason"] == f"tunnel connection lost: {closes[0]['reason']}", line
        assert line["direction"] == ("request" if tag.endswith("upload") else "response"), line
        assert int(line["bytes"]) > 0 and float(line["secs"]) > 0
    assert faultlog.aborted_counts(server.url) == {("request", "tunnel_lost"): 1,
                                                   ("response", "tunnel_lost"): 3}
    tunnel = tunnel_status(server, token)
    assert tunnel["aborted"] == {"request": {"tunnel_lost": 1}, "response": {"tunnel_lost": 3}}
    assert why in tunnel["last_close"]
    tell("cli kill -9", transport, probes, server=server, client=client, backend=backend)


# -- 2. the server killed ---------------------------------------------------------------------


@pytest.mark.both_transports
def test_server_killed_mid_stream_the_client_cancels_every_backend_request(
        harness: Harness, transport: str | None) -> None:
    transport = transport or "websocket"
    server = harness.server()
    backend = harness.backend()
    token = harness.new_token()
    client = start_client(harness, server, token)
    probes = start_probes("127.0.0.1", server.port, token, "killsrv")
    wait_under_way(probes)
    server.process.kill()
    outcomes = finish(probes)
    print(f"\n[server kill -9, {transport}] {describe(probes)}")
    # The server's process is gone: its sockets closed mid-body, none with a clean end.
    assert outcomes["download"] == outcomes["sse"] == outcomes["websocket"] == "aborted", outcomes
    assert outcomes["upload"] == "aborted", outcomes
    wait_cancelled_at_backend(backend, [p.tag for p in probes.values()])

    why = "server vanished" if transport == "websocket" else "server unreachable"
    wait_until(lambda: any(why in line.get("reason", "")
                           for line in faultlog.events(client.process.output(), "WS   RECONNECT")),
               what=f"the client's reconnect line naming the cause ({why})")
    aborts = faultlog.aborts_by_tag(client.process.output(), server=False)
    wait_until(lambda: len(faultlog.aborts_by_tag(client.process.output(), server=False)) == 4,
               what="a WS ABORT line from the client for each stream")
    aborts = faultlog.aborts_by_tag(client.process.output(), server=False)
    for line in aborts.values():
        assert line["cause"] == "tunnel_lost" and why in line["reason"], line
    stats = faultlog.stats(client.process)
    assert stats["aborted_tunnel_lost"] == "4", stats
    tell("srv kill -9", transport, probes, server=None, client=client, backend=backend)

    # Back on a new server, the tunnel carries the same kinds of streams whole.
    restarted = harness.server(port=server.port)
    restarted.wait_clients(token, 1, timeout=30)
    again = start_probes("127.0.0.1", restarted.port, token, "after", small=True)
    assert finish(again) == dict.fromkeys(again, "complete"), describe(again)


# -- 3. the tunnel cut silently ---------------------------------------------------------------



@pytest.mark.both_transports
def test_silent_cut_mid_stream_is_detected_both_ends_and_every_stream_aborted(
        harness: Harness, transport: str | None, namespace: netns.Netns) -> None:
    transport = transport or "websocket"
    port = 8080  # the namespace is new: nothing else listens in it
    argv = [PYTHON, "-m", "wstunnel", "srv", "-host", "0.0.0.0", "-port", str(port),
            "-wstimeout", f"{WSTIMEOUT:g}", "-restart-grace", "0",
            "-trusted-proxies", namespace.host_address]
    server = netns.NetnsServer.inside(harness.start("srv", namespace.wrap(argv)), port, namespace)
    wait_until(lambda: server.get("/_health_check", timeout=2).status_code == 200,
               what="wstunnel srv in the namespace")
    backend = harness.backend()
    token = harness.new_token()
    client = start_client(harness, server, token)
    # HTTP clients use the operator address, which stays reachable: only the tunnel is cut.
    probes = start_probes(namespace.operator_address, port, token, "cut")
    wait_under_way(probes)
    namespace.cut()
    cut_at = time.monotonic()
    try:
        outcomes = finish(probes)
        probes_secs = time.monotonic() - cut_at
        wait_cancelled_at_backend(backend, [p.tag for p in probes.values()], timeout=TIMEOUT * 4)
        client_secs = time.monotonic() - cut_at
    finally:
        namespace.heal()
    print(f"\n[silent cut, {transport}] HTTP clients told after {probes_secs:.1f}s (wstimeout "
          f"{WSTIMEOUT:g}s), backend requests cancelled after {client_secs:.1f}s (timeout "
          f"{TIMEOUT:g}s): {describe(probes)}")
    assert outcomes["download"] == outcomes["sse"] == outcomes["websocket"] == "aborted", outcomes
    assert outcomes["upload"] in ABORTED_OR_REFUSED, outcomes
    assert probes_secs < WSTIMEOUT + 5

    tags = {p.tag for p in probes.values()}
    output = wait_tunnel_lost_lines(server, tags)
    closes = faultlog.events(output, "WS   CLOSE")
    why = "silent too long"
    assert len(closes) == 1 and why in closes[0]["reason"], closes
    aborts = faultlog.aborts_by_tag(output)
    assert set(aborts) == tags, aborts
    assert all(line["cause"] == "tunnel_lost" and why in line["reason"] for line in aborts.values())
    assert sum(faultlog.aborted_counts(server.url).values()) == 4
    # The client noticed on its own: no pong (or, over long-poll, a request that timed out).
    reconnects = wait_until(lambda: [line["reason"] for line in
                                     faultlog.events(client.process.output(), "WS   RECONNECT")],
                            what="the client's reconnect line")
    print(f"[silent cut, {transport}] the client's reason: {reconnects[0]}")
    assert "ping timeout" in reconnects[0] or "Timeout" in reconnects[0], reconnects
    client_aborts = faultlog.aborts_by_tag(client.process.output(), server=False)
    assert set(client_aborts) == {p.tag for p in probes.values()}, client_aborts
    assert all(line["cause"] == "tunnel_lost" for line in client_aborts.values())
    tell("silent cut", transport, probes, server=server, client=client, backend=backend)
    # Healed: the client returns and streams go whole again.
    server.wait_clients(token, 1, timeout=TIMEOUT * 3 + 10)
    again = start_probes(namespace.operator_address, port, token, "healed", small=True)
    assert finish(again) == dict.fromkeys(again, "complete"), describe(again)


# -- 4. the backend dying mid-body -------------------------------------------------------------


@pytest.mark.both_transports
def test_backend_dying_mid_body_aborts_its_streams_only(
        harness: Harness, transport: str | None) -> None:
    transport = transport or "websocket"
    server = harness.server()
    steady = harness.backend()
    doomed_port = free_port()
    doomed = Backend(harness.start("doomed", [PYTHON, str(SUPPORT / "backend_app.py"),
                                              str(doomed_port)]), doomed_port)
    wait_until(lambda: httpx.get(f"{doomed.url}/", timeout=2).status_code == 200,
               what="the backend that will die")
    token = harness.new_token()
    client = start_client(harness, server, token, "-regexp", r"http://127\.0\.0\.1:\d+",
                          backend=steady.url)
    probes = start_probes("127.0.0.1", server.port, token, "dies", x_host=doomed.url)
    survivor = Download("127.0.0.1", server.port, token, "survivor", size=8 * 1024 * 1024)
    survivor.start()
    wait_under_way([*probes.values(), survivor])
    websocket_peer = backend_state(doomed)["websocket_peers"]["dies-websocket"]
    # Hung, then killed (as a watchdog or the OOM killer would): what it had not read yet turns
    # its close into a reset, as any process dying with input pending.
    hang_with_input_pending(doomed, websocket_peer, probes["websocket"])
    doomed.process.kill()
    outcomes = finish(probes)
    assert survivor.finish() == "complete", survivor.detail
    print(f"\n[backend killed mid-body, {transport}] {describe(probes)}; another stream on the "
          f"tunnel: {survivor.outcome}")
    assert outcomes["download"] == outcomes["sse"] == outcomes["websocket"] == "aborted", outcomes
    assert outcomes["upload"] in ABORTED_OR_REFUSED, outcomes

    output = server.process.output()
    # One tunnel all along: the fault was the backend's, not the tunnel's.
    assert len(faultlog.events(output, "WS   NEW")) == 1 and not faultlog.events(output, "WS   CLOSE")
    assert server.clients(token) == 1
    # srv logs a stream's ABORT as it ends it, which may be just after its HTTP client saw the
    # reset: wait for the lines, not for a read of the log that raced them.
    dying = {f"dies-{kind}" for kind in ("download", "sse", "websocket")}
    try:
        wait_until(lambda: dying <= set(faultlog.aborts_by_tag(server.process.output())),
                   timeout=15, what="srv's ABORT lines of the backend's streams")
    except AssertionError as exc:  # say what srv said, should it ever happen again
        said = "\n".join(faultlog.lines_of_tags(server.process.output(), dying))
        raise AssertionError(f"{exc}\nsrv's lines about those streams:\n{said}") from None
    aborts = faultlog.aborts_by_tag(server.process.output())
    for kind in ("download", "sse", "websocket"):
        line = aborts[f"dies-{kind}"]
        assert line["cause"] == "backend_failed" and "reset by the tunnel client" in line["reason"], line
    assert "survivor" not in aborts
    if outcomes["upload"] == "status 502":  # the backend went before it answered: said so
        assert "Backend unreachable" in probes["upload"].detail
    tags = {p.tag for p in probes.values()}
    wait_until(lambda: tags <= set(faultlog.aborts_by_tag(client.process.output(), server=False)),
               timeout=15, what="cli's ABORT lines of the backend's streams")
    client_aborts = faultlog.aborts_by_tag(client.process.output(), server=False)
    assert set(client_aborts) == {p.tag for p in probes.values()}, client_aborts
    assert all(line["cause"] == "backend_failed" for line in client_aborts.values()), client_aborts
    counts = faultlog.aborted_counts(server.url)
    assert counts.get(("response", "backend_failed"), 0) >= 3, counts
    tell("backend killed", transport, probes, server=server, client=client, backend=None)


# -- 5. the HTTP clients vanishing -------------------------------------------------------------


@pytest.mark.both_transports
def test_http_clients_vanishing_mid_stream_cancel_their_backend_requests_only(
        harness: Harness, transport: str | None) -> None:
    transport = transport or "websocket"
    server = harness.server()
    backend = harness.backend()
    token = harness.new_token()
    client = start_client(harness, server, token)
    probes = start_probes("127.0.0.1", server.port, token, "gone")
    survivor = Download("127.0.0.1", server.port, token, "survivor", size=8 * 1024 * 1024)
    survivor.start()
    wait_under_way([*probes.values(), survivor])
    # The uploader goes with a FIN (a killed process with nothing unread), the others with a
    # reset (data unread in their sockets).
    for kind, probe in probes.items():
        probe.vanish(reset=kind != "upload")
    assert all(p.outcome == "vanished" for p in probes.values()), describe(probes)
    wait_cancelled_at_backend(backend, [p.tag for p in probes.values()])
    assert survivor.finish() == "complete", survivor.detail

    output = server.process.output()
    wait_until(lambda: len(faultlog.aborts_by_tag(server.process.output())) == 4,
               what="an HTTP ABORT line for each vanished client")
    aborts = faultlog.aborts_by_tag(server.process.output())
    print(f"\n[HTTP clients vanished, {transport}] server: "
          + "; ".join(f"{tag}: {line['direction']} {line['cause']} after {line['bytes']} bytes"
                      for tag, line in sorted(aborts.items())) + f"; survivor: {survivor.outcome}")
    for tag, line in aborts.items():
        assert line["cause"] == "client_gone", line
        if tag.endswith("upload"):
            assert line["direction"] == "request" and int(line["bytes"]) >= probes["upload"].mid_bytes
    assert "survivor" not in aborts
    assert len(faultlog.events(output, "WS   NEW")) == 1 and server.clients(token) == 1
    counts = faultlog.aborted_counts(server.url)
    assert sum(n for (_, reason), n in counts.items() if reason == "client_gone") == 4, counts
    assert tunnel_status(server, token)["clients"][0]["aborted"] == 4
    client_aborts = faultlog.aborts_by_tag(client.process.output(), server=False)
    assert set(client_aborts) == {p.tag for p in probes.values()}, client_aborts
    assert all(line["cause"] == "reset_by_server" for line in client_aborts.values())
    tell("HTTP client gone", transport, probes, server=server, client=client, backend=backend)


@pytest.mark.both_transports
def test_streams_that_end_whole_leave_no_abort(harness: Harness) -> None:
    """The contrast: exchanges that end whole leave no ABORT line anywhere."""
    server = harness.server()
    token = harness.new_token()
    client = start_client(harness, server, token)
    probes = start_probes("127.0.0.1", server.port, token, "whole", small=True)
    assert finish(probes) == dict.fromkeys(probes, "complete"), describe(probes)
    assert not faultlog.events(server.process.output(), "HTTP ABORT")
    assert not faultlog.events(client.process.output(), "WS   ABORT")
    assert faultlog.aborted_counts(server.url) == {}
