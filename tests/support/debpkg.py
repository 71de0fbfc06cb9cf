"""The Debian packages, built and installed for real: what tests/test_deb.py stands on.

:class:`Build` runs ``scripts/build-deb`` in the background: the packages of this checkout, or
those of an older release from its own debian/ tree (tests/data/debian-0.1.0, the single
``wstunnel`` package every 0.1.0 machine has). :func:`repack` gives built packages a higher
version without a rebuild, for an upgrade between two builds of today's layout.

:class:`Box` is a booted container (tests/support/systemd_container.py) with a local apt
repository in /srv/debs, so that the tests type what an administrator types (``apt install
wstunnel-server``) and apt resolves the packages' dependencies itself; and with the ways to see
what the packages did: unit states, listening sockets, files, dpkg's records.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.harness import ROOT, wait_until
from tests.support.systemd_container import Container

BUILD_DEB = ROOT / "scripts" / "build-deb"
OLD_DEBIAN = ROOT / "tests" / "data" / "debian-0.1.0"
BUILD_TIMEOUT = 900.0
APT_TIMEOUT = 300.0
REPOSITORY = "/srv/debs"  # world-readable, so apt's _apt user can read the files
PACKAGES = ("wstunnel", "wstunnel-server", "wstunnel-client")
# Whose content changes with every run of the container, whatever the packages do.
NOISE = (
    "/var/lib/dpkg/", "/var/lib/apt/", "/var/cache/apt/", "/var/cache/debconf/",
    "/var/cache/ldconfig/", "/var/log/apt/", "/var/log/journal/", "/var/lib/systemd/",
    "/run/systemd/", "/run/udev/", "/run/dbus/", "/run/user/", "/run/log/", "/tmp/",
    "/srv/", "/var/log/dpkg.log", "/var/log/alternatives.log", "/etc/.pwd.lock",
    "/run/lock/", "/var/tmp/", "/run/mount/", "/run/credentials/", "/etc/apt/sources.list",
)


def changelog_version(debian: Path) -> str:
    first = (debian / "changelog").read_text().splitlines()[0]
    match = re.match(r"wstunnel \(([^)\s]+)\)", first)
    assert match, f"{debian}/changelog does not start with a wstunnel entry: {first!r}"
    return match.group(1)


class Build:
    """``scripts/build-deb`` running in the background, in its own process group."""

    def __init__(self, outdir: Path, *, debian: Path | None = None, lintian: bool = True) -> None:
        self.outdir = outdir
        self.version = changelog_version(debian or ROOT / "debian")
        self.log_path = outdir / "build.log"
        outdir.mkdir(parents=True)
        argv = [str(BUILD_DEB), "--outdir", str(outdir)]
        if debian is not None:
            argv += ["--debian", str(debian)]
        if not lintian:
            argv.append("--no-lintian")
        self.started = time.monotonic()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def debs(self) -> dict[str, Path]:
        """The built packages by name, once the build has finished."""
        try:
            code = self.proc.wait(max(1.0, BUILD_TIMEOUT - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"scripts/build-deb took over {BUILD_TIMEOUT:g}s") from None
        log = self.log()
        assert code == 0, f"scripts/build-deb ({self.version}) exited {code}:\n{log[-4000:]}"
        found = {path.name.split("_")[0]: path for path in self.outdir.glob("*.deb")}
        assert found, f"no .deb in {self.outdir}"
        return found

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop the build if it still runs (build-deb's EXIT trap removes its scratch tree)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


class SharedBuild:
    """This checkout's packages for every test module that installs them: one build per run,
    started by the first module that asks (after its own checks, so a machine that cannot run
    the container tests builds nothing), in the background while its containers boot."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir
        self.build: Build | None = None

    def start(self) -> Build:
        if self.build is None:
            self.build = Build(self.outdir)
        return self.build

    def stop(self) -> None:
        if self.build is not None:
            self.build.stop()


def repack(debs: dict[str, Path], version: str, outdir: Path) -> dict[str, Path]:
    """The same packages as ``version``, their exact dependencies on each other moved along."""
    outdir.mkdir(parents=True)
    result = {}
    for name, deb in debs.items():
        tree = outdir / f"{name}.tree"
        subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True, timeout=120)
        control = tree / "DEBIAN" / "control"
        text = control.read_text()
        old = re.search(r"^Version: (\S+)$", text, re.MULTILINE)
        assert old, text
        text = text.replace(f"Version: {old.group(1)}\n", f"Version: {version}\n")
        control.write_text(text.replace(f"(= {old.group(1)})", f"(= {version})"))
        out = outdir / deb.name.replace(f"_{old.group(1)}_", f"_{version}_")
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "-b", str(tree), str(out)],
                       check=True, timeout=300, capture_output=True)
        shutil.rmtree(tree)
        result[name] = out
    return result


@dataclass(frozen=True)
class Listener:
    address: str
    pid: int
    command: str  # the process's command line, spaces between the arguments
    user: str  # its real uid


@dataclass
class Box:
    """A booted container with a local apt repository, and what a test learns along the way."""

    c: Container
    done: set[str] = field(default_factory=set)
    before: set[str] = field(default_factory=set)
    timings: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)

    UNITS = ("wstunsrv.service", "wstuncli@*.service", "wst-backend.service")

    @contextlib.contextmanager
    def step(self, name: str, *needs: str) -> Iterator[None]:
        """One step of the packages' life here; on failure the message carries the logs."""
        missing = [need for need in needs if need not in self.done]
        if missing:
            pytest.skip(f"needs the step(s) {', '.join(missing)}, which did not pass")
        started = time.monotonic()
        try:
            yield
        except (AssertionError, subprocess.SubprocessError, OSError) as exc:
            raise AssertionError(f"{exc}\n\n{self.diagnostics()}") from exc
        self.done.add(name)
        self.timings.append(f"{name} {time.monotonic() - started:.1f}s")

    def diagnostics(self) -> str:
        parts = [f"--- diagnostics from the container {self.c.name} ---"]
        commands = [
            ["systemctl", "--no-pager", "status", *self.UNITS],
            ["journalctl", "--no-pager", "-n", "80", *(f"--unit={unit}" for unit in self.UNITS)],
            ["sh", "-c", "grep -v 'Reading database' /var/log/apt/term.log | tail -n 60"],
        ]
        for argv in commands:
            try:
                result = self.c.run(*argv, check=False, timeout=30)
                parts.append(f"$ {shlex.join(argv)}\n{result.stdout}{result.stderr}")
            except (AssertionError, subprocess.SubprocessError, OSError) as exc:
                parts.append(f"$ {shlex.join(argv)}\n(failed: {exc})")
        return "\n".join(parts)

    # --- packages -----------------------------------------------------------------------------

    def publish(self, *debs: Path) -> None:
        """Add packages to the container's apt repository (``deb file:/srv/debs ./``), and update.

        The index is written with dpkg-scanpackages on the host; apt in the container sees no
        other source (it has no network to reach Debian's anyway, and needs none: the root
        filesystem already holds every dependency).
        """
        target = self.c.root / REPOSITORY.lstrip("/")
        target.mkdir(mode=0o755, exist_ok=True)
        for deb in debs:
            shutil.copyfile(deb, target / deb.name)
            (target / deb.name).chmod(0o644)
        index = subprocess.run(["dpkg-scanpackages", "--multiversion", ".", "/dev/null"], cwd=target,
                               capture_output=True, text=True, timeout=120, check=True).stdout
        (target / "Packages").write_text(index)
        (target / "Packages").chmod(0o644)
        self.c.write("/etc/apt/sources.list", f"deb [trusted=yes] file:{REPOSITORY} ./\n")
        self.apt("update")

    def apt(self, *args: str) -> str:
        """``apt-get -y ARGS`` as an administrator would type it, with no terminal; its output.

        No --force-conf* option: a question about a configuration file finds stdin closed and
        fails the step, as it should, since none of these upgrades may ask one.
        """
        result = self.c.run("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", *args,
                            check=False, timeout=APT_TIMEOUT)
        assert result.returncode == 0, (
            f"apt-get {shlex.join(args)} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
        return result.stdout + result.stderr

    def status(self, package: str) -> str:
        """``ii 0.2.0``, ``rc 0.2.0``..., or ``not installed``."""
        result = self.c.run("dpkg-query", "-W", "-f=${db:Status-Abbrev} ${Version}", package,
                            check=False)
        status = " ".join(result.stdout.split())
        return status if result.returncode == 0 and not status.startswith("un") else "not installed"

    def owner(self, path: str) -> str:
        result = self.c.run("dpkg-query", "-S", path, check=False)
        return result.stdout.split(":")[0] if result.returncode == 0 else "nobody"

    def conffiles(self, package: str) -> list[str]:
        """``PATH HASH [obsolete]`` lines, as dpkg keeps them."""
        out = self.c.run("dpkg-query", "-W", "-f=${Conffiles}", package).stdout
        return [" ".join(line.split()) for line in out.splitlines() if line.strip()]

    def verify(self, *packages: str) -> list[str]:
        """What ``dpkg --verify`` finds changed since install (an edited conffile, say)."""
        return self.c.run("dpkg", "--verify", *packages, check=False).stdout.splitlines()

    # --- what runs ----------------------------------------------------------------------------

    def state(self, unit: str) -> dict[str, str]:
        return self.c.show(unit, "ActiveState", "SubState", "MainPID", "LoadState", "StatusText",
                           "UnitFileState", "FragmentPath")

    def active(self, unit: str) -> dict[str, str] | None:
        state = self.state(unit)
        return state if state["ActiveState"] == "active" and state["SubState"] == "running" else None

    def is_enabled(self, unit: str) -> str:
        return self.c.systemctl("is-enabled", unit, check=False).stdout.strip() or "not-found"

    def listeners(self) -> list[Listener]:
        """Every listening TCP socket and the process that holds it (``ss -ltnp``)."""
        found = []
        for line in self.c.run("ss", "-ltnpH").stdout.splitlines():
            fields = line.split()
            for pid in map(int, re.findall(r"pid=(\d+)", line)):
                command = self.c.run("cat", f"/proc/{pid}/cmdline", check=False).stdout
                status = self.c.run("cat", f"/proc/{pid}/status", check=False).stdout
                uid = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)
                found.append(Listener(fields[3], pid, command.replace("\0", " ").strip(),
                                      uid.group(1) if uid else "?"))
        return found

    def start_backend(self, page: str, port: int) -> None:
        """A web server behind the tunnel: python's http.server on 127.0.0.1, a unit of its own."""
        self.c.run("install", "-d", "/srv/www")
        self.c.write("/srv/www/hello.txt", page)
        self.c.run("systemd-run", "--unit=wst-backend.service", "--property=WorkingDirectory=/srv/www",
                   "/usr/bin/python3", "-m", "http.server", "--bind", "127.0.0.1", str(port))
        wait_until(lambda: self.c.curl(f"http://127.0.0.1:{port}/hello.txt") == page,
                   timeout=60, what=f"the backend in {self.c.name}")

    def curl(self, argv: Sequence[str]) -> str:
        """Run a curl command line (as ``wstunnel token new`` printed it); what it fetched."""
        result = self.c.run(*argv, "-sS", "--fail-with-body", "--max-time", "20", check=False,
                            timeout=30)
        if result.returncode != 0:
            raise ValueError(f"{shlex.join(argv)}: {result.returncode} {result.stderr.strip()} "
                             f"{result.stdout!r}")
        return result.stdout

    # --- files --------------------------------------------------------------------------------

    def files(self) -> set[str]:
        """Every path on the container's own file systems (not /proc, /sys, /dev)."""
        out = self.c.sh(
            "find / -xdev \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -print; "
            "find /run /tmp -xdev -print",
            timeout=120,
        )
        return set(out.splitlines())

    def left_behind(self) -> list[str]:
        """Paths of ours that are new since the container booted: none, after a purge."""
        new = self.files() - self.before
        return sorted(path for path in new if "wstun" in path and not path.startswith(NOISE))

    def exists(self, path: str) -> bool:
        return self.c.run("sh", "-c", 'test -e "$1" || test -L "$1"', "sh", path,
                          check=False).returncode == 0

    def stat(self, path: str) -> str:
        return self.c.run("stat", "-c", "%U:%G %a", path).stdout.strip()

    def account(self) -> tuple[str, str] | None:
        """The wstunnel user's uid and gid, if it exists."""
        entry = self.c.run("getent", "passwd", "wstunnel", check=False).stdout.strip().split(":")
        return (entry[2], entry[3]) if len(entry) > 3 else None

    def owned_by(self, uid: str, gid: str) -> str:
        """Files of a uid or gid (of an account since removed, say): none should be left."""
        return self.c.sh(f"find / -xdev \\( -path /proc -o -path /sys \\) -prune -o "
                         f"\\( -uid {uid} -o -gid {gid} \\) -print", check=False).strip()
