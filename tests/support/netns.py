"""A network namespace joined to the host by a veth pair, and a firewall rule to cut it silently.

    host  10.213.N.1 --veth-- 10.213.N.2 (the tunnel address)  namespace
                              10.213.N.3 (the operator address)

A process run in the namespace (:meth:`Netns.wrap` in front of its argv) listens on both
addresses; :meth:`Netns.cut` drops every packet to or from the tunnel address with nftables (or
iptables), inside the namespace only, so nothing is refused or reset: the peers just stop hearing
each other, as when a NAT box forgets a connection. The operator address stays reachable, for
``/_status``. :meth:`Netns.remove` deletes the namespace, which takes the veth pair and the rules
with it; it is safe to call twice and after a failed :meth:`Netns.create`.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2; :func:`unavailable` says why not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from tests.support.harness import Process, Server

CUT_TABLE = "wstunnel_cut"


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def _must(*argv: str) -> None:
    result = _run(*argv)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")


def firewall() -> str | None:
    """The packet filter to cut with: "nft", "iptables" or None."""
    for name in ("nft", "iptables"):
        if shutil.which(name) or os.path.exists(f"/usr/sbin/{name}"):
            return name
    return None


def unavailable() -> str | None:
    """Why namespaces cannot be used here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (the ip command) is not installed"
    probe = f"wstprobe{os.getpid()}"
    added = _run("ip", "netns", "add", probe)
    if added.returncode != 0:
        return f"ip netns add fails here: {added.stderr.strip()}"
    _run("ip", "netns", "del", probe)
    if firewall() is None:
        return "neither nft nor iptables is installed (scripts/setup installs nftables)"
    return None


@dataclass
class Netns:
    name: str
    host_if: str
    ns_if: str
    subnet: int  # the N of 10.213.N.0/24

    @classmethod
    def for_this_process(cls) -> Netns:
        """Names and a subnet unique to this process, so parallel runs do not collide."""
        pid = os.getpid()
        return cls(name=f"wstun{pid}", host_if=f"wsh{pid}"[:15], ns_if=f"wsn{pid}"[:15],
                   subnet=pid % 250 + 1)

    @property
    def host_address(self) -> str:
        return f"10.213.{self.subnet}.1"

    @property
    def tunnel_address(self) -> str:
        return f"10.213.{self.subnet}.2"

    @property
    def operator_address(self) -> str:
        return f"10.213.{self.subnet}.3"

    def create(self) -> None:
        self.remove()  # leftovers of a run that was killed before its cleanup
        _must("ip", "netns", "add", self.name)
        _must("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _must("ip", "link", "set", self.ns_if, "netns", self.name)
        _must("ip", "addr", "add", f"{self.host_address}/24", "dev", self.host_if)
        _must("ip", "link", "set", self.host_if, "up")
        for address in (self.tunnel_address, self.operator_address):
            self.exec("ip", "addr", "add", f"{address}/24", "dev", self.ns_if)
        self.exec("ip", "link", "set", self.ns_if, "up")
        self.exec("ip", "link", "set", "lo", "up")

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def exec(self, *argv: str) -> None:
        _must(*self.wrap(list(argv)))

    def cut(self) -> None:
        """Drop, silently, every packet to or from the tunnel address."""
        address = self.tunnel_address
        if firewall() == "nft":
            self.exec("nft", "add", "table", "inet", CUT_TABLE)
            for chain, hook, match in (("in", "input", "daddr"), ("out", "output", "saddr")):
                self.exec("nft", "add", "chain", "inet", CUT_TABLE, chain,
                          f"{{ type filter hook {hook} priority 0; policy accept; }}")
                self.exec("nft", "add", "rule", "inet", CUT_TABLE, chain, "ip", match, address, "drop")
        else:
            self.exec("iptables", "-I", "INPUT", "-d", address, "-j", "DROP")
            self.exec("iptables", "-I", "OUTPUT", "-s", address, "-j", "DROP")

    def heal(self) -> None:
        address = self.tunnel_address
        if firewall() == "nft":
            self.exec("nft", "delete", "table", "inet", CUT_TABLE)
        else:
            self.exec("iptables", "-D", "INPUT", "-d", address, "-j", "DROP")
            self.exec("iptables", "-D", "OUTPUT", "-s", address, "-j", "DROP")

    def remove(self) -> None:
        _run("ip", "netns", "del", self.name)
        _run("ip", "link", "del", self.host_if)  # gone with its peer already, unless half-made


@dataclass
class NetnsServer(Server):
    """A ``wstunnel srv`` run in a :class:`Netns`: HTTP clients and the test reach it on the
    operator address, which stays reachable; tunnel clients dial the tunnel address, which
    :meth:`Netns.cut` cuts."""

    host: str = "127.0.0.1"
    tunnel_host: str = "127.0.0.1"

    @classmethod
    def inside(cls, process: Process, port: int, space: Netns) -> NetnsServer:
        return cls(process, port, host=space.operator_address, tunnel_host=space.tunnel_address)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.tunnel_host}:{self.port}"
