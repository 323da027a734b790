"""Configuration: TOML -> frozen dataclasses, validated once, before any worker starts.

Every problem is collected (not just the first) as (key, value, reason) and raised together in
one `ConfigError`. Durations accept numbers of seconds or strings such as "250ms", "10s", "2m";
sizes accept integers of bytes or strings such as "16KiB", "10MiB", "1MB". Environment
overrides for containers are applied in `apply_env`, the only place that reads the environment;
a problem with an overridden value is reported under the variable's name ("UVGATE_WORKERS
(server.workers)"), not as the file's.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from proxy.errors import ConfigError
from proxy.forwarding import FORWARDING, FRAMING, HOP_BY_HOP

T = TypeVar("T")

KiB = 1024
MiB = 1024 * KiB
MAX_DURATION = 86400.0


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: Address = Address("127.0.0.1", 8080)
    workers: int = 2
    admin_listen: Address = Address("127.0.0.1", 9901)
    backlog: int = 2048
    # Graceful shutdown / reload.
    drain_timeout: float = 10.0
    drain_idle_grace: float = 1.0  # during drain, a connection idle this long is closed
    # Downstream limits.
    max_header_bytes: int = 16 * KiB  # request line + headers -> 431
    max_header_count: int = 100  # -> 431
    max_body_bytes: int = 16 * MiB  # -> 413
    header_timeout: float = 10.0  # first byte to end of head -> 408 (slowloris guard)
    keepalive_timeout: float = 60.0  # idle keep-alive connection closed after this
    body_timeout: float = 60.0  # request body: max gap between reads -> 408
    body_total_timeout: float = 60.0  # request body: end of head to last byte -> 408
    body_buffer_size: int = 64 * KiB  # a request body is read up to this much before an upstream is taken
    body_buffer_memory: int = 64 * MiB  # per worker: request bodies held that way at once
    half_close: str = "abort"  # a client's FIN while a response is pending: "abort" (NGINX) or "finish"
    send_timeout: float = 60.0  # response: client not reading for this long -> close
    lingering_timeout: float = 2.0  # after an error answer, read and discard this long so the client sees it
    write_buffer_limit: int = 256 * KiB  # per-transport high-water mark (flow control)
    max_pipelined: int = 32  # requests parsed ahead of the one in flight
    # Headers.
    request_id_header: str = "x-request-id"
    via: str = ""  # e.g. "1.1 uvgate"; empty = no Via header
    # Process management.
    heartbeat_timeout: float = 30.0  # a worker silent this long is killed and replaced
    restart_backoff_max: float = 10.0
    access_log: bool = False  # one JSON line per request
    access_log_path: str = ""  # "" = standard error


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    servers: tuple[Address, ...]
    max_connections: int = 256  # per worker and server
    max_pending: int = 1024  # requests waiting for a connection -> 503 beyond
    pending_timeout: float = 5.0  # wait for a pooled connection -> 503
    connect_timeout: float = 2.0  # -> 504
    response_timeout: float = 30.0  # request sent -> response head; also max gap between body reads -> 504
    idle_timeout: float = 30.0  # pooled idle connection expires after this
    max_fails: int = 3  # consecutive connect failures before a server is skipped
    fail_cooldown: float = 10.0  # how long a failed server is skipped


@dataclass(frozen=True, slots=True)
class RouteConfig:
    prefix: str
    upstream: str
    host: str | None = None
    auth: str = "none"  # "none", "jwt" ([auth.jwt]) or "introspect" ([auth.introspect])
    name: str = ""  # for logs and metrics; default: host + prefix
    required_scope: tuple[str, ...] = ()  # every one of these scopes, or 403 (auth routes only)
    limits: tuple[str, ...] = ()  # names of [limits.NAME] tables, checked in this order


# Signature algorithms the JWT verifier accepts in `auth.jwt.algorithms` (pyjwt[crypto] implements them).
HMAC_ALGORITHMS = {"HS256": 32, "HS384": 48, "HS512": 64}  # -> shortest secret, in bytes (RFC 7518 3.2)
KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
BOOT_SERVE = "serve"  # first JWKS fetch failed: start anyway, JWT routes answer 503 until keys arrive
BOOT_REQUIRE = "require"  # first JWKS fetch failed: the worker fails to boot (the supervisor exits 3)


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """`[auth.jwt]`: bearer JWTs verified in the proxy (HMAC secret and/or keys from a JWKS URL)."""

    algorithms: tuple[str, ...]
    secret: str = field(default="", repr=False)  # HS* only
    jwks_url: str = ""  # RS*/PS*/ES*/EdDSA: http:// or https://
    jwks_ca_file: str = ""  # https: trust this CA bundle instead of the system's
    issuer: str | None = None
    audience: tuple[str, ...] = ()  # any of these; empty: `aud` is not checked
    leeway: float = 30.0  # clock skew allowed on exp, nbf and iat
    required_claims: tuple[str, ...] = ("exp",)
    subject_claim: str = "sub"  # the identity rate limits count (exchange.subject)
    forward_claims: tuple[tuple[str, str], ...] = ()  # (claim, header name), in config order
    cache_size: int = 100_000  # verified tokens per worker
    negative_cache_size: int = 10_000  # rejected tokens per worker
    negative_ttl: float = 10.0  # how long a rejected token is answered without the crypto
    jwks_refresh: float = 300.0  # background refresh period
    jwks_cooldown: float = 5.0  # shortest gap between refreshes that unknown `kid`s trigger
    jwks_timeout: float = 5.0  # one fetch, connect to last byte
    jwks_max_bytes: int = 1024 * 1024
    jwks_wait: float = 5.0  # how long a request with an unknown `kid` waits for the refresh
    jwks_boot: str = BOOT_SERVE


@dataclass(frozen=True, slots=True)
class IntrospectConfig:
    """`[auth.introspect]`: opaque tokens checked against an RFC 7662 endpoint, answers cached."""

    url: str
    ca_file: str = ""  # https: trust this CA bundle instead of the system's
    client_id: str = ""  # HTTP Basic credentials for the endpoint, when it wants them
    client_secret: str = field(default="", repr=False)
    timeout: float = 5.0  # one call, connect to last byte; also how long a request waits for it
    max_bytes: int = 64 * 1024
    cache_ttl: float = 300.0  # an active answer is reused this long at most (and never past its `exp`)
    inactive_ttl: float = 10.0  # an inactive answer is reused this long
    cache_size: int = 100_000
    negative_cache_size: int = 10_000
    max_inflight: int = 256  # concurrent calls per worker; beyond: 503
    subject_claim: str = "sub"
    forward_claims: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class AuthConfig:
    realm: str = "uvgate"  # WWW-Authenticate: Bearer realm="..."
    jwt: JwtConfig | None = None
    introspect: IntrospectConfig | None = None

    def identity_headers(self) -> frozenset[bytes]:
        """Header names the proxy vouches for (forwarded claims): a client's copies are always dropped."""
        pairs = (self.jwt.forward_claims if self.jwt else ()) + (
            self.introspect.forward_claims if self.introspect else ()
        )
        return frozenset(header.encode() for _, header in pairs)


FAIL_OPEN = "open"  # Redis unreachable or slower than its timeout: serve on local limits only
FAIL_CLOSED = "closed"  # ... answer 503 on routes with a global limit
FIXED_WINDOW = "fixed_window"
SLIDING_WINDOW = "sliding_window"  # two-window weighted estimate


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """`[redis]`: the counters of global limits, synced by every worker in batches."""

    url: str = ""  # redis://, rediss://, unix:// or redis+sentinel://host:port[,host:port]/service[/db]
    cluster: bool = False  # a Redis Cluster reached through the node of `url`
    failure_mode: str = FAIL_OPEN
    sync_interval: float = 0.01  # pending increments are sent at least this often (and early when a key runs low)
    timeout: float = 0.05  # budget of one sync round trip (connecting included)
    key_prefix: str = "uvgate:rl:"


@dataclass(frozen=True, slots=True)
class LimitConfig:
    """`[limits.NAME]`: a local token bucket per worker and/or a global limit per subject, per route."""

    name: str
    local_rate: float = 0.0  # tokens a second, per worker, per (route, subject); 0: no local bucket
    local_burst: int = 0  # bucket size (default: the rate, at least 1)
    global_limit: int = 0  # requests per window per (route, subject) across every worker and host; 0: none
    window: float = 1.0
    algorithm: str = FIXED_WINDOW
    max_subjects: int = 100_000  # subjects tracked per worker and route (least recent evicted beyond)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = True  # count in the workers, serve /metrics and /stats.json on the admin listener
    # The prometheus-client multiprocess directory. "": a fresh one made (and removed) by the supervisor;
    # a path: created if missing, its *.db files removed at start and at exit (the supervisor owns it).
    directory: str = ""
    interval: float = 1.0  # how often a worker folds its counts into its files


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    upstreams: Mapping[str, UpstreamConfig]
    routes: tuple[RouteConfig, ...]
    redis: RedisConfig = field(default_factory=RedisConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: Mapping[str, LimitConfig] = field(default_factory=dict)
    source: str = ""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


# ---------------------------------------------------------------------------------------------- parsing helpers

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib|k|m|g)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1, "k": KiB, "kib": KiB, "kb": 1000, "m": MiB, "mib": MiB, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
}  # fmt: skip


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "250ms", "10s", "2m"; raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError('expected seconds or a string like "250ms", "10s", "2m"')
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("must be a finite, non-negative duration")
    if seconds > MAX_DURATION:
        raise ValueError("must not exceed one day")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an int or a string like "16KiB", "10MiB"; raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        unit = m.group(2).lower() if m.group(2) else None
        size = int(m.group(1)) * _SIZE_UNITS[unit]
    else:
        raise ValueError('expected bytes or a string like "16KiB", "10MiB"')
    if size < 0:
        raise ValueError("must not be negative")
    return size


def parse_address(value: object, *, default_host: str = "0.0.0.0") -> Address:
    """`host:port`, `[v6]:port` or `:port`; raises ValueError."""
    if not isinstance(value, str) or not value:
        raise ValueError('expected "host:port"')
    text = value.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError('expected "[ipv6]:port"')
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError('expected "host:port"')
        if ":" in host:
            raise ValueError('IPv6 addresses need brackets: "[::1]:8080"')
    host = host or default_host
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("port must be a number from 0 to 65535")
    if not re.fullmatch(r"[A-Za-z0-9.\-_:%]+", host):
        raise ValueError("invalid host")
    return Address(host, int(port_text))


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected an integer")
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected an integer")
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _half_close(value: object) -> str:
    text = _string(value)
    if text not in ("abort", "finish"):
        raise ValueError('expected "abort" or "finish"')
    return text


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


# Headers the proxy manages itself (framing, hop-by-hop, forwarding): never configurable names.
_RESERVED_HEADERS = frozenset(name.decode() for name in HOP_BY_HOP | FRAMING | FORWARDING | {b"host", b"expect"})


def _header_name(value: object) -> str:
    text = _string(value).lower()
    if not re.fullmatch(r"[a-z0-9!#$%&'*+.^_`|~-]+", text):
        raise ValueError("not a valid header name")
    if text in _RESERVED_HEADERS:
        raise ValueError("a header the proxy manages itself (framing, hop-by-hop or forwarding)")
    return text


def _header_value(value: object) -> str:
    text = _string(value)
    if any(ch in text for ch in "\r\n\x00"):
        raise ValueError("must not contain CR, LF or NUL")
    return text


class _Reader:
    """Collects problems while reading one table; `get` returns the default on error."""

    def __init__(self, problems: list[tuple[str, object, str]], prefix: str, table: Mapping[str, Any]) -> None:
        self.problems = problems
        self.prefix = prefix
        self.table = table
        self.seen: set[str] = set()

    def get(self, key: str, parse: Callable[[object], T], default: T) -> T:
        self.seen.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        try:
            return parse(value)
        except ValueError as exc:
            self.problems.append((f"{self.prefix}{key}", value, str(exc)))
            return default

    def require(self, key: str, parse: Callable[[object], T], default: T) -> T:
        if key not in self.table:
            self.seen.add(key)
            self.problems.append((f"{self.prefix}{key}", None, "is required"))
            return default
        return self.get(key, parse, default)

    def finish(self) -> None:
        for key in self.table:
            if key not in self.seen:
                self.problems.append((f"{self.prefix}{key}", self.table[key], "unknown key"))


# ---------------------------------------------------------------------------------------------- sections

_SERVER_PARSERS: dict[str, Callable[[object], Any]] = {
    "listen": parse_address,
    "workers": _positive_int,
    "admin_listen": lambda v: parse_address(v, default_host="127.0.0.1"),
    "backlog": _positive_int,
    "drain_timeout": parse_duration,
    "drain_idle_grace": parse_duration,
    "max_header_bytes": parse_size,
    "max_header_count": _positive_int,
    "max_body_bytes": parse_size,
    "header_timeout": _positive_duration,
    "keepalive_timeout": _positive_duration,
    "body_timeout": _positive_duration,
    "body_total_timeout": _positive_duration,
    "body_buffer_size": parse_size,
    "body_buffer_memory": parse_size,
    "half_close": _half_close,
    "send_timeout": _positive_duration,
    "lingering_timeout": _positive_duration,
    "write_buffer_limit": parse_size,
    "max_pipelined": _positive_int,
    "request_id_header": _header_name,
    "via": _header_value,
    "heartbeat_timeout": _positive_duration,
    "restart_backoff_max": _positive_duration,
    "access_log": _bool,
    "access_log_path": _string,
}

_UPSTREAM_PARSERS: dict[str, Callable[[object], Any]] = {
    "max_connections": _positive_int,
    "max_pending": _non_negative_int,
    "pending_timeout": parse_duration,
    "connect_timeout": _positive_duration,
    "response_timeout": _positive_duration,
    "idle_timeout": _positive_duration,
    "max_fails": _positive_int,
    "fail_cooldown": parse_duration,
}


def _read_section(
    problems: list[tuple[str, object, str]],
    prefix: str,
    table: Mapping[str, Any],
    parsers: Mapping[str, Callable[[object], Any]],
    defaults: object,
) -> dict[str, Any]:
    reader = _Reader(problems, prefix, table)
    values = {key: reader.get(key, parse, getattr(defaults, key)) for key, parse in parsers.items()}
    reader.seen.update(parsers)
    return values


def _server(problems: list[tuple[str, object, str]], table: object) -> ServerConfig:
    if not isinstance(table, Mapping):
        problems.append(("server", table, "expected a table"))
        return ServerConfig()
    defaults = ServerConfig()
    values = _read_section(problems, "server.", table, _SERVER_PARSERS, defaults)
    for key in table:
        if key not in _SERVER_PARSERS:
            problems.append((f"server.{key}", table[key], "unknown key"))
    server = ServerConfig(**values)
    if server.max_header_bytes < 1024:
        problems.append(("server.max_header_bytes", server.max_header_bytes, "must be at least 1KiB"))
    if server.write_buffer_limit < 4 * KiB:
        problems.append(("server.write_buffer_limit", server.write_buffer_limit, "must be at least 4KiB"))
    if server.listen.port != 0 and server.listen.port == server.admin_listen.port:
        problems.append(("server.admin_listen", str(server.admin_listen), "must use another port than server.listen"))
    if server.heartbeat_timeout < 3.0:
        problems.append(
            ("server.heartbeat_timeout", server.heartbeat_timeout, "must be at least 3s (beats are 1s apart)")
        )
    if server.body_buffer_memory < server.body_buffer_size:
        problems.append(
            ("server.body_buffer_memory", server.body_buffer_memory, "must be at least server.body_buffer_size")
        )
    if server.backlog > 65535:
        problems.append(("server.backlog", server.backlog, "must be at most 65535"))
    if server.access_log_path not in ("", "-"):
        directory = os.path.dirname(os.path.abspath(server.access_log_path))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            problems.append(("server.access_log_path", server.access_log_path, "directory missing or not writable"))
    return server


def _servers(value: object) -> tuple[Address, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError('expected a non-empty list of "host:port"')
    out = []
    for item in value:
        address = parse_address(item)
        if address.port == 0:
            raise ValueError(f"{item!r}: port 0 is not a valid upstream port")
        if address.host in ("0.0.0.0", "::"):
            raise ValueError(f"{item!r}: an upstream needs a concrete host")
        out.append(address)
    return tuple(out)


def _upstream(problems: list[tuple[str, object, str]], name: str, table: object) -> UpstreamConfig | None:
    prefix = f"upstreams.{name}."
    if not isinstance(table, Mapping):
        problems.append((f"upstreams.{name}", table, "expected a table"))
        return None
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        problems.append((f"upstreams.{name}", name, "upstream names use letters, digits, '_', '.', '-'"))
    reader = _Reader(problems, prefix, table)
    no_servers: tuple[Address, ...] = ()
    servers = reader.require("servers", _servers, no_servers)
    defaults = UpstreamConfig(name=name, servers=())
    values = _read_section(problems, prefix, table, _UPSTREAM_PARSERS, defaults)
    reader.seen.update(_UPSTREAM_PARSERS)
    reader.finish()
    return UpstreamConfig(name=name, servers=servers, **values)


_AUTH_MODES = ("none", "jwt", "introspect")


def _auth(value: object) -> str:
    text = _string(value)
    if text not in _AUTH_MODES:
        raise ValueError(f"supported: {', '.join(_AUTH_MODES)}")
    return text


def _prefix(value: object) -> str:
    text = _string(value)
    if not text.startswith("/"):
        raise ValueError('must start with "/"')
    if any(ch in text for ch in " \r\n\t\x00?#"):
        raise ValueError("must not contain whitespace, '?' or '#'")
    return text


def _host(value: object) -> str:
    text = _string(value).lower()
    if not text or not re.fullmatch(r"[a-z0-9.\-*:\[\]]+", text):
        raise ValueError("invalid host name")
    return text


def _route(
    problems: list[tuple[str, object, str]],
    index: int,
    table: object,
    upstreams: Mapping[str, Any],
    auth_config: AuthConfig,
    limits: Mapping[str, object],
) -> RouteConfig | None:
    prefix = f"routes[{index}]."
    if not isinstance(table, Mapping):
        problems.append((f"routes[{index}]", table, "expected a table"))
        return None
    reader = _Reader(problems, prefix, table)
    path = reader.require("prefix", _prefix, "/")
    upstream = reader.require("upstream", _string, "")
    host = reader.get("host", _host, None)
    auth = reader.get("auth", _auth, "none")
    name = reader.get("name", _route_name, "")
    no_scopes: tuple[str, ...] = ()
    scopes = reader.get("required_scope", _scopes, no_scopes)
    limit_names = reader.get("limits", _limit_list, no_scopes)
    reader.finish()
    for limit_name in limit_names:
        if limit_name not in limits:
            known = ", ".join(sorted(limits)) or "none defined"
            problems.append((f"{prefix}limits", limit_name, f"no such [limits.{limit_name}] table (known: {known})"))
    if upstream and upstream not in upstreams:
        known = ", ".join(sorted(upstreams)) or "none defined"
        problems.append((f"{prefix}upstream", upstream, f"no such upstream (known: {known})"))
    if auth == "jwt" and auth_config.jwt is None:
        problems.append((f"{prefix}auth", auth, "needs an [auth.jwt] table"))
    if auth == "introspect" and auth_config.introspect is None:
        problems.append((f"{prefix}auth", auth, "needs an [auth.introspect] table"))
    if scopes and auth == "none":
        problems.append((f"{prefix}required_scope", " ".join(scopes), 'needs auth = "jwt" or "introspect"'))
    return RouteConfig(
        prefix=path,
        upstream=upstream,
        host=host,
        auth=auth,
        name=name or (host or "") + path,
        required_scope=scopes,
        limits=limit_names,
    )


def _limit_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ValueError('expected a list of limit names, e.g. ["per_key"]')
    if len(set(value)) != len(value):
        raise ValueError("names a limit twice")
    return tuple(value)


def _scopes(value: object) -> tuple[str, ...]:
    text = _string(value)
    scopes = tuple(dict.fromkeys(text.split()))
    if not scopes or any(not 0x21 <= ord(ch) <= 0x7E or ch in '"\\' for ch in text.replace(" ", "")):
        raise ValueError('expected space-separated scope names (RFC 6749 3.3), e.g. "read write"')
    return scopes


def _route_name(value: object) -> str:
    text = _string(value)
    if not re.fullmatch(r"[A-Za-z0-9_.:/\-]{1,64}", text):
        raise ValueError("route names use 1 to 64 letters, digits, '_', '.', ':', '/', '-'")
    return text


# ---------------------------------------------------------------------------------------------- auth

_CLAIM = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")


def _claim_name(value: object) -> str:
    text = _string(value)
    if not _CLAIM.fullmatch(text):
        raise ValueError("claim names use 1 to 64 letters, digits, '_', '.', ':', '-'")
    return text


def _http_url(value: object) -> str:
    text = _string(value)
    match = re.fullmatch(r"(https?)://([A-Za-z0-9.\-_]+|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?(/[^\s#]*)?", text)
    if match is None:
        raise ValueError("expected an http:// or https:// URL (host, optional port and path)")
    if match.group(3) and not 0 < int(match.group(3)[1:]) <= 65535:
        raise ValueError("port must be a number from 1 to 65535")
    return text


def _string_list(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ValueError("expected a string or a list of non-empty strings")
    return tuple(dict.fromkeys(value))


def _algorithms(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise ValueError('expected a non-empty list such as ["RS256", "ES256"]')
    if any(item.lower() == "none" for item in value):
        raise ValueError('"none" (unsigned tokens) is never accepted')
    known = (*HMAC_ALGORITHMS, *KEY_ALGORITHMS)
    unknown = [item for item in value if item not in known]
    if unknown:
        raise ValueError(f"unknown algorithm {unknown[0]!r} (supported: {', '.join(known)})")
    return tuple(dict.fromkeys(value))


def _readable_file(value: object) -> str:
    text = _string(value)
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise ValueError("no readable file there")
    return text


def _boot(value: object) -> str:
    text = _string(value)
    if text not in (BOOT_SERVE, BOOT_REQUIRE):
        raise ValueError(f'expected "{BOOT_SERVE}" or "{BOOT_REQUIRE}"')
    return text


def _forward_claims(
    problems: list[tuple[str, object, str]], key: str, value: object, reserved: frozenset[str]
) -> tuple[tuple[str, str], ...]:
    """`{ claim = "Header-Name", ... }` -> ((claim, lower-cased header), ...); problems named by key."""
    if not isinstance(value, Mapping):
        problems.append((key, value, 'expected a table such as { sub = "X-Auth-Subject" }'))
        return ()
    out: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for claim, header in value.items():
        where = f"{key}.{claim}"
        try:
            _claim_name(claim)
            name = _header_name(header)
        except ValueError as exc:
            problems.append((where, header, str(exc)))
            continue
        if name in reserved:
            problems.append((where, header, "a header the proxy reads or sets itself"))
        elif name in seen:
            problems.append((where, header, f"already the header of claim {seen[name]!r}"))
        else:
            seen[name] = claim
            out.append((claim, name))
    return tuple(out)


def _hidden(secret: str) -> str:
    return f"<{len(secret.encode())} bytes, not shown>"


# Keys of [auth.jwt] and [auth.introspect] read as they are (the others are checked together in _jwt and _introspect).
_JWT_PARSERS: dict[str, Callable[[object], Any]] = {
    "jwks_ca_file": _readable_file,
    "leeway": parse_duration,
    "subject_claim": _claim_name,
    "cache_size": _positive_int,
    "negative_cache_size": _positive_int,
    "negative_ttl": parse_duration,
    "jwks_refresh": _positive_duration,
    "jwks_cooldown": parse_duration,
    "jwks_timeout": _positive_duration,
    "jwks_max_bytes": parse_size,
    "jwks_wait": _positive_duration,
    "jwks_boot": _boot,
}
_INTROSPECT_PARSERS: dict[str, Callable[[object], Any]] = {
    "ca_file": _readable_file,
    "timeout": _positive_duration,
    "max_bytes": parse_size,
    "cache_ttl": _positive_duration,
    "inactive_ttl": _positive_duration,
    "cache_size": _positive_int,
    "negative_cache_size": _positive_int,
    "max_inflight": _positive_int,
    "subject_claim": _claim_name,
}


def _jwt(problems: list[tuple[str, object, str]], table: object, reserved: frozenset[str]) -> JwtConfig | None:
    prefix = "auth.jwt."
    if not isinstance(table, Mapping):
        problems.append(("auth.jwt", table, "expected a table"))
        return None
    reader = _Reader(problems, prefix, table)
    d = JwtConfig(algorithms=())
    none: tuple[str, ...] = ()
    algorithms = reader.require("algorithms", _algorithms, none)
    secret = table.get("secret", "")
    reader.seen.add("secret")
    if not isinstance(secret, str):
        problems.append((prefix + "secret", type(secret).__name__, "expected a string"))
        secret = ""
    jwks_url = reader.get("jwks_url", _http_url, "")
    issuer = reader.get("issuer", _string, None)
    audience = reader.get("audience", _string_list, none)
    required = reader.get("required_claims", _string_list, d.required_claims)
    values = _read_section(problems, prefix, table, _JWT_PARSERS, d)
    reader.seen.update(_JWT_PARSERS)
    config = JwtConfig(
        algorithms=algorithms,
        secret=secret,
        jwks_url=jwks_url,
        issuer=issuer,
        audience=audience,
        required_claims=required,
        **values,
    )
    forward = _forward_claims(problems, prefix + "forward_claims", table.get("forward_claims", {}), reserved)
    reader.seen.add("forward_claims")
    reader.finish()
    hmac = [alg for alg in algorithms if alg in HMAC_ALGORITHMS]
    keyed = [alg for alg in algorithms if alg not in HMAC_ALGORITHMS]
    if hmac and not secret:
        problems.append((prefix + "secret", None, f"is required for {', '.join(hmac)}"))
    elif hmac:
        shortest = max(HMAC_ALGORITHMS[alg] for alg in hmac)
        if len(secret.encode()) < shortest:
            problems.append(
                (prefix + "secret", _hidden(secret), f"must be at least {shortest} bytes for {', '.join(hmac)}")
            )
    elif secret:
        problems.append((prefix + "secret", _hidden(secret), "set, but no HS256/HS384/HS512 in auth.jwt.algorithms"))
    if keyed and "jwks_url" not in table:
        problems.append((prefix + "jwks_url", None, f"is required for {', '.join(keyed)}"))
    elif jwks_url and not keyed:
        problems.append((prefix + "jwks_url", jwks_url, "set, but auth.jwt.algorithms has no key algorithm"))
    if config.jwks_max_bytes < 1024:
        problems.append((prefix + "jwks_max_bytes", config.jwks_max_bytes, "must be at least 1KiB"))
    return replace(config, forward_claims=forward)


def _introspect(
    problems: list[tuple[str, object, str]], table: object, reserved: frozenset[str]
) -> IntrospectConfig | None:
    prefix = "auth.introspect."
    if not isinstance(table, Mapping):
        problems.append(("auth.introspect", table, "expected a table"))
        return None
    reader = _Reader(problems, prefix, table)
    d = IntrospectConfig(url="")
    url = reader.require("url", _http_url, "")
    client_id = reader.get("client_id", _string, "")
    client_secret = table.get("client_secret", "")
    reader.seen.add("client_secret")
    if not isinstance(client_secret, str):
        problems.append((prefix + "client_secret", type(client_secret).__name__, "expected a string"))
        client_secret = ""
    if bool(client_id) != bool(client_secret):
        problems.append((prefix + "client_id", client_id, "client_id and client_secret go together"))
    values = _read_section(problems, prefix, table, _INTROSPECT_PARSERS, d)
    reader.seen.update(_INTROSPECT_PARSERS)
    forward = _forward_claims(problems, prefix + "forward_claims", table.get("forward_claims", {}), reserved)
    config = IntrospectConfig(
        url=url, client_id=client_id, client_secret=client_secret, forward_claims=forward, **values
    )
    reader.seen.add("forward_claims")
    reader.finish()
    return config


def _auth_section(problems: list[tuple[str, object, str]], table: object, server: ServerConfig) -> AuthConfig:
    if not isinstance(table, Mapping):
        problems.append(("auth", table, "expected a table"))
        return AuthConfig()
    reader = _Reader(problems, "auth.", table)
    realm = reader.get("realm", _realm, "uvgate")
    reader.seen.update(("jwt", "introspect"))
    reader.finish()
    # The proxy reads Authorization itself, and sets the request id: never a claim's header.
    reserved = frozenset({"authorization", server.request_id_header.lower()})
    jwt = _jwt(problems, table["jwt"], reserved) if "jwt" in table else None
    introspect = _introspect(problems, table["introspect"], reserved) if "introspect" in table else None
    return AuthConfig(realm=realm, jwt=jwt, introspect=introspect)


def _realm(value: object) -> str:
    text = _string(value)
    if not re.fullmatch(r"[\x20-\x7e]{1,64}", text) or '"' in text or "\\" in text:
        raise ValueError("1 to 64 printable ASCII characters, without quotes or backslashes")
    return text


_METRICS_PARSERS: dict[str, Callable[[object], Any]] = {
    "enabled": _bool,
    "directory": _string,
    "interval": _positive_duration,
}


def _metrics(problems: list[tuple[str, object, str]], table: object) -> MetricsConfig:
    if not isinstance(table, Mapping):
        problems.append(("metrics", table, "expected a table"))
        return MetricsConfig()
    values = _read_section(problems, "metrics.", table, _METRICS_PARSERS, MetricsConfig())
    for key in table:
        if key not in _METRICS_PARSERS:
            problems.append((f"metrics.{key}", table[key], "unknown key"))
    metrics = MetricsConfig(**values)
    # Only its form is checked here: it may not exist yet when the config is checked (systemd makes
    # /run/uvgate when the service starts); the supervisor creates it and names the key if it cannot.
    if metrics.directory and not os.path.isabs(metrics.directory):
        problems.append(("metrics.directory", metrics.directory, "must be an absolute path"))
    if metrics.interval > 60.0:
        problems.append(("metrics.interval", metrics.interval, "must be at most 60s"))
    return metrics


def _failure_mode(value: object) -> str:
    text = _string(value)
    if text not in (FAIL_OPEN, FAIL_CLOSED):
        raise ValueError(f'expected "{FAIL_OPEN}" or "{FAIL_CLOSED}"')
    return text


def _key_prefix(value: object) -> str:
    text = _string(value)
    if not re.fullmatch(r"[A-Za-z0-9_.:\-]{0,64}", text):
        raise ValueError("0 to 64 letters, digits, '_', '.', ':', '-'")
    return text


_REDIS_PARSERS: dict[str, Callable[[object], Any]] = {
    "cluster": _bool,
    "failure_mode": _failure_mode,
    "sync_interval": _positive_duration,
    "timeout": _positive_duration,
    "key_prefix": _key_prefix,
}


def _redis(problems: list[tuple[str, object, str]], table: object) -> RedisConfig:
    if not isinstance(table, Mapping):
        problems.append(("redis", table, "expected a table"))
        return RedisConfig()
    reader = _Reader(problems, "redis.", table)
    url = reader.get("url", _string, "")
    values = _read_section(problems, "redis.", table, _REDIS_PARSERS, RedisConfig())
    reader.seen.update(_REDIS_PARSERS)
    reader.finish()
    config = RedisConfig(url=url, **values)
    if url and not url.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://")):
        problems.append(("redis.url", url, "expected a redis://, rediss://, unix:// or redis+sentinel:// URL"))
    elif url.startswith("redis+sentinel://") and config.cluster:
        problems.append(("redis.cluster", True, "a Sentinel URL names one master, not a cluster"))
    elif url.startswith("redis+sentinel://") and not re.fullmatch(r"redis\+sentinel://[^/]+/[^/]+(/\d+)?", url):
        problems.append(("redis.url", url, "expected redis+sentinel://host:port[,host:port]/service[/db]"))
    if config.sync_interval < 0.001 or config.sync_interval > 10.0:
        problems.append(("redis.sync_interval", config.sync_interval, "must be from 1ms to 10s"))
    return config


_LIMIT_PARSERS: dict[str, Callable[[object], Any]] = {
    "global_limit": _positive_int,
    "window": _positive_duration,
    "algorithm": lambda v: _choice(v, (FIXED_WINDOW, SLIDING_WINDOW)),
    "max_subjects": _positive_int,
}


def _choice(value: object, choices: tuple[str, ...]) -> str:
    text = _string(value)
    if text not in choices:
        raise ValueError("expected " + " or ".join(f'"{choice}"' for choice in choices))
    return text


def _rate(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a number of tokens per second")
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number")
    return float(value)


def _limit(problems: list[tuple[str, object, str]], name: str, table: object, redis: RedisConfig) -> LimitConfig | None:
    prefix = f"limits.{name}."
    if not isinstance(table, Mapping):
        problems.append((f"limits.{name}", table, "expected a table"))
        return None
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        problems.append((f"limits.{name}", name, "limit names use 1 to 64 letters, digits, '_', '.', '-'"))
    reader = _Reader(problems, prefix, table)
    rate = reader.get("local_rate", _rate, 0.0)
    burst = reader.get("local_burst", _positive_int, 0)
    values = _read_section(problems, prefix, table, _LIMIT_PARSERS, LimitConfig(name=name))
    reader.seen.update(_LIMIT_PARSERS)
    reader.finish()
    if burst and not rate:
        problems.append((prefix + "local_burst", burst, "needs local_rate"))
    elif rate and not burst:
        burst = max(1, math.ceil(rate))
    config = LimitConfig(name=name, local_rate=rate, local_burst=burst, **values)
    if not rate and not config.global_limit:
        problems.append((f"limits.{name}", dict(table), "needs local_rate or global_limit (or both)"))
    if config.global_limit and not redis.url:
        problems.append((prefix + "global_limit", config.global_limit, "needs a [redis] table with a url"))
    if config.global_limit and config.window <= 2 * redis.sync_interval:
        problems.append((prefix + "window", config.window, "must be longer than twice redis.sync_interval"))
    return config


def _limits(problems: list[tuple[str, object, str]], table: object, redis: RedisConfig) -> dict[str, LimitConfig]:
    if not isinstance(table, Mapping):
        problems.append(("limits", table, "expected tables [limits.NAME]"))
        return {}
    out: dict[str, LimitConfig] = {}
    for name, section in table.items():
        limit = _limit(problems, name, section, redis)
        if limit is not None:
            out[name] = limit
    return out


# ---------------------------------------------------------------------------------------------- entry points


def build(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Validate a parsed TOML document; raises ConfigError listing every problem."""
    problems: list[tuple[str, object, str]] = []
    for key in data:
        if key not in ("server", "upstreams", "routes", "redis", "auth", "limits", "metrics"):
            problems.append((key, data[key], "unknown section"))
    server = _server(problems, data.get("server", {}))
    auth = _auth_section(problems, data.get("auth", {}), server)
    redis = _redis(problems, data.get("redis", {}))
    limits = _limits(problems, data.get("limits", {}), redis)
    upstreams: dict[str, UpstreamConfig] = {}
    raw_upstreams = data.get("upstreams", {})
    if not isinstance(raw_upstreams, Mapping):
        problems.append(("upstreams", raw_upstreams, "expected tables [upstreams.NAME]"))
        raw_upstreams = {}
    for name, table in raw_upstreams.items():
        upstream = _upstream(problems, name, table)
        if upstream is not None:
            upstreams[name] = upstream
    raw_routes = data.get("routes", [])
    routes: list[RouteConfig] = []
    if not isinstance(raw_routes, list):
        problems.append(("routes", raw_routes, "expected an array of tables [[routes]]"))
        raw_routes = []
    if not raw_routes:
        problems.append(("routes", raw_routes, "at least one [[routes]] entry is required"))
    seen: dict[tuple[str | None, str], int] = {}
    names: dict[str, int] = {}
    for index, table in enumerate(raw_routes):
        upstream_tables = raw_upstreams if isinstance(raw_upstreams, Mapping) else {}
        route = _route(problems, index, table, upstream_tables, auth, limits)
        if route is None:
            continue
        route_key = (route.host, route.prefix)
        if route_key in seen:
            problems.append((f"routes[{index}].prefix", route.prefix, f"duplicates routes[{seen[route_key]}]"))
        elif route.name in names:
            problems.append((f"routes[{index}].name", route.name, f"already the name of routes[{names[route.name]}]"))
        seen[route_key] = index
        names[route.name] = index
        routes.append(route)
    metrics = _metrics(problems, data.get("metrics", {}))
    if problems:
        raise ConfigError(problems)
    return Config(
        server=server,
        upstreams=upstreams,
        routes=tuple(routes),
        redis=redis,
        auth=auth,
        limits=limits,
        source=source,
        metrics=metrics,
    )


def load(path: str, env: Mapping[str, str] | None = None, workers: int | None = None) -> Config:
    """Read, override from `env` and the CLI, validate. Raises ConfigError (also for I/O and TOML errors)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError([(path, None, f"cannot read: {exc.strerror or exc}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([(path, None, f"invalid TOML: {exc}")]) from exc
    overridden = apply_env(data, os.environ if env is None else env)
    if workers is not None:
        data.setdefault("server", {})
        if isinstance(data["server"], dict):
            data["server"]["workers"] = workers
            overridden.pop("server.workers", None)
    try:
        return build(data, source=os.path.abspath(path))
    except ConfigError as exc:
        # A value that came from the environment is reported under its variable, not as the file's.
        problems = [(_origin(key, overridden), value, reason) for key, value, reason in exc.problems]
        raise ConfigError(problems) from None


ENV_OVERRIDES = {
    "UVGATE_WORKERS": ("server", "workers", int),
    "UVGATE_LISTEN": ("server", "listen", str),
    "UVGATE_ADMIN_LISTEN": ("server", "admin_listen", str),
    "UVGATE_REDIS_URL": ("redis", "url", str),
}


def apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Apply the documented UVGATE_* overrides to `data` in place (the only environment reads of the
    project); returns the keys overridden, e.g. {"server.workers": "UVGATE_WORKERS"}."""
    overridden: dict[str, str] = {}
    for var, (section, key, kind) in ENV_OVERRIDES.items():
        if var not in env:
            continue
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            continue
        raw = env[var]
        try:
            table[key] = kind(raw)
        except ValueError:
            table[key] = raw  # validation reports it, under the variable's name
        overridden[f"{section}.{key}"] = var
    return overridden


def _origin(key: str, overridden: Mapping[str, str]) -> str:
    """How a problem's key is reported: "UVGATE_WORKERS (server.workers)" for an overridden key."""
    var = overridden.get(key)
    return key if var is None else f"{var} ({key})"


def with_listen(config: Config, listen: Address) -> Config:
    """A copy with another listen address (the supervisor resolves port 0 once)."""
    return replace(config, server=replace(config.server, listen=listen))


def with_metrics_directory(config: Config, directory: str) -> Config:
    """A copy naming the metrics directory the supervisor made (workers write their files there)."""
    return replace(config, metrics=replace(config.metrics, directory=directory))


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
