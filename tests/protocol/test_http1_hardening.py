"""Defects an adversarial probe found in the HTTP/1.1 shell, each fed as bytes without a loop (fakes from
tests/fakes.py). The live-proxy side of the same defects is in tests/integration/test_hardening.py."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from devstack.rawhttp import RawResponse, parse_response
from proxy.config import build
from proxy.exchange import BODY_LENGTH, PHASE_DONE, Exchange
from proxy.http1.protocol import Http1Settings, HttpProtocol
from proxy.server import WorkerState
from tests.fakes import MockLoop, MockTransport, RecordingGateway


def connect(**server: object) -> tuple[HttpProtocol, MockTransport, RecordingGateway, WorkerState]:
    data: dict[str, Any] = {
        "server": {"max_header_bytes": "2KiB", **server},
        "upstreams": {"b": {"servers": ["127.0.0.1:1"]}},
        "routes": [{"prefix": "/", "upstream": "b"}],
    }
    state = WorkerState(MockLoop(), build(data))  # type: ignore[arg-type]
    gateway = RecordingGateway()
    state.gateway = gateway
    protocol = HttpProtocol(state, Http1Settings(state))
    transport = MockTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport, gateway, state


def respond(protocol: HttpProtocol, exchange: Exchange, body: bytes = b"ok") -> None:
    protocol.response_complete(exchange, 200, b"HTTP/1.1 200 OK\r\ncontent-length: %d" % len(body), body, BODY_LENGTH)


def responses(raw: bytes) -> list[RawResponse]:
    out = []
    while raw:
        parsed = parse_response(raw)
        assert parsed is not None, raw[:200]
        out.append(parsed[0])
        raw = raw[parsed[1] :]
    return out


def error_of(response: RawResponse) -> str:
    return str(orjson.loads(response.body)["error"])


def test_a_request_rejected_after_its_head_never_reaches_the_gateway() -> None:
    """Issue 7 #4: llhttp rejects `Transfer-Encoding: chunked<TAB>` after on_headers_complete; the exchange
    was already dispatched and its head written upstream. Exchanges are dispatched once the parser returns."""
    protocol, transport, gateway, _ = connect()
    protocol.data_received(b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n")
    (response,) = responses(transport.take())
    assert response.status == 400 and transport.closing
    assert gateway.exchanges == [], "nothing rejected may reach an upstream"


def test_valid_requests_before_a_rejected_one_are_answered_first() -> None:
    protocol, transport, gateway, _ = connect()
    protocol.data_received(
        b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n"
    )
    (first,) = gateway.exchanges
    assert first.target == b"/a" and not transport.buffer
    respond(protocol, first)
    assert [r.status for r in responses(transport.take())] == [200, 400]
    assert len(gateway.exchanges) == 1 and transport.closing


def test_a_hundred_pipelined_requests_in_one_write_are_all_answered() -> None:
    """Issue 7 #5: past `max_pipelined` the shell failed with 400 (34 of 100 answered); now it stops parsing
    and reading until the pipeline has room, and parses at most about `max_pipelined` ahead."""
    protocol, transport, gateway, _ = connect(max_pipelined=8)
    protocol.data_received(b"".join(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in range(100)))
    assert transport.paused()
    assert len(protocol.queue) <= 8 + 1 and protocol.backlog, "parsed at most max_pipelined ahead"
    answered = 0
    while answered < 100:
        exchange = gateway.exchanges[answered]
        assert exchange.target == b"/%d" % answered
        assert len(protocol.queue) <= 9
        respond(protocol, exchange, b"%d" % answered)
        answered += 1
    got = responses(transport.take())
    assert [r.body for r in got] == [b"%d" % i for i in range(100)]
    assert not transport.closing and not transport.paused() and not protocol.backlog


def test_pipelined_bodies_are_cut_at_their_length() -> None:
    protocol, transport, gateway, _ = connect(max_pipelined=2)
    one = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123456789"
    protocol.data_received(one * 6)
    for index in range(6):
        exchange = gateway.exchanges[index]
        assert exchange.body_done and b"".join(exchange.pending_body or []) == b"0123456789"
        respond(protocol, exchange)
    assert [r.status for r in responses(transport.take())] == [200] * 6


@pytest.mark.parametrize(
    ("head", "code"),
    [
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "invalid_host"),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", "invalid_host"),
        (b"GET / HTTP/1.1\r\nHost: u@h\r\n\r\n", "invalid_host"),
        (b"GET http://h/x HTTP/1.1\r\n\r\n", "missing_host"),
        (b"GET http://a b/x HTTP/1.1\r\nHost: h\r\n\r\n", None),
    ],
)
def test_invalid_hosts_are_400(head: bytes, code: str | None) -> None:
    """Issue 7 #6: these were forwarded (as Host and X-Forwarded-Host); RFC 9112 3.2 and NGINX say 400."""
    protocol, transport, gateway, _ = connect()
    protocol.data_received(head)
    (response,) = responses(transport.take())
    assert response.status == 400 and not gateway.exchanges
    if code is not None:
        assert error_of(response) == code


def test_absolute_form_authority_replaces_host() -> None:
    protocol, _, gateway, _ = connect()
    protocol.data_received(b"GET http://api.example:8080/x?q HTTP/1.1\r\nHost: other\r\n\r\n")
    (exchange,) = gateway.exchanges
    assert (exchange.host, exchange.target) == (b"api.example:8080", b"/x?q")


@pytest.mark.parametrize(
    ("head", "status", "code"),
    [
        (b"FOO / HTTP/1.1\r\nHost: h\r\n\r\n", 501, "method_not_implemented"),
        (b"GET / HTTP/1.2\r\nHost: h\r\n\r\n", 505, "http_version_not_supported"),
        (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505, "http_version_not_supported"),
    ],
)
def test_methods_and_versions_llhttp_cannot_parse(head: bytes, status: int, code: str) -> None:
    """Decided: llhttp knows the registered methods only and versions 1.0/1.1 (2.0 answered 505 too), so
    an extension method gets 501 (RFC 9110 9.1) and another version 505 (NGINX forwards the former and
    takes HTTP/1.2 for 1.1; see tests/corpus/README.md)."""
    protocol, transport, gateway, _ = connect()
    protocol.data_received(head)
    (response,) = responses(transport.take())
    assert (response.status, error_of(response)) == (status, code)
    assert transport.closing and not gateway.exchanges


def test_a_chunk_extension_longer_than_a_head_is_400() -> None:
    """Issue 7 #8: chunk extensions had no size cap (llhttp skips them without a callback)."""
    protocol, transport, gateway, _ = connect()
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=")
    for _ in range(4):
        if transport.closing:
            break
        protocol.data_received(b"x" * 1000)
    (response,) = responses(transport.take())
    assert (response.status, error_of(response)) == (400, "chunk_extension_too_long")
    assert gateway.exchanges[0].phase == PHASE_DONE and gateway.exchanges[0].status == 400


def test_short_chunk_extensions_and_trailers_pass() -> None:
    protocol, transport, gateway, _ = connect()
    protocol.data_received(
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;name=value\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"
    )
    (exchange,) = gateway.exchanges
    assert exchange.body_done and b"".join(exchange.pending_body or []) == b"hello"
    assert not transport.buffer


def test_a_client_close_seen_while_paused_gives_up_the_exchanges() -> None:
    """Issue 7 #8: with reading paused (pipelining), a client's FIN or RST went unnoticed; the worker's tick
    now polls such sockets and tells the connection (`server.half_close = "abort"`, like NGINX)."""
    protocol, transport, gateway, _ = connect()
    protocol.data_received(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    assert transport.paused()
    protocol.fd = 42  # (a real socket in tests/unit/test_server.py)
    assert protocol.watched_fd() == 42
    protocol.peer_closed(reset=False)
    assert transport.aborted
    protocol.connection_lost(None)
    assert [(e.phase, e.status) for e in gateway.exchanges] == [(PHASE_DONE, 499)]
    assert protocol.watched_fd() == -1


def test_half_close_finish_answers_what_was_received() -> None:
    protocol, transport, gateway, _ = connect(half_close="finish")
    protocol.data_received(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    assert protocol.eof_received() is True
    respond(protocol, gateway.exchanges[0])
    (response,) = responses(transport.take())
    assert response.status == 200 and response.header("connection") == "close" and transport.closing


def test_half_close_abort_gives_up() -> None:
    protocol, _, gateway, _ = connect()
    protocol.data_received(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    assert protocol.eof_received() is None  # uvloop closes the transport; connection_lost follows
    protocol.connection_lost(None)
    assert gateway.exchanges[0].status == 499
