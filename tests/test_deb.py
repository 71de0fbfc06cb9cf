"""The Debian package, tested for real: install, tunnel, upgrade, remove, purge.

``scripts/build-deb`` builds the package from this checkout twice: once at the version in
debian/changelog and once with a higher version for the upgrade. The second one is then given a
changed shipped ``wstunsrv.toml`` and ``example.toml.sample`` (one comment line each, repacked
with ``dpkg-deb``), so that the upgrade meets both conffile cases: a file the administrator
edited, which ``--force-confold`` keeps (the new one goes to ``.dpkg-dist``), and one left as
shipped, which dpkg replaces without asking.

One throwaway Debian 12 container with a real systemd (tests/support/systemd_container.py) takes the
package through its life, one test per step, in file order; a step whose predecessor failed is
skipped. Nothing of the checkout is bound into the container: the package brings everything.
Like the other container tests these need root and a working systemd-nspawn; elsewhere they are
skipped with the reason; with WSTUNNEL_REQUIRE_CONTAINER_TESTS set that reason fails them instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.harness import ROOT, wait_until
from tests.support.systemd_container import Container, Unavailable, booted, preflight
from wstunnel import __version__

BUILD_DEB = ROOT / "scripts" / "build-deb"
BUILD_TIMEOUT = 600.0
APT_TIMEOUT = 300.0
DEBS_IN_BOX = "/srv/debs"  # world-readable, so apt's _apt user can read the files
SRV = "wstunsrv.service"
CLI = "wstuncli@demo.service"
SRV_CONFIG = "/etc/wstunnel/wstunsrv.toml"
SAMPLE = "/etc/wstunnel/wstuncli.d/example.toml.sample"
CLI_DIR = "/etc/wstunnel/wstuncli.d"
CLI_CONFIG = f"{CLI_DIR}/demo.toml"
BACKEND_UNIT = "wst-backend.service"
BACKEND_PORT = 9000
LOCAL_EDIT = "max_requests_per_tunnel = 7  # local edit, kept across upgrades"
V2_MARK = "# (changed in the upgrade package)"
# Whose content changes with every run of the container, whatever the package does.
NOISE = (
    "/var/lib/dpkg/", "/var/lib/apt/", "/var/cache/apt/", "/var/cache/debconf/",
    "/var/cache/ldconfig/", "/var/log/apt/", "/var/log/journal/", "/var/lib/systemd/",
    "/run/systemd/", "/run/udev/", "/run/dbus/", "/run/user/", "/run/log/", "/tmp/",
    "/srv/", "/var/log/dpkg.log", "/var/log/alternatives.log", "/etc/.pwd.lock",
    "/run/lock/", "/var/tmp/", "/run/mount/", "/run/credentials/",
)


def _unavailable(reason: str) -> None:
    print(f"Debian package tests cannot run: {reason}", file=sys.stderr)
    if os.environ.get("WSTUNNEL_REQUIRE_CONTAINER_TESTS"):
        pytest.fail(f"Debian package tests must run here: {reason}")
    pytest.skip(f"systemd container unavailable: {reason}")


def _changelog_version() -> str:
    first = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    match = re.match(r"wstunnel \(([^)\s]+)\)", first)
    assert match, f"debian/changelog does not start with a wstunnel entry: {first!r}"
    return match.group(1)


V1 = _changelog_version()
V2 = f"{V1}+test1"  # sorts after V1 for dpkg: "+" > end of string


class Build:
    """``scripts/build-deb`` running in the background, in its own process group."""

    def __init__(self, outdir: Path, version: str | None) -> None:
        self.outdir = outdir
        self.version = version or V1
        self.log_path = outdir / "build.log"
        outdir.mkdir(parents=True)
        argv = [str(BUILD_DEB), "--outdir", str(outdir)]
        if version:
            argv += ["--version", version]
        self.started = time.monotonic()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def deb(self) -> Path:
        """The built package, once the build has finished."""
        try:
            code = self.proc.wait(BUILD_TIMEOUT - (time.monotonic() - self.started))
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"scripts/build-deb took over {BUILD_TIMEOUT:g}s") from None
        log = self.log_path.read_text(errors="replace")
        assert code == 0, f"scripts/build-deb --version {self.version} exited {code}:\n{log[-4000:]}"
        deb = self.outdir / f"wstunnel_{self.version}_amd64.deb"
        assert deb.is_file(), f"no {deb.name} in {sorted(p.name for p in self.outdir.iterdir())}"
        return deb

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


def _with_changed_conffiles(deb: Path, out: Path, work: Path) -> dict[str, str]:
    """Repack ``deb`` as ``out`` with a comment line added to each conffile; their new text."""
    tree = work / "tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True, timeout=120)
    conffiles = (tree / "DEBIAN" / "conffiles").read_text().split()
    assert sorted(conffiles) == [SAMPLE, SRV_CONFIG], conffiles
    texts = {}
    for name in conffiles:
        path = tree / name.lstrip("/")
        texts[name] = path.read_text() + f"\n{V2_MARK}\n"
        path.write_text(texts[name])
    # Conffiles are not in DEBIAN/md5sums (dpkg keeps their hashes itself): nothing to update.
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "-b", str(tree), str(out)],
                   check=True, timeout=300, capture_output=True)
    shutil.rmtree(tree)
    return texts


@dataclass
class Box:
    """The container the package lives in, and what the steps learn along the way."""

    c: Container
    v2_build: Build
    v2_work: Path
    done: set[str] = field(default_factory=set)
    before: set[str] = field(default_factory=set)
    page: str = ""
    token: str = ""
    curl_argv: list[str] = field(default_factory=list)
    uid: str = ""
    gid: str = ""
    timings: list[str] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self, name: str, *needs: str) -> Iterator[None]:
        """One step of the package's life; on failure the message carries the daemons' logs."""
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
        parts = ["--- diagnostics from the container ---"]
        commands = [
            ["systemctl", "--no-pager", "status", SRV, CLI, BACKEND_UNIT],
            ["journalctl", "--no-pager", "-n", "80", "-u", SRV, "-u", CLI, "-u", BACKEND_UNIT],
            ["sh", "-c", "grep -v 'Reading database' /var/log/apt/term.log | tail -n 40"],
        ]
        for argv in commands:
            try:
                result = self.c.run(*argv, check=False, timeout=30)
                parts.append(f"$ {shlex.join(argv)}\n{result.stdout}{result.stderr}")
            except (AssertionError, subprocess.SubprocessError, OSError) as exc:
                parts.append(f"$ {shlex.join(argv)}\n(failed: {exc})")
        return "\n".join(parts)

    def apt(self, *args: str) -> str:
        """``apt-get -y ARGS`` in /srv/debs, as an administrator would type it; its output."""
        script = f"cd {DEBS_IN_BOX} && apt-get -y {shlex.join(args)}"
        result = self.c.run("env", "DEBIAN_FRONTEND=noninteractive", "/bin/sh", "-ec", script,
                            check=False, timeout=APT_TIMEOUT)
        assert result.returncode == 0, (
            f"apt-get {shlex.join(args)} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
        return result.stdout + result.stderr

    def bring_in(self, deb: Path) -> str:
        """Copy a package into the container's /srv/debs; its name there, as ./NAME."""
        target = self.c.root / DEBS_IN_BOX.lstrip("/")
        target.mkdir(mode=0o755, exist_ok=True)
        shutil.copyfile(deb, target / deb.name)
        (target / deb.name).chmod(0o644)
        return f"./{deb.name}"

    def files(self) -> set[str]:
        """Every path on the container's own file systems (not /proc, /sys, /dev)."""
        out = self.c.sh(
            "find / -xdev \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -print; "
            "find /run /tmp -xdev -print",
            timeout=120,
        )
        return set(out.splitlines())

    def state(self, unit: str) -> dict[str, str]:
        return self.c.show(unit, "ActiveState", "SubState", "MainPID", "LoadState", "StatusText")

    def active(self, unit: str) -> dict[str, str] | None:
        state = self.state(unit)
        return state if state["ActiveState"] == "active" and state["SubState"] == "running" else None

    def curl(self, url: str, *headers: str) -> str:
        return self.c.curl(url, *headers)

    def through_tunnel(self) -> str:
        """The curl line ``wstunnel token new`` printed, with the page's path on its URL."""
        *argv, url = self.curl_argv
        result = self.c.run(*argv, "-sS", "--fail-with-body", "--max-time", "20",
                            url + "hello.txt", check=False, timeout=30)
        if result.returncode != 0:
            raise ValueError(f"{shlex.join(self.curl_argv)}: {result.returncode} "
                             f"{result.stderr.strip()} {result.stdout!r}")
        return result.stdout

    def wait_for_tunnel(self, what: str) -> float:
        started = time.monotonic()
        wait_until(lambda: self.through_tunnel() == self.page, timeout=90, what=what)
        return time.monotonic() - started

    def stat(self, path: str) -> str:
        return self.c.run("stat", "-c", "%U:%G %a", path).stdout.strip()

    def exists(self, path: str) -> bool:
        return self.c.run("sh", "-c", 'test -e "$1" || test -L "$1"', "sh", path,
                          check=False).returncode == 0

    def package_status(self) -> str:
        result = self.c.run("dpkg-query", "-W", "-f=${db:Status-Abbrev} ${Version}", "wstunnel",
                            check=False)
        return " ".join(result.stdout.split()) if result.returncode == 0 else "not known to dpkg"


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    reason = preflight()
    if not reason and shutil.which("dpkg-deb") is None:
        reason = "not a Debian machine (no dpkg-deb): scripts/build-deb needs Debian 12"
    if reason:
        _unavailable(reason)
    work = tmp_path_factory.mktemp("deb")
    # The first build runs while the container boots; the second, started when the first is
    # done (so that only one of them installs missing build dependencies), while it installs.
    v1_build = Build(work / "v1", None)
    v2_build: Build | None = None
    name = f"wst-deb-{os.getpid()}-{secrets.token_hex(3)}"
    started = time.monotonic()
    try:
        with booted(name) as container:
            v1 = v1_build.deb()
            v2_build = Build(work / "v2", V2)
            setup = Box(container, v2_build, work / "v2-repack")
            setup.bring_in(v1)
            setup.before = setup.files()
            yield setup
            notes = [*container.notes, *setup.timings, f"{time.monotonic() - started:.0f}s in all"]
            print(f"\nDebian package container {name}: {'; '.join(notes)}", file=sys.stderr)
    except Unavailable as exc:
        _unavailable(str(exc))
    finally:
        v1_build.stop()
        if v2_build is not None:
            v2_build.stop()


def test_install(box: Box) -> None:
    c = box.c
    with box.step("install"):
        assert c.run("getent", "passwd", "wstunnel", check=False).returncode == 2, \
            "the pristine root already has a wstunnel user"
        out = box.apt("install", f"./wstunnel_{V1}_amd64.deb")
        assert "Download is performed unsandboxed" not in out, out
        assert box.package_status() == f"ii {V1}"
        wait_until(lambda: box.active(SRV), timeout=60, what=f"{SRV} to be active after install")
        assert c.systemctl("is-enabled", SRV, check=False).stdout.strip() == "enabled"
        user = c.run("getent", "passwd", "wstunnel").stdout.strip().split(":")
        assert user[5:] == ["/var/lib/wstunnel", "/usr/sbin/nologin"], user
        assert int(user[2]) < 1000, f"not a system user: {user}"
        box.uid, box.gid = user[2], user[3]
        assert c.run("getent", "group", "wstunnel").stdout.split(":")[2] == user[3]
        assert c.run("/usr/bin/wstunnel", "version").stdout.strip() == __version__
        assert box.stat(CLI_DIR) == "root:wstunnel 750"
        assert box.stat(SRV_CONFIG) == "root:root 644"
        assert box.curl("http://127.0.0.1:8080/_health_check") == "WSTUNSRV RUNNING\n"
        # The daemon runs the package's own environment, as the package's user.
        pid = box.state(SRV)["MainPID"]
        assert c.read(f"/proc/{pid}/cmdline").split("\0")[0] == "/usr/lib/wstunnel/bin/python"
        status = dict(line.split(":", 1) for line in c.read(f"/proc/{pid}/status").splitlines())
        assert status["Uid"].split()[0] == box.uid
        # Nothing the package shipped differs from what dpkg recorded.
        verify = c.run("dpkg", "--verify", "wstunnel", check=False)
        assert verify.returncode == 0 and not verify.stdout.strip(), verify.stdout + verify.stderr


def test_token_new_and_a_request_through_the_tunnel(box: Box) -> None:
    c = box.c
    with box.step("tunnel", "install"):
        box.page = f"hello from the backend {secrets.token_hex(8)}\n"
        c.run("install", "-d", "/srv/www")
        c.write("/srv/www/hello.txt", box.page)
        c.run("systemd-run", f"--unit={BACKEND_UNIT}", "--property=WorkingDirectory=/srv/www",
              "/usr/bin/python3", "-m", "http.server", "--bind", "127.0.0.1", str(BACKEND_PORT))
        wait_until(lambda: box.curl(f"http://127.0.0.1:{BACKEND_PORT}/hello.txt") == box.page,
                   timeout=60, what="the backend in the container")

        out = c.run("wstunnel", "token", "new", "demo", "--tunnel", "ws://127.0.0.1:8080",
                    "--server", f"http://127.0.0.1:{BACKEND_PORT}").stdout
        curl_lines = [line.strip() for line in out.splitlines() if line.strip().startswith("curl ")]
        assert len(curl_lines) == 1, out
        box.curl_argv = shlex.split(curl_lines[0])
        header = box.curl_argv[box.curl_argv.index("-H") + 1]
        assert header.startswith("X-Token: "), curl_lines
        box.token = header.removeprefix("X-Token: ")
        assert box.curl_argv[-1] == "http://127.0.0.1:8080/", curl_lines
        assert box.stat(CLI_CONFIG) == "root:wstunnel 640"
        # The two commands it prints: start now, and at boot.
        for command in ("systemctl start wstuncli@demo", "systemctl enable wstuncli@demo"):
            assert command in out, out
            c.run(*shlex.split(command))

        box.timings.append(f"tunnel up in {box.wait_for_tunnel('the first request through the tunnel'):.1f}s")
        assert box.state(CLI)["StatusText"].startswith("connected to ws://127.0.0.1:8080")
        status = c.run("wstunnel", "status").stdout
        assert ", 1 tunnel(s)" in status.splitlines()[0], status
        assert re.search(rf"^{re.escape(box.token[:8])}\.\.\.\s+1\s", status, re.MULTILINE), status
        assert box.token not in status


def test_console_as_packaged_keeps_a_block_in_the_state_directory(box: Box) -> None:
    c = box.c
    with box.step("console", "tunnel"):
        admin = "http://127.0.0.1:8080/_admin/"
        assert "<title>wstunnel console</title>" in box.curl(admin)  # the page, from the package
        document = json.loads(box.curl(admin + "api/state"))
        [tunnel] = document["tunnels"]
        post = ["curl", "-sS", "--fail-with-body", "--max-time", "20", "-X", "POST",
                "-H", f"X-CSRF-Token: {document['csrf_token']}"]
        c.run(*post, f"{admin}api/tunnels/{tunnel['id']}/block")
        # Written under the hardened unit (ProtectSystem=strict) into its StateDirectory.
        assert box.stat("/var/lib/wstunnel") == "wstunnel:wstunnel 755"
        assert box.stat("/var/lib/wstunnel/wstunsrv-state.json") == "wstunnel:wstunnel 600"
        saved = c.read("/var/lib/wstunnel/wstunsrv-state.json")
        assert box.token[:8] + "..." in saved and box.token not in saved
        with pytest.raises(ValueError, match="403"):
            box.through_tunnel()
        c.run(*post, f"{admin}api/tunnels/{tunnel['id']}/unblock")
        back = box.wait_for_tunnel("the unblocked tunnel")
        box.timings.append(f"tunnel back after an unblock in {back:.1f}s")


def test_upgrade_keeps_local_config_and_restarts(box: Box) -> None:
    c = box.c
    with box.step("upgrade", "tunnel"):
        shipped = c.read(SRV_CONFIG)
        assert "# max_requests_per_tunnel = 20\n" in shipped
        edited = shipped.replace("# max_requests_per_tunnel = 20\n", LOCAL_EDIT + "\n")
        c.write(SRV_CONFIG, edited)
        c.systemctl("reload", SRV)
        demo_before = (c.read(CLI_CONFIG), box.stat(CLI_CONFIG))
        pids = {unit: box.state(unit)["MainPID"] for unit in (SRV, CLI)}

        box.v2_work.mkdir()
        # The checkout may have changed since the first build: what V2 ships is read from it.
        v2 = box.v2_work / f"wstunnel_{V2}_amd64.deb"
        v2_conffiles = _with_changed_conffiles(box.v2_build.deb(), v2, box.v2_work)
        out = box.apt("install", "-o", "Dpkg::Options::=--force-confold", box.bring_in(v2))
        # The question dpkg asks when both sides changed the file, answered by --force-confold.
        assert re.search(rf"Configuration file '{SRV_CONFIG}'\n ==> Modified .*\n ==> Package "
                         r"distributor has shipped an updated version\.\n ==> Using current old file",
                         out), out
        assert box.package_status() == f"ii {V2}"
        changelog = c.run("sh", "-c", "zcat /usr/share/doc/wstunnel/changelog.gz").stdout
        assert f"wstunnel ({V2})" in changelog.splitlines()[0], "the upgrade did not replace the files"

        # The edited conffile: kept, the package's new version beside it; the untouched one: new.
        assert c.read(SRV_CONFIG) == edited, f"local edit lost:\n{out}"
        assert c.read(SRV_CONFIG + ".dpkg-dist") == v2_conffiles[SRV_CONFIG]
        assert c.read(SAMPLE) == v2_conffiles[SAMPLE], "the unmodified conffile was not updated"
        assert not box.exists(SAMPLE + ".dpkg-old") and not box.exists(SAMPLE + ".dpkg-dist")
        assert (c.read(CLI_CONFIG), box.stat(CLI_CONFIG)) == demo_before
        assert box.stat(CLI_DIR) == "root:wstunnel 750"
        assert c.run("id", "-u", "wstunnel").stdout.strip() == box.uid

        for unit in (SRV, CLI):
            state = wait_until(lambda unit=unit: box.active(unit), timeout=60,
                               what=f"{unit} to run again after the upgrade")
            assert state["MainPID"] != pids[unit], f"{unit} was not restarted by the upgrade"
        assert c.systemctl("is-enabled", SRV, check=False).stdout.strip() == "enabled"
        box.timings.append(f"tunnel back {box.wait_for_tunnel('the tunnel after the upgrade'):.1f}s "
                           "after the upgrade")
        verify = c.run("dpkg", "--verify", "wstunnel", check=False).stdout
        assert verify.splitlines() == [f"??5?????? c {SRV_CONFIG}"], verify


def test_remove_stops_everything_and_keeps_config(box: Box) -> None:
    c = box.c
    with box.step("remove", "upgrade"):
        box.apt("remove", "wstunnel")
        assert box.package_status() == f"rc {V2}"
        for unit in (SRV, CLI):
            state = box.state(unit)
            assert state["ActiveState"] == "inactive", f"{unit} still {state} after remove"
        assert c.run("pgrep", "-u", "wstunnel", check=False).stdout == "", "wstunnel processes left"
        for path in ("/usr/bin/wstunnel", "/usr/lib/wstunnel", "/lib/systemd/system/wstunsrv.service",
                     "/lib/systemd/system/wstuncli@.service"):
            assert not box.exists(path), f"{path} still there after remove"
        assert c.read(SRV_CONFIG).count(LOCAL_EDIT) == 1
        assert box.exists(CLI_CONFIG)
        assert c.run("id", "-u", "wstunnel").stdout.strip() == box.uid
        with pytest.raises(ValueError):
            box.curl("http://127.0.0.1:8080/_health_check")


def test_purge_leaves_nothing_behind(box: Box) -> None:
    c = box.c
    with box.step("purge", "remove"):
        box.apt("purge", "wstunnel")
        assert box.package_status() == "not known to dpkg"
        assert "no packages found" in c.run("dpkg", "-l", "wstunnel", check=False).stderr
        assert not box.exists("/etc/wstunnel"), c.sh("find /etc/wstunnel", check=False)
        assert c.run("getent", "passwd", "wstunnel", check=False).returncode == 2
        assert c.run("getent", "group", "wstunnel", check=False).returncode == 2
        orphans = c.sh(f"find / -xdev \\( -path /proc -o -path /sys \\) -prune -o "
                       f"\\( -uid {box.uid} -o -gid {box.gid} \\) -print", check=False)
        assert orphans == "", f"files of the removed user: {orphans}"
        units = c.sh("find /etc/systemd /lib/systemd /usr/lib/systemd /run/systemd "
                     "-name '*wstun*'", check=False)
        assert units == "", f"unit files or links left: {units}"
        c.systemctl("daemon-reload")
        load_state = box.state(SRV)["LoadState"]
        assert load_state == "not-found", load_state

        accounts = c.run("grep", "-l", "^wstunnel:", "/etc/passwd", "/etc/group", "/etc/shadow",
                         "/etc/gshadow", "/etc/subuid", "/etc/subgid", check=False).stdout
        assert accounts == "", f"the wstunnel account is still in {accounts.split()}"

        new = box.files() - box.before
        ours = sorted(path for path in new if "wstun" in path and not path.startswith("/srv/"))
        assert ours == [], f"left behind after purge: {ours}"
        left = sorted(path for path in new if not path.startswith(NOISE) and path + "/" not in NOISE)
        print(f"\nnew after install and purge (besides package manager, journal and systemd state): "
              f"{left}", file=sys.stderr)
