"""The bench's switched uvgates, started from configs/bench.toml as the bench starts them: `proxy` counts and
serves /metrics without an access log, `nometrics` answers 404 there, `accesslog` writes one line per request
to the file in its run dir."""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from bench.switches import ACCESS_LOG_FILE, switch_dir, switched_config
from devstack import ProxyFactory, Service, http_get, raw_request
from devstack.config import load_config_source

BENCH_TOML = Path(__file__).resolve().parents[2] / "configs" / "bench.toml"


def _metrics_status(host: str, port: int) -> int:
    return http_get(f"http://{host}:{port}/metrics", timeout=5.0)[0]


def test_switched_uvgates_differ_in_their_setting(
    proxy_factory: ProxyFactory, backend_stub: Service, tmp_path: Path
) -> None:
    template = load_config_source(BENCH_TOML)
    proxy = proxy_factory(template)
    off = proxy_factory(switched_config("nometrics", template, tmp_path))
    directory = switch_dir(tmp_path, "plain", "accesslog")
    directory.mkdir(parents=True)
    logged = proxy_factory(switched_config("accesslog", template, directory))
    for server in (proxy, off, logged):
        assert raw_request(server.host, server.port, "GET", "/api/resource").status == 200
    assert _metrics_status(proxy.admin_host, proxy.admin_port) == 200
    assert _metrics_status(off.admin_host, off.admin_port) == 404
    assert _metrics_status(logged.admin_host, logged.admin_port) == 200
    log_path = directory / ACCESS_LOG_FILE
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (log_path.exists() and log_path.stat().st_size):
        time.sleep(0.05)
    lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
    assert [(line["path"], line["status"]) for line in lines] == [("/api/resource", 200)]
    for server in (proxy, off):  # a tick has passed since their request: an access log would show it
        assert '"path":"/api/resource"' not in server.log_path.read_text(), "no access log on stderr"
