"""The metrics of auth, upstream failures and pool waits, through the live proxy (one worker)."""

from __future__ import annotations

import socket
from pathlib import Path

import orjson
from prometheus_client.parser import text_string_to_metric_families

from devstack import ProxyFactory, ProxyService, Service, http_get, raw_request
from tests.integration.authhelp import get, mint, with_signature_of
from tests.integration.test_auth_jwt import JWT_TABLE
from tests.supervisor.helpers import wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(proxy: ProxyService) -> Samples:
    status, body = http_get(proxy.admin_url + "/metrics", timeout=5.0)
    assert status == 200, body
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_auth_failures_jwt_cache_connect_errors_and_pool_waits(
    proxy_factory: ProxyFactory, backend_stub: Service, auth_stub: Service, tmp_path: Path
) -> None:
    with socket.socket() as closed:  # a port nobody listens on: connects are refused
        closed.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{closed.getsockname()[1]}"
    proxy = proxy_factory(
        {
            "server": {"access_log": True, "access_log_path": str(tmp_path / "access.log")},
            "auth": {"jwt": JWT_TABLE},
            "metrics": {"interval": "100ms"},
            "upstreams": {
                "backend": {"servers": [backend_stub.address]},
                "narrow": {"servers": [backend_stub.address], "max_connections": 1},
                "down": {"servers": [refused]},
            },
            "routes": [
                {"prefix": "/echo", "upstream": "backend", "auth": "jwt", "name": "echo"},
                {"prefix": "/api/", "upstream": "backend", "auth": "jwt", "required_scope": "read", "name": "api"},
                {"prefix": "/delay", "upstream": "narrow", "name": "narrow"},
                {"prefix": "/down/", "upstream": "down", "name": "down"},
            ],
        },
        workers=1,
        keep_upstreams=True,
        auth_url=auth_stub.url,
    )
    token = mint(auth_stub, alg="HS256", scope="write")
    assert get(proxy, "/echo").status == 401  # missing_token
    assert get(proxy, "/echo", with_signature_of(token, mint(auth_stub, alg="HS256"))).status == 401
    for _ in range(3):
        assert get(proxy, "/echo", token).status == 200  # one verification, then two cache hits
    assert get(proxy, "/api/x", token).status == 403  # insufficient_scope (a hit: the token is cached)
    assert raw_request(proxy.host, proxy.port, "GET", "/down/x", timeout=10.0).status == 503

    # Two requests at once on an upstream with one connection: the second waits in the pool queue. Both
    # are sent before either answer is read (threads could start so far apart under load that the first
    # had its answer before the second was sent: nothing would wait).
    clients = [socket.create_connection((proxy.host, proxy.port), timeout=10.0) for _ in range(2)]
    try:
        for client in clients:
            client.sendall(b"GET /delay?ms=300 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        results = [read_until_close(client)[:12] for client in clients]
    finally:
        for client in clients:
            client.close()
    assert results == [b"HTTP/1.1 200", b"HTTP/1.1 200"]

    narrow = ("uvgate_requests_total", (("code", "200"), ("method", "GET"), ("route", "narrow")))

    def counted() -> Samples | None:  # the requests counters are written last by a worker's fold
        samples = scrape(proxy)
        return samples if samples.get(narrow) == 2 else None

    samples = wait_until(counted, 10.0, "the two pool requests in /metrics")
    assert samples[("uvgate_upstream_pool_wait_seconds_count", ())] == 1
    assert samples[("uvgate_auth_failures_total", (("reason", "missing_token"),))] == 1
    assert samples[("uvgate_auth_failures_total", (("reason", "invalid_token"),))] == 1
    assert samples[("uvgate_auth_failures_total", (("reason", "insufficient_scope"),))] == 1
    assert samples[("uvgate_jwt_cache_total", (("result", "miss"),))] == 2  # forged, first valid (none: no lookup)
    assert samples[("uvgate_jwt_cache_total", (("result", "hit"),))] == 3
    errors = samples[("uvgate_upstream_connect_errors_total", (("server", refused), ("upstream", "down")))]
    assert errors == 1
    assert samples[("uvgate_requests_total", (("code", "503"), ("method", "GET"), ("route", "down")))] == 1
    assert samples[("uvgate_requests_total", (("code", "401"), ("method", "GET"), ("route", "echo")))] == 2
    # The wait was about the first request's 300 ms (it is not the whole request).
    assert 0.1 < samples[("uvgate_upstream_pool_wait_seconds_sum", ())] < 5.0

    # The access log names the verified subject (the api_key claim), never the token.
    def lines() -> list[dict[str, object]] | None:
        path = tmp_path / "access.log"
        found = [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []
        return found if len(found) == 9 else None

    logged = wait_until(lines, 10.0, "9 access log lines")
    assert [line["subject"] for line in logged if line["route"] == "echo"] == [None, None, "k1", "k1", "k1"]
    assert all(line["subject"] is None for line in logged if line["route"] != "echo")
    assert token not in (tmp_path / "access.log").read_text()


def read_until_close(sock: socket.socket) -> bytes:
    """Everything `sock` receives until the peer closes (within the socket's timeout)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data
