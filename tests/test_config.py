"""wstunnel.config: flags, environment and TOML file merged into settings (SPEC §1-§3)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from wstunnel import commands
from wstunnel.config import (
    ClientSettings,
    ServerSettings,
    Settings,
    load_settings,
    parse_port_ranges,
)
from wstunnel.errors import ConfigError
from wstunnel.flags import FlagParser, flag_name, parse_flags

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cr3t-t0ken-0123456789abcdef"
PREFIX = 9  # more than the 8 characters a log line may show of a token
CLIENT_ARGS = ["-token", TOKEN, "-tunnel", "ws://tunnel.example:8080", "-server", "http://localhost:3000"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No WSTUNSRV_/WSTUNCLI_ variable of the machine running the tests leaks in."""
    for name in list(os.environ):
        if name.upper().startswith(("WSTUNSRV_", "WSTUNCLI_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def parser_for(model: type[ServerSettings] | type[ClientSettings]) -> FlagParser:
    name = "wstunnel srv" if model is ServerSettings else "wstunnel cli"
    return commands.daemon_parser(name, model)  # the parser the program itself uses


def load(model: type[Settings], argv: Sequence[str]) -> Settings:
    return load_settings(model, parse_flags(parser_for(model), argv))


def config_error(model: type[Settings], argv: Sequence[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load(model, argv)
    return str(info.value)


def write_toml(tmp_path: Path, text: str, name: str = "wstunnel.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o640)  # a file with a token in it must not be world-readable
    return path


# -- defaults and flag syntax ---------------------------------------------------------------------


def test_server_defaults_are_the_originals() -> None:
    settings = load(ServerSettings, [])
    assert settings.port == 80
    assert settings.host == "0.0.0.0"
    assert settings.wstimeout == 30.0
    assert settings.httptimeout == 1200.0
    assert settings.max_requests_per_tunnel == 20
    assert settings.max_clients_per_token == 0
    assert settings.log_level == "info"
    assert settings.trusted_proxies == []
    assert settings.pidfile is None and settings.logfile is None and settings.syslog is None


def test_client_defaults() -> None:
    settings = load(ClientSettings, CLIENT_ARGS)
    assert settings.token.get_secret_value() == TOKEN
    assert settings.tunnel == "ws://tunnel.example:8080"
    assert settings.server == "http://localhost:3000"
    assert settings.regexp is None
    assert settings.insecure is False
    assert settings.timeout == 30.0
    assert settings.source_ports == []


@pytest.mark.parametrize(
    "argv",
    [["-port", "8080"], ["-port=8080"], ["--port", "8080"], ["--port=8080"]],
)
def test_go_and_gnu_flag_styles(argv: list[str]) -> None:
    assert load(ServerSettings, argv).port == 8080


@pytest.mark.parametrize(
    "argv",
    [
        ["-max-requests-per-tunnel", "5", "--max-clients-per-token=3"],
        ["--max-requests-per-tunnel", "5", "-max-clients-per-token=3"],
    ],
)
def test_multi_word_flags_use_dashes(argv: list[str]) -> None:
    settings = load(ServerSettings, argv)
    assert (settings.max_requests_per_tunnel, settings.max_clients_per_token) == (5, 3)


def test_every_setting_has_both_flag_styles() -> None:
    for model in (ServerSettings, ClientSettings):
        parser = parser_for(model)
        for name in model.model_fields:
            for option in (f"-{flag_name(name)}", f"--{flag_name(name)}"):
                assert parse_flags(parser, [f"{option}=x"]) == {name: "x"}, option


# "-por 8080" is not here: Python 3.11's argparse abbreviates single-dash long options even with
# allow_abbrev=False (fixed in later Pythons), so it means -port.
@pytest.mark.parametrize("argv", [["-bogus", "1"], ["--por", "8080"], ["8080"]])
def test_unknown_or_abbreviated_flags_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_flags(parser_for(ServerSettings), argv)
    assert info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_parse_flags_keeps_only_given_flags_as_strings() -> None:
    flags = parse_flags(parser_for(ServerSettings), ["-port", "81", "-host=::"])
    assert flags == {"port": "81", "host": "::"}


@pytest.mark.parametrize(
    ("extra", "insecure"),
    [
        ([], False),
        (["-insecure"], True),
        (["--insecure"], True),
        (["-insecure=true"], True),
        (["-insecure=false"], False),
        (["--insecure=0"], False),
        (["-insecure=1"], True),
    ],
)
def test_bool_flags_go_style(extra: list[str], insecure: bool) -> None:
    assert load(ClientSettings, [*extra, *CLIENT_ARGS]).insecure is insecure


@pytest.mark.parametrize("style", ["-token", "--token"])
def test_a_flag_value_may_start_with_a_dash_like_go(style: str) -> None:
    # Go's flag package gives -token the next argument, whatever it looks like.
    dashed = "-dash-first-" + TOKEN
    settings = load(ClientSettings, [*CLIENT_ARGS, style, dashed, "-regexp", "-?x", "-insecure"])
    assert settings.token.get_secret_value() == dashed
    assert settings.regexp == "-?x"
    assert settings.insecure is True


@pytest.mark.parametrize("model", [ServerSettings, ClientSettings])
def test_every_flag_but_the_booleans_takes_a_dashed_value(model: type[Settings]) -> None:
    parser = parser_for(model)
    for name, info in model.model_fields.items():
        for option in (f"-{flag_name(name)}", f"--{flag_name(name)}"):
            if info.annotation is bool:  # Go: a boolean never takes the next argument
                assert parse_flags(parser, [option]) == {name: "true"}, option
            else:
                # even a value that is a flag of its own: the original reads -server -help so
                assert parse_flags(parser, [option, "-help"]) == {name: "-help"}, option


def test_a_flag_missing_its_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_flags(parser_for(ServerSettings), ["-host", "::", "-port"])
    assert info.value.code == 2
    assert "-port/--port: expected one argument" in capsys.readouterr().err


def test_bool_flag_alone_does_not_eat_the_next_flag() -> None:
    settings = load(ClientSettings, ["-insecure", "-timeout", "9", *CLIENT_ARGS])
    assert settings.insecure is True
    assert settings.timeout == 9.0


def test_bad_bool_flag() -> None:
    message = config_error(ClientSettings, ["-insecure=maybe", *CLIENT_ARGS])
    assert message.startswith("flag -insecure: ")


# -- clamping -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "clamped"),
    [("-5", 3.0), ("0", 3.0), ("1", 3.0), ("2.5", 3.0), ("3", 3.0), ("30", 30.0), ("45.5", 45.5),
     ("600", 600.0), ("601", 600.0), ("100000", 600.0), ("inf", 600.0), ("-inf", 3.0)],
)
def test_wstimeout_and_timeout_are_clamped_to_3_600(value: str, clamped: float) -> None:
    assert load(ServerSettings, [f"-wstimeout={value}"]).wstimeout == clamped
    assert load(ClientSettings, [*CLIENT_ARGS, f"--timeout={value}"]).timeout == clamped


def test_negative_number_as_separate_flag_value() -> None:
    assert load(ServerSettings, ["-wstimeout", "-5"]).wstimeout == 3.0
    assert load(ServerSettings, ["-wstimeout", "-inf"]).wstimeout == 3.0


def test_clamping_applies_whatever_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_toml(tmp_path, "wstimeout = 1000\n")
    assert load(ServerSettings, ["-config", str(path)]).wstimeout == 600.0
    monkeypatch.setenv("WSTUNSRV_WSTIMEOUT", "1")
    assert load(ServerSettings, ["-config", str(path)]).wstimeout == 3.0


def test_nan_timeouts_are_refused() -> None:
    # min()/max() would let NaN through the clamp, and trio only refuses it once running.
    assert config_error(ServerSettings, ["-wstimeout", "nan"]).startswith("flag -wstimeout: ")
    assert config_error(ClientSettings, [*CLIENT_ARGS, "-timeout", "NaN"]).startswith("flag -timeout: ")


# -- port ranges ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "ports"),
    [
        ("8000..8002,8500", [8000, 8001, 8002, 8500]),
        ("8500", [8500]),
        ("1", [1]),
        ("65535", [65535]),
        ("7..7", [7]),
        (" 8000 .. 8001 , 9000 ", [8000, 8001, 9000]),
        ("9000,8000..8001", [9000, 8000, 8001]),
    ],
)
def test_parse_port_ranges(spec: str, ports: list[int]) -> None:
    assert parse_port_ranges(spec) == ports


def test_parse_port_ranges_whole_range() -> None:
    ports = parse_port_ranges("1..65535")
    assert len(ports) == 65535 and ports[0] == 1 and ports[-1] == 65535


@pytest.mark.parametrize(
    ("spec", "part"),
    [
        ("", "''"),
        ("abc", "'abc'"),
        ("8000..", "'8000..'"),
        ("..8000", "'..8000'"),
        ("8000-8100", "'8000-8100'"),
        ("8000,,8001", "''"),
        ("8000,", "''"),
        ("8002..8000", "'8002..8000'"),
        ("0", "'0'"),
        ("65536", "'65536'"),
        ("1..65536", "'1..65536'"),
        ("-1..5", "'-1..5'"),
        ("8000...8001", "'8000...8001'"),
    ],
)
def test_parse_port_ranges_errors_quote_the_bad_part(spec: str, part: str) -> None:
    with pytest.raises(ValueError, match=part if part != "''" else "^'' is not a port"):
        parse_port_ranges(spec)


def test_client_ports_setting() -> None:
    settings = load(ClientSettings, [*CLIENT_ARGS, "-client-ports", "8000..8002,8500"])
    assert settings.client_ports == "8000..8002,8500"
    assert settings.source_ports == [8000, 8001, 8002, 8500]


@pytest.mark.parametrize("spec", ["8002..8000", "70000", "ports"])
def test_bad_client_ports_name_the_flag(spec: str) -> None:
    message = config_error(ClientSettings, [*CLIENT_ARGS, "-client-ports", spec])
    assert message.startswith("flag -client-ports: ")
    assert repr(spec) in message


# -- precedence: flag > environment > file > default ----------------------------------------------


@pytest.mark.parametrize(
    ("in_file", "in_env", "in_flag", "expected"),
    [
        (False, False, False, 80),
        (True, False, False, 1000),
        (False, True, False, 2000),
        (True, True, False, 2000),
        (False, False, True, 3000),
        (True, False, True, 3000),
        (False, True, True, 3000),
        (True, True, True, 3000),
    ],
)
def test_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_file: bool, in_env: bool, in_flag: bool, expected: int
) -> None:
    argv = ["-config", str(write_toml(tmp_path, "port = 1000\n" if in_file else ""))]
    if in_env:
        monkeypatch.setenv("WSTUNSRV_PORT", "2000")
    if in_flag:
        argv += ["-port", "3000"]
    assert load(ServerSettings, argv).port == expected


def test_sources_merge_key_by_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_toml(tmp_path, 'host = "127.0.0.1"\nport = 1000\nwstimeout = 40\nlog_level = "debug"\n')
    monkeypatch.setenv("WSTUNSRV_PORT", "2000")
    monkeypatch.setenv("WSTUNSRV_HTTPTIMEOUT", "99")
    settings = load(ServerSettings, ["-config", str(path), "-wstimeout", "50"])
    assert settings.host == "127.0.0.1"  # file
    assert settings.log_level == "debug"  # file
    assert settings.port == 2000  # environment over file
    assert settings.httptimeout == 99.0  # environment
    assert settings.wstimeout == 50.0  # flag over file
    assert settings.max_requests_per_tunnel == 20  # default
    assert settings.config == path


def test_environment_names_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_env = write_toml(tmp_path, "port = 1111\n", "env.toml")
    from_flag = write_toml(tmp_path, "port = 2222\n", "flag.toml")
    monkeypatch.setenv("WSTUNSRV_CONFIG", str(from_env))
    assert load(ServerSettings, []).port == 1111
    assert load(ServerSettings, ["-config", str(from_flag)]).port == 2222


def test_client_environment_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSTUNCLI_TOKEN", TOKEN)
    monkeypatch.setenv("WSTUNCLI_TUNNEL", "wss://tunnel.example")
    monkeypatch.setenv("WSTUNCLI_REGEXP", r"https://.*\.example\.com")
    monkeypatch.setenv("WSTUNCLI_INSECURE", "true")
    monkeypatch.setenv("WSTUNSRV_PORT", "notanumber")  # the other daemon's: ignored
    settings = load(ClientSettings, [])
    assert settings.token.get_secret_value() == TOKEN
    assert settings.tunnel == "wss://tunnel.example"
    assert settings.regexp == r"https://.*\.example\.com"
    assert settings.server is None
    assert settings.insecure is True


def test_trusted_proxies_from_each_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_toml(tmp_path, 'trusted_proxies = ["10.0.0.0/8", "::1"]\n')
    assert load(ServerSettings, ["-config", str(path)]).trusted_proxies == ["10.0.0.0/8", "::1"]
    monkeypatch.setenv("WSTUNSRV_TRUSTED_PROXIES", "192.168.1.1, 172.16.0.0/12")
    assert load(ServerSettings, []).trusted_proxies == ["192.168.1.1", "172.16.0.0/12"]
    flags = ["-trusted-proxies", "127.0.0.1,,fe80::/10 "]
    assert load(ServerSettings, flags).trusted_proxies == ["127.0.0.1", "fe80::/10"]


def test_toml_file_for_the_client(tmp_path: Path) -> None:
    text = f'token = "{TOKEN}"\ntunnel = "ws://t/"\nregexp = "x"\nclient_ports = "9000"\n'
    path = write_toml(tmp_path, text + "insecure = true\ntimeout = 9\n")
    settings = load(ClientSettings, ["-config", str(path)])
    assert settings.token.get_secret_value() == TOKEN
    assert settings.tunnel == "ws://t"
    assert settings.source_ports == [9000]
    assert settings.insecure is True
    assert settings.timeout == 9.0


# -- errors name their source --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-port", "notanumber"], "flag -port: Input should be a valid integer"),
        (["-port", "70000"], "flag -port: Input should be less than or equal to 65535"),
        (["-port", "-1"], "flag -port: Input should be greater than or equal to 0"),
        (["-max-requests-per-tunnel", "0"], "flag -max-requests-per-tunnel: Input should be greater"),
        (["-httptimeout", "0"], "flag -httptimeout: Input should be greater than 0"),
        (["-wstimeout", "soon"], "flag -wstimeout: Input should be a valid number"),
        (["-log-level", "loud"], "flag -log-level: Input should be 'debug', 'info', 'warning' or 'error'"),
        (["-trusted-proxies", "10.0.0.0/8,bogus"], "flag -trusted-proxies: 'bogus' is not an IP address"),
        (["-max-body-size", "10"], "flag -max-body-size: Input should be greater than or equal to 1024"),
    ],
)
def test_bad_flag_values_name_the_flag(argv: list[str], expected: str) -> None:
    assert config_error(ServerSettings, argv).startswith(expected)


def test_every_bad_value_is_reported_on_its_own_line() -> None:
    lines = config_error(ServerSettings, ["-port", "x", "-wstimeout", "y"]).splitlines()
    assert [line.split(":")[0] for line in lines] == ["flag -port", "flag -wstimeout"]


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSTUNSRV_PORT", "abc")
    assert config_error(ServerSettings, []).startswith(
        "environment variable WSTUNSRV_PORT: Input should be a valid integer"
    )
    monkeypatch.setenv("WSTUNSRV_PORT", "8080")
    monkeypatch.setenv("WSTUNSRV_MAX_CLIENTS_PER_TOKEN", "-2")
    message = config_error(ServerSettings, [])
    assert message.startswith("environment variable WSTUNSRV_MAX_CLIENTS_PER_TOKEN: ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bogus = 1\n", "key 'bogus': unknown setting"),
        ("max-requests-per-tunnel = 3\n", "key 'max-requests-per-tunnel': unknown setting"),
        ("token = 'not-a-server-setting'\n", "key 'token': unknown setting"),
        ("[server]\nport = 1\n", "key 'server': unknown setting"),
        ('port = "abc"\n', "key 'port': Input should be a valid integer"),
        ("port = 8080.5\n", "key 'port': Input should be a valid integer"),
        ("port = [80]\n", "key 'port': Input should be a valid integer"),
        ('log_level = "loud"\n', "key 'log_level': Input should be"),
        ("trusted_proxies = [1]\n", "key 'trusted_proxies': "),
        ("wstimeout = nan\n", "key 'wstimeout': "),
    ],
)
def test_bad_file_values_name_the_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write_toml(tmp_path, text)
    assert config_error(ServerSettings, ["-config", str(path)]).startswith(f"{path}: {expected}")


def test_file_errors_and_flag_errors_together(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "bogus = 1\nhost = 5\n")
    lines = config_error(ServerSettings, ["-config", str(path), "-port", "x"]).splitlines()
    assert sorted(lines) == sorted([
        f"{path}: key 'bogus': unknown setting",
        f"{path}: key 'host': Input should be a valid string",
        "flag -port: Input should be a valid integer, unable to parse string as an integer",
    ])


def test_a_flag_overriding_a_bad_file_value_hides_it(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'port = "abc"\n')
    assert load(ServerSettings, ["-config", str(path), "-port", "81"]).port == 81


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("port = \n", "invalid TOML: Invalid value (at line 1, column 8)"),
        ("port = 1\nport = 2\n", "invalid TOML: Cannot overwrite a value (at line 2"),
        ("[unclosed\n", "invalid TOML: "),
        ('token = "unterminated\n', "invalid TOML: "),
    ],
)
def test_bad_toml_syntax_names_the_file(tmp_path: Path, text: str, fragment: str) -> None:
    path = write_toml(tmp_path, text)
    message = config_error(ServerSettings, ["-config", str(path)])
    assert message.startswith(f"{path}: {fragment}")


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert config_error(ServerSettings, ["-config", str(path)]) == (
        f"{path}: cannot read: No such file or directory"
    )


def test_config_file_that_is_a_directory(tmp_path: Path) -> None:
    message = config_error(ServerSettings, ["-config", str(tmp_path)])
    assert message == f"{tmp_path}: cannot read: Is a directory"


def test_missing_config_file_named_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WSTUNSRV_CONFIG", str(tmp_path / "gone.toml"))
    assert config_error(ServerSettings, []).startswith(f"{tmp_path / 'gone.toml'}: cannot read")


# -- client requirements -------------------------------------------------------------------------


def test_missing_token_and_tunnel() -> None:
    lines = config_error(ClientSettings, ["-server", "http://b"]).splitlines()
    assert lines == [
        "setting 'token': is required (flag -token, variable WSTUNCLI_TOKEN or config file key)",
        "setting 'tunnel': is required (flag -tunnel, variable WSTUNCLI_TUNNEL or config file key)",
    ]


def test_server_or_regexp_is_required() -> None:
    message = config_error(ClientSettings, ["-token", TOKEN, "-tunnel", "ws://t"])
    assert message == "settings: one of 'server' or 'regexp' is required"
    assert load(ClientSettings, ["-token", TOKEN, "-tunnel", "ws://t", "-regexp", "http://a"]).server is None


def test_token_of_exactly_min_length_is_accepted() -> None:
    token = "0123456789abcdef"
    settings = load(ClientSettings, [*CLIENT_ARGS, "-token", token])
    assert settings.token.get_secret_value() == token


def test_short_token_names_the_flag_but_not_the_token() -> None:
    short = "fifteen-chars!!"
    assert len(short) == 15
    message = config_error(ClientSettings, [*CLIENT_ARGS, "-token", short])
    assert message == "flag -token: must be at least 16 characters"


def test_short_token_from_file_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_toml(tmp_path, 'token = "short"\ntunnel = "ws://t"\nserver = "http://b"\n')
    assert config_error(ClientSettings, ["-config", str(path)]) == (
        f"{path}: key 'token': must be at least 16 characters"
    )
    monkeypatch.setenv("WSTUNCLI_TOKEN", "short")
    assert config_error(ClientSettings, ["-tunnel", "ws://t", "-server", "http://b"]) == (
        "environment variable WSTUNCLI_TOKEN: must be at least 16 characters"
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["-tunnel", "http://t"], "flag -tunnel: must be a ws:// or wss:// URL with a host"),
        (["-tunnel", "ws://"], "flag -tunnel: must be a ws:// or wss:// URL with a host"),
        (["-tunnel", "tunnel.example:80"], "flag -tunnel: must be a ws:// or wss:// URL with a host"),
        (["-server", "ftp://b"], "flag -server: must be an http:// or https:// URL with a host"),
        (["-server", "ws://b"], "flag -server: must be an http:// or https:// URL with a host"),
        (["-server", "localhost:3000"], "flag -server: must be an http:// or https:// URL with a host"),
        (["-proxy", "https://proxy:3128"], "flag -proxy: must be an http://[user:pass@]host:port URL"),
        (["-proxy", "socks5://proxy:1080"], "flag -proxy: must be an http://[user:pass@]host:port URL"),
        (["-regexp", "(unclosed"], "flag -regexp: not a regular expression: missing )"),
        (["-regexp", "*"], "flag -regexp: not a regular expression: nothing to repeat"),
        (["-timeout", "soon"], "flag -timeout: Input should be a valid number"),
        (["-reconnect-max-delay", "0.5"], "flag -reconnect-max-delay: Input should be greater than or equal"),
        (["-max-concurrent-requests", "0"], "flag -max-concurrent-requests: Input should be greater"),
        (["-log-level", "verbose"], "flag -log-level: Input should be"),
    ],
)
def test_bad_client_values_never_show_the_token(extra: list[str], expected: str) -> None:
    message = config_error(ClientSettings, [*CLIENT_ARGS, *extra])
    assert message.startswith(expected)
    assert TOKEN not in message
    assert TOKEN[:PREFIX] not in message


def test_file_errors_never_show_the_token(tmp_path: Path) -> None:
    path = write_toml(tmp_path, f'token = "{TOKEN}"\ntunnel = "{TOKEN}"\nserver = 5\nsecret = "{TOKEN}"\n')
    message = config_error(ClientSettings, ["-config", str(path)])
    assert f"{path}: key 'tunnel': must be a ws:// or wss:// URL with a host" in message
    assert f"{path}: key 'secret': unknown setting" in message
    assert TOKEN[:PREFIX] not in message


def test_settings_repr_hides_the_token() -> None:
    settings = load(ClientSettings, CLIENT_ARGS)
    assert TOKEN not in repr(settings)
    assert TOKEN not in str(settings)


@pytest.mark.parametrize(
    ("flag", "value", "stored"),
    [
        ("-tunnel", "wss://tunnel.example/prefix/", "wss://tunnel.example/prefix"),
        ("-tunnel", "ws://[::1]:8080", "ws://[::1]:8080"),
        ("-server", "https://backend.example/", "https://backend.example"),
        ("-proxy", "proxy.example:3128", "proxy.example:3128"),
        ("-proxy", "http://user:pa%40ss@proxy.example:3128", "http://user:pa%40ss@proxy.example:3128"),
    ],
)
def test_good_urls(flag: str, value: str, stored: str) -> None:
    settings = load(ClientSettings, [*CLIENT_ARGS, flag, value])
    assert getattr(settings, flag.lstrip("-")) == stored


# -- the program: exit status 78 before anything is bound ----------------------------------------


def run_wstunnel(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith(("WSTUNSRV_", "WSTUNCLI_"))}
    environ["WSTUNNEL_NO_REEXEC"] = "1"
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "wstunnel", *args], capture_output=True, text=True, timeout=60,
        cwd=ROOT, env=environ, check=False,
    )


def test_program_bad_port_flag_exits_78() -> None:
    result = run_wstunnel("srv", "-port", "notanumber")
    assert result.returncode == commands.EX_CONFIG == 78
    assert result.stderr == (
        "wstunnel srv: flag -port: Input should be a valid integer, unable to parse string as an integer\n"
    )
    assert result.stdout == ""


def test_program_checks_settings_before_binding() -> None:
    # The port is taken: had the server tried to bind, it would fail with "Address already in use"
    # (exit 1). It must stop at the bad -wstimeout first.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_wstunnel("srv", "-host", "127.0.0.1", "-port", str(port), "-wstimeout", "soon")
    assert result.returncode == 78
    assert result.stderr.startswith("wstunnel srv: flag -wstimeout: Input should be a valid number")
    assert "in use" not in result.stderr


def test_program_missing_config_file_exits_78() -> None:
    result = run_wstunnel("srv", "-config", "/bad/file.toml")
    assert result.returncode == 78
    assert result.stderr == "wstunnel srv: /bad/file.toml: cannot read: No such file or directory\n"


def test_program_bad_config_key_exits_78(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'port = "eighty"\nlisten = 1\n', "srv.toml")
    result = run_wstunnel("srv", "-config", str(path))
    assert result.returncode == 78
    assert sorted(result.stderr.splitlines()) == [
        f"wstunnel srv: {path}: key 'listen': unknown setting",
        f"wstunnel srv: {path}: key 'port': Input should be a valid integer, "
        "unable to parse string as an integer",
    ]


@pytest.mark.parametrize("token", [TOKEN, "-" + TOKEN])
def test_program_client_config_error_hides_the_token(token: str) -> None:
    result = run_wstunnel("cli", "-token", token, "-tunnel", "http://wrong", "-server", "http://b")
    assert result.returncode == 78
    assert result.stderr == "wstunnel cli: flag -tunnel: must be a ws:// or wss:// URL with a host\n"
    assert TOKEN[:PREFIX] not in result.stderr + result.stdout


def test_settings_error_has_a_stable_shape() -> None:
    # Every line is "<where>: <what>", where is a flag, a variable, a file and key, or a setting.
    message = config_error(ClientSettings, ["-tunnel", "x", "-timeout", "y"])
    wheres = [line.split(": ", 1)[0] for line in message.splitlines()]
    assert wheres == ["setting 'token'", "flag -tunnel", "flag -timeout"]


def test_token_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = write_toml(tmp_path, f'token = "{"s" * 20}"\ntunnel = "ws://h"\nserver = "http://b"\n')
    path.chmod(0o644)
    message = config_error(ClientSettings, ["-config", str(path)])
    assert message.startswith(f"{path}: key 'token': the file is readable by other users (mode 0644)")
    assert "s" * 20 not in message
    path.chmod(0o640)
    assert load_settings(ClientSettings, {"config": str(path)}).token.get_secret_value() == "s" * 20
