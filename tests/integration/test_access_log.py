"""Access log: one JSON line per request, written by the worker; secrets never logged."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import orjson

from devstack import ProxyFactory, Service, raw_request


def test_access_log_lines_without_secrets(proxy_factory: ProxyFactory, backend_stub: Service, tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"
    proxy = proxy_factory(
        {
            "server": {"access_log": True, "access_log_path": str(log_path)},
            "upstreams": {"backend": {"servers": ["127.0.0.1:1"]}},
            "routes": [{"prefix": "/api/", "upstream": "backend"}],
        }
    )
    ok = raw_request(
        proxy.host,
        proxy.port,
        "GET",
        "/api/resource?access_token=query-secret",
        headers=[("Authorization", "Bearer header-secret"), ("X-Request-Id", "log-test-1")],
    )
    assert ok.status == 200
    missing = raw_request(proxy.host, proxy.port, "GET", "/nowhere")
    assert missing.status == 404
    deadline = time.monotonic() + 10
    lines: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        if log_path.exists():
            lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines() if line]
            if len(lines) >= 2:
                break
        time.sleep(0.05)
    assert len(lines) == 2, lines
    first, second = lines
    assert first["status"] == 200 and first["method"] == "GET" and first["path"] == "/api/resource"
    assert first["request_id"] == "log-test-1"
    assert first["route"] == "/api/" and first["upstream"] == "backend" and first["error"] is None
    assert first["upstream_addr"] == backend_stub.address
    assert isinstance(first["duration_ms"], float) and first["duration_ms"] > 0
    assert isinstance(first["upstream_ms"], float) and 0 < first["upstream_ms"] <= first["duration_ms"]
    # Microsecond resolution: not whole milliseconds (a local round trip takes well under one).
    assert first["duration_ms"] != int(first["duration_ms"]), first
    assert first["bytes_in"] > len("GET /api/resource HTTP/1.1\r\n") and first["bytes_out"] > 0
    assert second["status"] == 404 and second["error"] == "no_route"
    assert second["route"] is None and second["upstream"] is None and second["upstream_addr"] is None
    raw = log_path.read_text()
    assert "secret" not in raw


def _wait_lines(path: Path, count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 10
    lines: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        if path.exists():
            lines = [orjson.loads(line) for line in path.read_bytes().splitlines() if line]
            if len(lines) >= count:
                return lines
        time.sleep(0.05)
    raise AssertionError(f"{len(lines)} of {count} access log lines: {lines}")


def test_upstream_failures_are_logged_with_the_upstream_and_the_reason(
    proxy_factory: ProxyFactory, backend_stub: Service, tmp_path: Path
) -> None:
    """An upstream that refuses, closes or times out used to leave no trace in any log."""
    log_path = tmp_path / "access.log"
    with socket.socket() as closed:  # a port nobody listens on: connects are refused
        closed.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{closed.getsockname()[1]}"
    proxy = proxy_factory(
        {
            "server": {"access_log": True, "access_log_path": str(log_path)},
            "upstreams": {
                "backend": {"servers": [backend_stub.address], "response_timeout": "300ms"},
                "gone": {"servers": [refused]},
            },
            "routes": [{"prefix": "/gone/", "upstream": "gone"}, {"prefix": "/", "upstream": "backend"}],
        },
        keep_upstreams=True,
    )
    for _ in range(3):
        assert raw_request(proxy.host, proxy.port, "GET", "/gone/x").status == 503
    assert raw_request(proxy.host, proxy.port, "GET", "/abort").status == 502
    assert raw_request(proxy.host, proxy.port, "GET", "/delay?ms=3000").status == 504
    lines = _wait_lines(log_path, 5)
    assert [(line["status"], line["error"], line["upstream"], line["upstream_addr"]) for line in lines] == [
        (503, "upstream_connect_failed", "gone", refused),
        (503, "upstream_connect_failed", "gone", refused),
        (503, "upstream_connect_failed", "gone", refused),
        (502, "upstream_closed", "backend", backend_stub.address),
        (504, "upstream_response_timeout", "backend", backend_stub.address),
    ]
    log = proxy.read_log()
    assert log.count(f"upstream gone server {refused}: connection refused") == 1, log  # once per interval
    assert f"upstream backend server {backend_stub.address}: connection closed before the response" in log, log
    assert f"upstream backend server {backend_stub.address}: response timeout" in log, log
