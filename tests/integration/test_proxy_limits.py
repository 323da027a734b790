"""Limits and timeouts of the HTTP/1.1 data plane, against a real proxy process and backend_stub.

Downstream: 431 (header count, header size), 413 (Content-Length, growing chunked body),
408 (slow head, slow body), idle connections closed. Upstream: 504 (response timeout, connect
timeout), 503 (pool and wait queue full, pending timeout). Timeouts are configured small
(0.3 or 0.5 s) and every wait in the tests has a deadline well above them.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from devstack import ProxyFactory, RawHTTPConnection, Service
from tests.helpers import (
    CLOSE_TIMEOUT,
    IO_TIMEOUT,
    assert_closed_after_response,
    assert_json_error,
    backend_requests,
    wait_backend_requests,
)

API_BODY = {"id": 1, "name": "resource", "tags": ["a", "b"], "ok": True}
TIMEOUT = 0.5  # the downstream and upstream timeouts configured below
# Deadlines are measured against the worker's coarse clock, refreshed once per tick (a quarter of the
# smallest timeout: 0.125 s here), so proxy/server.py documents them as enforced within one tick.
# A timeout is therefore not expected to fire before TIMEOUT - one tick (minus a little slack).
EARLIEST = TIMEOUT - TIMEOUT / 4 - 0.05

Connect = Callable[..., RawHTTPConnection]


def _config(server: dict[str, Any] | None = None, upstream: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "server": dict(server or {}),
        "upstreams": {"backend": {"servers": ["127.0.0.1:9"], **(upstream or {})}},
        "routes": [{"prefix": "/", "upstream": "backend"}],
    }


def _readable(conn: RawHTTPConnection) -> bool:
    if conn.buffer:
        return True
    ready, _, _ = select.select([conn.sock], [], [], 0)
    return bool(ready)


# ---------------------------------------------------------------------------------------------- header limits


def test_too_many_headers_431(backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect) -> None:
    proxy = proxy_factory(_config(server={"max_header_count": 20}))
    ok = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    ok.request("GET", "/echo", headers=[(f"X-H{i}", "v") for i in range(15)])
    assert ok.read_response().status == 200

    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.request("GET", "/echo", headers=[(f"X-H{i}", "v") for i in range(40)])
    assert_json_error(conn.read_response(), 431)
    assert_closed_after_response(conn)


def test_too_large_headers_431(backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect) -> None:
    proxy = proxy_factory(_config(server={"max_header_bytes": 4096}))
    ok = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    ok.request("GET", "/echo", headers={"X-Big": "a" * 2000})
    assert ok.read_response().json()["headers"]["x-big"] == "a" * 2000

    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.request("GET", "/echo", headers={"X-Big": "a" * 8000})
    assert_json_error(conn.read_response(), 431)
    assert_closed_after_response(conn)

    # Many small headers adding up past the limit.
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.request("GET", "/echo", headers=[(f"X-Part-{i}", "b" * 200) for i in range(30)])
    assert_json_error(conn.read_response(), 431)
    assert_closed_after_response(conn)


# ---------------------------------------------------------------------------------------------- body limits


def test_content_length_over_max_body_413(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    proxy = proxy_factory(_config(server={"max_body_bytes": 1000}))
    before = backend_requests(backend_stub)
    ok = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    ok.request("POST", "/echo", body=b"x" * 1000)
    assert ok.read_response().json()["body_length"] == 1000

    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.request("POST", "/echo", headers=[("Content-Length", "5000")])  # head only: answered before the body
    assert_json_error(conn.read_response(), 413)
    assert_closed_after_response(conn)
    assert backend_requests(backend_stub) - before == 2  # the 1000-byte echo and this /stats


def test_chunked_body_growing_over_max_body_413(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    proxy = proxy_factory(_config(server={"max_body_bytes": 2048}))
    before = backend_requests(backend_stub)
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.request("POST", "/echo", headers=[("Transfer-Encoding", "chunked")])
    conn.send(b"".join(b"400\r\n" + b"z" * 1024 + b"\r\n" for _ in range(3)) + b"0\r\n\r\n")
    assert_json_error(conn.read_response(), 413)
    assert_closed_after_response(conn)
    # The backend never received a complete request.
    assert backend_requests(backend_stub) - before == 1


# ---------------------------------------------------------------------------------------------- downstream timeouts


def test_slow_header_408_and_closed(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    proxy = proxy_factory(_config(server={"header_timeout": TIMEOUT}))
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    started = time.monotonic()
    conn.send(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    response = conn.read_response(timeout=IO_TIMEOUT)
    elapsed = time.monotonic() - started
    assert_json_error(response, 408, "header")
    assert elapsed >= EARLIEST, f"408 after {elapsed:.2f}s, before header_timeout"
    assert_closed_after_response(conn)


def test_idle_connections_closed(backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect) -> None:
    proxy = proxy_factory(_config(server={"keepalive_timeout": TIMEOUT, "header_timeout": TIMEOUT}))

    # A connection that is used keeps living past keepalive_timeout as long as it never idles that long.
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    for i in range(7):
        conn.request("GET", f"/echo/busy-{i}")
        assert conn.read_response().status == 200
        idle_from = time.monotonic()
        if i < 6:
            assert not conn.closed_by_peer(0.15)

    # Idle after a response: closed silently after keepalive_timeout.
    assert conn.closed_by_peer(CLOSE_TIMEOUT)
    idle = time.monotonic() - idle_from
    assert conn.buffer == b""
    assert idle >= EARLIEST, f"closed after {idle:.2f}s of idleness, before keepalive_timeout"

    # A connection that never sends a byte is closed after header_timeout.
    silent = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    started = time.monotonic()
    assert silent.closed_by_peer(CLOSE_TIMEOUT)
    assert time.monotonic() - started >= EARLIEST


def test_slow_body_408_and_closed(backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect) -> None:
    proxy = proxy_factory(_config(server={"body_timeout": TIMEOUT}))
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    started = time.monotonic()
    conn.request("POST", "/echo", headers=[("Content-Length", "100")])
    conn.send(b"0123456789")
    response = conn.read_response(timeout=IO_TIMEOUT)
    elapsed = time.monotonic() - started
    assert_json_error(response, 408, "body")
    assert elapsed >= EARLIEST, f"408 after {elapsed:.2f}s, before body_timeout"
    assert_closed_after_response(conn)


# ---------------------------------------------------------------------------------------------- upstream timeouts


def test_upstream_response_timeout_504(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    proxy = proxy_factory(_config(upstream={"response_timeout": TIMEOUT}))
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    started = time.monotonic()
    conn.request("GET", "/delay?ms=3000")
    response = conn.read_response(timeout=IO_TIMEOUT)
    elapsed = time.monotonic() - started
    assert_json_error(response, 504, "response")
    assert EARLIEST <= elapsed < 2.5, f"504 after {elapsed:.2f}s"
    # The client connection survives, and the late upstream answer is never mistaken for the next one.
    conn.request("GET", "/echo/after-timeout")
    after = conn.read_response(timeout=IO_TIMEOUT)
    assert after.status == 200
    assert after.json()["path"] == "/echo/after-timeout"


@contextlib.contextmanager
def _unaccepting_listener() -> Iterator[str]:
    """A loopback listener with backlog 0 that never accepts, its queue filled by our own connections.

    Once the accept queue is full, Linux drops further SYNs, so a connect to it hangs (SYN retries)
    instead of being refused: a local stand-in for an unreachable host.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(4):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            filler.connect_ex(address)
            fillers.append(filler)
        # Precondition: a new connect does not complete (bounded probe, not a sleep).
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(0.3)
        try:
            probe.connect(address)
        except TimeoutError:
            pass
        else:
            raise AssertionError("could not fill the listener's accept queue: connects are not hanging")
        finally:
            probe.close()
        yield f"{address[0]}:{address[1]}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_upstream_connect_timeout_504(proxy_factory: ProxyFactory, raw_connection: Connect) -> None:
    with _unaccepting_listener() as blackhole:
        proxy = proxy_factory(_config(upstream={"connect_timeout": TIMEOUT}), upstream_servers=[blackhole])
        conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
        started = time.monotonic()
        conn.request("GET", "/echo")
        response = conn.read_response(timeout=IO_TIMEOUT)
        elapsed = time.monotonic() - started
        assert_json_error(response, 504, "connect")
        assert EARLIEST <= elapsed < 2.5, f"504 after {elapsed:.2f}s"


# ---------------------------------------------------------------------------------------------- pool limits


def test_pool_and_queue_full_503(backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect) -> None:
    proxy = proxy_factory(_config(upstream={"max_connections": 1, "max_pending": 1}))
    before = backend_requests(backend_stub)
    first = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    first.request("GET", "/delay?ms=600")
    wait_backend_requests(backend_stub, before, 1)  # the only upstream connection is busy now
    others = [raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT) for _ in range(2)]
    for conn in others:
        conn.request("GET", "/delay?ms=600")

    responses = [first.read_response(), *(conn.read_response() for conn in others)]
    assert responses[0].status == 200
    assert responses[0].json() == API_BODY
    assert sorted(r.status for r in responses[1:]) == [200, 503]
    assert_json_error(next(r for r in responses if r.status == 503), 503)
    # The proxy serves normally afterwards.
    first.request("GET", "/echo/after-overflow")
    assert first.read_response().status == 200


def test_pool_pending_timeout_503(backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect) -> None:
    pending_timeout = 0.3
    proxy = proxy_factory(
        _config(upstream={"max_connections": 1, "max_pending": 4, "pending_timeout": pending_timeout})
    )
    before = backend_requests(backend_stub)
    first = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    first.request("GET", "/delay?ms=1200")
    wait_backend_requests(backend_stub, before, 1)
    waiting = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    started = time.monotonic()
    waiting.request("GET", "/echo/waiting")
    response = waiting.read_response(timeout=IO_TIMEOUT)
    elapsed = time.monotonic() - started
    assert_json_error(response, 503, "pending")
    assert elapsed >= pending_timeout * 0.75 - 0.05, f"503 after {elapsed:.2f}s, before pending_timeout"
    # It was the queue timing out, not a late hand-over: the first request is still in flight.
    assert not _readable(first)
    assert first.read_response(timeout=IO_TIMEOUT).json() == API_BODY
