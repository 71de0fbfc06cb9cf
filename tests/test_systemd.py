"""The systemd units and the shipped configuration files, tested for real.

A real systemd boots in a throwaway Debian 12 root filesystem (tests/support/systemd_container.py);
the project comes in as the checkout and its virtualenv, bound read-only. Inside it the units
run as shipped: ``systemctl start wstunsrv`` and ``wstuncli@demo``, a request curled through the
tunnel, the structured journal fields read back, reload, a configuration error (status 78, no
restart loop), the watchdog killing a hung daemon, and the documented drop-in for port 80.

The container tests need root and a working systemd-nspawn; elsewhere they are skipped, with
the reason; with WSTUNNEL_REQUIRE_CONTAINER_TESTS set the same reason fails them instead.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import ROOT, wait_until
from tests.support.systemd_container import Container, Unavailable, booted, preflight
from wstunnel.config import ClientSettings, ServerSettings, load_settings
from wstunnel.errors import ConfigError

UNITS = ROOT / "systemd"
SERVER_UNIT = UNITS / "wstunsrv.service"
CLIENT_UNIT = UNITS / "wstuncli@.service"
INSTANCE_UNIT = UNITS / "wstunsrv@.service"
SERVER_TOML = ROOT / "etc" / "wstunnel" / "wstunsrv.toml"
CLIENT_SAMPLE = ROOT / "etc" / "wstunnel" / "wstuncli.d" / "example.toml.sample"
MAX_EXPOSURE = 2.0
EX_CONFIG = "78"

SRV = "wstunsrv.service"
CLI = "wstuncli@demo.service"
SRV_CONFIG = "/etc/wstunnel/wstunsrv.toml"
CLI_CONFIG = "/etc/wstunnel/wstuncli.d/demo.toml"
SRV_DROPINS = "/etc/systemd/system/wstunsrv.service.d"
BACKEND_PORT = 9000
BACKEND_UNIT = "wst-backend.service"
# Paths the units' sandbox hides (PrivateTmp=, ProtectHome=): a checkout there needs a test
# drop-in to be visible to the daemons at all.
HIDDEN_BY_SANDBOX = ("/tmp", "/var/tmp", "/home", "/root", "/run/user")


# --- The shipped files, checked without a container -------------------------------------------


def _examples(path: Path) -> dict[str, Any]:
    """Every ``key = value`` line of a config file, commented out or not, as TOML."""
    lines = [
        line.removeprefix("# ")
        for line in path.read_text().splitlines()
        if re.match(r"^(# )?[a-z_]+ = ", line)
    ]
    return tomllib.loads("\n".join(lines))


@pytest.mark.parametrize(
    ("path", "model"), [(SERVER_TOML, ServerSettings), (CLIENT_SAMPLE, ClientSettings)],
    ids=["wstunsrv.toml", "example.toml.sample"],
)
def test_config_file_lists_every_setting_with_its_default(path: Path, model: type[Any]) -> None:
    examples = _examples(path)
    settings = set(model.model_fields) - {"config"}
    assert sorted(settings - set(examples)) == [], f"settings missing from {path.name}"
    assert sorted(set(examples) - settings) == [], f"unknown keys in {path.name}"
    active = tomllib.loads(path.read_text())
    for name, value in examples.items():
        field = model.model_fields[name]
        if name in active or field.is_required() or field.get_default(call_default_factory=True) is None:
            continue  # set on purpose, required, or an example of a setting that is off by default
        default = field.get_default(call_default_factory=True)
        if isinstance(default, Path):
            default = str(default)  # TOML writes a path as a string
        assert value == default, f"{path.name}: '# {name} = {value!r}' but the default is {default!r}"


def test_server_config_loads_as_shipped_and_avoids_privileged_ports() -> None:
    settings = load_settings(ServerSettings, {"config": str(SERVER_TOML)})
    assert settings.port >= 1024  # the unit has no CAP_NET_BIND_SERVICE
    assert settings.port == 8080


def test_server_config_runs_as_shipped(tmp_path: Path) -> None:
    # -port 0: the shipped file as it is, on whatever port is free on this machine.
    log = tmp_path / "srv.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "wstunnel", "srv", "-config", str(SERVER_TOML), "-port", "0",
             "-host", "127.0.0.1", "-log-target", "stderr"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        def listening() -> bool:
            assert process.poll() is None, log.read_text()
            return "Listening" in log.read_text()

        wait_until(listening, timeout=30, what="wstunnel srv with the shipped config to listen")
    finally:
        process.terminate()
        process.wait(15)
    assert process.returncode == 0, log.read_text()


def test_client_sample_needs_a_token_then_loads(tmp_path: Path) -> None:
    # As its header says: copy it, chmod 640, fill in the token.
    copy = tmp_path / "demo.toml"
    copy.write_text(CLIENT_SAMPLE.read_text())
    copy.chmod(0o640)
    with pytest.raises(ConfigError, match=r"key 'token': must be at least 16 characters"):
        load_settings(ClientSettings, {"config": str(copy)})
    token = secrets.token_urlsafe(24)
    copy.write_text(CLIENT_SAMPLE.read_text().replace('token = ""', f'token = "{token}"', 1))
    settings = load_settings(ClientSettings, {"config": str(copy)})
    assert settings.token.get_secret_value() == token
    assert settings.tunnel.startswith("wss://")
    assert settings.server is not None


def _exposure(unit: Path | str, *, runner: Any = None, offline: bool = True) -> float:
    """``systemd-analyze security``'s overall figure: of a unit file, or of a loaded unit."""
    argv = ["systemd-analyze", "security", f"--offline={str(offline).lower()}", "--no-pager", str(unit)]
    if runner is None:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        output = result.stdout + result.stderr
    else:
        output = runner(*argv).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", output)
    assert match, output
    return float(match.group(1))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", [SERVER_UNIT, CLIENT_UNIT, INSTANCE_UNIT], ids=lambda p: p.name)
def test_unit_exposure_is_ok(unit: Path) -> None:
    exposure = _exposure(unit)
    print(f"{unit.name}: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE


# --- The container ----------------------------------------------------------------------------


def _unavailable(reason: str) -> None:
    print(f"systemd container tests cannot run: {reason}", file=sys.stderr)
    # A machine that cannot boot a container is a fact about the machine, not a bug of ours:
    # skip with the reason (pytest -ra prints it) unless told that these tests must run.
    if os.environ.get("WSTUNNEL_REQUIRE_CONTAINER_TESTS"):
        pytest.fail(f"systemd container tests must run here: {reason}")
    pytest.skip(f"systemd container unavailable: {reason}")


class Demo:
    """The container with wstunnel installed as a package would install it, plus a backend."""

    def __init__(self, container: Container) -> None:
        self.c = container
        self.token = f"demo_{secrets.token_urlsafe(24)}"
        self.page = f"backend page {secrets.token_hex(8)}\n"
        self.server_config = (
            SERVER_TOML.read_text()
            + '\n# test: loopback only\nhost = "127.0.0.1"\n'
        )
        self.client_config = (
            f'token = "{self.token}"\n'
            'tunnel = "ws://127.0.0.1:8080"\n'
            f'server = "http://127.0.0.1:{BACKEND_PORT}"\n'
            "# test: come back quickly after the tests restart the server\n"
            "reconnect_max_delay = 2\n"
        )

    def install(self) -> None:
        c = self.c
        c.run("useradd", "--system", "--user-group", "--no-create-home",
              "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "wstunnel")
        c.run("ln", "-sf", str(ROOT / ".venv" / "bin" / "wstunnel"), "/usr/bin/wstunnel")
        works = c.run("/usr/bin/wstunnel", "version", check=False)
        assert works.returncode == 0, (
            f"the checkout's .venv does not run in the Debian 12 container (it must be built with "
            f"Debian's /usr/bin/python3 3.11, as scripts/setup does): {works.stderr}"
        )
        c.run("install", "-m", "0644", str(SERVER_UNIT), str(CLIENT_UNIT), "/etc/systemd/system/")
        c.run("install", "-d", "-m", "0755", "/etc/wstunnel")
        c.run("install", "-d", "-m", "0750", "-o", "root", "-g", "wstunnel", "/etc/wstunnel/wstuncli.d")
        self._checkout_visibility()
        c.write(SRV_CONFIG, self.server_config)
        c.write(CLI_CONFIG, self.client_config, mode="0640", owner="root:wstunnel")
        c.run("install", "-d", "/srv/www")
        c.write("/srv/www/hello.txt", self.page)
        c.systemctl("daemon-reload")
        c.run("systemd-run", f"--unit={BACKEND_UNIT}", "--property=WorkingDirectory=/srv/www",
              "/usr/bin/python3", "-m", "http.server", "--bind", "127.0.0.1", str(BACKEND_PORT))
        wait_until(lambda: self.curl(f"http://127.0.0.1:{BACKEND_PORT}/hello.txt") == self.page,
                   timeout=60, what="the backend in the container")

    def _checkout_visibility(self) -> None:
        """A checkout under /tmp or /home is hidden by the units' own sandbox: show it to them."""
        hidden = [p for p in HIDDEN_BY_SANDBOX if Path(p) == ROOT or Path(p) in ROOT.parents]
        if not hidden:
            return
        lines = ["[Service]", f"BindReadOnlyPaths={ROOT}"]
        if not hidden[0].startswith(("/tmp", "/var/tmp")):
            lines.insert(1, "ProtectHome=tmpfs")
        for unit in ("wstunsrv.service", "wstuncli@.service", "wstunsrv@.service"):
            self.c.run("install", "-d", f"/etc/systemd/system/{unit}.d")
            self.c.write(f"/etc/systemd/system/{unit}.d/00-test-checkout.conf", "\n".join(lines) + "\n")
        self.c.notes.append(f"checkout under {hidden[0]}: added {lines[1:]} for the test")

    def curl(self, url: str, *headers: str) -> str:
        return self.c.curl(url, *headers)

    def through_tunnel(self, path: str = "/hello.txt") -> str:
        return self.curl(f"http://127.0.0.1:8080{path}", f"X-Token: {self.token}")

    def client_connected(self) -> bool:
        return self.c.show(CLI, "StatusText")["StatusText"].startswith("connected to")

    def reset(self) -> None:
        """Back to the shipped state: shipped config, no test drop-ins, both units running."""
        c = self.c
        dropins = c.run("sh", "-c", f"ls {SRV_DROPINS}/5*.conf 2>/dev/null", check=False).stdout.split()
        restart_server = bool(dropins)
        if dropins:
            c.remove(*dropins)
            c.systemctl("daemon-reload")
        if c.read(SRV_CONFIG) != self.server_config:
            c.write(SRV_CONFIG, self.server_config)
            restart_server = True
        if restart_server:
            c.systemctl("restart", SRV, check=False)
        if c.read(CLI_CONFIG) != self.client_config:
            c.write(CLI_CONFIG, self.client_config, mode="0640", owner="root:wstunnel")
            c.systemctl("restart", CLI, check=False)
        for unit in (SRV, CLI):
            if c.show(unit, "ActiveState")["ActiveState"] != "active":
                c.systemctl("reset-failed", unit, check=False)
                c.systemctl("start", unit)
        wait_until(self.client_connected, timeout=60, what="wstuncli@demo to connect")


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    reason = preflight()
    if reason:
        _unavailable(reason)
    binds = [ROOT]
    venv = (ROOT / ".venv").resolve()
    if ROOT not in venv.parents:
        binds.append(venv)
    name = f"wst-{os.getpid()}-{secrets.token_hex(3)}"
    started = time.monotonic()
    try:
        with booted(name, binds) as container:
            setup = Demo(container)
            setup.install()
            yield setup
            print(f"\nsystemd container {name}: {'; '.join(container.notes)}; "
                  f"{time.monotonic() - started:.0f}s in all", file=sys.stderr)
    except Unavailable as exc:
        _unavailable(str(exc))


@pytest.fixture
def running(demo: Demo) -> Demo:
    demo.reset()
    return demo


def _main_pid(c: Container, unit: str) -> int:
    return int(c.show(unit, "MainPID")["MainPID"])


def test_units_verify_and_score_ok_inside(demo: Demo) -> None:
    c = demo.c
    verify = c.run("systemd-analyze", "verify", SRV, CLI, check=False)
    assert verify.returncode == 0, verify.stderr
    assert "wstun" not in verify.stderr, verify.stderr
    for unit in ("/etc/systemd/system/wstunsrv.service", "/etc/systemd/system/wstuncli@.service"):
        assert _exposure(Path(unit), runner=c.run) <= MAX_EXPOSURE


def test_tunnel_through_the_units(running: Demo) -> None:
    c = running.c
    assert running.through_tunnel() == running.page
    assert c.show(SRV, "StatusText")["StatusText"] == "listening on 127.0.0.1:8080"
    assert c.show(CLI, "StatusText")["StatusText"].startswith("connected to ws://127.0.0.1:8080")
    for unit in (SRV, CLI):
        pid = _main_pid(c, unit)
        status = dict(line.split(":", 1) for line in c.read(f"/proc/{pid}/status").splitlines())
        uid = c.run("id", "-u", "wstunnel").stdout.strip()
        assert status["Uid"].split()[0] == uid, f"{unit} does not run as wstunnel"
        assert int(status["CapEff"], 16) == 0, f"{unit} holds capabilities"
        assert status["NoNewPrivs"].strip() == "1"
        cmdline = c.read(f"/proc/{pid}/cmdline")
        assert running.token not in cmdline


def test_journal_has_the_lines_and_structured_fields(running: Demo) -> None:
    c = running.c
    prefix = running.token[:8]
    probe = secrets.token_hex(4)
    assert running.through_tunnel(f"/hello.txt?probe={probe}") == running.page

    def exchange() -> tuple[dict[str, Any], dict[str, Any]] | None:
        entries = c.journal(unit=SRV)
        received = [e for e in entries if e.get("WSTUNNEL_EVENT") == "HTTP RCV"
                    and f"probe={probe}" in str(e.get("WSTUNNEL_URL"))]
        if not received:
            return None
        rcv = received[-1]
        answers = [e for e in entries[entries.index(rcv):] if e.get("WSTUNNEL_EVENT") == "HTTP RET"
                   and e.get("WSTUNNEL_REQUEST_ID") == rcv.get("WSTUNNEL_REQUEST_ID")]
        return (rcv, answers[0]) if answers else None

    rcv, ret = wait_until(exchange, timeout=30, what="the request's HTTP RCV and HTTP RET lines")
    request_id = str(rcv["WSTUNNEL_REQUEST_ID"])
    assert re.fullmatch(
        rf"INFO HTTP RCV +pkg=WStunsrv token={prefix}\.\.\. id={request_id} verb=GET "
        rf'url="/hello\.txt\?probe={probe}" addr=\S+ x-host= try=',  # quoted: it holds "="
        str(rcv["MESSAGE"]),
    ), rcv["MESSAGE"]
    assert re.fullmatch(
        rf"INFO HTTP RET +pkg=WStunsrv token={prefix}\.\.\. id={request_id} status=200",
        str(ret["MESSAGE"]),
    ), ret["MESSAGE"]
    for entry in (rcv, ret):
        assert entry["WSTUNNEL_TOKEN"] == prefix
        assert entry["SYSLOG_IDENTIFIER"] == "wstunsrv"
        assert entry["PRIORITY"] == "6"
        assert entry["_TRANSPORT"] == "journal"  # sent natively, not scraped from stderr
    assert ret["WSTUNNEL_STATUS"] == "200"
    assert rcv["WSTUNNEL_VERB"] == "GET"

    # journalctl can filter on the token prefix: both daemons' lines about this tunnel.
    by_token = c.journal(f"WSTUNNEL_TOKEN={prefix}")
    assert {e.get("SYSLOG_IDENTIFIER") for e in by_token} >= {"wstunsrv", "wstuncli"}
    assert {e.get("_SYSTEMD_UNIT") for e in by_token} >= {SRV, CLI}

    everything = c.run("journalctl", "--no-pager", "-o", "json").stdout
    assert prefix in everything
    assert running.token not in everything, "a whole token reached the journal"


def test_reload_applies_and_says_what_changed(running: Demo) -> None:
    c = running.c
    pids = {unit: _main_pid(c, unit) for unit in (SRV, CLI)}
    cursor = c.journal_cursor()
    c.write(SRV_CONFIG, running.server_config + "max_requests_per_tunnel = 7\n")
    c.systemctl("reload", SRV)
    c.write(CLI_CONFIG, running.client_config + "max_concurrent_requests = 9\n",
            mode="0640", owner="root:wstunnel")
    c.systemctl("reload", CLI)

    def reload_line(unit: str) -> str | None:
        lines = [m for m in c.messages(unit=unit, after=cursor) if " Reload " in f" {m}"]
        return lines[-1] if lines else None

    server_line = wait_until(lambda: reload_line(SRV), timeout=30, what="the server's Reload line")
    assert re.search(r"^INFO Reload +pkg=WStunsrv changed=max_requests_per_tunnel\b", server_line)
    client_line = wait_until(lambda: reload_line(CLI), timeout=30, what="the client's Reload line")
    assert re.search(r"^INFO Reload +pkg=WStuncli changed=max_concurrent_requests\b", client_line)
    for unit, pid in pids.items():
        state = c.show(unit, "ActiveState", "MainPID", "NRestarts")
        assert state == {"ActiveState": "active", "MainPID": str(pid), "NRestarts": "0"}, unit
    assert running.through_tunnel() == running.page


def test_reload_names_what_needs_a_restart(running: Demo) -> None:
    c = running.c
    cursor = c.journal_cursor()
    c.write(SRV_CONFIG, running.server_config.replace("port = 8080", "port = 8081"))
    c.systemctl("reload", SRV)

    def reload_line() -> str | None:
        lines = [m for m in c.messages(unit=SRV, after=cursor) if m.startswith("INFO Reload ")]
        return lines[-1] if lines else None

    line = wait_until(reload_line, timeout=30, what="the server's Reload line")
    assert "restart_needed=port" in line, line
    assert running.through_tunnel() == running.page  # still on 8080 until a restart


@pytest.mark.parametrize("case", ["server-unknown-key", "client-missing-file"])
def test_config_error_stops_with_78_and_no_restart_loop(running: Demo, case: str) -> None:
    c = running.c
    if case == "server-unknown-key":
        unit = SRV
        c.write(SRV_CONFIG, running.server_config + "bogus_key = 1\n")
        expected = f"{SRV_CONFIG}: key 'bogus_key': unknown setting"
        started = c.systemctl("restart", unit, check=False)
    else:
        unit = "wstuncli@missing.service"
        expected = "/etc/wstunnel/wstuncli.d/missing.toml: cannot read"
        started = c.systemctl("start", unit, check=False)
    assert started.returncode != 0, "systemctl start succeeded with a bad configuration"
    state = c.show(unit, "ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts")
    # RestartPreventExitStatus=78 makes it "failed" at once; a restart would be "auto-restart".
    assert state == {"ActiveState": "failed", "SubState": "failed", "Result": "exit-code",
                     "ExecMainStatus": EX_CONFIG, "NRestarts": "0"}, state
    assert unit not in c.systemctl("list-jobs", "--no-legend").stdout
    assert any(expected in m for m in c.messages(unit=unit)), expected
    c.systemctl("reset-failed", unit, check=False)


def test_watchdog_restarts_a_hung_daemon(running: Demo) -> None:
    c = running.c
    # Only the server here: a client dialling the stopped server would sit out its handshake
    # timeout (30 s) before it tries the restarted one.
    c.systemctl("stop", CLI)
    c.run("install", "-d", SRV_DROPINS)
    c.write(f"{SRV_DROPINS}/50-test-watchdog.conf", "[Service]\nWatchdogSec=3\nRestartSec=100ms\n")
    c.systemctl("daemon-reload")
    c.systemctl("restart", SRV)
    before = c.show(SRV, "MainPID", "NRestarts", "WatchdogUSec", "WatchdogTimestampMonotonic")
    assert before["WatchdogUSec"] == "3s"
    assert before["NRestarts"] == "0"
    # It pings: the manager's watchdog timestamp moves on while it runs.
    wait_until(
        lambda: c.show(SRV, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
        != before["WatchdogTimestampMonotonic"],
        timeout=15, what="a watchdog ping",
    )
    cursor = c.journal_cursor()
    c.systemctl("kill", "--kill-who=main", "--signal=SIGSTOP", SRV)  # a hung event loop

    def restarted() -> dict[str, str] | None:
        state = c.show(SRV, "MainPID", "NRestarts", "ActiveState", "SubState")
        fresh = state["MainPID"] not in ("0", before["MainPID"])
        if int(state["NRestarts"]) >= 1 and fresh and state["SubState"] == "running":
            return state
        return None

    wait_until(restarted, timeout=60, what="the watchdog to restart wstunsrv")
    assert any("Watchdog timeout" in m for m in c.messages(unit=SRV, after=cursor))
    assert running.curl("http://127.0.0.1:8080/_health_check") == "WSTUNSRV RUNNING\n"


def test_port_80_needs_the_documented_drop_in(running: Demo) -> None:
    c = running.c
    c.write(SRV_CONFIG, running.server_config.replace("port = 8080", "port = 80"))
    failed = c.systemctl("restart", SRV, check=False)
    assert failed.returncode != 0, "bound port 80 without any capability"
    c.systemctl("stop", SRV)
    # The drop-in exactly as the unit's header comment gives it.
    header = SERVER_UNIT.read_text().split("[Unit]")[0]
    block = re.search(r"^#     \[Service\]\n((?:#     \S.*\n)+)", header, re.MULTILINE)
    assert block, "the unit's comment lost its drop-in"
    dropin = "[Service]\n" + "".join(line[6:] + "\n" for line in block.group(1).splitlines())
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in dropin
    c.run("install", "-d", SRV_DROPINS)
    c.write(f"{SRV_DROPINS}/50-test-port80.conf", dropin)
    c.systemctl("daemon-reload")
    c.systemctl("reset-failed", SRV, check=False)
    c.systemctl("start", SRV)
    assert running.curl("http://127.0.0.1:80/_health_check") == "WSTUNSRV RUNNING\n"
    status = c.read(f"/proc/{_main_pid(c, SRV)}/status")
    assert re.search(r"^CapEff:\s+0*400$", status, re.MULTILINE), status
    assert _exposure(SRV, runner=c.run, offline=False) <= MAX_EXPOSURE


def test_one_server_instance_per_port(running: Demo) -> None:
    c = running.c
    c.run("install", "-m", "0644", str(INSTANCE_UNIT), "/etc/systemd/system/")
    c.systemctl("daemon-reload")
    instances = ("wstunsrv@8091.service", "wstunsrv@8092.service")
    try:
        c.systemctl("start", *instances)
        for unit, port in zip(instances, (8091, 8092), strict=True):
            assert c.show(unit, "StatusText")["StatusText"] == f"listening on 127.0.0.1:{port}"
            assert running.curl(f"http://127.0.0.1:{port}/_health_check") == "WSTUNSRV RUNNING\n"
        verify = c.run("systemd-analyze", "verify", *instances, check=False)
        assert verify.returncode == 0, verify.stderr
        assert _exposure(instances[0], runner=c.run, offline=False) <= MAX_EXPOSURE
        assert running.through_tunnel() == running.page  # the main server is untouched
    finally:
        c.systemctl("stop", *instances, check=False)


def test_syslog_lines_reach_journald_through_dev_log(demo: Demo) -> None:
    # -syslog sends each line as one datagram to /dev/log, journald's syslog socket here: the
    # entry keeps the tag, the pid, the daemon facility and the level, and the line unchanged.
    c = demo.c
    tag = f"wstsyslog{secrets.token_hex(3)}"
    unit = f"{tag}.service"
    c.run("systemd-run", f"--unit={unit}", "/usr/bin/wstunnel", "srv", "-syslog", tag,
          "-host", "127.0.0.1", "-port", "0")
    try:
        def listening() -> dict[str, Any] | None:
            lines = [e for e in c.journal(f"SYSLOG_IDENTIFIER={tag}") if "Listening" in str(e["MESSAGE"])]
            return lines[0] if lines else None

        entry = wait_until(listening, timeout=30, what="the Listening line through /dev/log")
        assert re.fullmatch(r"INFO Listening +pkg=WStunsrv port=\d+ host=127\.0\.0\.1",
                            str(entry["MESSAGE"])), entry["MESSAGE"]
        assert entry["_TRANSPORT"] == "syslog"
        assert entry["SYSLOG_FACILITY"] == "3"
        assert entry["PRIORITY"] == "6"
        assert entry["SYSLOG_PID"] == entry["_PID"] == str(_main_pid(c, unit))
    finally:
        c.systemctl("stop", unit, check=False)


def test_journal_tells_a_download_cut_by_a_killed_client_with_its_fields(running: Demo) -> None:
    """Issue 18: the server's HTTP ABORT line reaches the journal with its fields (how far the
    download got, why), and its WS CLOSE line says how the tunnel went."""
    c = running.c
    size = 64 * 1024 * 1024
    c.sh(f"head -c {size} /dev/zero > /srv/www/big.bin; rm -f /tmp/big.out /tmp/curl.rc")
    # A script, not a command line: systemd-run logs the command, and the token is a secret.
    c.write("/root/download.sh",
            "#!/bin/sh\ncurl -sS --limit-rate 2M -o /tmp/big.out "
            f"-H 'X-Token: {running.token}' http://127.0.0.1:8080/big.bin\necho $? > /tmp/curl.rc\n",
            mode="0700")
    cursor = c.journal_cursor()
    c.run("systemd-run", "--unit=wst-download", "--collect", "/root/download.sh")

    def received() -> int:
        done = c.run("stat", "-c", "%s", "/tmp/big.out", check=False)
        return int(done.stdout) if done.returncode == 0 else 0

    wait_until(lambda: received() >= 2 * 1024 * 1024, timeout=60, what="the download under way")
    c.systemctl("kill", "--signal=KILL", CLI)
    rc = wait_until(lambda: c.run("cat", "/tmp/curl.rc", check=False).stdout.strip(), timeout=60,
                    what="curl to end")
    assert rc != "0" and received() < size, (rc, received())  # an error, never a whole 200

    def entry(event: str) -> dict[str, Any] | None:
        found = [e for e in c.journal(unit=SRV, after=cursor) if e.get("WSTUNNEL_EVENT") == event]
        return found[-1] if found else None

    abort = wait_until(lambda: entry("HTTP ABORT"), timeout=30, what="the HTTP ABORT entry")
    close = entry("WS CLOSE")
    print(f"\n[journal] curl exit {rc} after {received()} bytes; {abort['MESSAGE']}")
    assert close is not None and "client vanished" in str(close["WSTUNNEL_REASON"]), close
    assert close["WSTUNNEL_CODE"] == "1006"
    assert abort["WSTUNNEL_DIRECTION"] == "response"
    assert abort["WSTUNNEL_CAUSE"] == "tunnel_lost"
    assert abort["WSTUNNEL_REASON"] == f"tunnel connection lost: {close['WSTUNNEL_REASON']}"
    assert 2 * 1024 * 1024 <= int(str(abort["WSTUNNEL_BYTES"])) < size
    assert float(str(abort["WSTUNNEL_SECS"])) > 0
    assert abort["WSTUNNEL_TOKEN"] == running.token[:8]
    assert re.fullmatch(r"INFO HTTP ABORT +pkg=WStunsrv token=\S+ id=\d+ direction=response "
                        r"bytes=\d+ secs=[\d.]+ cause=tunnel_lost reason=\".+\"", str(abort["MESSAGE"]))
    c.remove("/srv/www/big.bin", "/tmp/big.out", "/root/download.sh")
    c.systemctl("restart", CLI)  # an explicit start: its restart count is back to 0
