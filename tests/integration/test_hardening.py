"""Defects an adversarial probe found, over real sockets: the live proxy and backend_stub (and, where the test
must control when an upstream comes back, a worker in this process: tests/integration/inprocess.py)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

from devstack import ProxyFactory, RawHTTPConnection, Service
from devstack.rawhttp import parse_response
from tests.helpers import IO_TIMEOUT, assert_json_error, backend_requests, backend_stats, wait_backend_requests
from tests.integration.inprocess import Worker, request, run

Connect = Callable[..., RawHTTPConnection]


def _config(**server: Any) -> dict[str, Any]:
    return {
        "server": server,
        "upstreams": {"backend": {"servers": ["127.0.0.1:9"]}},
        "routes": [{"prefix": "/", "upstream": "backend"}],
    }


def test_a_nominated_content_length_keeps_the_response_framed(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    """Issue 7 #1: `Connection: content-length` from the upstream stripped Content-Length on a kept-alive
    connection: the client read the next response as part of the body."""
    proxy = proxy_factory(_config())
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.request("GET", "/headers?Connection=content-length")
    first = conn.read_response()
    conn.request("GET", "/api/next")
    second = conn.read_response()
    assert (first.status, first.body) == (200, b'{"ok":true}')
    assert first.header("content-length") == str(len(first.body))
    assert second.status == 200 and second.json()["name"] == "resource"


def test_slow_request_bodies_hold_no_upstream_connection(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    """Issue 7 #2: each trickling body held an upstream connection, so a few slow senders got every other
    request a 503; bodies are now buffered (up to `server.body_buffer_size`) before an upstream is taken."""
    proxy = proxy_factory(
        {
            "server": {"body_timeout": "10s"},
            "upstreams": {"backend": {"servers": ["127.0.0.1:9"], "max_connections": 2, "pending_timeout": "1s"}},
            "routes": [{"prefix": "/", "upstream": "backend"}],
        }
    )
    before = backend_stats(backend_stub)
    slow = []
    for index in range(20):
        conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
        conn.send(b"POST /echo/%d HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" % index + b"x" * 10)
        slow.append(conn)
    for _ in range(5):
        fast = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
        fast.request("GET", "/api/fast")
        assert fast.read_response().status == 200
    assert backend_stats(backend_stub)["connections_accepted"] - before["connections_accepted"] <= 3
    for conn in slow:  # the senders finish: every body is forwarded whole
        conn.send(b"y" * 990)
    for index, conn in enumerate(slow):
        echoed = conn.read_response().json()
        assert (echoed["path"], echoed["body_length"]) == (f"/echo/{index}", 1000)


def test_a_body_that_takes_too_long_in_all_is_408(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    proxy = proxy_factory(_config(body_timeout="5s", body_total_timeout="600ms"))
    before = backend_requests(backend_stub)
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    started = time.monotonic()
    response = None
    while response is None and time.monotonic() - started < IO_TIMEOUT:
        conn.send(b"x")  # a byte every 100 ms: never a gap of body_timeout
        try:
            response = conn.read_response(timeout=0.1)
        except TimeoutError:
            continue
    assert response is not None
    assert_json_error(response, 408, "body_total_timeout")
    assert time.monotonic() - started >= 0.6
    assert backend_requests(backend_stub) - before == 1, "never forwarded"


def test_a_request_rejected_after_its_head_never_reaches_the_upstream(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    """Issue 7 #4: `Transfer-Encoding: chunked<TAB>` got a 400, but its head had been written upstream."""
    proxy = proxy_factory(_config())
    before = backend_stats(backend_stub)
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n")
    assert_json_error(conn.read_response(), 400)
    after = backend_stats(backend_stub)
    assert after["requests"] - before["requests"] == 1, "only our own /stats"
    assert after["connections_accepted"] == before["connections_accepted"] + 1, "not even a connection"


def test_a_hundred_pipelined_requests_in_one_write_get_a_hundred_answers(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    """Issue 7 #5: 34 answers, then 400 and close (NGINX answers all 100)."""
    proxy = proxy_factory(_config())
    before = backend_requests(backend_stub)
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.send(b"".join(b"GET /echo/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(100)))
    paths = [conn.read_response().json()["path"] for _ in range(100)]
    assert paths == [f"/echo/{i}" for i in range(100)]
    wait_backend_requests(backend_stub, before, 100)


def test_a_client_that_closes_while_its_pipeline_waits_aborts_the_upstream_request(
    backend_stub: Service, proxy_factory: ProxyFactory, tmp_path: Any
) -> None:
    """Issue 7 #8: with reading paused (pipelining), a client's close went unnoticed and the upstream request
    ran to its end; the worker's tick now sees it (499 in the access log, well before the upstream answers)."""
    log_path = tmp_path / "access.log"
    proxy = proxy_factory(_config(access_log=True, access_log_path=str(log_path)))
    before = backend_requests(backend_stub)
    with socket.create_connection((proxy.host, proxy.port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(b"GET /delay?ms=3000 HTTP/1.1\r\nHost: x\r\n\r\nGET /delay?ms=3000 HTTP/1.1\r\nHost: x\r\n\r\n")
        # The first request reached the backend: both were read in one go, the second waits, reading paused.
        wait_backend_requests(backend_stub, before, 1)
        sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        deadline = started + 2.0
        while time.monotonic() < deadline and not (log_path.exists() and b'"status":499' in log_path.read_bytes()):
            time.sleep(0.02)
        assert log_path.exists() and b'"status":499' in log_path.read_bytes(), "the close was not noticed"
        assert time.monotonic() - started < 2.0


def test_the_only_server_of_an_upstream_is_used_again_as_soon_as_it_is_back(backend_stub: Service) -> None:
    """Issue 7 #3: after `max_fails` refused connects the only server was ejected for `fail_cooldown` (10 s)
    and answered 503 `no_healthy_upstream` all that time after it came back. NGINX never marks it down."""
    reserved = socket.socket()
    reserved.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused
    port = reserved.getsockname()[1]
    config = {
        "upstreams": {"flaky": {"servers": [f"127.0.0.1:{port}"], "max_fails": 2, "fail_cooldown": "30s"}},
        "routes": [{"prefix": "/", "upstream": "flaky"}],
    }

    async def served(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nback")

    async def scenario() -> None:
        async with Worker(config, backend_stub.address) as worker:
            client = await worker.client()
            for _ in range(4):
                client.send(request("/x"))
                response = await client.response()
                assert (response.status, response.json()["error"]) == (503, "upstream_connect_failed")
            reserved.close()
            server = await asyncio.start_server(served, "127.0.0.1", port, reuse_address=True)
            try:
                client.send(request("/x"))
                response = await client.response()
                assert (response.status, response.body) == (200, b"back")
            finally:
                server.close()
                await server.wait_closed()

    try:
        run(scenario)
    finally:
        reserved.close()


def test_responses_stay_parseable_after_a_proxy_error_in_a_pipeline(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    proxy = proxy_factory(_config())
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.send(b"GET /api/a HTTP/1.1\r\nHost: x\r\n\r\nGET /api/b HTTP/1.1\r\nHost: a b\r\n\r\n")
    data = conn.read_until_closed(IO_TIMEOUT)
    first = parse_response(data)
    assert first is not None and first[0].status == 200
    second = parse_response(data[first[1] :])
    assert second is not None and second[0].status == 400
