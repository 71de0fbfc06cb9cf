"""Configuration of both daemons: flags, environment variables and a TOML file.

Every setting has one name, in snake_case: the TOML key. Its flag is the same name with dashes,
accepted Go style (``-port 8080``, ``-port=8080``) as the original WStunnel took them, and GNU style
(``--port 8080``); its environment variable is the name in upper case behind ``WSTUNSRV_`` or
``WSTUNCLI_``. Precedence: flag > environment > file > built-in default (SPEC §1).

Errors name where the bad value came from: the flag, the variable, or the file and its key.
"""

from __future__ import annotations

import ipaddress
import math
import re
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from wstunnel import hostnames, tls
from wstunnel.errors import ConfigError
from wstunnel.flags import flag_name
from wstunnel.password_hash import check_password_hash
from wstunnel.tokens import MIN_LENGTH
from wstunnel.v2 import WindowLimits

MiB = 1024 * 1024
LogLevel = Literal["debug", "info", "warning", "error"]
LogTarget = Literal["auto", "journal", "stderr"]
# Keys whose values are secrets: a file holding one must not be readable by other users.
SECRET_SETTINGS = ("token", "allowed_tokens", "passwords", "password", "host_names",
                   "admin_password")
CommaList = Annotated[list[str], NoDecode]


def _clamp(value: float, low: float, high: float) -> float:
    # The original clamps these silently instead of refusing them; users' scripts rely on it.
    if math.isnan(value):
        # min()/max() pass NaN through, and trio refuses a NaN timeout only once running.
        raise ValueError("must be a number of seconds, not NaN")
    return float(min(max(value, low), high))


def password_pairs(value: SecretStr) -> list[tuple[str, str]]:
    """``token:password,token:password`` (the Go fork's -passwords) as pairs; ValueError if bad."""
    pairs = []
    for index, item in enumerate(value.get_secret_value().split(","), start=1):
        token, colon, password = (part.strip() for part in item.partition(":"))
        if not item.strip():
            continue
        if not colon or not token or not password:
            raise ValueError(f"entry {index} is not token:password")
        if len(token) < MIN_LENGTH:
            raise ValueError(f"entry {index}: the token is shorter than {MIN_LENGTH} characters")
        pairs.append((token, password))
    return pairs


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class _Common(BaseSettings):
    """Settings both daemons have."""

    model_config = SettingsConfigDict(extra="forbid", validate_default=True)

    config: Path | None = Field(None, description="TOML configuration file to read")
    pidfile: Path | None = Field(None, description="write the process id to this file")
    logfile: Path | None = Field(None, description="append log lines to this file (reopened on SIGHUP)")
    syslog: str | None = Field(None, description="log to syslog with this tag")
    log_level: LogLevel = Field("info", description="lowest level logged")
    log_target: LogTarget = Field(
        "auto", description="where lines go without -logfile/-syslog (auto: journal under systemd)"
    )
    max_body_size: int = Field(
        100 * MiB, ge=1024,
        description="largest body held whole in memory (protocol v1, small bodies), bytes",
    )
    max_stream_size: int = Field(
        0, ge=0, description="largest body streamed over protocol v2, bytes (0: no limit)"
    )
    max_stream_window: int = Field(
        32 * MiB, ge=256 * 1024, le=2**31 - 1,
        description="largest v2 receive window of one stream, bytes (it grows with the link)",
    )
    max_tunnel_window: int = Field(
        64 * MiB, ge=4 * MiB, le=2**31 - 1,
        description="largest v2 receive window of a whole tunnel, bytes (it grows with the link)",
    )

    @property
    def window_limits(self) -> WindowLimits:
        return WindowLimits(stream=self.max_stream_window, tunnel=self.max_tunnel_window)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Sources are merged by load_settings(), which must know where each value came from.
        return (init_settings,)


class ServerSettings(_Common):
    model_config = SettingsConfigDict(env_prefix="WSTUNSRV_")

    port: int = Field(80, ge=0, le=65535, description="port to listen on (0: any free port)")
    host: str = Field("0.0.0.0", description="address to listen on")
    wstimeout: float = Field(30.0, description="close a tunnel silent this long, seconds (3..600)")
    httptimeout: float = Field(1200.0, gt=0, description="longest wait for a response, seconds")
    max_requests_per_tunnel: int = Field(20, ge=1, description="requests queued per token")
    max_clients_per_token: int = Field(0, ge=0, description="tunnel connections per token (0: any)")
    max_header_size: int = Field(64 * 1024, ge=1024, description="largest request head, bytes")
    max_header_count: int = Field(256, ge=8, description="most headers in a request")
    header_timeout: float = Field(30.0, gt=0, description="time to send a request head, seconds")
    token_idle_timeout: float = Field(
        3600.0, gt=0, description="forget a token this long after its last client and request"
    )
    trusted_proxies: CommaList = Field(
        default_factory=list, description="addresses or networks whose X-Forwarded-For we believe"
    )
    shutdown_grace: float = Field(5.0, ge=0, description="time in-flight requests get on stop")
    restart_grace: float = Field(
        35.0, ge=0, description="after start, unknown tokens wait this long for their tunnel"
    )
    allowed_tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="if set, only these tokens may open tunnels"
    )
    passwords: SecretStr | None = Field(
        None, description="tunnel passwords, token:password,... (HTTP Basic on /_tunnel)"
    )
    failure_limit: int = Field(
        30, ge=0, description="unknown tokens/failed handshakes per address before 429 (0: no limit)"
    )
    failure_window: float = Field(60.0, gt=0, description="window of failure_limit, seconds")
    max_handshakes: int = Field(
        64, ge=1, description="tunnel handshakes in progress at once; more wait their turn"
    )
    max_queued_bytes: int = Field(
        256 * MiB, ge=1024, description="request bytes queued per token before 503"
    )
    max_streams_per_tunnel: int = Field(
        256, ge=1, description="requests open at once on one v2 tunnel; more wait in the queue"
    )
    base_path: str = Field("", description="serve every endpoint under this path, e.g. /wstunnel")
    # Host routing (README "Host routing"): <label>.<domain> goes through a tunnel, no X-Token.
    host_domains: CommaList = Field(
        default_factory=list, description="domains whose <label>.<domain> routes by host name"
    )
    host_tokens: bool = Field(
        True, description="with host_domains: a label that is not in host_names is the token"
    )
    host_names: Annotated[dict[str, SecretStr], NoDecode] = Field(
        default_factory=dict, description="with host_domains: name=token,... (label -> token)"
    )
    host_credentials: CommaList = Field(
        default_factory=list,
        description="HTTP Basic for named hosts: name=user:hash,... (wstunnel token credential)",
    )
    # TLS on srv itself (README "TLS").
    tls_cert: Path | None = Field(None, description="certificate chain (PEM): HTTPS and wss://")
    tls_key: Path | None = Field(None, description="private key (PEM) of tls_cert")
    tls_port: int | None = Field(
        None, ge=0, le=65535, description="HTTPS on this port, plain HTTP on port (unset: port is HTTPS)"
    )
    tls_client_ca: Path | None = Field(
        None, description="CA (PEM) of the client certificates srv asks for (needs tls_cert)"
    )
    require_client_cert: Literal["no", "tunnel", "all"] = Field(
        "no", description="no, tunnel or all: a verified client certificate to open a tunnel, or always"
    )
    admin_password: SecretStr | None = Field(
        None, description="hash of the /_admin/ console's password for remote access "
                          "(written by `wstunnel admin passwd`)"
    )
    state_file: Path = Field(
        Path("/var/lib/wstunnel/wstunsrv-state.json"),
        description="where blocked tokens are kept across restarts (written atomically)",
    )

    @field_validator("wstimeout")
    @classmethod
    def _clamp_wstimeout(cls, value: float) -> float:
        return _clamp(value, 3, 600)

    @field_validator("trusted_proxies", "allowed_tokens", "host_domains", "host_credentials",
                     mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("base_path")
    @classmethod
    def _check_base_path(cls, value: str) -> str:
        return normalise_base_path(value)

    @field_validator("host_domains")
    @classmethod
    def _check_domains(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(hostnames.normalise_domain(item) for item in value))

    @field_validator("host_names", mode="before")
    @classmethod
    def _parse_host_names(cls, value: Any) -> Any:
        return hostnames.parse_host_names(value) if isinstance(value, str) else value

    @field_validator("host_names")
    @classmethod
    def _check_host_names(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, token in value.items():
            hostnames.check_label(name, "the name")
            if len(token.get_secret_value()) < MIN_LENGTH:
                raise ValueError(f"{name}: the token is shorter than {MIN_LENGTH} characters")
        return value

    @field_validator("host_credentials")
    @classmethod
    def _check_credentials(cls, value: list[str], info: ValidationInfo) -> list[str]:
        names = info.data.get("host_names")
        for name in hostnames.parse_credentials(value):
            if names is not None and name not in names:
                raise ValueError(f"{name!r} is not one of host_names")
        return value

    @field_validator("tls_cert")
    @classmethod
    def _check_tls_cert(cls, value: Path | None) -> Path | None:
        if value is not None:
            tls.check_certificate_file(value)
        return value

    @field_validator("tls_key")
    @classmethod
    def _check_tls_key(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if "tls_cert" not in info.data:
            return value  # tls_cert itself is wrong: that is the error to report
        cert = info.data["tls_cert"]
        if (cert is None) != (value is None):
            raise ValueError("tls_cert and tls_key go together")
        if cert is not None and value is not None:
            tls.server_context(cert, value)  # loads both: a key that does not match says so
        return value

    @field_validator("tls_port")
    @classmethod
    def _check_tls_port(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("tls_cert") is None:
            raise ValueError("needs tls_cert and tls_key")
        return value

    @field_validator("tls_client_ca")
    @classmethod
    def _check_client_ca(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        if info.data.get("tls_cert") is None:
            raise ValueError("needs tls_cert and tls_key (srv asks for client certificates "
                             "on its own TLS listener)")
        tls.check_client_ca(value)
        return value

    @field_validator("require_client_cert")
    @classmethod
    def _check_require(cls, value: str, info: ValidationInfo) -> str:
        if value != "no" and info.data.get("tls_client_ca") is None \
                and not info.data.get("trusted_proxies"):
            raise ValueError("needs tls_client_ca (srv's own TLS) or trusted_proxies (a TLS "
                             "frontend that passes the verified subject)")
        return value

    @field_validator("passwords")
    @classmethod
    def _check_passwords(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            password_pairs(value)  # raises ValueError naming the entry, never its token
        return value

    @field_validator("admin_password")
    @classmethod
    def _check_admin_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_password_hash(value.get_secret_value())  # never echoes the value
        return value

    @field_validator("allowed_tokens")
    @classmethod
    def _check_allowed_tokens(cls, value: list[SecretStr]) -> list[SecretStr]:
        for index, token in enumerate(value):
            if len(token.get_secret_value()) < MIN_LENGTH:
                raise ValueError(f"entry {index + 1} is shorter than {MIN_LENGTH} characters")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return value


class ClientSettings(_Common):
    model_config = SettingsConfigDict(env_prefix="WSTUNCLI_")

    token: SecretStr = Field(description=f"rendez-vous token, at least {MIN_LENGTH} characters")
    tunnel: str = Field(description="tunnel server URL, ws:// or wss://")
    server: str | None = Field(None, description="default backend URL, http:// or https://")
    regexp: str | None = Field(None, description="X-Host values allowed (whole-value match)")
    insecure: bool = Field(False, description="do not verify the tunnel server's certificate")
    certfile: Path | None = Field(None, description="extra CA certificates (PEM) to trust")
    client_cert: Path | None = Field(
        None, description="certificate (PEM) presented to a wss:// server that asks for one"
    )
    client_key: Path | None = Field(None, description="private key (PEM) of client_cert")
    timeout: float = Field(30.0, description="ping timeout, seconds (3..600); pings every third")
    statusfile: Path | None = Field(None, description="rewritten with the time of every pong")
    proxy: str | None = Field(None, description="HTTP CONNECT proxy, http://user:pass@host:port")
    client_ports: str | None = Field(None, description="local source ports, e.g. 8000..8100,8500")
    reconnect_max_delay: float = Field(30.0, ge=1, description="cap of the reconnect backoff, s")
    max_concurrent_requests: int = Field(100, ge=1, description="backend requests at once")
    password: SecretStr | None = Field(
        None, description="tunnel password, if the server sets one for this token"
    )
    transport: Literal["auto", "websocket", "longpoll"] = Field(
        "auto", description="auto (WebSocket, else HTTPS long-poll), websocket or longpoll"
    )
    websocket_retry: float = Field(
        300.0, ge=1, description="with transport auto: try the WebSocket again after this long, s"
    )

    @field_validator("token")
    @classmethod
    def _token_length(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < MIN_LENGTH:
            raise ValueError(f"must be at least {MIN_LENGTH} characters")
        return value

    @field_validator("timeout")
    @classmethod
    def _clamp_timeout(cls, value: float) -> float:
        return _clamp(value, 3, 600)

    @field_validator("client_cert")
    @classmethod
    def _check_client_cert(cls, value: Path | None) -> Path | None:
        if value is not None:
            tls.check_certificate_file(value)
        return value

    @field_validator("client_key")
    @classmethod
    def _check_client_key(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if "client_cert" not in info.data:
            return value
        cert = info.data["client_cert"]
        if (cert is None) != (value is None):
            raise ValueError("client_cert and client_key go together")
        if cert is not None and value is not None:
            tls.client_context(cert, value)
        return value

    @field_validator("tunnel")
    @classmethod
    def _tunnel_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError("must be a ws:// or wss:// URL with a host")
        return value.rstrip("/")

    @field_validator("server")
    @classmethod
    def _server_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value.rstrip("/")

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value if "://" in value else f"http://{value}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("must be an http://[user:pass@]host:port URL")
        return value

    @field_validator("regexp")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @field_validator("client_ports")
    @classmethod
    def _ports(cls, value: str | None) -> str | None:
        if value is not None:
            parse_port_ranges(value)
        return value

    @model_validator(mode="after")
    def _needs_a_backend(self) -> ClientSettings:
        if self.server is None and self.regexp is None:
            raise ValueError("one of 'server' or 'regexp' is required")
        return self

    @property
    def source_ports(self) -> list[int]:
        return parse_port_ranges(self.client_ports) if self.client_ports else []


# What a base path may hold: RFC 3986 path characters, no percent-escapes (the server matches
# the prefix as sent, byte for byte).
_BASE_PATH = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")


def normalise_base_path(value: str) -> str:
    """``wstunnel//x/`` -> ``/wstunnel/x``; ``/`` and empty -> empty (no prefix). ValueError for
    ``.`` or ``..`` segments, control characters and anything that is not a plain path."""
    if any(not ch.isprintable() or ch.isspace() for ch in value):
        raise ValueError("holds a control character or a space")
    if not _BASE_PATH.fullmatch(value):
        raise ValueError("must be a plain path: letters, digits and -._~!$&'()*+,;=:@/ only")
    segments = [segment for segment in value.split("/") if segment]
    if any(segment in (".", "..") for segment in segments):
        raise ValueError("must not hold '.' or '..' segments")
    return "".join("/" + segment for segment in segments)


def parse_port_ranges(spec: str) -> list[int]:
    """``"8000..8100,8500"`` -> the ports it names, in order."""
    ports: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        low, sep, high = part.partition("..")
        try:
            first, last = int(low), int(high if sep else low)
        except ValueError:
            raise ValueError(f"{part!r} is not a port or a range like 8000..8100") from None
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"{part!r} is not a range of ports within 1..65535")
        ports.extend(range(first, last + 1))
    return ports


Settings = TypeVar("Settings", ServerSettings, ClientSettings)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _check_secret_file(path: Path, key: str) -> None:
    """A file holding a token must not be readable by everyone (ssh refuses such keys too)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(
            f"{path}: key '{key}': the file is readable by other users "
            f"(mode {stat.S_IMODE(mode):04o}); chmod 640 it"
        )


def load_settings(model: type[Settings], flags: Mapping[str, Any]) -> Settings:
    """Merge default < file < environment < flags into ``model``, or raise ConfigError."""
    origin: dict[str, str] = {}
    merged: dict[str, Any] = {}
    env_prefix = model.model_config.get("env_prefix", "")

    config_path = flags.get("config")
    env_values = EnvSettingsSource(model)()
    if config_path is None:
        config_path = env_values.get("config")
    if config_path is not None:
        path = Path(config_path)
        document = _read_toml(path)
        secrets_here = [k for k in SECRET_SETTINGS if k in document and k in model.model_fields]
        if secrets_here:
            _check_secret_file(path, secrets_here[0])
        for key, value in document.items():
            merged[key] = value
            origin[key] = f"{path}: key '{key}'"
    for key, value in env_values.items():
        merged[key] = value
        origin[key] = f"environment variable {env_prefix}{key.upper()}"
    for key, value in flags.items():
        if value is not None:
            merged[key] = value
            origin[key] = f"flag -{flag_name(key)}"
    try:
        return model(**merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin, env_prefix)) from None


def _describe(exc: ValidationError, origin: Mapping[str, str], env_prefix: str) -> str:
    lines = []
    for error in exc.errors():
        key = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            where = f"setting '{key}'"
            message = (
                f"is required (flag -{flag_name(key)}, variable {env_prefix}{key.upper()} "
                "or config file key)"
            )
        elif error["type"] == "extra_forbidden":
            where = origin.get(key, f"setting '{key}'")
            message = "unknown setting"
        elif not key:
            where = "settings"
        else:
            where = origin.get(key, f"setting '{key}'")
        lines.append(f"{where}: {message}")
    return "\n".join(lines)
