"""Defects an adversarial review of the exchange-lifecycle refactor found (each test failed before its fix):
upstream write backpressure lost on a pooled connection, a request parsed after a body rejected for its
framing dispatched, a client that reads nothing answered a whole read, the total body clock counting time
the proxy held reading paused, half_close = "finish" with pipelining, and dispatch after an abort."""

from __future__ import annotations

from tests.fakes import MockTransport
from tests.protocol.test_http1_regressions import (
    Proxied,
    connect,
    error_codes,
    feed,
    respond,
    statuses,
)


def test_half_close_finish_answers_pipelined_requests() -> None:
    """half_close = "finish": pipelined requests followed by FIN must all be answered, then the close."""
    client, transport, gateway, _ = connect(half_close="finish")
    client.data_received(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    assert client.eof_received() is True
    respond(client, gateway.exchanges[0])
    if len(gateway.exchanges) > 1:
        respond(client, gateway.exchanges[1])
    out = transport.take()
    assert statuses(out) == [200, 200], out


def test_body_total_timeout_does_not_count_time_reading_was_held_paused() -> None:
    """A POST queued behind a slow request (reading paused by the proxy) got 408 body_total_timeout as soon as
    reading resumed: the total clock kept running while the proxy did not read."""
    client, transport, gateway, state = connect(body_timeout="1s", body_total_timeout="2s")
    client.data_received(
        b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\nPOST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n01234"
    )
    assert transport.paused()
    state.now += 5  # the slow response takes 5 s; the client cannot send meanwhile (not read)
    client.check(state.now)
    respond(client, gateway.exchanges[0])
    assert not transport.paused()
    state.now += 0.5  # half a second later (one tick), the client is still sending the rest of the body
    client.check(state.now)
    out = transport.take()
    assert statuses(out) == [200], (out, error_codes(out))
    client.data_received(b"56789")
    respond(client, gateway.exchanges[1])
    assert statuses(transport.take()) == [200]


def test_upstream_write_backpressure_survives_pooling() -> None:
    """A connection whose write buffer is above the high-water mark (the upstream answered before reading the
    whole body) was pooled; the next exchange on it streamed its body without any backpressure (uvloop does not
    call pause_writing again while the protocol is paused)."""
    worker = Proxied(server={"max_body_bytes": "64MiB", "write_buffer_limit": "16KiB", "body_buffer_size": "16KiB"})
    first, first_out = worker.client()
    first.data_received(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 40000\r\n\r\n" + b"a" * 40000)
    (conn,) = worker.conns
    up = worker.connected(conn, high=16 * 1024)
    assert up.write_paused  # the upstream does not read (it answers early)
    conn.data_received(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
    assert statuses(first_out.take()) == [401]
    assert list(worker.cluster.servers[0].idle) == [conn]  # pooled, still write-paused
    second, second_out = worker.client()
    second.data_received(b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (8 << 20) + b"b" * 20000)
    assert conn.exchange is second.active
    for _ in range(50):
        if second_out.paused():
            break
        second.data_received(b"b" * 65536)
    assert second_out.paused(), f"{up.buffer} bytes queued upstream, client still read"


def test_request_after_a_chunked_body_rejected_for_its_framing_is_never_dispatched() -> None:
    """The chunk-framing bound is checked after the feed: a request parsed after the offending body in the same
    feed stayed queued and was dispatched (forwarded upstream) before the deferred 400, which then answered it
    out of place: the client reads B's response as A's. (max_pipelined * 25 > max_header_bytes + 128.)"""
    client, transport, gateway, _ = connect(max_header_bytes="1KiB", max_pipelined=64)
    client.data_received(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
    a_head = b"POST /a HTTP/1.1\r\nHost: h\r\nX-Pad: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % (b"p" * 200)
    a_body = b"5;" + b"e" * 1300 + b"\r\nhello\r\n0\r\n\r\n"
    b_req = b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n"
    data = a_head + a_body + b_req
    assert len(data) > 64 * 25 and len(a_body + b_req) <= 63 * 25
    client.data_received(data)
    respond(client, gateway.exchanges[0])
    targets = [ex.target for ex in gateway.exchanges]
    out = transport.take()
    assert targets == [b"/slow"], (targets, statuses(out))
    assert statuses(out) == [200, 400]


class UvloopAbortedTransport(MockTransport):
    """Like uvloop: write() after abort() or close() is silently dropped (connection_lost comes later)."""

    def write(self, data: bytes) -> None:
        if not self.closing:
            super().write(data)


def test_nothing_is_dispatched_after_the_proxy_aborted_the_client() -> None:
    """After abort() (peer reset seen by the poll, or half_close=abort), connection_lost comes a loop iteration
    later; a response completing in between finished the active exchange and _pump dispatched the next pipelined
    request upstream (a POST sent for a client already gone)."""
    client, transport, gateway, _ = connect(transport=UvloopAbortedTransport())
    client.data_received(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nPOST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx")
    client.peer_closed(reset=True)
    assert transport.aborted
    respond(client, gateway.exchanges[0])  # the upstream answered in the same loop iteration
    assert [ex.target for ex in gateway.exchanges] == [b"/a"], "POST /b went upstream after the abort"
    client.connection_lost(None)


def test_a_client_that_reads_nothing_does_not_get_its_whole_read_answered() -> None:
    """pause_writing pauses reading "between request bodies: answers the proxy makes itself must not pile up",
    but _pump keeps parsing `backlog` (bytes already read) regardless of _PAUSE_CLIENT_BEHIND: one 256 KiB read
    of 25-byte requests to a 404 route puts ~10 000 answers (~1.7 MB) in the transport buffer."""
    from tests.protocol.test_http1_regressions import CrossingTransport, NotFoundGateway

    transport = CrossingTransport()
    client, _, _, _ = connect(gateway=NotFoundGateway(), transport=transport)
    transport.protocol = client
    transport.cross_on_next_write = True  # the first answer crosses the high-water mark: the client is behind
    one = b"GET /x HTTP/1.1\r\nHost:\r\n\r\n"
    assert feed(client, one * (262144 // len(one))) is None
    answered = len(statuses(transport.take()))
    assert answered <= 32 + 2, f"{answered} answers written to a client that reads nothing"


def test_a_slow_request_body_is_not_blamed_on_the_upstream() -> None:
    """While the client still sends its body, each piece restarted the upstream response clock: a client
    stalling longer than `response_timeout` got a 504 and the server was reported as timing out. The
    response clock now starts when the request is all sent; until then the client's body clocks apply."""
    worker = Proxied(server={"body_timeout": "30s", "body_buffer_size": "0"}, upstream={"response_timeout": "5s"})
    client, transport = worker.client()
    client.data_received(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n01234")
    (conn,) = worker.conns
    worker.connected(conn)
    state = worker.state
    state.now += 20  # the client stalls: longer than response_timeout, shorter than body_timeout
    client.check(state.now)
    assert not transport.buffer, transport.buffer
    client.data_received(b"56789")  # the request is all sent: now the upstream's clock runs
    state.now += 4
    client.check(state.now)
    assert not transport.buffer
    state.now += 3
    client.check(state.now)
    assert error_codes(transport.take()) == ["upstream_response_timeout"]
