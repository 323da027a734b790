"""Access log: one JSON line per request, written by the worker; secrets never logged."""

from __future__ import annotations

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
    assert first["upstream"] == backend_stub.address
    assert isinstance(first["duration_ms"], float) and first["duration_ms"] >= 0
    assert second["status"] == 404 and second["upstream"] == ""
    raw = log_path.read_text()
    assert "secret" not in raw
