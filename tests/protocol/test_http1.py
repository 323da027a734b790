"""HTTP/1.1 downstream protocol fed bytes through a mock transport; the gateway is a recorder."""

from __future__ import annotations

import orjson
import pytest

from proxy.config import build
from proxy.errors import ProxyError, ServiceUnavailable
from proxy.exchange import BODY_CHUNKED, BODY_LENGTH, PHASE_DONE, PHASE_WAIT_CONNECTION, Exchange
from proxy.http1.protocol import Http1Settings, HttpProtocol
from proxy.server import WorkerState
from proxy.upstream.client import request_head
from tests.fakes import MockLoop, MockTransport, RecordingGateway

CONFIG = {
    "server": {"max_header_count": 20, "max_header_bytes": 2048, "max_body_bytes": 1000, "via": "1.1 uvgate"},
    "upstreams": {"b": {"servers": ["127.0.0.1:1"]}},
    "routes": [{"prefix": "/", "upstream": "b"}],
}


def connect(**server: object) -> tuple[HttpProtocol, MockTransport, RecordingGateway, WorkerState]:
    data = orjson.loads(orjson.dumps(CONFIG))
    data["server"].update(server)
    state = WorkerState(MockLoop(), build(data))  # type: ignore[arg-type]
    gateway = RecordingGateway()
    state.gateway = gateway
    protocol = HttpProtocol(state, Http1Settings(state))
    transport = MockTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport, gateway, state


def respond(protocol: HttpProtocol, exchange: Exchange, body: bytes = b"ok", head: bytes | None = None) -> None:
    """Play the upstream side of one response."""
    head = head or b"HTTP/1.1 200 OK\r\ncontent-length: %d" % len(body)
    protocol.response_head(exchange, 200, head, BODY_LENGTH)
    protocol.response_body(exchange, body)
    protocol.response_end(exchange)
    protocol.response_flush(exchange)
    protocol.response_done(exchange)


class Parked:
    """Something an exchange waits on (a cluster queue, say), recording why it was let go."""

    def __init__(self) -> None:
        self.unparked: list[bool] = []

    def unpark(self, exchange: Exchange, timed_out: bool) -> None:
        self.unparked.append(timed_out)


def parse_status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def test_forwarded_head_sets_proxy_headers_and_drops_hop_by_hop() -> None:
    protocol, transport, gateway, _ = connect()
    protocol.data_received(
        b"GET /api/x?q=1 HTTP/1.1\r\nHost: example.com\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n"
        b"Keep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Authorization: Basic x\r\n"
        b"X-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\nAccept: */*\r\n\r\n"
    )
    (exchange,) = gateway.exchanges
    head = request_head(exchange)
    lines = head.split(b"\r\n")
    assert lines[0] == b"GET /api/x?q=1 HTTP/1.1"
    names = [line.split(b":")[0].lower() for line in lines[1:] if line]
    for banned in (b"connection", b"x-secret", b"keep-alive", b"te", b"upgrade", b"proxy-authorization"):
        assert banned not in names
    assert b"x-forwarded-for: 1.1.1.1, 10.1.2.3" in lines
    assert b"x-forwarded-proto: http" in lines and names.count(b"x-forwarded-proto") == 1
    assert b"x-forwarded-host: example.com" in lines and names.count(b"x-forwarded-host") == 1
    assert b"via: 1.1 uvgate" in lines
    assert b"Accept: */*" in lines
    assert head.endswith(b"\r\n\r\n")
    rid = [line for line in lines if line.startswith(b"x-request-id: ")]
    assert len(rid) == 1 and rid[0] == b"x-request-id: " + exchange.request_id
    respond(protocol, exchange)
    out = transport.take()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"connection: keep-alive" not in out.lower()
    assert b"\r\nx-request-id: " + exchange.request_id in out
    assert out.endswith(b"\r\n\r\nok")


def test_client_request_id_is_kept() -> None:
    protocol, _, gateway, _ = connect()
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: abc-123\r\n\r\n")
    assert gateway.exchanges[0].request_id == b"abc-123"
    protocol2, _, gateway2, _ = connect()
    protocol2.data_received(b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: has space\r\n\r\n")
    assert gateway2.exchanges[0].request_id != b"has space"


SMUGGLING = {
    "cl_and_te": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_and_cl": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    "two_lengths": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "same_length_twice": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "length_list": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\nhello",
    "length_not_a_number": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5x\r\n\r\nhello",
    "length_negative": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
    "te_not_chunked": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    "te_chunked_not_final": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te_twice": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "te_space_before_colon": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "te_in_http10": b"POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad_chunk_size": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk_size_overflow": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
    "chunk_missing_crlf": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX0\r\n\r\n",
    "bare_lf_in_header": b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n",
    "bare_cr_in_header": b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n",
    "nul_in_header": b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n",
    "missing_host": b"GET / HTTP/1.1\r\n\r\n",
    "two_hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "bad_target": b"GET nope HTTP/1.1\r\nHost: h\r\n\r\n",
}


@pytest.mark.parametrize("name", list(SMUGGLING))
def test_framing_errors_answer_400_and_close(name: str) -> None:
    protocol, transport, gateway, _ = connect()
    protocol.data_received(SMUGGLING[name])
    out = transport.take()
    assert parse_status(out) == 400, out
    assert b"\r\nconnection: close\r\n" in out
    assert transport.closing
    # An exchange whose body turned out malformed was given up (its upstream, if any, aborted).
    assert all(ex.phase == PHASE_DONE for ex in gateway.exchanges)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
        (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\n\r\n", 413),
        (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(21)) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"v" * 2100 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 2100 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 431),
        (b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: magic\r\nContent-Length: 1\r\n\r\nx", 417),
        (b"CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n", 501),
    ],
)
def test_limits_and_unsupported(raw: bytes, status: int) -> None:
    protocol, transport, gateway, _ = connect()
    protocol.data_received(raw)
    out = transport.take()
    assert parse_status(out) == status, out
    assert transport.closing
    assert not gateway.exchanges


def test_head_bytes_limit_counts_partial_heads() -> None:
    protocol, transport, _, _ = connect()
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: h\r\nX-Long: ")
    for _ in range(5):
        if transport.closing:
            break
        protocol.data_received(b"v" * 1000)
    assert parse_status(transport.take()) == 431


def test_chunked_body_over_limit_is_413() -> None:
    protocol, transport, gateway, _ = connect()
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert len(gateway.exchanges) == 1
    protocol.data_received(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
    assert not transport.buffer
    protocol.data_received(b"1\r\nx\r\n")
    assert parse_status(transport.take()) == 413
    assert transport.closing


def test_pipelined_requests_are_dispatched_in_order() -> None:
    protocol, transport, gateway, _ = connect()
    protocol.data_received(b"".join(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in range(3)))
    assert [ex.target for ex in gateway.exchanges] == [b"/0"]
    assert transport.read_paused
    respond(protocol, gateway.exchanges[0], b"zero")
    assert [ex.target for ex in gateway.exchanges] == [b"/0", b"/1"]
    respond(protocol, gateway.exchanges[1], b"one")
    respond(protocol, gateway.exchanges[2], b"two")
    out = transport.take()
    assert [part.rpartition(b"\r\n\r\n")[2] for part in out.split(b"HTTP/1.1 200 OK")[1:]] == [b"zero", b"one", b"two"]
    assert not transport.read_paused and not transport.closing


def test_connection_close_and_http10() -> None:
    protocol, transport, gateway, _ = connect()
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    respond(protocol, gateway.exchanges[0])
    assert b"\r\nconnection: close\r\n" in transport.take()
    assert transport.closing

    protocol, transport, gateway, _ = connect()
    protocol.data_received(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    respond(protocol, gateway.exchanges[0])
    assert b"\r\nconnection: keep-alive\r\n" in transport.take()
    assert not transport.closing


def test_each_request_gets_its_own_version_however_the_stream_is_cut() -> None:
    """The version is read from the request line's bytes when its head began a read, else from the
    parser: 1.0 and 1.1 requests, with and without Connection, with bodies, an empty line before a
    request line and methods of other lengths, cut into reads at random, each get their own version."""
    import random

    rng = random.Random(7)
    for _ in range(300):
        requests: list[tuple[bytes, bytes]] = []
        for _ in range(rng.randrange(1, 6)):
            version = rng.choice((b"1.0", b"1.1"))
            method = rng.choice((b"GET", b"DELETE", b"POST"))
            target = rng.choice((b"/", b"/a/b?c=d", b"/HTTP/1.1"))
            lines = [b"%s %s HTTP/%s" % (method, target, version), b"Host: h"]
            connection = rng.choice((None, b"keep-alive", b"Keep-Alive", b"x"))
            if connection is not None:
                lines.append(b"Connection: " + connection)
            body = b""
            if method == b"POST":
                body = b"x" * rng.randrange(0, 5)
                lines.append(b"Content-Length: %d" % len(body))
            lead = b"\r\n" if rng.random() < 0.2 else b""
            requests.append((lead + b"\r\n".join(lines) + b"\r\n\r\n" + body, version))
            if version == b"1.0" and connection != b"keep-alive" and connection != b"Keep-Alive":
                break  # the connection ends with this one
        stream = b"".join(raw for raw, _ in requests)
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randrange(0, 6))))
        protocol, _, gateway, _ = connect()
        seen: list[bytes] = []
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            protocol.data_received(stream[start:end])
            while len(seen) < len(gateway.exchanges):
                exchange = gateway.exchanges[len(seen)]
                seen.append(exchange.protocol)
                respond(protocol, exchange)
        assert seen == [b"HTTP/" + version for _, version in requests], (stream, cuts)


def test_chunked_upstream_to_http10_client_is_close_delimited() -> None:
    protocol, transport, gateway, _ = connect()
    protocol.data_received(b"GET / HTTP/1.0\r\n\r\n")
    exchange = gateway.exchanges[0]
    protocol.response_head(exchange, 200, b"HTTP/1.1 200 OK", BODY_CHUNKED)
    protocol.response_body(exchange, b"abc")
    protocol.response_end(exchange)
    protocol.response_flush(exchange)
    protocol.response_done(exchange)
    out = transport.take()
    assert out.endswith(b"\r\n\r\nabc")
    assert b"transfer-encoding" not in out.lower()
    assert transport.closing


def test_chunked_response_rechunked_for_http11() -> None:
    protocol, transport, gateway, _ = connect()
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    exchange = gateway.exchanges[0]
    protocol.response_head(exchange, 200, b"HTTP/1.1 200 OK\r\nX-A: b", BODY_CHUNKED)
    protocol.response_body(exchange, b"hello")
    protocol.response_end(exchange)
    protocol.response_flush(exchange)
    out = transport.take()
    assert out.lower().count(b"transfer-encoding: chunked") == 1
    assert out.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")


def test_expect_100_continue_sent_when_body_wanted() -> None:
    protocol, transport, gateway, _ = connect()
    protocol.data_received(b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    exchange = gateway.exchanges[0]
    assert not transport.buffer
    protocol.body_wanted(exchange)
    assert transport.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert b"expect" not in request_head(exchange).lower()


def test_body_before_upstream_is_buffered_with_backpressure() -> None:
    protocol, transport, gateway, _ = connect(max_body_bytes="1MiB", write_buffer_limit="4KiB", body_buffer_size="1KiB")
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10000\r\n\r\n" + b"a" * 5000)
    exchange = gateway.exchanges[0]
    assert exchange.pending_bytes == 5000 and transport.read_paused
    protocol.body_wanted(exchange)
    assert not transport.read_paused


def test_gateway_failure_answers_json_and_keeps_alive() -> None:
    protocol, transport, gateway, _ = connect()
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    exchange = gateway.exchanges[0]
    exchange.fail(ServiceUnavailable("no_healthy_upstream"))
    out = transport.take()
    assert parse_status(out) == 503
    body = orjson.loads(out.partition(b"\r\n\r\n")[2])
    assert body == {"error": "no_healthy_upstream", "request_id": exchange.request_id.decode()}
    assert not transport.closing


def test_failure_after_response_started_aborts() -> None:
    protocol, transport, gateway, _ = connect()
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    exchange = gateway.exchanges[0]
    protocol.response_head(exchange, 200, b"HTTP/1.1 200 OK\r\ncontent-length: 10", BODY_LENGTH)
    protocol.response_flush(exchange)
    exchange.fail(ProxyError("boom"))
    assert transport.aborted and exchange.phase == PHASE_DONE


def test_timeouts() -> None:
    protocol, transport, _, state = connect(header_timeout="5s", keepalive_timeout="30s")
    protocol.data_received(b"GET / HTTP/1.1\r\nHo")
    protocol.check(state.now + 4)
    assert not transport.buffer
    protocol.check(state.now + 6)
    assert parse_status(transport.take()) == 408

    protocol, transport, gateway, state = connect(keepalive_timeout="30s")
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    respond(protocol, gateway.exchanges[0])
    protocol.check(state.now + 29)
    assert not transport.closing
    protocol.check(state.now + 31)
    assert transport.closing

    protocol, transport, gateway, state = connect()
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    exchange = gateway.exchanges[0]
    queue = Parked()
    exchange.wait_connection(queue, state.now + 1)
    assert exchange.phase == PHASE_WAIT_CONNECTION
    protocol.check(state.now + 1)  # (the coarse clock's tick of slack: not yet)
    assert not transport.buffer
    protocol.check(state.now + 2)
    assert parse_status(transport.take()) == 503
    assert exchange.phase == PHASE_DONE and queue.unparked == [True]


def test_shutdown_closes_after_the_response_in_flight_and_idle_connections_after_the_grace() -> None:
    protocol, transport, gateway, state = connect(drain_idle_grace="1s")
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    protocol.shutdown()  # the worker drains
    respond(protocol, gateway.exchanges[0])
    assert b"\r\nconnection: close\r\n" in transport.take()
    assert transport.closing

    idle, idle_transport, idle_gateway, state = connect(drain_idle_grace="1s", keepalive_timeout="60s")
    idle.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    respond(idle, idle_gateway.exchanges[0])
    idle.shutdown()
    idle.check(state.now + 0.5)
    assert not idle_transport.closing, "a request may be on its way: the grace lets it arrive"
    idle.check(state.now + 2.5)
    assert idle_transport.closing


def test_client_that_reads_nothing_is_not_read_from() -> None:
    """Answers the proxy makes itself (404s here) must not pile up for a client that never reads them."""
    protocol, transport, gateway, _ = connect()
    protocol.data_received(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    gateway.exchanges[0].fail(ServiceUnavailable("x"))
    protocol.pause_writing()  # the transport's buffer went over the high-water mark
    assert transport.read_paused
    protocol.resume_writing()
    assert not transport.read_paused


def test_slow_client_does_not_stop_a_request_body() -> None:
    """While a body is being read, a full write buffer pauses the upstream response, not the upload."""
    protocol, transport, _gateway, _ = connect()
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
    protocol.pause_writing()
    assert not transport.read_paused


def test_endless_trailer_is_431() -> None:
    """Trailer fields are bounded like a head (httptools accumulates them itself)."""
    protocol, transport, gateway, _ = connect(max_body_bytes="1MiB")
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n")
    assert gateway.exchanges
    protocol.data_received(b"X-Trailer: ")
    for _ in range(10):
        if transport.closing:
            break
        protocol.data_received(b"v" * 1000)
    assert parse_status(transport.take()) == 431
    assert transport.closing


def test_large_reads_ending_in_a_chunk_header_are_not_trailers() -> None:
    protocol, transport, gateway, _ = connect(max_body_bytes="1MiB")
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(5):
        protocol.data_received(b"1000\r\n" + b"x" * 4096 + b"\r\n1000\r\n")
        protocol.data_received(b"y" * 4096 + b"\r\n")
    protocol.data_received(b"0\r\n\r\n")
    assert not transport.buffer and not transport.closing
    assert gateway.exchanges[0].body_done
