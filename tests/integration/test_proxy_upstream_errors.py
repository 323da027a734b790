"""Upstream failures seen through a real proxy process: down (503), no response (502), reset in the
middle of a body (truncated response, no hang), and upstreams that close their connection, including
a pooled connection that dies as it is reused (retried once for idempotent requests; docs/architecture.md, section 3).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from devstack import ProxyFactory, RawHTTPConnection, Service, free_port
from tests.helpers import CLOSE_TIMEOUT, IO_TIMEOUT, LoopbackServer, assert_json_error, backend_stats

API_BODY = {"id": 1, "name": "resource", "tags": ["a", "b"], "ok": True}

Connect = Callable[..., RawHTTPConnection]


def _config(upstream: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "server": {},
        "upstreams": {"backend": {"servers": ["127.0.0.1:9"], **(upstream or {})}},
        "routes": [{"prefix": "/", "upstream": "backend"}],
    }


def test_upstream_down_503(proxy_factory: ProxyFactory, raw_connection: Connect) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    proxy = proxy_factory(_config(), upstream_servers=[nobody])
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    for i in range(5):  # also once the server is ejected after max_fails
        conn.request("GET", f"/echo/down-{i}")
        assert_json_error(conn.read_response(), 503)
    # The client sent its own request id: the error carries it.
    conn.request("GET", "/echo/down-id", headers={"X-Request-Id": "down-req-1"})
    response = conn.read_response()
    assert assert_json_error(response, 503)["request_id"] == "down-req-1"


def test_upstream_closes_without_response_502(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    proxy = proxy_factory(_config())
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    # On a fresh upstream connection.
    conn.request("GET", "/abort")
    assert_json_error(conn.read_response(), 502)
    # On a pooled one (the proxy may retry an idempotent request once on a fresh connection: still 502).
    conn.request("GET", "/echo/warm")
    assert conn.read_response().status == 200
    conn.request("GET", "/abort")
    assert_json_error(conn.read_response(), 502)
    # A non-idempotent request is not retried, and also answered 502.
    conn.request("POST", "/abort", body=b"payload")
    assert_json_error(conn.read_response(), 502)
    # The client connection is still usable.
    conn.request("GET", "/echo/after-abort")
    response = conn.read_response()
    assert response.status == 200
    assert response.json()["path"] == "/echo/after-abort"


def test_upstream_reset_mid_body_truncates_client_response(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    proxy = proxy_factory(_config())
    length = 1_000_000
    sock = socket.create_connection((proxy.host, proxy.port), timeout=IO_TIMEOUT)
    try:
        sock.sendall(f"GET /reset-mid-body?bytes={length} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        deadline = time.monotonic() + CLOSE_TIMEOUT
        data = bytearray()
        closed = False
        while not closed:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"response neither completed nor closed: hang after {len(data)} bytes"
            sock.settimeout(remaining)
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                closed = True
            else:
                closed = not piece
                data += piece
    finally:
        sock.close()
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    assert sep, f"no response head before the close: {bytes(data[:200])!r}"
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"content-length: {length}".encode() in head.lower()
    assert len(body) < length, "the client must see the response cut short"
    assert body == (b"0123456789abcdef" * (len(body) // 16 + 1))[: len(body)]

    # The proxy is fine afterwards.
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.request("GET", "/echo/after-reset")
    assert conn.read_response().status == 200


def test_upstream_connection_close_is_not_reused(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    """`/close` answers `Connection: close`: the client keeps its connection, the proxy opens a new upstream one."""
    proxy = proxy_factory(_config())
    before = backend_stats(backend_stub)["connections_accepted"]
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    for i in range(3):
        conn.request("GET", "/close")
        response = conn.read_response()
        assert response.status == 200
        assert response.json() == API_BODY
        assert (response.header("connection") or "").lower() != "close"
        conn.request("GET", f"/echo/after-close-{i}")
        assert conn.read_response().json()["path"] == f"/echo/after-close-{i}"
    assert not conn.closed_by_peer(0.05)
    # 3 closed upstream connections + 1 pooled one + this /stats connection.
    assert backend_stats(backend_stub)["connections_accepted"] - before == 3 + 1 + 1


class OneShotUpstream(LoopbackServer):
    """A loopback HTTP/1.1 server that answers the first request of each connection (keep-alive, no
    `Connection: close`) and closes the connection without answering when a second request arrives
    on it: what a proxy sees when a server's keep-alive timeout races with the reuse of the connection.
    """

    def __init__(self) -> None:
        self.answered: list[str] = []
        self.dropped: list[str] = []
        super().__init__()

    def _recv(self, conn: socket.socket) -> bytes:
        """The next bytes from `conn`; b"" when the peer closed or the server is stopping."""
        while not self.stopping.is_set():
            try:
                return conn.recv(65536)
            except TimeoutError:
                continue
        return b""

    def _read_request(self, conn: socket.socket, buffer: bytearray) -> str | None:
        """The request line of the next request (its body skipped), or None when the peer closed."""
        while b"\r\n\r\n" not in buffer:
            data = self._recv(conn)
            if not data:
                return None
            buffer += data
        end = buffer.index(b"\r\n\r\n") + 4
        head = bytes(buffer[:end]).decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        while len(buffer) < end + length:
            data = self._recv(conn)
            if not data:
                return None
            buffer += data
        del buffer[: end + length]
        return head.split("\r\n", 1)[0]

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        buffer = bytearray()
        with conn, contextlib.suppress(OSError):
            first = self._read_request(conn, buffer)
            if first is None:
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
            with self.lock:
                self.answered.append(first)
            second = self._read_request(conn, buffer)
            if second is not None:
                with self.lock:
                    self.dropped.append(second)


@contextlib.contextmanager
def _one_shot_upstream() -> Iterator[OneShotUpstream]:
    server = OneShotUpstream()
    try:
        yield server
    finally:
        server.close()


def test_pooled_connection_closed_on_reuse_is_retried_for_idempotent_requests(
    proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    with _one_shot_upstream() as upstream:
        proxy = proxy_factory(_config(), upstream_servers=[upstream.address])
        conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)

        conn.request("GET", "/first")
        response = conn.read_response()
        assert (response.status, response.body) == (200, b"ok")

        # Sent on the pooled connection, which the server closes unanswered: replayed on a new one.
        conn.request("GET", "/second")
        response = conn.read_response()
        assert (response.status, response.body) == (200, b"ok"), response.raw[:300]

        # A POST is not replayed: the client gets a 502 instead.
        conn.request("POST", "/third", body=b"not idempotent")
        assert_json_error(conn.read_response(), 502)

        with upstream.lock:
            assert upstream.answered == ["GET /first HTTP/1.1", "GET /second HTTP/1.1"]
            assert upstream.dropped == ["GET /second HTTP/1.1", "POST /third HTTP/1.1"]
            assert upstream.connections == 2
