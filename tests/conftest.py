from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import netns
from tests.support.debpkg import SharedBuild
from tests.support.harness import ROOT, Harness
from wstunnel import compiled


def pytest_sessionstart(session: pytest.Session) -> None:
    # Python imports a module's compiled extension before its source: after an edit, the tests
    # would run the old code without a word. scripts/setup (scripts/test runs it) rebuilds.
    stale = []
    for module in compiled.COMPILED_MODULES:
        source = ROOT / compiled.source_path(module)
        extensions = source.parent.glob(source.stem + ".*.so")
        if any(extension.stat().st_mtime < source.stat().st_mtime for extension in extensions):
            stale.append(module)
    if stale:
        pytest.exit(f"compiled modules older than their sources: {', '.join(stale)}; "
                    "run scripts/setup to rebuild them", returncode=2)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "both_transports: run once with the clients' default transport (the WebSocket) "
                   "and once more with every client on HTTPS long-poll")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("both_transports") is not None:
        metafunc.parametrize("transport", [None, "longpoll"], ids=["websocket", "longpoll"])


@pytest.fixture
def transport() -> str | None:
    """The transport the harness gives clients that name none; None: the harness's default."""
    return None


@pytest.fixture
def harness(tmp_path: Path, transport: str | None) -> Iterator[Harness]:
    """Processes for one test; all stopped at the end, and their logs searched for tokens."""
    h = Harness(tmp_path)
    if transport is not None:
        h.transport = transport
    try:
        yield h
    finally:
        h.close()
    leaks = h.leaked_tokens()
    assert not leaks, f"whole tokens in logs: {leaks}"


@pytest.fixture
def namespace() -> Iterator[netns.Netns]:
    """A network namespace joined to this host by a veth pair: an address that is not loopback,
    on this host's side (10.213.N.1) and on the far side (10.213.N.2); skips where namespaces
    cannot be made (netns.unavailable says why)."""
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(reason)
    space = netns.Netns.for_this_process()
    try:
        space.create()
        yield space
    finally:
        space.remove()


@pytest.fixture(scope="session")
def checkout_debs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedBuild]:
    """This checkout's packages (scripts/build-deb, lintian included), built once per run for
    the modules that install them (``.start()``, then ``.debs()`` waits for them)."""
    shared = SharedBuild(tmp_path_factory.mktemp("checkout-debs") / "debs")
    try:
        yield shared
    finally:
        shared.stop()
