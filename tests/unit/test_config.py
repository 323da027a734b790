from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ENV_OVERRIDES, Address, build, load, parse_address, parse_duration, parse_size
from proxy.errors import ConfigError

MINIMAL = {
    "server": {"listen": "127.0.0.1:8080"},
    "upstreams": {"backend": {"servers": ["127.0.0.1:8000"]}},
    "routes": [{"prefix": "/api/", "upstream": "backend"}],
}


def problems_of(data: dict[str, object]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        build(data)
    return {key: reason for key, _, reason in info.value.problems}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(5, 5.0), (0.25, 0.25), ("250ms", 0.25), ("10s", 10.0), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["10 parsecs", "-1s", -1, True, "", None, [1]])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"), [(1024, 1024), ("16KiB", 16384), ("10MiB", 10 * 1024 * 1024), ("1MB", 1_000_000), ("8k", 8192)]
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["lots", "-5", -5, False, 1.5])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:8080", Address("127.0.0.1", 8080)),
        (":9000", Address("0.0.0.0", 9000)),
        ("[::1]:443", Address("::1", 443)),
        ("localhost:0", Address("localhost", 0)),
    ],
)
def test_addresses(text: str, address: Address) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize("bad", ["8080", "host:", "host:99999", "::1:80", "a b:80", 8080])
def test_bad_addresses(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_address(bad)


def test_minimal_config_gets_defaults() -> None:
    config = build(MINIMAL)
    assert config.server.listen == Address("127.0.0.1", 8080)
    assert config.server.admin_listen == Address("127.0.0.1", 9901)  # loopback by default
    assert config.server.max_header_bytes == 16384
    assert config.upstreams["backend"].servers == (Address("127.0.0.1", 8000),)
    assert config.routes[0].auth == "none"


def test_every_problem_is_reported_with_its_key() -> None:
    data = {
        "server": {"listen": "nowhere", "workers": 0, "drain_timeout": "soon", "colour": "blue"},
        "upstreams": {"backend": {"servers": [], "max_connections": -1}},
        "routes": [
            {"prefix": "api", "upstream": "missing"},
            {"prefix": "/x", "upstream": "backend", "auth": "magic"},
        ],
        "extra": {},
    }
    found = problems_of(data)
    assert "server.listen" in found
    assert found["server.workers"] == "must be at least 1"
    assert "server.drain_timeout" in found
    assert found["server.colour"] == "unknown key"
    assert "upstreams.backend.servers" in found
    assert "upstreams.backend.max_connections" in found
    assert found["routes[0].prefix"] == 'must start with "/"'
    assert found["routes[0].upstream"].startswith("no such upstream")
    assert "routes[1].auth" in found
    assert found["extra"] == "unknown section"


def test_routes_are_required_and_unique() -> None:
    assert "routes" in problems_of({**MINIMAL, "routes": []})
    duplicate = [{"prefix": "/a", "upstream": "backend"}, {"prefix": "/a", "upstream": "backend"}]
    assert "routes[1].prefix" in problems_of({**MINIMAL, "routes": duplicate})


def test_env_overrides_apply_in_one_place(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\nlisten = "127.0.0.1:1"\n[upstreams.b]\nservers = ["127.0.0.1:2"]\n'
        '[[routes]]\nprefix = "/"\nupstream = "b"\n'
    )
    config = load(str(path), env={"UVGATE_WORKERS": "3", "UVGATE_LISTEN": "127.0.0.1:7000"})
    assert config.server.workers == 3
    assert config.server.listen.port == 7000
    with pytest.raises(ConfigError) as info:
        load(str(path), env={"UVGATE_WORKERS": "many"})
    assert info.value.problems[0][0] == "UVGATE_WORKERS (server.workers)"


VALID = (
    '[server]\nlisten = "127.0.0.1:1"\nadmin_listen = "127.0.0.1:2"\n[upstreams.b]\nservers = ["127.0.0.1:3"]\n'
    '[[routes]]\nprefix = "/"\nupstream = "b"\n'
)

# One bad value per override: (variable, value, the key it overrides, the reason reported).
BAD_OVERRIDES = [
    ("UVGATE_WORKERS", "abc", "server.workers", "expected an integer"),
    ("UVGATE_WORKERS", "0", "server.workers", "must be at least 1"),
    ("UVGATE_LISTEN", "8080", "server.listen", 'expected "host:port"'),
    ("UVGATE_ADMIN_LISTEN", "127.0.0.1:1", "server.admin_listen", "must use another port than server.listen"),
    ("UVGATE_REDIS_URL", "http://cache:6379", "redis.url", "expected a redis://"),
]


def test_every_env_override_has_a_bad_value_case() -> None:
    assert {var for var, *_ in BAD_OVERRIDES} == set(ENV_OVERRIDES)


@pytest.mark.parametrize(("var", "value", "key", "reason"), BAD_OVERRIDES)
def test_a_bad_env_override_is_reported_naming_the_variable(
    tmp_path: Path, var: str, value: str, key: str, reason: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(VALID)
    load(str(path), env={})  # the file alone is valid
    with pytest.raises(ConfigError) as info:
        load(str(path), env={var: value})
    ((name, _, why),) = info.value.problems
    assert name == f"{var} ({key})"
    assert why.startswith(reason), why
    assert str(info.value).startswith(f"{var} ({key}): {reason}")


def test_the_file_is_blamed_for_its_own_values_and_the_cli_overrides_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(VALID.replace("[server]\n", '[server]\nworkers = "two"\n'))
    with pytest.raises(ConfigError) as info:
        load(str(path), env={"UVGATE_LISTEN": "127.0.0.1:7000"})
    assert [p[0] for p in info.value.problems] == ["server.workers"], "the override is fine; the file is not"
    assert load(str(path), env={"UVGATE_WORKERS": "abc"}, workers=3).server.workers == 3


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load(str(bad))


def test_check_cli_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        '[server]\nlisten = "127.0.0.1:1"\n[upstreams.b]\nservers = ["127.0.0.1:2"]\n'
        '[[routes]]\nprefix = "/"\nupstream = "b"\n'
    )
    ok = subprocess.run([sys.executable, "-m", "proxy", "--config", str(good), "--check"], capture_output=True)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nworkers = "two"\nmax_body_bytes = "huge"\n')
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(bad), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "server.workers" in result.stderr
    assert "server.max_body_bytes" in result.stderr
    assert "routes" in result.stderr


@pytest.mark.parametrize("check", [True, False], ids=["check", "start"])
def test_cli_names_a_bad_environment_override(tmp_path: Path, check: bool) -> None:
    """`--check` and a real start both report the variable, not the file, and exit 2 (nothing is bound)."""
    path = tmp_path / "c.toml"
    path.write_text(VALID)
    env = {k: v for k, v in os.environ.items() if not k.startswith("UVGATE_")}
    env["UVGATE_WORKERS"] = "abc"
    argv = [sys.executable, "-m", "proxy", "--config", str(path), *(["--check"] if check else [])]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "UVGATE_WORKERS (server.workers): expected an integer (got 'abc')" in result.stderr


@pytest.mark.parametrize(
    ("server", "key"),
    [
        ({"header_timeout": float("nan")}, "server.header_timeout"),
        ({"drain_timeout": float("inf")}, "server.drain_timeout"),
        ({"keepalive_timeout": "2000000s"}, "server.keepalive_timeout"),
        ({"heartbeat_timeout": "500ms"}, "server.heartbeat_timeout"),
        ({"request_id_header": "content-length"}, "server.request_id_header"),
        ({"request_id_header": "Host"}, "server.request_id_header"),
        ({"listen": "localhost:8080", "admin_listen": "127.0.0.1:8080"}, "server.admin_listen"),
        ({"backlog": 2**40}, "server.backlog"),
        ({"access_log_path": "/nonexistent-dir/access.log"}, "server.access_log_path"),
    ],
)
def test_values_that_would_break_at_runtime_are_rejected(server: dict[str, object], key: str) -> None:
    assert key in problems_of({**MINIMAL, "server": {**MINIMAL["server"], **server}})  # type: ignore[dict-item]
