"""The modules that the build compiles to C with mypyc, and which of them run compiled here.

Every request crosses these: the server front's HTTP reader and writer, the client's backend
request writer and response-head reader, the HTTP/1.1 grammar, field parsing and head writing,
header handling, the WebSocket frame codec, the v2 stream protocol (frames, heads, streams and the
connection's state) and the text of log lines. They are synchronous, sans-I/O code, so compiled
they run the same logic with the interpreter's dispatch taken out. Paired runs (1 KiB GETs
through srv and cli, nginx backend) when the first eight were compiled: srv's CPU per request at
32 connections 161-172 µs -> 146-149 µs, cli's 141-152 -> 132-134, and 5,437-5,797 ->
6,254-6,380 req/s; at one connection +1-3 %. The client's wire module and head writers later
took cli from 120-127 to 114-120 µs per request at 32 connections.

The coroutines on the request path stay interpreted: compiled as well, they gave +23 % at 32
connections but -12 % at one, where every request resumes each await chain from the top; no
group of them (sockets and WebSocket, endpoint and outbox, front, tunnels and rendezvous) gained
at one connection on top of the modules below. Measured again once writes skipped the scheduler
(0328dae): compiling every module of srv's and cli's request path as well (front, forwarding,
rendezvous, both tunnel ends, endpoint, outbox, WebSocket, sockets, body queues, the client's
session and origin: 16 modules, coroutines and all) lost at both loads: 0.96x the req/s at one
connection (paired, 14 rounds, ahead in 1) and 0.94x at 32 (8 rounds, ahead in 2).

The same sources stay importable uncompiled: ``setup.py`` builds them unless
``WSTUNNEL_PURE_PYTHON=1``, and Python imports a module's compiled form first when it is there.
This file is read by ``setup.py`` before the package exists, so it imports nothing of ours.
"""

from __future__ import annotations

import importlib.machinery
import sys

COMPILED_MODULES: tuple[str, ...] = (
    "wstunnel.client.wire",
    "wstunnel.headers",
    "wstunnel.http1._grammar",
    "wstunnel.http1._readers",
    "wstunnel.http1._writers",
    "wstunnel.logtext",
    "wstunnel.server.fasthttp",
    "wstunnel.tunnel._wsframes",
    "wstunnel.v2._connection",
    "wstunnel.v2._frames",
    "wstunnel.v2._heads",
    "wstunnel.v2._state",
)


def source_path(module: str) -> str:
    """``wstunnel/v2/_heads.py`` for ``wstunnel.v2._heads``: relative to the project's root."""
    return module.replace(".", "/") + ".py"


def is_compiled(module: str) -> bool:
    """Whether ``module`` (imported already) runs from its compiled extension."""
    path = getattr(sys.modules[module], "__file__", None) or ""
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def interpreted() -> list[str]:
    """The modules of COMPILED_MODULES that run from their Python source (imports them all)."""
    for module in COMPILED_MODULES:
        __import__(module)
    return [module for module in COMPILED_MODULES if not is_compiled(module)]
