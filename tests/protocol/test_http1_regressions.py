"""Regression tests for data-plane bugs found in review, without sockets: the HTTP/1.1 downstream protocol,
the upstream client connection and the pool, driven through fake transports and an explicit clock.

Each test names the bug it guards and fails on the code before the fix (ff265cc), except the waiter
test next to bug 4's, which guards a regression of a later commit (1cbf13e). The mock transport and
loop follow tests/protocol/test_http1.py (not importable under --import-mode=importlib), plus a
transport that behaves like uvloop's where the difference matters (write_eof, pause_writing).
"""

from __future__ import annotations

from typing import Any, cast

import orjson
import pytest

from devstack.rawhttp import RawResponse, parse_response
from proxy.config import Address, UpstreamConfig, build
from proxy.errors import NotFound, ServiceUnavailable
from proxy.exchange import BODY_LENGTH, PHASE_WAIT_RESPONSE, Exchange
from proxy.gateway import Gateway
from proxy.http1.framing import ResponseHeadRewriter
from proxy.http1.protocol import Http1Settings, HttpProtocol
from proxy.server import Pipeline, WorkerState
from proxy.upstream.client import UpstreamConnection, request_head
from proxy.upstream.pool import Cluster, ServerPool

# ---------------------------------------------------------------------------------------------- fakes
from tests.fakes import (
    FakeConn,
    FakeConnectTask,
    FakeDownstream,
    MockLoop,
    MockTransport,
    RecordingGateway,
    make_exchange,
)


class UvloopLikeTransport(MockTransport):
    """Like uvloop's TCPTransport: is_closing() stays False after write_eof(), and write() then raises."""

    def write(self, data: bytes) -> None:
        if self.eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        super().write(data)

    def write_eof(self) -> None:
        self.eof_written = True


class CrossingTransport(MockTransport):
    """A downstream transport whose next write crosses the high-water mark (uvloop calls pause_writing)."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: HttpProtocol | None = None
        self.cross_on_next_write = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.cross_on_next_write and self.protocol is not None:
            self.cross_on_next_write = False
            self.protocol.pause_writing()


class NotFoundGateway(Pipeline):
    """Answers every request at once, when it is dispatched (like a route miss)."""

    def handle(self, exchange: Exchange) -> None:
        exchange.start()
        exchange.fail(NotFound("no_route"))

    def resume(self, exchange: Exchange) -> None:
        raise AssertionError("nothing suspends here")

    def forward(self, exchange: Exchange) -> None:
        raise AssertionError("nothing buffers here")


class UpTransport:
    """Upstream socket that takes nothing: pause_writing once when the buffer passes `high`, like uvloop."""

    def __init__(self, protocol: UpstreamConnection, high: int) -> None:
        self.protocol = protocol
        self.high = high
        self.buffer = 0
        self.written = bytearray()
        self.write_paused = False
        self.reading = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # the test decides the high-water mark

    def write(self, data: bytes) -> None:
        self.buffer += len(data)
        self.written += data
        if self.buffer > self.high and not self.write_paused:
            self.write_paused = True
            self.protocol.pause_writing()

    def drain(self) -> None:
        self.buffer = 0
        if self.write_paused:
            self.write_paused = False
            self.protocol.resume_writing()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self.buffer


BASE_CONFIG: dict[str, Any] = {
    "server": {"max_header_count": 20, "max_header_bytes": 2048, "max_body_bytes": 1000, "via": "1.1 uvgate"},
    "upstreams": {"b": {"servers": ["127.0.0.1:1"]}},
    "routes": [{"prefix": "/", "upstream": "b"}],
}


def _config(server: dict[str, Any] | None = None, upstream: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(orjson.dumps(BASE_CONFIG))
    data["server"].update(server or {})
    data["upstreams"]["b"].update(upstream or {})
    return data


def connect(
    gateway: Any = None, transport: MockTransport | None = None, **server: object
) -> tuple[HttpProtocol, MockTransport, Any, WorkerState]:
    """A downstream protocol on a mock transport; the gateway records exchanges unless one is given."""
    state = WorkerState(MockLoop(), build(_config(server)))  # type: ignore[arg-type]
    gateway = gateway if gateway is not None else RecordingGateway()
    state.gateway = gateway
    protocol = HttpProtocol(state, Http1Settings(state))
    transport = transport if transport is not None else MockTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport, gateway, state


class Proxied:
    """A worker with the real gateway, pool and upstream connections; connects happen when the test says."""

    def __init__(self, server: dict[str, Any] | None = None, upstream: dict[str, Any] | None = None) -> None:
        self.config = build(_config(server, upstream))
        self.state = WorkerState(MockLoop(), self.config)  # type: ignore[arg-type]
        self.conns: list[UpstreamConnection] = []
        self.cluster = Cluster(self.config.upstreams["b"], self._connector)
        self.state.gateway = Gateway(self.config, self.state, {"b": self.cluster})
        self.settings = Http1Settings(self.state)

    def _connector(self, server: ServerPool, exchange: Exchange) -> UpstreamConnection:
        conn = UpstreamConnection(server.cluster, server, self.state, ResponseHeadRewriter())
        conn.pending = exchange
        conn.connect_task = cast(Any, FakeConnectTask())
        self.conns.append(conn)
        return conn

    def client(self, transport: MockTransport | None = None) -> tuple[HttpProtocol, MockTransport]:
        protocol = HttpProtocol(self.state, self.settings)
        transport = transport if transport is not None else MockTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        return protocol, transport

    @staticmethod
    def connected(conn: UpstreamConnection, high: int = 1 << 30) -> UpTransport:
        """The TCP connect succeeded: connection_made, then the task's done-callback."""
        transport = UpTransport(conn, high)
        conn.connection_made(transport)  # type: ignore[arg-type]
        task = conn.connect_task
        assert task is not None
        conn.connect_done(task)
        return transport


def respond(protocol: HttpProtocol, exchange: Exchange, body: bytes = b"ok") -> None:
    """Play the upstream side of one response."""
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d" % len(body)
    protocol.response_head(exchange, 200, head, BODY_LENGTH)
    protocol.response_body(exchange, body)
    protocol.response_end(exchange)
    protocol.response_flush(exchange)
    protocol.response_done(exchange)


def responses(raw: bytes) -> list[RawResponse]:
    """Every complete response in `raw` (what the client would parse), in order."""
    out: list[RawResponse] = []
    while raw:
        parsed = parse_response(raw)
        assert parsed is not None, f"incomplete response: {raw[:300]!r}"
        response, consumed = parsed
        out.append(response)
        raw = raw[consumed:]
    return out


def feed(protocol: HttpProtocol, data: bytes) -> Exception | None:
    """`protocol.data_received(data)`; what it raised (in uvloop: "Fatal error on transport"), without its
    possibly thousand-deep context chain, which pytest would take half a minute to render."""
    try:
        protocol.data_received(data)
    except Exception as exc:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return None


def statuses(raw: bytes) -> list[int]:
    return [response.status for response in responses(raw)]


def error_codes(raw: bytes) -> list[str]:
    return [str(response.json()["error"]) for response in responses(raw) if response.status >= 400]


# ---------------------------------------------------------------------------------------------- bug 4


def test_upstream_paused_by_slow_client_on_its_last_read_is_resumed_before_pooling() -> None:
    """Bug 4: a connection paused for a slow client on the response's last read was pooled still paused."""
    worker = Proxied(server={"write_buffer_limit": "16KiB"})
    transport = CrossingTransport()
    client, _ = worker.client(transport)
    transport.protocol = client
    client.data_received(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
    (conn,) = worker.conns
    up = worker.connected(conn)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nabcd")
    assert up.reading
    transport.cross_on_next_write = True  # the client is behind: the last read crosses the high-water mark
    conn.data_received(b"efgh")
    assert transport.buffer.endswith(b"abcdefgh")
    server = worker.cluster.servers[0]
    assert list(server.idle) == [conn], "the connection should be pooled after a complete response"
    assert up.reading, "a pooled connection must be read (the next response on it would never arrive)"


def test_waiter_handed_a_connection_after_a_whole_response_gets_a_whole_response() -> None:
    """Waiters (bug 15): one handed the connection as a whole response finished got its own response without a head."""
    worker = Proxied(upstream={"max_connections": 1})
    first, first_transport = worker.client()
    first.data_received(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    (conn,) = worker.conns
    worker.connected(conn)
    waiter, waiter_transport = worker.client()
    waiter.data_received(b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n")  # the only connection is busy: it waits
    assert list(worker.cluster.waiters) == [waiter.active]
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")  # whole, in one read
    assert [(r.status, r.body) for r in responses(first_transport.take())] == [(200, b"a")]
    assert conn.exchange is waiter.active, "the waiter takes the connection"
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
    out = waiter_transport.take()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n"), out
    assert [(r.status, r.body) for r in responses(out)] == [(200, b"b")]


# ---------------------------------------------------------------------------------------------- bug 6


def test_attach_keeps_upstream_backpressure_on_the_request_body() -> None:
    """Bug 6: attach() wrote the buffered body (upstream pause_writing) and then cleared that pause."""
    worker = Proxied(server={"write_buffer_limit": "16KiB", "max_body_bytes": "64MiB", "body_buffer_size": "16KiB"})
    client, transport = worker.client()
    client.data_received(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (32 << 20) + b"a" * 40000)
    assert transport.paused(), "a body buffered beyond the write limit pauses reading"
    (conn,) = worker.conns
    up = worker.connected(conn, high=16 * 1024)
    assert up.write_paused, "the attach write crossed the upstream high-water mark"
    assert transport.paused(), "reading must stay paused until the upstream drains"
    queued = up.buffer
    for _ in range(10):  # a client that keeps sending gets nothing read
        if transport.paused():
            break
        client.data_received(b"a" * 65536)
    assert up.buffer == queued
    up.drain()
    assert not transport.paused(), "the upstream drained: the body is read again"


# ---------------------------------------------------------------------------------------------- bug 7


def test_body_buffer_pause_ends_with_an_exchange_answered_early() -> None:
    """Bug 7a: a request body buffered while waiting for a connection, then answered 503: reading stayed paused."""
    client, transport, gateway, state = connect(
        max_body_bytes="1MiB", write_buffer_limit="4KiB", body_buffer_size="1KiB"
    )
    client.data_received(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n" + b"a" * 5000)
    (exchange,) = gateway.exchanges
    assert transport.paused()
    queue = FakeConn("a cluster queue")
    exchange.wait_connection(queue, state.now + 5)
    exchange.fail(ServiceUnavailable("upstream_pending_timeout"))
    assert queue.unparked == [(exchange, False)]
    assert statuses(transport.take()) == [503]
    assert not transport.closing
    assert not transport.paused(), "the rest of the body and the next request must be read"
    client.data_received(b"a" * 95000 + b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [ex.target for ex in gateway.exchanges] == [b"/", b"/next"]


def test_upstream_pause_ends_with_an_exchange_answered_early() -> None:
    """Bug 7b: upstream stopped reading the body (reading paused), then answered early: reading stayed paused."""
    client, transport, gateway, _ = connect(max_body_bytes="1MiB")
    client.data_received(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n" + b"a" * 5000)
    (exchange,) = gateway.exchanges
    conn = FakeConn("upstream")
    conn.attach(exchange)
    assert exchange.phase == PHASE_WAIT_RESPONSE
    client.pause_reading(exchange)  # the upstream's write buffer is full
    assert transport.paused()
    respond(client, exchange, b"nope")  # answered before the body was sent (e.g. 413), connection kept
    assert not transport.closing
    assert not transport.paused(), "the rest of the body and the next request must be read"
    client.data_received(b"a" * 95000 + b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [ex.target for ex in gateway.exchanges] == [b"/", b"/next"]


# ---------------------------------------------------------------------------------------------- bug 8


def test_pipelined_requests_behind_a_slow_one_get_no_header_or_body_timeout() -> None:
    """Bug 8: while reading is paused for the pipeline, the queued body's and next head's clocks kept running."""
    client, transport, gateway, state = connect(header_timeout="1s", body_timeout="1s")
    client.data_received(
        b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\nPOST /body HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n01234"
    )
    client.check(state.now + 5)
    assert not transport.buffer and not transport.closing, transport.buffer
    client2, transport2, gateway2, state2 = connect(header_timeout="1s", body_timeout="1s")
    client2.data_received(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\nGET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\n")
    client2.check(state2.now + 5)
    assert not transport2.buffer and not transport2.closing, transport2.buffer
    # The slow responses arrive; the clients send the rest of what they started.
    respond(client, gateway.exchanges[0])
    assert [ex.target for ex in gateway.exchanges] == [b"/slow", b"/body"], transport.buffer
    client.data_received(b"56789")
    respond(client, gateway.exchanges[1])
    assert statuses(transport.take()) == [200, 200]
    respond(client2, gateway2.exchanges[0])
    respond(client2, gateway2.exchanges[1])
    assert [ex.target for ex in gateway2.exchanges] == [b"/slow", b"/1"], transport2.buffer
    client2.data_received(b"Host: h\r\n\r\n")
    respond(client2, gateway2.exchanges[2])
    assert statuses(transport2.take()) == [200, 200, 200]


# ---------------------------------------------------------------------------------------------- bug 9


def test_chunked_trailers_are_not_forwarded_as_headers() -> None:
    """Bug 9: trailer fields of a chunked body were appended to the (not yet sent) upstream request head."""
    client, _, gateway, _ = connect()
    client.data_received(
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Internal: set-by-trailer\r\nAuthorization: Bearer smuggled\r\n\r\n"
    )
    (exchange,) = gateway.exchanges
    head = request_head(exchange).lower()
    assert b"x-internal" not in head and b"authorization" not in head, head
    assert exchange.body_done and b"".join(exchange.pending_body or []) == b"abc"


# ---------------------------------------------------------------------------------------------- bug 12


def test_many_upgrade_requests_in_one_read_are_all_answered() -> None:
    """Bug 12: each Upgrade request in a read re-fed the rest by recursion: RecursionError on a long pipeline."""
    client, transport, _, _ = connect(gateway=NotFoundGateway())
    one = b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    error = feed(client, one * 3000)
    assert error is None, f"data_received raised {error!r}"
    out = transport.take()
    assert out.count(b"HTTP/1.1 404 ") == 3000
    assert not transport.closing


# ---------------------------------------------------------------------------------------------- bug 13


def test_sync_answer_with_connection_close_then_more_bytes_does_not_write_after_eof() -> None:
    """Bug 13: a 404 answered with Connection: close, then the next pipelined bytes -> 400 written after write_eof."""
    client, transport, _, _ = connect(gateway=NotFoundGateway(), transport=UvloopLikeTransport())
    error = feed(
        client, b"GET /nope HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\nGET /api/x HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    assert error is None, f"data_received raised {error!r}"
    out = transport.take()
    assert statuses(out) == [404], out
    assert transport.eof_written


# ---------------------------------------------------------------------------------------------- bug 14


def test_client_leaving_after_the_tcp_connect_is_not_a_connect_failure() -> None:
    """Bug 14: a client gone while its upstream connect finished counted as a connect failure (server ejected)."""
    worker = Proxied(upstream={"max_fails": 1, "fail_cooldown": "30s"})
    client, _ = worker.client()
    client.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    (conn,) = worker.conns
    conn.connection_made(UpTransport(conn, 1 << 30))  # type: ignore[arg-type]
    client.connection_lost(None)  # the client leaves before the connect task's done-callback runs
    task = conn.connect_task
    assert task is not None
    conn.connect_done(task)
    server = worker.cluster.servers[0]
    assert server.fails == 0 and server.ejected_until == 0.0, f"{server} ejected until {server.ejected_until}"
    # The next client is served (by the connection that was opened), not refused with no_healthy_upstream.
    client2, transport2 = worker.client()
    client2.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert not transport2.buffer, transport2.buffer
    assert len(worker.conns) == 1 and conn.exchange is not None


# ---------------------------------------------------------------------------------------------- bug 16


def test_retry_after_connect_failure_uses_an_idle_connection_of_another_server() -> None:
    """Bug 16: after a connect failure, a server whose slots were all idle pooled connections was skipped (503)."""
    connects: list[tuple[ServerPool, Exchange]] = []
    config = UpstreamConfig(
        name="b", servers=(Address("127.0.0.1", 9000), Address("127.0.0.1", 9001)), max_connections=2
    )
    cluster = Cluster(config, lambda server, ex: connects.append((server, ex)) or FakeConn("connecting"))
    a, b = cluster.servers
    idle = [FakeConn("b1"), FakeConn("b2")]
    for conn in idle:  # B's whole budget is idle keep-alive connections
        b.open += 1
        conn.idle_since = 0.0
        cluster.release(b, conn)
    down = FakeDownstream()
    exchange = make_exchange(down)
    cluster._rr = 0  # round robin: A first
    cluster.dispatch(exchange, now=1.0)
    assert connects == [(a, exchange)]
    cluster.connect_failed(a, exchange, now=1.5, timeout=False, reason="connection refused")  # A refuses
    assert not down.failures, [f.detail for f in down.failures]
    assert idle[1].attached == [exchange] and exchange.phase == PHASE_WAIT_RESPONSE
    assert len(connects) == 1


# ---------------------------------------------------------------------------------------------- bug 17


def test_deferred_400_is_not_replaced_by_a_header_timeout() -> None:
    """Bug 17: a malformed request behind a slow one: its deferred 400 became a 408 once header_timeout passed."""
    client, transport, gateway, state = connect(header_timeout="1s")
    client.data_received(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\nGET /a HTTP/1.1\r\nHost: h\r\nBad Header\r\n\r\n")
    client.check(state.now + 5)
    assert not transport.buffer
    respond(client, gateway.exchanges[0])
    out = transport.take()
    assert statuses(out) == [200, 400], out
    assert "header_timeout" not in error_codes(out)
    assert transport.closing


# ---------------------------------------------------------------------------------------------- bug 18


def test_http10_keep_alive_error_response_says_keep_alive() -> None:
    """Bug 18: an HTTP/1.0 keep-alive client got proxy error responses without `Connection: keep-alive`."""
    client, transport, gateway, _ = connect()
    client.data_received(b"GET / HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n")
    (exchange,) = gateway.exchanges
    exchange.fail(ServiceUnavailable("upstream_connect_failed"))
    out = transport.take()
    assert statuses(out) == [503]
    assert b"\r\nconnection: keep-alive\r\n" in out.lower(), out
    assert not transport.closing


# ---------------------------------------------------------------------------------------------- request targets, TE


@pytest.mark.parametrize(
    "target",
    [b"/api/../admin", b"/api/%2e%2e/admin", b"/api/%2E%2E/admin", b"/api/./admin", b"/api/.%2e/admin", b"/api/.."],
)
def test_dot_segments_are_rejected(target: bytes) -> None:
    """Dot segments (also percent-encoded) let `/api/../admin` match the `/api/` route while meaning `/admin`."""
    client, transport, gateway, _ = connect()
    client.data_received(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % target)
    out = transport.take()
    assert statuses(out) == [400], out
    assert not gateway.exchanges


def test_absolute_form_with_query_and_no_path() -> None:
    """`GET http://h?x` took `h?x` for the host: the host is `h` and the path `/?x`."""
    client, _, gateway, _ = connect()
    client.data_received(b"GET http://h?x HTTP/1.1\r\nHost: other\r\n\r\n")
    (exchange,) = gateway.exchanges
    assert exchange.host == b"h"
    assert exchange.target == b"/?x"


def test_two_transfer_encoding_headers_gzip_then_chunked_is_501() -> None:
    """Only the last of two Transfer-Encoding headers was seen: `gzip` then `chunked` was forwarded as chunked."""
    client, transport, gateway, _ = connect()
    client.data_received(
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    )
    out = transport.take()
    assert statuses(out) == [501], out
    assert not gateway.exchanges
    assert transport.closing
