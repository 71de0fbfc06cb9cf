"""``/_metrics``: the text format checked by a strict parser, then a real server's counts moving."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import httpx
import pytest

from tests.support.harness import Harness, Server
from wstunnel.alarms import Alarms
from wstunnel.server.aborts import Cause
from wstunnel.server.metrics import DURATION_BUCKETS, Gauges, Histogram, Metrics
from wstunnel.server.rendezvous import Registry
from wstunnel.tokens import Token

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
SAMPLE = re.compile(rf"({NAME})(?:\{{(.*)\}})? (\S+)")
LABEL = re.compile(rf'({LABEL_NAME})="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@dataclass
class Family:
    kind: str
    help: str | None = None
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), text)


def _value(text: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    if not re.fullmatch(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", text):
        raise AssertionError(f"bad sample value {text!r}")
    return float(text)


def parse(text: str) -> dict[str, Family]:
    """Text format 0.0.4, strictly: TYPE before samples, one block per family, no duplicates."""
    assert text.endswith("\n"), "the exposition must end with a line feed"
    families: dict[str, Family] = {}
    current: str | None = None
    for line in text[:-1].split("\n"):
        assert line, "no blank lines"
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP "):].partition(" ")
            assert re.fullmatch(NAME, name), line
            families.setdefault(name, Family(kind="?")).help = _unescape(help_text)
            current = name
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE "):].partition(" ")
            assert kind in TYPES, line
            family = families.setdefault(name, Family(kind=kind))
            assert not family.samples, f"TYPE after samples: {line}"
            family.kind = kind
            current = name
            continue
        assert not line.startswith("#"), f"unexpected comment {line!r}"
        match = SAMPLE.fullmatch(line)
        assert match, f"not a sample line: {line!r}"
        name, labels_text, value_text = match.groups()
        labels: list[tuple[str, str]] = []
        rest = labels_text or ""
        while rest:
            label = LABEL.match(rest)
            assert label, f"bad labels in {line!r}"
            labels.append((label.group(1), _unescape(label.group(2))))
            rest = rest[label.end():]
        assert current is not None, f"sample before any TYPE: {line!r}"
        family = families[current]
        base = name
        if family.kind == "histogram":
            base = next((name.removesuffix(s) for s in HISTOGRAM_SUFFIXES if name.endswith(s)), name)
        assert base == current, f"{name} outside its family block ({current})"
        key = (name, tuple(sorted(labels)))
        assert key not in family.samples, f"duplicate series {line!r}"
        family.samples[key] = _value(value_text)
    for name, family in families.items():
        assert family.kind != "?", f"{name} has HELP but no TYPE"
        if family.kind == "histogram":
            check_histogram(name, family)
    return families


def check_histogram(name: str, family: Family) -> None:
    buckets = sorted(
        (_value(dict(labels)["le"]), value)
        for (sample, labels), value in family.samples.items() if sample == f"{name}_bucket"
    )
    assert buckets, f"{name} has no buckets"
    assert buckets[-1][0] == math.inf, "the last bucket must be +Inf"
    counts = [count for _, count in buckets]
    assert counts == sorted(counts), f"{name} buckets are not cumulative: {buckets}"
    assert family.samples[(f"{name}_count", ())] == buckets[-1][1], "+Inf bucket != _count"
    assert (f"{name}_sum", ()) in family.samples


def value(families: dict[str, Family], name: str, **labels: str) -> float:
    for family in families.values():
        for (sample, sample_labels), number in family.samples.items():
            if sample == name and dict(sample_labels) == labels:
                return number
    return 0.0


# -- rendering -------------------------------------------------------------------------------


def test_empty_metrics_parse_and_carry_every_family() -> None:
    text = Metrics("1.2.3").render(Gauges(tunnels=0, clients=0, queue_depth=0, pending=0), uptime=1.5)
    families = parse(text)
    assert families["wstunnel_requests_total"].kind == "counter"
    for name in ("wstunnel_tunnels", "wstunnel_clients", "wstunnel_queue_depth", "wstunnel_build_info"):
        assert families[name].kind == "gauge"
    assert families["wstunnel_request_duration_seconds"].kind == "histogram"
    assert value(families, "wstunnel_build_info", version="1.2.3") == 1
    assert value(families, "wstunnel_request_duration_seconds_count") == 0
    bounds = [dict(labels)["le"] for (name, labels) in
              families["wstunnel_request_duration_seconds"].samples if name.endswith("_bucket")]
    assert len(bounds) == len(DURATION_BUCKETS) + 1
    assert "+Inf" in bounds


def test_observations_land_in_counters_and_buckets() -> None:
    metrics = Metrics("1.0")
    metrics.observe(status=200, seconds=0.003, request_bytes=10, response_bytes=100)
    metrics.observe(status=200, seconds=0.5, request_bytes=0, response_bytes=5)  # exactly on a bound
    metrics.observe(status=504, seconds=1200.0, request_bytes=7, response_bytes=15)
    gauges = Gauges(tunnels=2, clients=3, queue_depth=4, pending=5,
                    clients_by_transport=(("longpoll", 1), ("websocket", 2)))
    families = parse(metrics.render(gauges, uptime=9))
    assert value(families, "wstunnel_requests_total", status="200") == 2
    assert value(families, "wstunnel_requests_total", status="504") == 1
    assert value(families, "wstunnel_request_bytes_total") == 17
    assert value(families, "wstunnel_response_bytes_total") == 120
    assert value(families, "wstunnel_tunnels") == 2
    assert value(families, "wstunnel_clients", transport="websocket") == 2
    assert value(families, "wstunnel_clients", transport="longpoll") == 1
    assert value(families, "wstunnel_queue_depth") == 4
    bucket = "wstunnel_request_duration_seconds_bucket"
    assert value(families, bucket, le="0.005") == 1
    assert value(families, bucket, le="0.25") == 1
    assert value(families, bucket, le="0.5") == 2  # le means "less than or equal"
    assert value(families, bucket, le="60.0") == 2
    assert value(families, bucket, le="+Inf") == 3
    assert value(families, "wstunnel_request_duration_seconds_count") == 3
    assert value(families, "wstunnel_request_duration_seconds_sum") == pytest.approx(1200.503)


def test_aborted_streams_are_counted_by_direction_and_reason() -> None:
    metrics = Metrics("1.0")
    metrics.aborted("response", Cause.TUNNEL_LOST)
    metrics.aborted("response", Cause.TUNNEL_LOST)
    metrics.aborted("request", Cause.CLIENT_GONE)
    families = parse(metrics.render(Gauges(0, 0, 0, 0), uptime=0))
    assert families["wstunnel_streams_aborted_total"].kind == "counter"
    name = "wstunnel_streams_aborted_total"
    assert value(families, name, direction="response", reason="tunnel_lost") == 2
    assert value(families, name, direction="request", reason="client_gone") == 1
    # What the process holds, for leak hunting (Linux: /proc).
    assert value(families, "process_open_fds") > 0
    assert value(families, "process_resident_memory_bytes") > 1024 * 1024
    assert value(families, "wstunnel_python_allocated_blocks") > 10_000


def test_label_values_are_escaped() -> None:
    text = Metrics('1.0 "odd"\\\nbuild').render(Gauges(0, 0, 0, 0), uptime=0)
    assert value(parse(text), "wstunnel_build_info", version='1.0 "odd"\\\nbuild') == 1


def test_histogram_refuses_unsorted_bounds() -> None:
    with pytest.raises(ValueError, match="ascending"):
        Histogram([1.0, 0.5])
    with pytest.raises(ValueError, match="finite"):
        Histogram([1.0, math.inf])


async def test_gauges_come_from_the_registry_and_name_no_token() -> None:
    registry = Registry(alarms=Alarms(), max_requests=5, token_idle_timeout=60)
    secret = "s3cr3t-token-value-0123456789"
    registry.register(Token(secret))
    gauges = Gauges.of(registry)
    assert gauges == Gauges(tunnels=1, clients=0, queue_depth=0, pending=0,
                            clients_by_transport=(("longpoll", 0), ("websocket", 0)))
    text = Metrics("1.0").render(gauges, uptime=0)
    assert secret[:8] not in text


# -- a real server -----------------------------------------------------------------------------


def scrape(server: Server, **headers: str) -> httpx.Response:
    return httpx.get(f"{server.url}/_metrics", headers=headers, timeout=10)


def test_counts_move_after_requests(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token)
    before = scrape(server)
    assert before.status_code == 200
    assert before.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    start = parse(before.text)
    assert value(start, "wstunnel_tunnels") == 1
    # One series per transport, both always there; the harness's client uses the WebSocket
    # unless WSTUNNEL_TEST_TRANSPORT says long-poll.
    transport = harness.transport or "websocket"
    other = "websocket" if transport == "longpoll" else "longpoll"
    assert value(start, "wstunnel_clients", transport=transport) == 1
    assert ("wstunnel_clients", (("transport", other),)) in start["wstunnel_clients"].samples
    assert value(start, "wstunnel_clients", transport=other) == 0

    for _ in range(3):
        assert server.get("/bytes?size=1000", token).status_code == 200
    assert server.get("/echo", token, method="POST", content=b"x" * 500).status_code == 200
    assert server.get("/status/418", token).status_code == 418
    assert server.get("/slow?secs=0.3", token).status_code == 200
    assert server.get("/", harness.new_token()).status_code == 404

    after = scrape(server)
    end = parse(after.text)

    def delta(name: str, **labels: str) -> float:
        return value(end, name, **labels) - value(start, name, **labels)

    assert delta("wstunnel_requests_total", status="200") == 5
    assert delta("wstunnel_requests_total", status="418") == 1
    assert delta("wstunnel_requests_total", status="404") == 1
    assert delta("wstunnel_request_bytes_total") == 500
    assert delta("wstunnel_response_bytes_total") >= 3000 + 500
    requests = sum(n for (name, _), n in end["wstunnel_requests_total"].samples.items())
    assert value(end, "wstunnel_request_duration_seconds_count") == requests == 7
    assert value(end, "wstunnel_request_duration_seconds_bucket", le="+Inf") == requests
    # The slow request took 0.3 s or more: it is above the 0.25 s bucket.
    assert value(end, "wstunnel_request_duration_seconds_bucket", le="0.25") <= requests - 1
    assert value(end, "wstunnel_request_duration_seconds_sum") >= 0.3
    assert value(end, "wstunnel_queue_depth") == 0
    assert token[:8] not in after.text


def _collected(server: Server) -> float:
    """Objects the server's cycle collector has found unreachable so far."""
    families = parse(scrape(server).text)
    return sum(families["python_gc_objects_collected_total"].samples.values())


def test_tunnelled_requests_leave_no_cyclic_garbage(harness: Harness) -> None:
    """Each request's objects are freed as it ends, not left in reference cycles for the
    collector (a stream that kept its request once answered made ~30 objects of garbage a
    request, 4 % of the server's CPU under load)."""
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token)

    with httpx.Client(base_url=server.url, headers={"X-Token": token}, timeout=30) as http:
        assert http.get("/bytes?size=1000").status_code == 200  # connections and pools made
        before = _collected(server)
        for _ in range(400):
            assert http.get("/bytes?size=1000").status_code == 200
    assert _collected(server) - before < 400  # 15,673 with that cycle


def test_connections_leave_no_cyclic_garbage(harness: Harness) -> None:
    """Each HTTP connection's objects (its socket, h11 state and last request) are freed as it
    closes: its respond() closure held the connection, which held respond(), ~28 objects of
    garbage a connection for the collector."""
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token)

    def one_connection() -> None:
        with httpx.Client(base_url=server.url, headers={"X-Token": token}, timeout=30) as http:
            assert http.get("/bytes?size=1000").status_code == 200

    one_connection()
    before = _collected(server)
    for _ in range(200):
        one_connection()
    assert _collected(server) - before < 200  # 5,701 with that cycle


def test_only_loopback_and_trusted_proxies_get_metrics(harness: Harness) -> None:
    server = harness.server("-trusted-proxies", "127.0.0.1")
    refused = scrape(server, **{"X-Forwarded-For": "10.1.2.3"})
    assert refused.status_code == 403
    assert "wstunnel_" not in refused.text
    assert scrape(server, **{"X-Forwarded-For": "127.0.0.1"}).status_code == 200
    assert scrape(server).status_code == 200  # the trusted proxy itself, or a loopback peer

    # Without trusted proxies, X-Forwarded-For is not believed: a loopback peer is a loopback peer.
    plain = harness.server()
    assert scrape(plain, **{"X-Forwarded-For": "10.1.2.3"}).status_code == 200
