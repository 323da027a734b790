"""What the proxy adds to and strips from requests: pure functions, and the same result whatever the protocol."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import BadRequest
from proxy.exchange import BODY_LENGTH, Downstream, Exchange
from proxy.forwarding import (
    ASCII_LOWER,
    FRAMING,
    HOP_BY_HOP,
    KIND_AUTHORIZATION,
    KIND_CONNECTION,
    KIND_EXPECT,
    KIND_FORWARD,
    KIND_HOST,
    KIND_LENGTH,
    KIND_REQUEST_ID,
    KIND_TE,
    KIND_UPGRADE,
    KIND_XFF,
    ForwardPolicy,
    HeadScan,
    RequestIds,
    nominated,
    scan_headers,
    upstream_headers,
    valid_host,
)
from proxy.http1.framing import ResponseHeadRewriter, head_pairs
from proxy.http1.protocol import Http1Settings, HttpProtocol
from proxy.upstream.client import request_head
from tests.fakes import MockTransport, RecordingGateway, make_exchange, worker_state

PROXY = Path(__file__).resolve().parents[2] / "proxy"


class TlsTransport(MockTransport):
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return object() if name == "sslcontext" else super().get_extra_info(name, default)


def http1_exchange(raw: bytes, transport: MockTransport | None = None) -> Exchange:
    """The exchange the HTTP/1.1 shell makes of `raw` (one request)."""
    state = worker_state()
    gateway = RecordingGateway()
    state.gateway = gateway
    protocol = HttpProtocol(state, Http1Settings(state))
    protocol.connection_made(transport or MockTransport())  # type: ignore[arg-type]
    protocol.data_received(raw)
    (exchange,) = gateway.exchanges
    return exchange


def stream_exchange(
    method: bytes, target: bytes, authority: bytes, pairs: list[tuple[bytes, bytes]], scheme: bytes
) -> Exchange:
    """What an HTTP/2 stream does with the same request: its header list (pseudo-headers already taken
    apart) through the protocol-neutral functions."""
    policy = ForwardPolicy("x-request-id", "")
    scan = HeadScan(policy.table)
    scan_headers(pairs, scan)
    client = b"10.1.2.3"
    headers, request_id, lines = upstream_headers(
        policy,
        scan,
        origin=policy.origin(client, scheme),
        host=authority,
        client=client,
        scheme=scheme,
        ids=RequestIds(b"fresh-"),
    )
    exchange = make_exchange(Downstream())
    exchange.method, exchange.target, exchange.host = method, target, authority
    exchange.headers, exchange.request_id, exchange.forward_lines = headers, request_id, lines
    return exchange


PAIRS = [
    (b"Accept", b"application/json"),
    (b"X-Request-Id", b"req-7"),
    (b"Connection", b"keep-alive, X-Hop"),
    (b"X-Hop", b"dropped"),
    (b"TE", b"trailers"),
    (b"X-Forwarded-For", b"203.0.113.9"),
    (b"X-Forwarded-Proto", b"gopher"),
    (b"X-Forwarded-Host", b"evil"),
    (b"Via", b"1.0 upstream-cache"),
    (b"Authorization", b"Bearer abc"),
]


@pytest.mark.parametrize("tls", [False, True])
def test_http1_and_a_stream_yield_the_same_upstream_request(tls: bool) -> None:
    raw = b"GET /api/x?q=1 HTTP/1.1\r\nHost: api.example\r\n" + b"".join(b"%s: %s\r\n" % p for p in PAIRS) + b"\r\n"
    h1 = http1_exchange(raw, TlsTransport() if tls else None)
    scheme = b"https" if tls else b"http"
    h2 = stream_exchange(b"GET", b"/api/x?q=1", b"api.example", PAIRS, scheme)
    head = request_head(h1)
    assert head == request_head(h2)
    lines = head.split(b"\r\n")
    assert b"x-forwarded-proto: " + scheme in lines
    assert b"x-forwarded-for: 203.0.113.9, 10.1.2.3" in lines and b"x-forwarded-host: api.example" in lines
    assert b"Via: 1.0 upstream-cache" in lines and b"x-request-id: req-7" in lines
    names = [line.split(b":")[0].lower() for line in lines[1:] if line]
    for gone in (b"connection", b"x-hop", b"te"):
        assert gone not in names
    assert names.count(b"x-forwarded-proto") == names.count(b"x-forwarded-host") == 1


def test_forward_lines_with_and_without_a_client_x_forwarded_for() -> None:
    policy = ForwardPolicy("x-request-id", "1.1 uvgate")
    scan = HeadScan(policy.table)
    ids = RequestIds(b"w1-")
    for pairs, xff in (([], b"10.1.2.3"), ([(b"X-Forwarded-For", b"198.51.100.1")], b"198.51.100.1, 10.1.2.3")):
        scan_headers(pairs, scan)
        _, rid, lines = upstream_headers(
            policy,
            scan,
            origin=policy.origin(b"10.1.2.3", b"http"),
            host=b"h",
            client=b"10.1.2.3",
            scheme=b"http",
            ids=ids,
        )
        assert rid == b"w1-%d" % ids.count  # (none sent: a new one each time)
        assert lines == (
            b"x-forwarded-for: %s\r\nx-forwarded-proto: http\r\nx-forwarded-host: h\r\n"
            b"via: 1.1 uvgate\r\nx-request-id: %s\r\n" % (xff, rid)
        )
    assert ids.count == 2


def test_scan_sorts_and_trims_what_the_proxy_interprets() -> None:
    policy = ForwardPolicy("x-trace", "1.1 uvgate")
    scan = HeadScan(policy.table)
    pairs = [(b"Host", b"h  "), (b"transfer-encoding", b"chunked\t"), (b"X-Trace", b"t1"), (b"x-trace", b"t2")]
    scan_headers([*pairs, (b"Upgrade", b"h2c"), (b"Expect", b"100-continue")], scan)
    assert (scan.host, scan.te, scan.request_id, scan.upgrade, scan.expect) == (
        b"h",
        b"chunked",
        b"t1",
        True,
        b"100-continue",
    )
    assert scan.forward == []
    with pytest.raises(BadRequest, match="duplicate_host"):
        scan_headers([(b"Host", b"a"), (b"host", b"a")], scan)
    lines = policy.forward_lines(client=b"::1", scheme=b"https", host=b"h", xff=None, request_id=b"r")
    assert lines == (
        b"x-forwarded-for: ::1\r\nx-forwarded-proto: https\r\nx-forwarded-host: h\r\nvia: 1.1 uvgate\r\nx-trace: r\r\n"
    )


def test_connection_never_nominates_framing_headers() -> None:
    assert nominated(b"close, Content-Length, X-A, transfer-encoding, keep-alive") == frozenset({b"x-a"})
    assert nominated(None) == frozenset()


def test_a_nominated_content_length_keeps_the_response_framed() -> None:
    """Issue 7 #1: `Connection: content-length` from an upstream stripped Content-Length while the client
    connection stayed open, so the client could not tell where the body ended."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: content-length, x-a\r\nX-A: 1"
    kind, cleaned = ResponseHeadRewriter().inspect(head, 200, False)
    assert kind == BODY_LENGTH
    assert cleaned == b"HTTP/1.1 200 OK\r\nContent-Length: 5"
    assert head_pairs(cleaned) == [(b"content-length", b"5")]


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        (b"example.com", True),
        (b"example.com:8080", True),
        (b"127.0.0.1:80", True),
        (b"[::1]:8080", True),
        (b"", True),
        (b"a b", False),
        (b"a/b", False),
        (b"user@host", False),
        (b"h\x00", False),
        (b"[::1", False),
        (b"h:80x", False),
    ],
)
def test_host_syntax(host: bytes, ok: bool) -> None:
    assert valid_host(host) is ok


def test_the_hop_by_hop_list_exists_once() -> None:
    """Written in three places once; now the shell, the rewriter and the config check derive theirs."""
    assert {b"transfer-encoding"} == FRAMING & HOP_BY_HOP
    holders = [
        path.relative_to(PROXY).as_posix()
        for path in PROXY.rglob("*.py")
        if re.search(r"proxy-connection", path.read_text())
    ]
    assert holders == ["forwarding.py"], holders


def test_ascii_lower_lowers_as_bytes_lower_does() -> None:
    """The translation table the hot path lower-cases names and heads with is `bytes.lower`, byte for byte."""
    every = bytes(range(256))
    assert every.translate(ASCII_LOWER) == every.lower()


def test_the_scan_classifies_every_spelling_as_its_lower_case_name() -> None:
    # HeadScan.add takes shortcuts (the (length, first byte) table, Host, the usual spellings): whatever
    # the spelling, a header must land where its lower-cased name's kind puts it.
    policy = ForwardPolicy("x-request-id", "", frozenset({b"x-auth-subject"}))
    kinds = policy.table.kinds
    scan = HeadScan(policy.table)
    rng = random.Random(20261202)
    specials = sorted(kinds)
    # Names that share a length and first letter with special ones, and ordinary ones.
    others = [b"hosx", b"connectiom", b"Content-Type", b"Accept", b"te-x", b"Trailers", b"x-request-ix", b"User-Agent"]
    fields = {
        KIND_HOST: "host",
        KIND_LENGTH: "length",
        KIND_TE: "te",
        KIND_CONNECTION: "connection",
        KIND_EXPECT: "expect",
        KIND_XFF: "xff",
        KIND_REQUEST_ID: "request_id",
        KIND_AUTHORIZATION: "authorization",
    }
    for _ in range(3000):
        chosen = rng.sample(specials, 3) + rng.sample(others, 2)
        pairs = []
        for name in chosen:
            style = rng.randrange(4)
            if style == 1:
                name = b"-".join(part.capitalize() for part in name.split(b"-"))
            elif style == 2:
                name = name.upper()
            elif style == 3:
                name = bytes(c ^ 0x20 if 0x61 <= (c | 0x20) <= 0x7A and rng.random() < 0.5 else c for c in name)
            pairs.append((name, b"v%d%s" % (rng.randrange(100), b" " * rng.randrange(2))))
        rng.shuffle(pairs)
        scan_headers(pairs, scan)
        expected_forward = []
        for name, value in pairs:
            kind = kinds.get(name.lower(), KIND_FORWARD)
            if kind in (KIND_FORWARD, KIND_AUTHORIZATION):
                expected_forward.append((name, value))
            if kind in fields:
                assert getattr(scan, fields[kind]) == value.strip(b" \t"), (name, pairs)
            if kind == KIND_UPGRADE:
                assert scan.upgrade, pairs
        assert scan.forward == expected_forward, pairs
        present = {kinds.get(name.lower(), KIND_FORWARD) for name, _ in pairs}
        for kind, field in fields.items():
            if kind not in present:
                assert getattr(scan, field) is None, (field, pairs)


def test_connections_share_the_workers_classification_tables() -> None:
    # Per-connection copies would cost kilobytes for each of thousands of idle keep-alive connections.
    state = worker_state()
    settings = Http1Settings(state)
    one, two = HttpProtocol(state, settings), HttpProtocol(state, settings)
    assert one.scan is not two.scan
    assert one.scan.maybe is two.scan.maybe is settings.policy.table.maybe
    assert one.scan.spelled is two.scan.spelled is settings.policy.table.spelled
