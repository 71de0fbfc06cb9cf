"""A real systemd, booted in a throwaway Debian 12 root filesystem, for the unit tests.

The pristine root filesystem is built once with ``debootstrap`` and cached outside the checkout
(``/var/cache/wstunnel-tests/bookworm``, or ``$WSTUNNEL_TEST_ROOTFS_CACHE/bookworm``), under a
lock so parallel runs build it once. Each test module boots a copy of it with
``systemd-nspawn --boot --private-network`` and talks to it with ``nsenter`` into the
container's PID 1; the checkout is bound in read-only at the same absolute path, so its
editable virtualenv works inside (the container's python3 is the same Debian 3.11).

Never boots anything against the host's own root: :func:`booted` refuses a directory that is
not a copy of the cached root filesystem. Every wait has a deadline; the container is halted
and its copy deleted when the block ends, on failure too (and on SIGTERM), and a later run
clears what a SIGKILLed one left.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.harness import proc_stat, wait_until

SUITE = "bookworm"
# procps for /bin/kill (the units' ExecReload=); iproute2 for ss (what listens, in the package
# tests); bash-completion to load wstunnel's completion as a shell would; the rest is what the
# issue's proven route used.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "curl", "ca-certificates", "python3", "procps",
            "iproute2", "bash-completion")
CACHE = Path(os.environ.get("WSTUNNEL_TEST_ROOTFS_CACHE", "/var/cache/wstunnel-tests"))
MIRROR = os.environ.get("WSTUNNEL_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
STAMP = ".wstunnel-test-rootfs"
DEBOOTSTRAP_TIMEOUT = 900.0
LOCK_TIMEOUT = DEBOOTSTRAP_TIMEOUT + 60.0
BOOT_TIMEOUT = 90.0
SHUTDOWN_TIMEOUT = 30.0
# Copies being booted: one directory each, named so that a later run can clear what a killed
# run left behind (see remove_leftovers).
WORKDIR_PARENT = Path("/var/tmp")
WORKDIR_PREFIX = "wstunnel-systemd-"
# Network namespaces made for two containers to talk in (linked_networks), named after the
# process that made them so that a later run can delete what a killed one left.
LINK_PREFIX = "wstlink"
LINK_ADDRESSES = ("10.214.0.1", "10.214.0.2")
# Inside the container: a plain environment, not whatever the test runner has.
CONTAINER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "TERM": "dumb",
}


class Unavailable(Exception):
    """This machine cannot boot the container; the message says why."""


def preflight() -> str | None:
    """Why the container tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, debootstrap, nsenter)"
    for tool, package in (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install {package}; scripts/setup does it)"
    if not _rootfs_ready(CACHE / SUITE) and shutil.which("debootstrap") is None:
        return "debootstrap not installed (apt-get install debootstrap; scripts/setup does it)"
    return None


def _stamp_text() -> str:
    return f"{SUITE} {','.join(PACKAGES)}\n"


def _rootfs_ready(path: Path) -> bool:
    try:
        return (path / STAMP).read_text() == _stamp_text()
    except OSError:
        return False


def ensure_rootfs() -> Path:
    """The cached pristine Debian 12 root filesystem, built now if missing or outdated."""
    target = CACHE / SUITE
    if _rootfs_ready(target):
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f"{SUITE}.lock").open("w") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Unavailable(f"another run holds {lock.name} for too long") from None
                time.sleep(0.5)
        if _rootfs_ready(target):  # built by the run we waited for
            return target
        for stale in CACHE.glob(f"{SUITE}.*.tmp"):
            _remove_tree(stale)
        building = CACHE / f"{SUITE}.{os.getpid()}.tmp"
        log_path = CACHE / f"{SUITE}.debootstrap.log"
        argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                SUITE, str(building), MIRROR]
        started = time.monotonic()
        with log_path.open("wb") as log:
            try:
                result = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, timeout=DEBOOTSTRAP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _remove_tree(building)
                raise Unavailable(f"debootstrap took over {DEBOOTSTRAP_TIMEOUT:g}s "
                                  f"(log: {log_path})") from None
        if result.returncode != 0:
            _remove_tree(building)
            raise Unavailable(f"debootstrap failed with status {result.returncode}: "
                              f"{_tail(log_path)}")
        (building / STAMP).write_text(_stamp_text())
        if target.exists():
            old = CACHE / f"{SUITE}.old.tmp"
            target.rename(old)
            _remove_tree(old)
        building.rename(target)
        print(f"systemd tests: built {target} in {time.monotonic() - started:.0f}s",
              file=sys.stderr)
        return target


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].replace("\\040", " ")
        if mount_point == str(path) or mount_point.startswith(prefix):
            found.append(mount_point)
    return found


def _remove_tree(path: Path) -> None:
    """``rm -rf`` that never crosses into a mount (such as a bound checkout) and never hits /."""
    if not path.exists():
        return
    resolved = path.resolve()
    if resolved == Path("/") or len(resolved.parts) < 3:
        raise RuntimeError(f"refusing to remove {resolved}")
    mounted = _mounts_under(resolved)
    if mounted:
        raise RuntimeError(f"not removing {resolved}: still mounted there: {mounted}")
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(resolved)], check=True, timeout=120)


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = proc_stat(entry / "stat")
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


def _container_init(nspawn_pid: int) -> int | None:
    """The container's systemd: the child of systemd-nspawn that is PID 1 of its namespace."""
    for child in _children(nspawn_pid):
        try:
            status = Path(f"/proc/{child}/status").read_text()
        except OSError:
            continue
        values = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if values.get("Name", "").strip() == "systemd" and values.get("NSpid", "").split()[-1:] == ["1"]:
            return child
    return None


@dataclass
class Container:
    name: str
    root: Path
    leader: int
    nspawn: subprocess.Popen[bytes]
    log_path: Path
    notes: list[str] = field(default_factory=list)

    def run(self, *argv: str, input: str | None = None, timeout: float = 60.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all its namespaces, its root and cwd)."""
        self._check_still_ours()
        command = ["nsenter", "-t", str(self.leader), "-a", "--", *argv]
        result = subprocess.run(command, input=input, capture_output=True, text=True,
                                timeout=timeout, env=CONTAINER_ENV,
                                stdin=None if input is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)!r} exited {result.returncode} in the container\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def _check_still_ours(self) -> None:
        """Refuse to enter anything but this container: a command meant for it (``systemctl``,
        ``rm -rf``) must never reach the host's own systemd or file systems.

        systemd-nspawn still running (not reaped by us, so its PID is its own) with ``leader`` as
        its child means ``leader`` is the container's PID 1, not a recycled PID of some host
        process; that it sees another mount namespace than ours says the same once more.
        """
        if self.nspawn.poll() is not None:
            raise AssertionError(f"container {self.name} is gone: {_tail(self.log_path)}")
        try:
            parent = int(proc_stat(Path(f"/proc/{self.leader}/stat"))[1])
            own_mounts = os.readlink(f"/proc/{self.leader}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        except (OSError, IndexError, ValueError):
            parent, own_mounts = 0, False
        if parent != self.nspawn.pid or not own_mounts:
            raise AssertionError(f"container {self.name}: PID {self.leader} is no longer its "
                                 f"systemd; not entering it: {_tail(self.log_path)}")

    def curl(self, url: str, *headers: str) -> str:
        argv = ["curl", "-sS", "--fail-with-body", "--max-time", "20"]
        for header in headers:
            argv += ["-H", header]
        result = self.run(*argv, url, check=False, timeout=30)
        if result.returncode != 0:
            raise ValueError(f"curl {url}: {result.returncode} {result.stderr.strip()} {result.stdout!r}")
        return result.stdout

    def sh(self, script: str, *, timeout: float = 60.0, check: bool = True) -> str:
        return self.run("/bin/sh", "-ec", script, timeout=timeout, check=check).stdout

    def write(self, path: str, text: str, *, mode: str = "0644", owner: str = "root:root") -> None:
        """Write a file inside the container, through its own view of the file system."""
        self.run("/bin/sh", "-ec", 'umask 077; cat > "$1"; chown "$2" "$1"; chmod "$3" "$1"',
                 "sh", path, owner, mode, input=text)

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout

    def remove(self, *paths: str) -> None:
        self.run("rm", "-rf", "--", *paths)

    def systemctl(self, *args: str, check: bool = True,
                  timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", "--no-ask-password", *args,
                        check=check, timeout=timeout)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={name}" for name in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *matches: str, unit: str | None = None,
                after: str | None = None) -> list[dict[str, object]]:
        """Journal entries as ``journalctl -o json`` gives them, oldest first."""
        argv = ["journalctl", "--no-pager", "-o", "json"]
        if unit:
            argv += ["-u", unit]
        if after:
            argv.append(f"--after-cursor={after}")
        result = self.run(*argv, *matches, check=False)
        if result.returncode not in (0, 1):  # 1: no entries
            raise AssertionError(f"journalctl failed: {result.stderr}")
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    def journal_cursor(self) -> str:
        """Where the journal ends now; pass it as ``after`` to see only what comes next."""
        self.run("journalctl", "--flush", check=False)
        entries = self.run("journalctl", "--no-pager", "-o", "json", "-n", "1").stdout.splitlines()
        return str(json.loads(entries[-1])["__CURSOR"])

    def messages(self, unit: str | None = None, after: str | None = None) -> list[str]:
        return [str(entry.get("MESSAGE", "")) for entry in self.journal(unit=unit, after=after)]


def _start_nspawn(root: Path, name: str, binds: Sequence[Path], network: Path | None,
                  log_path: Path) -> subprocess.Popen[bytes]:
    # Either way the container has a network of its own, never the host's.
    own_network = f"--network-namespace-path={network}" if network else "--private-network"
    argv = [
        "systemd-nspawn", "--directory", str(root), "--boot", own_network,
        "--register=no", "--keep-unit", "--machine", name, "--link-journal=no",
        *(f"--bind-ro={path}:{path}" for path in binds),
    ]
    with log_path.open("wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _shutdown(nspawn: subprocess.Popen[bytes], leader: int | None) -> None:
    """SIGTERM to systemd-nspawn halts the container; SIGKILL its PID 1 if it will not go."""
    if nspawn.poll() is None:
        nspawn.send_signal(signal.SIGTERM)
        try:
            nspawn.wait(SHUTDOWN_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            pass
        # Killing the namespace's PID 1 kills everything in it; check it is still ours first.
        if leader is not None and leader in _children(nspawn.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(leader, signal.SIGKILL)
        nspawn.kill()
        nspawn.wait(SHUTDOWN_TIMEOUT)


def _start_time(pid: int) -> str | None:
    try:
        return proc_stat(Path(f"/proc/{pid}/stat"))[19]
    except (OSError, IndexError):
        return None


def _owner_alive(owner: str) -> bool:
    pid, _, started = owner.partition(" ")
    return pid.isdigit() and _start_time(int(pid)) == started.strip()


def _gone(pid: int) -> bool:
    try:
        return proc_stat(Path(f"/proc/{pid}/stat"))[0] == "Z"
    except OSError:
        return True


def remove_leftovers() -> None:
    """Halt and delete what a killed run (SIGKILL: no finalizer ran) left behind."""
    for workdir in WORKDIR_PARENT.glob(f"{WORKDIR_PREFIX}*"):
        try:
            lines = (workdir / "owner").read_text().splitlines()
        except OSError:
            lines = []
        if lines and _owner_alive(lines[0]):
            continue  # a run in progress
        if not lines and time.time() - workdir.stat().st_mtime < 600:
            continue  # a run that is just starting, or too recent to judge
        nspawn_pid = int(lines[1]) if len(lines) > 1 and lines[1].isdigit() else None
        with contextlib.suppress(OSError):
            if nspawn_pid and str(workdir).encode() in Path(f"/proc/{nspawn_pid}/cmdline").read_bytes():
                leaders = _children(nspawn_pid)
                os.kill(nspawn_pid, signal.SIGTERM)
                deadline = time.monotonic() + SHUTDOWN_TIMEOUT
                while not _gone(nspawn_pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not _gone(nspawn_pid):  # kill the container's PID 1 (so all in it), then nspawn
                    for pid in set(leaders) & set(_children(nspawn_pid)):
                        os.kill(pid, signal.SIGKILL)
                    os.kill(nspawn_pid, signal.SIGKILL)
        _remove_tree(workdir)


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """SIGTERM (a CI run being stopped) as an exception, so the finalizers still halt the box."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise Unavailable(f"ip {' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def _remove_stale_links() -> None:
    listed = _ip("netns", "list", check=False).stdout.split()
    for name in listed:
        owner = name.removeprefix(LINK_PREFIX)[:-1]
        if name.startswith(LINK_PREFIX) and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            _ip("netns", "del", name, check=False)


@dataclass(frozen=True)
class Link:
    """Two network namespaces joined by a veth pair: one container's network each."""

    namespaces: tuple[Path, Path]  # for booted(network=...)
    addresses: tuple[str, str]  # the address each side has on the veth pair


@contextlib.contextmanager
def linked_networks() -> Iterator[Link]:
    """Two fresh network namespaces and a veth pair between them (made inside them: the host's
    own network never sees it); deleted afterwards, which takes the pair with them."""
    if shutil.which("ip") is None:
        raise Unavailable("iproute2 (the ip command) is not installed; scripts/setup installs it")
    _remove_stale_links()
    pid = os.getpid()
    names = (f"{LINK_PREFIX}{pid}a", f"{LINK_PREFIX}{pid}b")
    interfaces = (f"wstl{pid}a", f"wstl{pid}b")  # at most 15 characters
    try:
        for name in names:
            _ip("netns", "add", name)
        _ip("-n", names[0], "link", "add", interfaces[0], "type", "veth",
            "peer", "name", interfaces[1], "netns", names[1])
        for name, interface, address in zip(names, interfaces, LINK_ADDRESSES, strict=True):
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", interface)
            _ip("-n", name, "link", "set", interface, "up")
            _ip("-n", name, "link", "set", "lo", "up")
        yield Link((Path("/run/netns", names[0]), Path("/run/netns", names[1])), LINK_ADDRESSES)
    finally:
        for name in names:
            _ip("netns", "del", name, check=False)


@contextlib.contextmanager
def booted(name: str, binds: Sequence[Path] = (), network: Path | None = None) -> Iterator[Container]:
    """A fresh copy of the cached root filesystem, booted; halted and deleted afterwards.

    ``network``: a network namespace to boot it in (see :func:`linked_networks`); without it the
    container gets a private one with only a loopback.
    """
    pristine = ensure_rootfs()
    remove_leftovers()
    nspawn: subprocess.Popen[bytes] | None = None
    leader: int | None = None
    with _terminate_raises():
        workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=WORKDIR_PARENT))
        owner = f"{os.getpid()} {_start_time(os.getpid())}\n"
        root = workdir / "root"
        log_path = workdir / "nspawn.log"
        try:
            (workdir / "owner").write_text(owner)
            subprocess.run(["cp", "-a", "--reflink=auto", str(pristine), str(root)], check=True,
                           timeout=300)
            # The one guard that matters most: boot only a copy of our own debootstrapped tree.
            if root.resolve() == Path("/") or not _rootfs_ready(root):
                raise RuntimeError(f"{root} is not a copy of the test root filesystem")
            started = time.monotonic()
            nspawn = running = _start_nspawn(root, name, binds, network, log_path)
            (workdir / "owner").write_text(f"{owner}{nspawn.pid}\n")

            def init_pid() -> int | None:
                if running.poll() is not None:
                    raise Unavailable(f"systemd-nspawn exited {running.returncode}: "
                                      f"{_tail(log_path)}")
                return _container_init(running.pid)

            leader = wait_until(init_pid, timeout=BOOT_TIMEOUT, what="the container's systemd")
            container = Container(name=name, root=root, leader=leader, nspawn=nspawn,
                                  log_path=log_path)

            def booted_state() -> str | None:
                state = container.run("systemctl", "is-system-running", check=False).stdout.strip()
                return state if state in ("running", "degraded") else None

            state = wait_until(booted_state, timeout=BOOT_TIMEOUT, what="the container to boot")
            if state == "degraded":
                failed = container.systemctl("--failed", "--plain", "--no-legend").stdout.strip()
                container.notes.append(f"booted degraded: {failed}")
            container.notes.append(f"booted in {time.monotonic() - started:.1f}s")
            yield container
        finally:
            try:
                if nspawn is not None:
                    _shutdown(nspawn, leader)
            finally:
                _remove_tree(workdir)
