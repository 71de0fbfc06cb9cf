#!/usr/bin/env python3
"""Does ``http2`` on nginx's TLS listener help a browser that loads many assets through a tunnel?

    .venv/bin/python scripts/nginx_http2.py [--runs 5] [--assets 50] [--rtt-ms 0,40]

Chromium (headless, a fresh profile each load: cold connections, empty cache) loads a page of
``--assets`` small assets (a stylesheet, scripts, images; about 8 KiB each) from the test backend
through nginx -> wstunnel srv -> wstunnel cli -> backend, once with the shipped site file's TLS
listener as ``listen 443 ssl;`` and once as ``listen 443 ssl http2;``, alternating, ``--runs``
times each. For each ``--rtt-ms`` value, the browser's link to nginx and the tunnel's link (cli to
srv) each get that round-trip time from a delaying relay (tests/support/delay_relay.py), as
across the internet. WebSockets are not involved: the page's assets are plain GETs.

Prints, per round-trip time and listener, the page's load time (Navigation Timing's
``loadEventEnd``: from the start of navigation to the end of the load event) as median and range,
and the protocol the browser used. Everything runs on
127.0.0.1 and is stopped at the end. A measurement, not a test: on a busy machine, look at the
spread before trusting a difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support: the same real-process helpers as the tests

from tests.support.browser import chromium  # noqa: E402
from tests.support.harness import PYTHON, SUPPORT, Harness, free_port, wait_until  # noqa: E402
from tests.support.nginx_frontend import (  # noqa: E402
    SHIPPED_UPSTREAM,
    SITE,
    TRUST_NGINX,
    issue_certificates,
    start_nginx,
)

LISTENERS = {"http/1.1": "listen 443 ssl;", "h2": "listen 443 ssl http2;"}


def relay(harness: Harness, target: int, rtt_ms: float) -> int:
    """A delaying relay to 127.0.0.1:``target``; returns its port."""
    port = free_port()
    process = harness.start("relay", [PYTHON, str(SUPPORT / "delay_relay.py"), str(port), str(target),
                                      str(rtt_ms / 2)])
    wait_until(lambda: "relaying" in process.output(), what="the relay to listen")
    return port


def site_variant(directory: Path, listener: str) -> Path:
    """The shipped site file with its TLS listeners as ``listener`` says."""
    text = SITE.read_text()
    for shipped in ("listen 443 ssl http2;", "listen 443 ssl;"):
        if shipped in text:
            text = text.replace(shipped, listener).replace(
                shipped.replace("443", "[::]:443"), listener.replace("443", "[::]:443"))
            break
    path = directory / f"site-{listener.split()[-1].strip(';')}.conf"
    path.write_text(text)
    return path


def load(directory: Path, certs_pem: Path, url: str) -> dict[str, Any]:
    with chromium(directory, trust=[certs_pem]) as browser:
        browser.get(url)
        timing = wait_until(lambda: browser.execute_script("""
            const nav = performance.getEntriesByType("navigation")[0];
            if (!nav || nav.loadEventEnd <= 0) return null;
            const resources = performance.getEntriesByType("resource");
            return {load_ms: nav.loadEventEnd, protocol: nav.nextHopProtocol,
                    assets: resources.length,
                    protocols: [...new Set(resources.map(r => r.nextHopProtocol))]};
        """), timeout=120, what="the page's load event")
    return timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--assets", type=int, default=50)
    parser.add_argument("--rtt-ms", default="0,40", help="round-trip times to try, comma-separated")
    args = parser.parse_args()
    rtts = [float(x) for x in args.rtt_ms.split(",")]

    with tempfile.TemporaryDirectory(prefix="nginx-http2-") as tmp:
        directory = Path(tmp)
        harness = Harness(directory)
        try:
            certs = issue_certificates(directory)
            harness.backend()
            server = harness.server(*TRUST_NGINX)
            results: dict[tuple[float, str], list[dict[str, Any]]] = {}
            for rtt in rtts:
                token = harness.new_token("h2bench-")
                tunnel = relay(harness, server.port, rtt)
                harness.client(f"ws://127.0.0.1:{tunnel}", token, wait=False)
                server.wait_clients(token, 1)
                fronts = {}
                for name, listener in LISTENERS.items():
                    nginx = start_nginx(harness, directory / f"nginx-{name}-{rtt:g}",
                                        site_variant(directory, listener), certs,
                                        [(SHIPPED_UPSTREAM, f"server 127.0.0.1:{server.port};")])
                    fronts[name] = (nginx, relay(harness, nginx.tls_port, rtt))
                for run in range(args.runs):
                    order = list(LISTENERS) if run % 2 == 0 else list(reversed(LISTENERS))
                    for name in order:
                        port = fronts[name][1]
                        url = f"https://localhost:{port}/_token/{token}/app/many?n={args.assets}"
                        started = time.monotonic()
                        timing = load(directory / f"browser-{name}-{rtt:g}-{run}", certs.cert_pem, url)
                        timing["wall_s"] = time.monotonic() - started
                        results.setdefault((rtt, name), []).append(timing)
                        print(f"rtt {rtt:g} ms, {name}, run {run + 1}: {timing['load_ms']:.0f} ms "
                              f"({timing['assets']} assets over {', '.join(timing['protocols'])})",
                              flush=True)
        finally:
            harness.close()

    print(f"\npage of {args.assets} assets, {args.runs} cold loads each; load time in ms "
          "(median, min-max)")
    print(f"{'RTT':>7}  {'listener':<9} {'median':>7} {'range':>12}  protocol")
    for (rtt, name), timings in results.items():
        loads = [t["load_ms"] for t in timings]
        print(f"{rtt:>5g}ms  {name:<9} {statistics.median(loads):>7.0f} "
              f"{min(loads):>5.0f}-{max(loads):<6.0f}  {timings[0]['protocol']}")
    for rtt in rtts:
        h1 = statistics.median(t["load_ms"] for t in results[(rtt, "http/1.1")])
        h2 = statistics.median(t["load_ms"] for t in results[(rtt, "h2")])
        print(f"rtt {rtt:g} ms: h2 / http/1.1 = {h2 / h1:.2f}")


if __name__ == "__main__":
    main()
