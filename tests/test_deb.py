"""The Debian packages, tested for real: each role alone, both, the upgrade from 0.1.0, purge.

``scripts/build-deb`` builds this checkout's three packages (``wstunnel``: the program, starts
nothing; ``wstunnel-server``: wstunsrv; ``wstunnel-client``: wstuncli@NAME) and, from the frozen
debian/ tree of release 0.1.0 (tests/data/debian-0.1.0), the single ``wstunnel`` package that
0.1.0 machines have: one package with both daemons that starts wstunsrv wherever it goes. (Its
Python code is this checkout's; what the upgrade tests is the packaging.)

Three throwaway Debian 12 containers with a real systemd (tests/support/systemd_container.py),
each with a local apt repository so that apt resolves the packages as on a real machine:

- ``server`` and ``client``, each in a network namespace of its own, joined by a veth pair
  (10.214.0.1 and 10.214.0.2): the server package alone, the client package alone tunnelling to
  it, then both packages on the server machine; then remove and purge of each; then, on clean
  machines, 0.1.0 upgraded the ways README names besides the one below;
- ``upgrade``: 0.1.0 with an edited wstunsrv.toml and a running client, upgraded to the split
  packages the way the README says, then to a later build of them, then purged.

One test per step, in file order; a step whose predecessor failed is skipped. Nothing of the
checkout is bound into the containers: the packages bring everything. Like the other container
tests these need root and a working systemd-nspawn; elsewhere they are skipped with the reason;
with WSTUNNEL_REQUIRE_CONTAINER_TESTS set that reason fails them instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.debpkg import (
    OLD_DEBIAN,
    PACKAGES,
    Box,
    Build,
    Listener,
    SharedBuild,
    changelog_version,
    repack,
)
from tests.support.harness import wait_until
from tests.support.systemd_container import Unavailable, booted, linked_networks, preflight
from wstunnel import __version__
from wstunnel.completion import script

SRV = "wstunsrv.service"
SRV_CONFIG = "/etc/wstunnel/wstunsrv.toml"
CLI_DIR = "/etc/wstunnel/wstuncli.d"
SAMPLE = f"{CLI_DIR}/example.toml.sample"
COMPLETION = "/usr/share/bash-completion/completions/wstunnel"
BACKEND_PORT = 9000
LOCAL_EDIT = "max_requests_per_tunnel = 7  # local edit, kept across upgrades"
HEALTHY = "WSTUNSRV RUNNING\n"
OLD = changelog_version(OLD_DEBIAN)  # 0.1.0: one package, both daemons


def _unavailable(reason: str) -> None:
    print(f"Debian package tests cannot run: {reason}", file=sys.stderr)
    if os.environ.get("WSTUNNEL_REQUIRE_CONTAINER_TESTS"):
        pytest.fail(f"Debian package tests must run here: {reason}")
    pytest.skip(f"systemd container unavailable: {reason}")


@dataclass
class Tunnel:
    """A client made with ``wstunnel token new`` and the curl line it printed."""

    name: str
    token: str
    curl: list[str]
    page: str

    @property
    def unit(self) -> str:
        return f"wstuncli@{self.name}.service"


@dataclass
class World:
    server: Box
    client: Box
    upgrade: Box
    debs: dict[str, Path]  # this checkout's packages
    version: str  # theirs
    build_log: str
    server_address: str  # the server machine's address, as the client machine reaches it
    work: Path
    tunnels: dict[str, Tunnel]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, checkout_debs: SharedBuild) -> Iterator[World]:
    reason = preflight()
    if not reason and shutil.which("dpkg-scanpackages") is None:
        reason = "no dpkg-scanpackages (dpkg-dev): scripts/setup installs it"
    if reason:
        _unavailable(reason)
    work = tmp_path_factory.mktemp("deb")
    started = time.monotonic()
    # Both builds run while the containers boot.
    builds = [checkout_debs.start(), Build(work / "old", debian=OLD_DEBIAN, lintian=False)]
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"
    try:
        with contextlib.ExitStack() as stack:
            link = stack.enter_context(linked_networks())
            boxes = [Box(stack.enter_context(booted(f"wst-{role}-{tag}", network=network)))
                     for role, network in (("server", link.namespaces[0]),
                                           ("client", link.namespaces[1]), ("upgrade", None))]
            for box in boxes:
                box.before = box.files()
            debs, old = builds[0].debs(), builds[1].debs()
            assert sorted(old) == ["wstunnel"], sorted(old)
            for box in boxes:
                box.publish(*debs.values(), old["wstunnel"])
            setup = World(*boxes, debs=debs, version=builds[0].version, build_log=builds[0].log(),
                          server_address=link.addresses[0], work=work, tunnels={})
            yield setup
            for box in boxes:
                notes = [*box.c.notes, *box.timings, *(f"{k}: {v}" for k, v in box.notes.items())]
                print(f"\nDebian package container {box.c.name}: {'; '.join(notes)}", file=sys.stderr)
            print(f"Debian package tests: {time.monotonic() - started:.0f}s in all", file=sys.stderr)
    except Unavailable as exc:
        _unavailable(str(exc))
    finally:
        builds[1].stop()  # this checkout's build is the session's (tests/conftest.py)


def _new_tunnel(box: Box, name: str, server: str) -> Tunnel:
    """``wstunnel token new`` on ``box`` for its backend, then the two commands it prints."""
    page = f"hello from {name} {secrets.token_hex(8)}\n"
    box.start_backend(page, BACKEND_PORT)
    out = box.c.run("wstunnel", "token", "new", name, "--tunnel", f"ws://{server}:8080",
                    "--server", f"http://127.0.0.1:{BACKEND_PORT}").stdout
    curl_lines = [line.strip() for line in out.splitlines() if line.strip().startswith("curl ")]
    assert len(curl_lines) == 1, out
    curl = shlex.split(curl_lines[0])
    token = curl[curl.index("-H") + 1].removeprefix("X-Token: ")
    assert curl[-1] == f"http://{server}:8080/", curl
    assert box.stat(f"{CLI_DIR}/{name}.toml") == "root:wstunnel 640"
    for command in (f"systemctl start wstuncli@{name}", f"systemctl enable wstuncli@{name}"):
        assert command in out, out
        box.c.run(*shlex.split(command))
    tunnel = Tunnel(name, token, [*curl[:-1], curl[-1] + "hello.txt"], page)
    _wait_for_tunnel(box, tunnel, f"the first request through wstuncli@{name}")
    return tunnel


def _wait_for_tunnel(box: Box, tunnel: Tunnel, what: str) -> None:
    """The tunnel answers the curl line, run on ``box``."""
    started = time.monotonic()
    wait_until(lambda: box.curl(tunnel.curl) == tunnel.page, timeout=90, what=what)
    box.timings.append(f"{what}: {time.monotonic() - started:.1f}s")


def _ours(box: Box, listener: Listener) -> bool:
    account = box.account()
    return "wstunnel" in listener.command or (account is not None and listener.user == account[0])


def _restarted(box: Box, unit: str, before: str) -> dict[str, str]:
    state = wait_until(lambda: box.active(unit), timeout=60, what=f"{unit} to run")
    assert state["MainPID"] != before, f"{unit} was not restarted (still PID {before})"
    return state


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()  # what dpkg records for a conffile


def _dangling_unit_links(box: Box) -> str:
    return box.c.sh("find /etc/systemd/system -xtype l -name '*wstun*'", check=False).strip()


def _assert_nothing_left(box: Box, uid_gid: tuple[str, str]) -> None:
    for package in PACKAGES:
        assert box.status(package) == "not installed", f"{package}: {box.status(package)}"
    assert box.account() is None, "the wstunnel account is still there"
    accounts = box.c.run("grep", "-l", "^wstunnel:", "/etc/passwd", "/etc/group", "/etc/shadow",
                         "/etc/gshadow", "/etc/subuid", "/etc/subgid", check=False).stdout
    assert accounts == "", f"the wstunnel account is still in {accounts.split()}"
    assert box.owned_by(*uid_gid) == "", "files of the removed account are left"
    units = box.c.sh("find /etc/systemd /lib/systemd /usr/lib/systemd /run/systemd "
                     "-name '*wstun*'", check=False)
    assert units == "", f"unit files or links left: {units}"
    states = box.c.sh("find /var/lib/systemd/deb-systemd-helper-enabled "
                      "/var/lib/systemd/deb-systemd-helper-masked -name '*wstun*'", check=False)
    assert states == "", f"deb-systemd-helper still remembers: {states}"
    box.c.systemctl("daemon-reload")
    assert box.state(SRV)["LoadState"] == "not-found"
    assert box.left_behind() == [], f"left behind after purge: {box.left_behind()}"


# --- The packages as built ------------------------------------------------------------------


def _contents(deb: Path) -> list[str]:
    listing = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                             timeout=120, check=True).stdout
    names = subprocess.run(["tar", "-t"], input=listing, capture_output=True, timeout=120,
                           check=True).stdout.decode().split()
    return [name.removeprefix(".") for name in names]


def _conffiles(deb: Path) -> list[str]:
    result = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True,
                            timeout=60, check=True).stdout
    text = subprocess.run(["tar", "-xO", "./conffiles"], input=result, capture_output=True,
                          timeout=60, check=False).stdout.decode()
    return text.split()


def test_three_packages_each_with_its_role_and_lintian_clean(world: World) -> None:
    debs = world.debs
    assert sorted(debs) == sorted(PACKAGES)
    assert "build-deb: lintian: no errors, no warnings" in world.build_log, world.build_log[-3000:]
    runtime, server, client = (_contents(debs[name]) for name in PACKAGES)
    assert {"/usr/bin/wstunnel", "/usr/lib/wstunnel/bin/wstunnel", COMPLETION,
            "/usr/share/man/man1/wstunnel.1.gz"} <= set(runtime)
    assert [name for name in runtime if "systemd" in name and "site-packages" not in name] == []
    assert [name for name in runtime if name.startswith("/etc/") and not name.endswith("/")] == []
    assert {"/lib/systemd/system/wstunsrv.service", "/lib/systemd/system/wstunsrv@.service",
            SRV_CONFIG, "/usr/share/doc/wstunnel-server/examples/wstunnel.conf",
            "/usr/share/doc/wstunnel-server/examples/wstunnel-cluster.conf"} <= set(server)
    assert "/lib/systemd/system/wstuncli@.service" not in server
    assert {"/lib/systemd/system/wstuncli@.service", SAMPLE} <= set(client)
    assert [name for name in client if "wstunsrv" in name] == []
    assert [_conffiles(debs[name]) for name in PACKAGES] == [[], [SRV_CONFIG], [SAMPLE]]
    sizes = ", ".join(f"{path.name} {path.stat().st_size / 1024:.0f} KiB" for path in debs.values())
    print(f"\nbuilt: {sizes}", file=sys.stderr)


# --- Each role alone, then both -----------------------------------------------------------------


def test_server_package_alone(world: World) -> None:
    box = world.server
    with box.step("server-alone"):
        box.apt("install", "wstunnel-server")
        assert [box.status(name) for name in PACKAGES] == [f"ii {world.version}"] * 2 + ["not installed"]
        state = wait_until(lambda: box.active(SRV), timeout=60, what=f"{SRV} after install")
        assert box.is_enabled(SRV) == "enabled"
        assert box.c.curl("http://127.0.0.1:8080/_health_check") == HEALTHY
        assert box.c.curl(f"http://{world.server_address}:8080/_health_check") == HEALTHY
        assert box.c.run("/usr/bin/wstunnel", "version").stdout.strip() == __version__
        # The package runs the request path compiled (wstunnel/compiled.py), and mypyc's output
        # needs nothing at run time that the package does not carry: no build tool came along.
        compiled = box.c.run("/usr/lib/wstunnel/bin/python", "-c", "\n".join([
            "import importlib.util", "from wstunnel import compiled",
            "print(compiled.interpreted(), importlib.util.find_spec('mypy'))"]))
        assert compiled.stdout.strip() == "[] None", compiled.stdout
        # The daemon runs the package's own environment, as the package's user.
        assert box.c.read(f"/proc/{state['MainPID']}/cmdline").split("\0")[0] == \
            "/usr/lib/wstunnel/bin/python"
        account = box.account()
        assert account is not None
        listening = box.listeners()
        assert [(lst.address, lst.pid) for lst in listening] == [("0.0.0.0:8080", int(state["MainPID"]))]
        assert listening[0].user == account[0]
        # No client: no unit file, nothing enabled, no client directory.
        unit_files = box.c.systemctl("list-unit-files", "--no-legend", "wstuncli*", check=False)
        assert unit_files.stdout.strip() == "", unit_files.stdout
        assert box.c.sh("ls /etc/systemd/system/*.wants | grep wstuncli || true").strip() == ""
        assert not box.exists(CLI_DIR)
        assert box.verify(*PACKAGES[:2]) == []


def test_client_package_alone_tunnels_to_the_server(world: World) -> None:
    box = world.client
    with box.step("client-alone"):
        if "server-alone" not in world.server.done:
            pytest.skip("needs the server machine (test_server_package_alone did not pass)")
        box.apt("install", "wstunnel-client")
        assert [box.status(name) for name in PACKAGES] == [
            f"ii {world.version}", "not installed", f"ii {world.version}"]
        # Installed, nothing runs and nothing listens: no server, no client until a token file.
        assert box.listeners() == [], box.c.run("ss", "-ltnp").stdout
        units = box.c.systemctl("list-units", "--no-legend", "--all", "wstun*", check=False)
        assert units.stdout.strip() == "", units.stdout
        assert box.state(SRV)["LoadState"] == "not-found"
        assert box.stat(CLI_DIR) == "root:wstunnel 750"

        tunnel = _new_tunnel(box, "demo", world.server_address)
        world.tunnels["client"] = tunnel
        assert box.is_enabled(tunnel.unit) == "enabled"
        # The token reaches the server machine only through its tunnel; asked there, it answers.
        assert world.server.curl([*tunnel.curl[:-1], "http://127.0.0.1:8080/hello.txt"]) == tunnel.page
        status = world.server.c.run("wstunnel", "status").stdout
        assert re.search(rf"^{re.escape(tunnel.token[:8])}\.\.\.\s+1\s", status, re.MULTILINE), status
        # Tunnelling, the client machine still listens on nothing of ours: only the backend.
        listening = box.listeners()
        assert [lst.address for lst in listening] == [f"127.0.0.1:{BACKEND_PORT}"], listening
        assert not any(_ours(box, lst) for lst in listening), listening
        assert box.verify(PACKAGES[0], PACKAGES[2]) == []


def test_completion_is_found_by_bash_completion(world: World) -> None:
    box = world.client
    with box.step("completion", "client-alone"):
        assert box.c.read(COMPLETION) == script(), "the package's completion is not this checkout's"
        # What bash does on the first Tab after "wstunnel": bash-completion's loader finds the
        # file by the command's name, then calls the function it registered.
        program = ('. /usr/share/bash-completion/bash_completion\n'
                   '_completion_loader wstunnel\n'
                   'complete -p wstunnel\n'
                   'COMP_WORDS=(wstunnel token new demo --tu); COMP_CWORD=4\n'
                   '_wstunnel; echo "offered: ${COMPREPLY[*]}"\n')
        out = box.c.run("bash", "--norc", "-c", program).stdout
        assert "complete -F _wstunnel wstunnel" in out, out
        assert "offered: --tunnel" in out, out


def test_both_packages_on_one_machine(world: World) -> None:
    box = world.server
    with box.step("both", "server-alone"):
        pid = box.state(SRV)["MainPID"]
        box.apt("install", "wstunnel-client")
        assert all(box.status(name).startswith("ii ") for name in PACKAGES)
        assert box.state(SRV)["MainPID"] == pid, "installing the client restarted the server"
        tunnel = _new_tunnel(box, "local", "127.0.0.1")
        world.tunnels["server"] = tunnel
        # One server, now with two tunnels: the other machine's is still there.
        if "client" in world.tunnels:
            _wait_for_tunnel(world.client, world.tunnels["client"], "the client machine's tunnel")
        listening = box.listeners()
        assert sorted(lst.address for lst in listening) == [
            "0.0.0.0:8080", f"127.0.0.1:{BACKEND_PORT}"], listening
        assert [lst.pid for lst in listening if lst.address == "0.0.0.0:8080"] == [int(pid)]


def test_console_as_packaged_keeps_a_block_in_the_state_directory(world: World) -> None:
    box = world.server
    with box.step("console", "both"):
        tunnel = world.tunnels["server"]
        admin = "http://127.0.0.1:8080/_admin/"
        assert "<title>wstunnel console</title>" in box.curl(["curl", admin])  # from the package
        document = json.loads(box.curl(["curl", admin + "api/state"]))
        [entry] = [t for t in document["tunnels"] if t["token"] == tunnel.token[:8] + "..."]
        post = ["curl", "-X", "POST", "-H", f"X-CSRF-Token: {document['csrf_token']}"]
        box.curl([*post, f"{admin}api/tunnels/{entry['id']}/block"])
        # Written under the hardened unit (ProtectSystem=strict) into its StateDirectory.
        assert box.stat("/var/lib/wstunnel") == "wstunnel:wstunnel 755"
        assert box.stat("/var/lib/wstunnel/wstunsrv-state.json") == "wstunnel:wstunnel 600"
        saved = box.c.read("/var/lib/wstunnel/wstunsrv-state.json")
        assert tunnel.token[:8] + "..." in saved and tunnel.token not in saved
        with pytest.raises(ValueError, match="403"):
            box.curl(tunnel.curl)
        box.curl([*post, f"{admin}api/tunnels/{entry['id']}/unblock"])
        _wait_for_tunnel(box, tunnel, "the unblocked tunnel")


# --- Upgrades -----------------------------------------------------------------------------------


def test_upgrade_from_the_single_0_1_0_package(world: World) -> None:
    box = world.upgrade
    with box.step("upgrade"):
        box.apt("install", f"wstunnel={OLD}")
        assert box.status("wstunnel") == f"ii {OLD}"
        wait_until(lambda: box.active(SRV), timeout=60, what=f"{SRV} of {OLD}")
        tunnel = _new_tunnel(box, "demo", "127.0.0.1")
        world.tunnels["upgrade"] = tunnel
        shipped = box.c.read(SRV_CONFIG)
        assert "# max_requests_per_tunnel = 20\n" in shipped
        edited = shipped.replace("# max_requests_per_tunnel = 20\n", LOCAL_EDIT + "\n")
        box.c.write(SRV_CONFIG, edited)
        box.c.systemctl("reload", SRV)
        sample = box.c.read(SAMPLE)
        demo = (box.c.read(f"{CLI_DIR}/demo.toml"), box.stat(f"{CLI_DIR}/demo.toml"))
        pids = {unit: box.state(unit)["MainPID"] for unit in (SRV, tunnel.unit)}
        account = box.account()

        # As README says: the roles this machine has, in one step (0.1.0 had both).
        out = box.apt("install", "wstunnel-server", "wstunnel-client")
        assert [box.status(name) for name in PACKAGES] == [f"ii {world.version}"] * 3
        assert "Configuration file" not in out, out  # no question asked, none needed

        # The edited file stays as edited, and dpkg still knows the shipped one it came from.
        assert box.c.read(SRV_CONFIG) == edited
        assert box.c.read(SAMPLE) == sample
        leftovers = box.c.sh("ls /etc/wstunnel /etc/wstunnel/wstuncli.d | grep -E 'dpkg-|ucf-' || true")
        assert leftovers.strip() == "", leftovers
        assert box.verify(*PACKAGES) == [f"??5?????? c {SRV_CONFIG}"]
        assert box.conffiles("wstunnel-server") == [f"{SRV_CONFIG} {_md5(shipped)}"]
        assert box.conffiles("wstunnel-client") == [f"{SAMPLE} {_md5(sample)}"]
        owners = {path: box.owner(path) for path in (
            SRV_CONFIG, "/lib/systemd/system/wstunsrv.service", "/lib/systemd/system/wstunsrv@.service",
            SAMPLE, "/lib/systemd/system/wstuncli@.service", "/usr/bin/wstunnel", CLI_DIR)}
        assert owners == {
            SRV_CONFIG: "wstunnel-server", "/lib/systemd/system/wstunsrv.service": "wstunnel-server",
            "/lib/systemd/system/wstunsrv@.service": "wstunnel-server", SAMPLE: "wstunnel-client",
            "/lib/systemd/system/wstuncli@.service": "wstunnel-client",
            "/usr/bin/wstunnel": "wstunnel", CLI_DIR: "wstunnel-client"}, owners
        # dpkg keeps the program's old record of the moved files, marked obsolete, until its next
        # upgrade; it never removes a file that another package owns now.
        assert box.conffiles("wstunnel") == [f"{SRV_CONFIG} {_md5(shipped)} obsolete",
                                             f"{SAMPLE} {_md5(sample)} obsolete"]

        # Each daemon runs on, restarted by the package that now owns its unit.
        for unit, pid in pids.items():
            _restarted(box, unit, pid)
        assert box.is_enabled(SRV) == "enabled"
        assert box.is_enabled(tunnel.unit) == "enabled"
        assert (box.c.read(f"{CLI_DIR}/demo.toml"), box.stat(f"{CLI_DIR}/demo.toml")) == demo
        assert box.account() == account
        assert _dangling_unit_links(box) == ""
        _wait_for_tunnel(box, tunnel, "the tunnel after the upgrade from 0.1.0")


def test_upgrade_to_a_later_build_restarts_what_each_package_owns(world: World) -> None:
    box = world.upgrade
    with box.step("upgrade-again", "upgrade"):
        tunnel = world.tunnels["upgrade"]
        version = f"{world.version}+test1"  # after it for dpkg
        later = repack(world.debs, version, world.work / "later")
        box.publish(*later.values())
        edited = box.c.read(SRV_CONFIG)
        pids = {unit: box.state(unit)["MainPID"] for unit in (SRV, tunnel.unit)}
        box.apt("upgrade")
        assert [box.status(name) for name in PACKAGES] == [f"ii {version}"] * 3
        for unit, pid in pids.items():
            _restarted(box, unit, pid)
        assert box.c.read(SRV_CONFIG) == edited
        assert box.verify(*PACKAGES) == [f"??5?????? c {SRV_CONFIG}"]
        assert box.conffiles("wstunnel") == [], "the obsolete records outlived an upgrade"
        _wait_for_tunnel(box, tunnel, "the tunnel after the second upgrade")


# --- Remove and purge -------------------------------------------------------------------------


def test_remove_and_purge_the_client_machine(world: World) -> None:
    box = world.client
    with box.step("purge-client", "client-alone"):
        tunnel = world.tunnels["client"]
        account = box.account()
        assert account is not None
        box.apt("remove", "wstunnel-client")
        assert box.status("wstunnel-client").startswith("rc ")
        assert box.state(tunnel.unit)["ActiveState"] == "inactive"
        assert not box.exists("/lib/systemd/system/wstuncli@.service")
        assert box.exists(f"{CLI_DIR}/{tunnel.name}.toml"), "remove took the token file"
        assert box.status("wstunnel").startswith("ii ")
        assert box.c.run("pgrep", "-u", "wstunnel", check=False).stdout == "", "daemons left"

        box.apt("purge", "wstunnel-client")
        assert not box.exists(CLI_DIR)
        assert _dangling_unit_links(box) == ""
        assert box.account() == account, "the program's account went with the client package"
        box.apt("purge", "--autoremove", "wstunnel")
        _assert_nothing_left(box, account)
        box.c.systemctl("stop", "wst-backend.service")  # the next step counts what listens


def test_client_machine_upgrade_from_0_1_0_stops_its_server(world: World) -> None:
    """The issue's machine: 0.1.0 started a server on a client machine; the client package ends it."""
    box = world.client
    with box.step("client-machine-upgrade", "purge-client"):
        box.apt("install", f"wstunnel={OLD}")
        wait_until(lambda: box.active(SRV), timeout=60, what=f"{SRV} of {OLD}")
        assert box.is_enabled(SRV) == "enabled"
        assert [lst.address for lst in box.listeners()] == ["0.0.0.0:8080"]
        account = box.account()
        assert account is not None

        out = box.apt("install", "wstunnel-client")
        assert "stopped and disabled wstunsrv" in out, out
        assert box.status("wstunnel-server") == "not installed"
        assert box.state(SRV)["ActiveState"] == "inactive"
        assert box.listeners() == [], box.c.run("ss", "-ltnp").stdout
        assert _dangling_unit_links(box) == ""
        box.c.systemctl("daemon-reload")
        assert box.state(SRV)["LoadState"] == "not-found"

        box.apt("purge", "wstunnel-client", "wstunnel")
        _assert_nothing_left(box, account)


def test_remove_and_purge_on_the_machine_with_both(world: World) -> None:
    box = world.server
    with box.step("purge-both", "both"):
        tunnel = world.tunnels["server"]
        account = box.account()
        assert account is not None
        box.apt("remove", "wstunnel-server")
        assert box.status("wstunnel-server").startswith("rc ")
        assert box.state(SRV)["ActiveState"] == "inactive"
        assert box.c.read(SRV_CONFIG)
        # The client is another package: it runs on (and waits for a server to come back).
        assert box.active(tunnel.unit)
        with pytest.raises(ValueError):
            box.c.curl("http://127.0.0.1:8080/_health_check")

        box.apt("purge", "wstunnel-server")
        assert not box.exists(SRV_CONFIG)
        assert box.exists(f"{CLI_DIR}/{tunnel.name}.toml")
        assert box.active(tunnel.unit)

        box.apt("remove", "wstunnel-client")
        assert box.state(tunnel.unit)["ActiveState"] == "inactive"
        # The program purged while the client's token files are kept: their group stays.
        box.apt("purge", "wstunnel")
        assert box.status("wstunnel-client").startswith("rc ")
        assert box.account() == account, "the group that may read the kept token files is gone"
        assert box.stat(f"{CLI_DIR}/{tunnel.name}.toml") == "root:wstunnel 640"
        box.apt("purge", "wstunnel-client")
        _assert_nothing_left(box, account)


def test_upgraded_alone_the_program_leaves_the_server_running_for_its_package(world: World) -> None:
    """``apt upgrade`` on a 0.1.0 machine: what README and NEWS say happens, then the way back."""
    box = world.server
    with box.step("plain-upgrade", "purge-both"):
        box.apt("install", f"wstunnel={OLD}")
        before = wait_until(lambda: box.active(SRV), timeout=60, what=f"{SRV} of {OLD}")
        edited = box.c.read(SRV_CONFIG) + f"{LOCAL_EDIT}\n"
        box.c.write(SRV_CONFIG, edited)

        out = box.apt("upgrade")
        assert box.status("wstunnel") == f"ii {world.version}"
        assert box.status("wstunnel-server") == "not installed"
        assert "apt install wstunnel-server" in out, out
        # Nobody owns the unit now; the daemon runs on, as it was.
        assert box.state(SRV)["MainPID"] == before["MainPID"]
        assert not box.exists("/lib/systemd/system/wstunsrv.service")
        assert box.c.curl("http://127.0.0.1:8080/_health_check") == HEALTHY

        box.apt("install", "wstunnel-server")
        _restarted(box, SRV, before["MainPID"])
        assert box.is_enabled(SRV) == "enabled"
        assert box.c.read(SRV_CONFIG) == edited
        assert box.verify(*PACKAGES[:2]) == [f"??5?????? c {SRV_CONFIG}"]
        account = box.account()
        assert account is not None
        box.apt("purge", *PACKAGES[:2])
        _assert_nothing_left(box, account)


def test_purge_after_the_upgrades(world: World) -> None:
    box = world.upgrade
    with box.step("purge-upgraded", "upgrade"):
        account = box.account()
        assert account is not None
        box.apt("purge", *PACKAGES)
        _assert_nothing_left(box, account)
        assert not box.exists("/etc/wstunnel")
