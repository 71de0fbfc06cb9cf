"""The ops helpers run as the operator runs them: ``python -m wstunnel token|config|status ...``."""

from __future__ import annotations

import grp
import json
import os
import re
import stat
import subprocess
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.support.harness import PYTHON, ROOT, Harness, environ, free_port

EX_CONFIG = 78


def wstunnel(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "wstunnel", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=environ() if env is None else env, check=False)


def some_group() -> str:
    """A group other than root's own when we are root, so that the chown is seen to happen."""
    if os.geteuid() != 0:
        return grp.getgrgid(os.getgid()).gr_name
    for name in ("nogroup", "daemon", "users"):
        try:
            grp.getgrnam(name)
            return name
        except KeyError:
            continue
    return "root"


def token_new(directory: Path, name: str = "demo", *extra: str,
              tunnel: str = "wss://tunnel.example.com", server: str | None = "http://127.0.0.1:8000",
              ) -> subprocess.CompletedProcess[str]:
    args = ["token", "new", "--tunnel", tunnel, "--config-dir", str(directory),
            "--group", some_group(), *extra]
    if server is not None:
        args += ["--server", server]
    # After "--", so that a name like "-dash" reaches the name check rather than argparse.
    return wstunnel(*args, "--", name)


def printed_token(stdout: str) -> str:
    match = re.search(r"X-Token: ([A-Za-z0-9_-]+)", stdout)
    assert match, stdout
    return match.group(1)


# -- token new ---------------------------------------------------------------------------------


def test_token_new_writes_a_private_file_the_client_accepts(tmp_path: Path) -> None:
    result = token_new(tmp_path, "demo", "--regexp", r"(www|api)\.internal")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "demo.toml"
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o640
    if os.geteuid() == 0:
        assert (info.st_uid, info.st_gid) == (0, grp.getgrnam(some_group()).gr_gid)
    data = tomllib.loads(path.read_text())
    token = data["token"]
    assert len(token) >= 32
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert data["tunnel"] == "wss://tunnel.example.com"
    assert data["server"] == "http://127.0.0.1:8000"
    assert data["regexp"] == r"(www|api)\.internal"
    assert "systemctl start wstuncli@demo" in result.stdout
    assert f"curl -H 'X-Token: {token}' https://tunnel.example.com/" in result.stdout
    assert printed_token(result.stdout) == token
    assert token not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.toml"]  # no temporary file left

    # The client's own validation takes the file (config check goes through the same loader).
    check = wstunnel("config", "check", "--client", str(path))
    assert check.returncode == 0, check.stderr
    assert token not in check.stdout


def test_tokens_differ(tmp_path: Path) -> None:
    assert token_new(tmp_path, "one").returncode == 0
    assert token_new(tmp_path, "two").returncode == 0
    first, second = (tomllib.loads((tmp_path / f"{n}.toml").read_text())["token"] for n in ("one", "two"))
    assert first != second


def test_token_new_refuses_to_overwrite(tmp_path: Path) -> None:
    assert token_new(tmp_path, "demo").returncode == 0
    path = tmp_path / "demo.toml"
    before = path.read_bytes(), path.stat().st_mtime_ns
    again = token_new(tmp_path, "demo", tunnel="ws://other.example.com")
    assert again.returncode != 0
    assert "exists" in again.stderr and "not overwritten" in again.stderr
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert "X-Token" not in again.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.toml"]


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "-dash", "sp ace", "x" * 300])
def test_token_new_refuses_bad_names(tmp_path: Path, name: str) -> None:
    result = token_new(tmp_path, name)
    assert result.returncode == 2
    assert "tunnel name" in result.stderr
    assert list(tmp_path.iterdir()) == []
    assert not (tmp_path.parent / "evil.toml").exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"tunnel": "http://tunnel.example.com"}, "--tunnel"),
        ({"tunnel": "wss://"}, "--tunnel"),
        ({"server": "ftp://backend"}, "--server"),
        ({"server": None}, "--regexp"),
    ],
)
def test_token_new_validates_urls_like_the_client(tmp_path: Path, flags: dict, named: str) -> None:
    result = token_new(tmp_path, "demo", **flags)
    assert result.returncode != 0
    assert named in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_token_new_bad_regexp(tmp_path: Path) -> None:
    result = token_new(tmp_path, "demo", "--regexp", "(unclosed")
    assert result.returncode != 0
    assert "--regexp" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_token_new_missing_group(tmp_path: Path) -> None:
    result = wstunnel("token", "new", "demo", "--tunnel", "ws://h", "--server", "http://b",
                      "--config-dir", str(tmp_path), "--group", "no-such-group-wstunnel")
    assert result.returncode != 0
    assert "'no-such-group-wstunnel' does not exist" in result.stderr
    assert "--group" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_token_new_missing_directory(tmp_path: Path) -> None:
    result = token_new(tmp_path / "absent")
    assert result.returncode != 0
    assert "no such directory" in result.stderr


def test_token_new_file_drives_a_real_tunnel(harness: Harness, tmp_path: Path) -> None:
    """The printed curl line's URL and token reach the backend through a real srv and cli."""
    server = harness.server()
    backend = harness.backend()
    directory = tmp_path / "wstuncli.d"
    directory.mkdir()
    result = token_new(directory, "live", tunnel=server.ws_url, server=backend.url)
    assert result.returncode == 0, result.stderr
    token = printed_token(result.stdout)
    harness.tokens.add(token)  # the daemons' logs must not hold it
    assert f"curl -H 'X-Token: {token}' {server.url}/" in result.stdout
    harness.start("cli", [PYTHON, "-m", "wstunnel", "cli", "-config", str(directory / "live.toml")])
    server.wait_clients(token, 1)
    response = httpx.get(f"{server.url}/", headers={"X-Token": token}, timeout=30)
    assert response.status_code == 200
    assert response.text == "backend page /\n"


# -- config check ------------------------------------------------------------------------------


def test_config_check_prints_the_effective_server_configuration(tmp_path: Path) -> None:
    path = tmp_path / "wstunsrv.toml"
    path.write_text('port = 8080\ntrusted_proxies = ["10.0.0.0/8"]\n')
    result = wstunnel("config", "check", str(path), env=environ(WSTUNSRV_PORT="not-a-port"))
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["port"] == 8080  # the file alone: the shell's variable is not the unit's
    assert effective["trusted_proxies"] == ["10.0.0.0/8"]
    assert effective["wstimeout"] == 30.0  # defaults filled in
    assert "config" not in effective


def test_config_check_redacts_client_secrets(tmp_path: Path) -> None:
    directory = tmp_path / "wstuncli.d"
    directory.mkdir()
    token = "abcdefgh-this-is-the-secret-part-0123"
    path = directory / "demo.toml"
    path.write_text(f'token = "{token}"\ntunnel = "wss://t.example.com"\nserver = "http://b:80"\n'
                    'proxy = "http://user:hunter2@proxy:3128"\n')
    path.chmod(0o640)
    result = wstunnel("config", "check", str(path))  # client, from the directory's name
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["token"] == "abcdefgh..."
    assert effective["proxy"] == "http://user:***@proxy:3128"
    assert token not in result.stdout and "hunter2" not in result.stdout
    assert effective["timeout"] == 30.0


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("port = 99999\n", "port"),
        ('port = "eighty"\n', "port"),
        ("prot = 8080\n", "prot"),
        ('trusted_proxies = ["not-an-address"]\n', "trusted_proxies"),
    ],
)
def test_config_check_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "wstunsrv.toml"
    path.write_text(text)
    result = wstunnel("config", "check", "--server", str(path))
    assert result.returncode == EX_CONFIG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and f"'{key}'" in lines[0]
    assert result.stdout == ""


def test_config_check_client_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('tunnel = "wss://t.example.com"\nserver = "http://b"\n')
    missing = wstunnel("config", "check", "--client", str(path))
    assert missing.returncode == EX_CONFIG
    assert str(path) in missing.stderr and "'token'" in missing.stderr

    token = "shortish-but-16+chars-secret-value"
    path.write_text(f'token = "{token}"\ntunnel = "http://wrong"\nserver = "http://b"\n')
    path.chmod(0o640)
    bad = wstunnel("config", "check", "--client", str(path))
    assert bad.returncode == EX_CONFIG
    assert str(path) in bad.stderr and "'tunnel'" in bad.stderr
    assert token not in bad.stderr + bad.stdout


def test_config_check_unreadable_or_broken_file(tmp_path: Path) -> None:
    absent = wstunnel("config", "check", str(tmp_path / "absent.toml"))
    assert absent.returncode == EX_CONFIG
    assert "absent.toml" in absent.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("port = \n")
    result = wstunnel("config", "check", str(broken))
    assert result.returncode == EX_CONFIG
    assert "broken.toml" in result.stderr


# -- status ------------------------------------------------------------------------------------


def test_status_table_and_json(harness: Harness) -> None:
    server = harness.server()
    token = harness.new_token()
    harness.client(server, token)
    assert server.get("/", token).status_code == 200

    table = wstunnel("status", server.url)
    assert table.returncode == 0, table.stderr
    assert token[:8] + "..." in table.stdout
    assert token not in table.stdout
    assert "127.0.0.1" in table.stdout
    header, _, *rows = table.stdout.splitlines()
    assert header.startswith("wstunnel ") and "1 tunnel(s)" in header
    # What one instance holds, at a glance (issue 20): descriptors in use, the limit, the mark.
    assert re.search(r", open files \d+ of \d+ \(503 past \d+\)$", header), header
    assert rows[0].split() == ["TOKEN", "CLIENTS", "ADDRESSES", "VERSION", "PROTOCOL", "TRANSPORT",
                               "PENDING", "COMPLETED", "ERRORED", "IDLE"]
    cells = rows[1].split()
    assert cells[0] == token[:8] + "..." and cells[1] == "1" and cells[7] == "1"
    assert cells[4] == "v2" and cells[5] == (harness.transport or "websocket")

    raw = wstunnel("status", "--json", server.url.removeprefix("http://"))
    assert raw.returncode == 0, raw.stderr
    document = json.loads(raw.stdout)
    assert [t["token"] for t in document["tunnels"]] == [token[:8] + "..."]
    assert token not in raw.stdout


def test_status_without_a_server(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = wstunnel("status", url)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach" in lines[0] and url in lines[0]
    assert result.stdout == ""


def test_unknown_ops_subcommand_is_a_usage_error() -> None:
    assert wstunnel("token", "old").returncode == 2
    assert wstunnel("config").returncode == 2
