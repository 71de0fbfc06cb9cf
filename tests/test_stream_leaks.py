"""Nothing leaks: a thousand streams aborted in every way, and the daemons that lived through it
hold what they held before.

One server and two measured clients (one over a WebSocket, one over long-poll, each on its own
token) live through rounds of faults that cut streams in the middle: the HTTP clients vanishing,
the backend dying, a third client (on a third token) killed with kill -9, the tunnel cut silently
(when network namespaces are available), and last the server killed and restarted. Each round
runs the four kinds of exchange of tests/support/streams.py on every token it strikes; every
exchange must end aborted (or refused with an error status), never whole and never hung.

Measured at rest (no request in flight, every client connected), before and after:

* the server: trio tasks, open file descriptors and resident memory (``/_metrics``), and each
  tunnel's flow control (``/_status``: streams, buffered bytes, windows);
* each client: the same from its ``STATS`` line (SIGUSR1), its windows included.

Tasks and descriptors must come back exactly (the smallest of a few samples: a long-poll client's
requests come and go). Windows must balance across the two ends of each tunnel (what one side may
still send is what the other may still receive, nothing in flight) with nothing buffered and no
stream left, and no credit lost since the start. Memory is measured twice over:

* the blocks Python holds allocated (``BLOCKS_PER_STREAM``): a leaked stream leaves its objects
  (its stream, its request and headers, an h11 connection: well over a hundred blocks), a
  hundred thousand after a thousand streams, where the count moves by a few thousand between
  measurements at rest (cyclic garbage the collector has not reached yet; 2,500 streams moved
  it by +5.8k to +10.5k);
* resident memory, by at most ``RSS_SLACK`` bytes: a leak of what one aborted stream holds
  (tens of kilobytes at the least) would show as tens of megabytes after a thousand (8 MiB is
  8 KiB a stream). Not less: after a warm-up of some 250 streams, the server's RSS at rest moves
  by up to 4 MiB either way between rounds with no trend (garbage awaiting the collector holds
  body chunks; the allocator keeps freed peaks): a run measured +4.0 MiB after the first
  rounds and +1.4 MiB at the end, CI once +4.3 MiB at the end (the figures are printed).

Plus one allowance that is not a leak: receive windows widen with the transfers (issue 14), and
a wider window lets a process hold more body bytes at once, a peak the allocator keeps (freed,
not returned). So the slack also grows by how far the measured tunnels' windows widened past the
size they started at (printed too). And a long-poll client holds what it sends until its next
POST takes it: up to a tunnel window of frames at once, a peak of the same kind
(``QUEUED_PEAK``).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests.support import faultlog, netns
from tests.support.harness import (
    PYTHON,
    SUPPORT,
    Backend,
    Client,
    Harness,
    Process,
    Server,
    free_port,
    wait_until,
)
from tests.support.streams import KINDS, Probe
from wstunnel.v2 import INITIAL_TUNNEL_WINDOW

STREAMS = int(os.environ.get("WSTUNNEL_LEAK_STREAMS", "1000"))
TIMEOUT = WSTIMEOUT = 3.0
RSS_SLACK = 8 * 1024 * 1024
BLOCKS_PER_STREAM = 30
# The long-poll client's queue of frames to send can hold up to a tunnel window of them when a
# download outruns its POSTs; freed, that peak stays with the allocator. Whether it comes before
# the first measurement or after is chance: its memory grew +4.69 and +4.85 MiB in runs where it
# came after (Python's own allocations moved by under 0.6 MiB, tracemalloc), -0.34 to +2.37 in
# the others. The websocket client's frames go to its socket as they come.
QUEUED_PEAK = {"longpoll": INITIAL_TUNNEL_WINDOW, "websocket": 0}
# How long a connection that a round cut may hold a task and a socket: the header and idle
# timeouts the daemons use here are a few wstimeouts at most.
SETTLE_TIMEOUT = 30.0
WARMUP_ROUNDS = 25  # vanish rounds (8 streams each) before the first measurement
SAMPLES = 5  # at rest, the smallest of this many samples, 0.2 s apart
ACCEPTED = {"aborted", "status 502", "vanished"}
# Shares of the streams by fault (the rest: the server killed).
SHARES = {"vanish": 0.45, "backend": 0.15, "client": 0.15, "cut": 0.08}


@dataclass
class Rig:
    harness: Harness
    server: Server
    steady: dict[str, Client]  # by transport: the measured clients
    tokens: dict[str, str]  # "websocket", "longpoll" (the steady clients'), "flappy"
    flappy: Client
    doomed: Backend
    http_host: str
    space: netns.Netns | None
    server_argv: list[str]
    aborted: Counter[str] = field(default_factory=Counter)  # streams cut, by fault
    # Of those, the ones the server itself must count (not the uploads the tunnel client
    # answered with a 502 when its backend died: that answer is the server's RET line).
    server_told: int = 0

    def probes(self, tokens: list[str], prefix: str, *, x_host: str | None = None) -> list[Probe]:
        probes = [kind(self.http_host, self.server.port, token, f"{prefix}-{n}-{kind.kind}",
                       x_host=x_host, mid_bytes=256 * 1024 if kind.kind in ("download", "upload")
                       else 2)
                  for n, token in enumerate(tokens) for kind in KINDS]
        for probe in probes:
            probe.start()
        for probe in probes:
            wait_until(lambda p=probe: p.mid.is_set() or not p.is_alive(), timeout=30,  # type: ignore[misc]
                       what=f"{probe.tag} under way")
        return probes

    def settle(self, fault: str, probes: list[Probe]) -> None:
        for probe in probes:
            probe.hurry()
        for probe in probes:
            probe.join(90)
        wrong = [f"{p.tag}: {p.outcome} {p.detail}" for p in probes if p.outcome not in ACCEPTED]
        assert not wrong, f"{fault}: {wrong}"
        self.aborted[fault] += len(probes)
        self.server_told += sum(1 for p in probes if _server_sees_a_cut(fault, p))

    def wait_all_connected(self) -> None:
        for token in self.tokens.values():
            self.server.wait_clients(token, 1, timeout=30)

    def restart_server(self) -> None:
        self.server.process.kill()
        self.server = _server(self.harness.start("srv", self.server_argv), self.server.port,
                              self.space)
        wait_until(lambda: self.server.get("/_health_check", timeout=2).status_code == 200,
                   what="the restarted server")
        self.wait_all_connected()


def _server(process: Process, port: int, space: netns.Netns | None) -> Server:
    return Server(process, port) if space is None else netns.NetnsServer.inside(process, port, space)


@pytest.fixture
def space() -> Iterator[netns.Netns | None]:
    """A network namespace for the server, so that rounds can cut its tunnels; None if
    namespaces cannot be made here (the cut rounds are then left out, and say so)."""
    if netns.unavailable() is not None:
        yield None
        return
    made = netns.Netns.for_this_process()
    try:
        made.create()
        yield made
    finally:
        made.remove()


@pytest.fixture
def rig(harness: Harness, space: netns.Netns | None) -> Rig:
    common = ["-wstimeout", f"{WSTIMEOUT:g}", "-restart-grace", "0"]
    if space is None:
        server = harness.server(*common)
        argv = server.process.argv[:]
        argv[argv.index("-port") + 1] = str(server.port)
        http_host = "127.0.0.1"
    else:
        port = 8080
        argv = space.wrap([PYTHON, "-m", "wstunnel", "srv", "-host", "0.0.0.0", "-port", str(port),
                           "-trusted-proxies", space.host_address, *common])
        server = _server(harness.start("srv", argv), port, space)
        wait_until(lambda: server.get("/_health_check", timeout=2).status_code == 200,
                   what="wstunnel srv in the namespace")
        http_host = space.operator_address
    backend = harness.backend()
    doomed = _start_doomed(harness, free_port())
    tokens = {"websocket": harness.new_token("leakws-"), "longpoll": harness.new_token("leaklp-"),
              "flappy": harness.new_token("leakfl-")}
    flags = ["-timeout", f"{TIMEOUT:g}", "-reconnect-max-delay", "1",
             "-regexp", r"http://127\.0\.0\.1:\d+"]
    steady = {transport: harness.client(server, tokens[transport], "-transport", transport, *flags,
                                        backend=backend.url)
              for transport in ("websocket", "longpoll")}
    flappy = harness.client(server, tokens["flappy"], "-transport", "websocket", *flags,
                            backend=backend.url)
    return Rig(harness, server, steady, tokens, flappy, doomed, http_host, space, argv)


def _server_sees_a_cut(fault: str, probe: Probe) -> bool:
    """Whether the server had an abort of ``probe``'s stream to count.

    Not an upload that the tunnel client answered with a 502 (its backend gone before the
    body): that answer is the server's RET line. Nor a pass-through whose dying backend had
    nothing unread: the kernel closed its socket with a FIN, the end of the byte stream the
    tunnel carries, which passes on as such (the HTTP client sees the connection end, not a
    reset); with bytes unread it is a reset, and an abort. Which one it is depends on whether
    the probe's last message reached the backend before it stopped.
    """
    if "Backend unreachable" in probe.detail:
        return False
    return not (fault == "backend" and probe.kind == "websocket"
                and "without a Close frame" in probe.detail)


def _start_doomed(harness: Harness, port: int) -> Backend:
    doomed = Backend(harness.start("doomed", [PYTHON, str(SUPPORT / "backend_app.py"), str(port)]),
                     port)
    wait_until(lambda: httpx.get(f"{doomed.url}/", timeout=2).status_code == 200,
               what="the backend that will die")
    return doomed


# -- the faults -------------------------------------------------------------------------------


def vanish_round(rig: Rig, n: int) -> None:
    probes = rig.probes([rig.tokens["websocket"], rig.tokens["longpoll"]], f"v{n}")
    # An uploader that dies has nothing unread: its socket closes with a FIN. The others had
    # bytes unread: a reset. (A pass-through client's FIN is a clean close of its side.)
    for probe in probes:
        probe.vanish(reset=probe.kind != "upload")
    rig.settle("vanish", probes)


def backend_round(rig: Rig, n: int) -> None:
    probes = rig.probes([rig.tokens["websocket"], rig.tokens["longpoll"]], f"b{n}",
                        x_host=rig.doomed.url)
    rig.doomed.process.signal(signal.SIGSTOP)
    time.sleep(0.2)  # the probes' next bytes reach its socket: not a synchronisation
    rig.doomed.process.kill()
    rig.settle("backend", probes)
    rig.doomed = _start_doomed(rig.harness, rig.doomed.port)


def client_round(rig: Rig, n: int, transport: str) -> None:
    """Kill the third client mid-stream; start it again over ``transport``."""
    probes = rig.probes([rig.tokens["flappy"]], f"c{n}")
    rig.flappy.process.kill()
    rig.settle("client", probes)
    rig.flappy = rig.harness.client(rig.server, rig.tokens["flappy"], "-transport", transport,
                                    "-timeout", f"{TIMEOUT:g}", backend=rig.harness.backend().url)


def cut_round(rig: Rig, n: int) -> None:
    assert rig.space is not None
    probes = rig.probes(list(rig.tokens.values()), f"x{n}")
    rig.space.cut()
    try:
        rig.settle("cut", probes)
        # Both ends must have noticed before the path heals.
        wait_until(lambda: all(rig.server.clients(token) == 0 for token in rig.tokens.values()),
                   timeout=WSTIMEOUT + 10, what="the server to drop the cut tunnels")
        clients = {**rig.steady, "flappy": rig.flappy}

        def unaware() -> dict[str, str]:
            """Each client that has not noticed yet, with its log since it last connected."""
            return {name: since[-1500:] for name, client in clients.items()
                    if "WS   RECONNECT" not in (since := client.process.output().rpartition(
                        "WS   CONNECTED")[2])}

        try:
            wait_until(lambda: not unaware(), timeout=TIMEOUT * 3 + 10,
                       what="every client to notice the cut")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; not yet: {unaware()}") from None
    finally:
        rig.space.heal()
    rig.wait_all_connected()


def server_round(rig: Rig, n: int) -> None:
    probes = rig.probes([rig.tokens["websocket"], rig.tokens["longpoll"]], f"s{n}")
    rig.restart_server()  # kill -9, then a new one on the same port
    rig.settle("server", probes)


# -- measuring --------------------------------------------------------------------------------


def at_rest(rig: Rig) -> None:
    """No request in flight anywhere, every client connected, nothing buffered."""
    rig.wait_all_connected()

    def quiet() -> bool:
        for tunnel in rig.server.status()["tunnels"]:
            if tunnel["pending"] or any(c.get("flow", {}).get("protocol_streams") or
                                        c.get("flow", {}).get("buffered")
                                        for c in tunnel["clients"]):
                return False
        return True

    wait_until(quiet, timeout=30, what="the server at rest")
    for client in rig.steady.values():
        wait_until(lambda c=client: faultlog.stats(c.process).get("protocol_streams") == "0",  # type: ignore[misc]
                   timeout=30, what=f"{client.token[:6]} at rest")


def smallest(sample: Callable[[], dict[str, int]]) -> dict[str, int]:
    samples = []
    for _ in range(SAMPLES):
        samples.append(sample())
        time.sleep(0.2)
    return {key: min(s[key] for s in samples) for key in samples[0]}


def settled(sample: Callable[[], dict[str, int]], before: dict[str, int],
            timeout: float = SETTLE_TIMEOUT) -> dict[str, int]:
    """``sample`` once tasks and descriptors are back to ``before``, or at ``timeout``: a
    connection that the last round cut silently is closed only at a timeout of its own (a leak
    never comes back)."""
    deadline = time.monotonic() + timeout
    while True:
        figures = sample()
        if ((figures["tasks"] <= before["tasks"] and figures["fds"] <= before["fds"])
                or time.monotonic() > deadline):
            return figures


def server_figures(rig: Rig) -> dict[str, int]:
    def sample() -> dict[str, int]:
        text = httpx.get(f"{rig.server.url}/_metrics", timeout=10).text

        def gauge(name: str) -> int:
            found = re.search(rf"^{name} (\S+)$", text, re.M)
            assert found is not None, name
            return int(float(found.group(1)))

        return {"tasks": gauge("wstunnel_trio_tasks"), "fds": gauge("process_open_fds"),
                "rss": gauge("process_resident_memory_bytes"),
                "blocks": gauge("wstunnel_python_allocated_blocks")}

    return smallest(sample)


def client_figures(client: Client) -> dict[str, int]:
    def sample() -> dict[str, int]:
        stats = faultlog.stats(client.process)
        return {"tasks": int(stats["tasks"]), "fds": int(stats["fds"]),
                "rss": int(stats["rss_kib"]) * 1024, "blocks": int(stats["py_blocks"])}

    return smallest(sample)


def flows(rig: Rig) -> dict[str, tuple[dict[str, int], dict[str, str]]]:
    """Each steady tunnel's flow control at rest: (the server's end, the client's end)."""
    by_token = {t["token"]: t for t in rig.server.status()["tunnels"]}
    found = {}
    for transport, client in rig.steady.items():
        [connection] = by_token[client.token[:8] + "..."]["clients"]
        found[transport] = (connection["flow"], faultlog.stats(client.process))
    return found


def check_flows(rig: Rig, before: dict[str, tuple[dict[str, int], dict[str, str]]]) -> None:
    for transport, (server_end, client_end) in flows(rig).items():
        print(f"[leaks] {transport} tunnel at rest: server {server_end}; client send_window="
              f"{client_end['send_window']} receive_window={client_end['receive_window']} "
              f"credit_owed={client_end['credit_owed']}")
        assert server_end["streams"] == server_end["protocol_streams"] == 0, server_end
        assert server_end["buffered"] == 0 and client_end["buffered"] == "0"
        assert client_end["streams"] == client_end["protocol_streams"] == "0"
        # Nothing in flight: what one end may still send is what the other may still receive.
        assert server_end["send_window"] == int(client_end["receive_window"]), (server_end, client_end)
        assert server_end["receive_window"] == int(client_end["send_window"]), (server_end, client_end)
        # And no credit went missing since the start (granted back, or owed in a batch).
        start = before[transport][0]
        assert (server_end["receive_window"] + server_end["credit_owed"]
                >= start["receive_window"] + start["credit_owed"]), (start, server_end)
        client_start = before[transport][1]
        assert (int(client_end["receive_window"]) + int(client_end["credit_owed"])
                >= int(client_start["receive_window"]) + int(client_start["credit_owed"]))


def widest_windows(seen: list[dict[str, tuple[dict[str, int], dict[str, str]]]]) -> dict[str, int]:
    """How far each steady tunnel's receive window widened past its start, at its widest in
    ``seen`` (flows() taken at several points): at each end, by transport."""
    widened: dict[str, int] = {}
    for transport in seen[0]:
        server = max(int(flow[transport][0]["tunnel_window"]) for flow in seen)
        client = max(int(flow[transport][1]["tunnel_window"]) for flow in seen)
        widened[f"server {transport}"] = server - INITIAL_TUNNEL_WINDOW
        widened[f"{transport} client"] = client - INITIAL_TUNNEL_WINDOW
    return widened


def compare(name: str, before: dict[str, int], after: dict[str, int], pid: int,
            allowance: int) -> None:
    """``allowance``: peaks the allocator may keep beyond RSS_SLACK (widened windows, and a
    long-poll client's queue)."""
    growth = after["rss"] - before["rss"]
    print(f"[leaks] {name}: tasks {before['tasks']} -> {after['tasks']}, fds {before['fds']} -> "
          f"{after['fds']}, Python blocks {before['blocks']} -> {after['blocks']} "
          f"({after['blocks'] - before['blocks']:+d}), RSS {before['rss'] / 2**20:.1f} -> "
          f"{after['rss'] / 2**20:.1f} MiB ({growth / 2**20:+.2f} MiB; allowed beyond the slack: "
          f"{allowance / 2**20:.2f} MiB)")
    if after["fds"] != before["fds"]:
        print(f"[leaks] {name} has open:\n  " + "\n  ".join(faultlog.open_files(pid)))
    assert after["tasks"] == before["tasks"], (name, before, after)
    assert after["fds"] == before["fds"], (name, before, after)
    assert after["blocks"] - before["blocks"] <= BLOCKS_PER_STREAM * STREAMS, (name, before, after)
    assert growth <= RSS_SLACK + allowance, (name, before, after, allowance)


# -- the test -----------------------------------------------------------------------------------


def test_a_thousand_aborted_streams_leave_no_task_fd_memory_or_credit_behind(rig: Rig) -> None:
    per_round = {"vanish": 8, "backend": 8, "client": 4, "cut": 12, "server": 8}
    rounds = {fault: max(1, round(STREAMS * share / per_round[fault]))
              for fault, share in SHARES.items()}
    if rig.space is None:
        print("\n[leaks] no network namespaces here: no silent cuts")
        rounds["cut"] = 0
    planned = sum(rounds[f] * per_round[f] for f in rounds)
    rounds["server"] = max(1, -(-(STREAMS - planned) // per_round["server"]))
    started = time.monotonic()

    # Warm up, so that pools, caches and the allocator's arenas are at their working size: a
    # client's memory grows by 2-3 MiB over its first 300 aborted streams, then by 0.3 MiB over
    # the next 800 (measured, a long-poll client and its server, 1,100 vanished streams).
    for n in range(WARMUP_ROUNDS):
        vanish_round(rig, -1 - n)
    for n, transport in enumerate(("longpoll", "websocket")):
        backend_round(rig, -1 - n)
        client_round(rig, -1 - n, transport)
    at_rest(rig)
    server_before = server_figures(rig)
    clients_before = {t: client_figures(c) for t, c in rig.steady.items()}
    flows_before = flows(rig)
    rig.aborted.clear()
    rig.server_told = sum(faultlog.aborted_counts(rig.server.url).values())  # the warm-up's

    # The tunnels of the steady clients live through these: their windows must balance after.
    for n in range(rounds["vanish"]):
        vanish_round(rig, n)
    for n in range(rounds["backend"]):
        backend_round(rig, n)
    at_rest(rig)
    check_flows(rig, flows_before)
    seen = [flows_before, flows(rig)]
    for n in range(rounds["client"]):
        # Both transports in turn; the last over a WebSocket, as at the first measurement (a
        # long-poll client holds more of the server's tasks and sockets than a WebSocket).
        last = n == rounds["client"] - 1
        client_round(rig, n, "websocket" if last or n % 2 else "longpoll")
    for n in range(rounds["cut"]):
        cut_round(rig, n)
    at_rest(rig)
    server_after = settled(lambda: server_figures(rig), server_before)
    seen.append(flows(rig))
    server_pid = rig.server.process.pid
    if server_after["fds"] != server_before["fds"]:  # listed now: the server rounds kill it
        print("[leaks] server has open:\n  " + "\n  ".join(faultlog.open_files(server_pid)))
    by_server = sum(faultlog.aborted_counts(rig.server.url).values())
    server_told = rig.server_told
    for n in range(rounds["server"]):
        server_round(rig, n)
    at_rest(rig)
    clients_after = {t: settled(lambda c=c: client_figures(c), clients_before[t])  # type: ignore[misc]
                     for t, c in rig.steady.items()}

    total = sum(rig.aborted.values())
    print(f"[leaks] {total} streams aborted in {time.monotonic() - started:.0f}s: "
          f"{dict(rig.aborted)}; the server counted {by_server} before its own kills")
    seen.append(flows(rig))
    widened = widest_windows(seen)
    compare("server", server_before, server_after, server_pid,
            sum(n for end, n in widened.items() if end.startswith("server ")))
    for transport, figures in clients_after.items():
        compare(f"{transport} client", clients_before[transport], figures,
                rig.steady[transport].process.pid,
                widened[f"{transport} client"] + QUEUED_PEAK[transport])
    assert total >= STREAMS
    # Every stream cut while the server lived was counted there, once.
    assert by_server == server_told
