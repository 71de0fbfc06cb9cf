"""Run a wstunnel server and client on loopback and send one request through the tunnel."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return
        time.sleep(0.1)
    raise SystemExit(f"demo: {what} did not come up within {timeout:g}s")


@contextlib.contextmanager
def started(name: str, argv: list[str], env: dict[str, str] | None = None) -> Iterator[None]:
    print(f"$ {' '.join(argv[2:] if argv[:2] == [PYTHON, '-m'] else argv)}", flush=True)
    process = subprocess.Popen(argv, env=env)
    try:
        yield
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    token = secrets.token_urlsafe(24)
    server_port, backend_port = free_port(), free_port()
    tunnel_server = f"http://127.0.0.1:{server_port}"
    with tempfile.TemporaryDirectory() as site:
        Path(site, "index.html").write_text("Hello from the web server behind the tunnel!\n")
        backend = [PYTHON, "-m", "http.server", str(backend_port), "--bind", "127.0.0.1",
                   "--directory", site]
        server = [PYTHON, "-m", "wstunnel", "srv", "-host", "127.0.0.1", "-port", str(server_port)]
        client = [PYTHON, "-m", "wstunnel", "cli", "-tunnel", f"ws://127.0.0.1:{server_port}",
                  "-server", f"http://127.0.0.1:{backend_port}"]
        # The token goes in the environment, not on the command line, so ps never shows it.
        client_env = dict(os.environ, WSTUNCLI_TOKEN=token)
        with (
            started("backend", backend),
            started("server", server),
            started("client", client, client_env),
        ):
            wait_for("the server", lambda: httpx.get(f"{tunnel_server}/_health_check").is_success)
            wait_for("the tunnel", lambda: "_clients=1" in httpx.get(f"{tunnel_server}/_stats").text)
            print(f"$ curl -H 'X-Token: {token[:8]}...' {tunnel_server}/", flush=True)
            response = httpx.get(f"{tunnel_server}/", headers={"X-Token": token})
            print(f"HTTP {response.status_code} {response.reason_phrase}")
            print(response.text, end="", flush=True)
            return 0 if response.status_code == 200 else 1


if __name__ == "__main__":
    raise SystemExit(main())
