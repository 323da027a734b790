"""The regression corpus (tests/corpus/*.json) against a live proxy: real sockets, backend_stub as the
upstream for request cases, a scripted loopback upstream for response cases.

Every request case targets /echo (backend_stub answers 200); `forwarded` is read from backend_stub's
request counter (its /stats request counts once). Every wait has a deadline (tests/helpers.py).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from devstack import ProxyFactory, RawHTTPConnection, Service
from tests.corpus.corpus import RequestCase, ResponseCase, params, request_cases, response_cases
from tests.framing.harness import parse_client_response
from tests.helpers import CLOSE_TIMEOUT, IO_TIMEOUT, LoopbackServer, backend_requests


@pytest.mark.parametrize("case", params(request_cases()))
def test_request_case_live(
    case: RequestCase,
    backend_stub: Service,
    proxy_factory: ProxyFactory,
    raw_connection: Callable[..., RawHTTPConnection],
) -> None:
    proxy = proxy_factory(case.config())
    before = backend_requests(backend_stub)
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    statuses: list[int] = []
    bodies: list[bytes] = []
    keep_alive: list[bool] = []

    def read(count: int) -> None:
        while len(statuses) < count:
            head_request = len(statuses) < len(case.head) and case.head[len(statuses)]
            response = conn.read_response(head_request=head_request)
            if response.status >= 200:
                statuses.append(response.status)
                bodies.append(response.body)
                keep_alive.append(response.header("connection") == "keep-alive")

    for index, write in enumerate(case.writes):
        conn.send(write)
        if index < len(case.wait):
            read(case.wait[index])
    read(len(case.answers))
    assert statuses == case.answers
    for body, head in zip(bodies, case.head, strict=False):
        assert (body == b"") == head, body
    for said, keep in zip(keep_alive, case.keep_alive, strict=False):
        assert said == keep
    if case.closed:
        assert conn.closed_by_peer(CLOSE_TIMEOUT), "the proxy kept the connection open"
        assert conn.buffer == b"", conn.buffer[:300]
    else:
        assert not conn.eof and conn.buffer == b"", conn.buffer[:300]
    assert backend_requests(backend_stub) - before - 1 == case.forwarded


class RawUpstream(LoopbackServer):
    """Answers each connection's first request with fixed bytes, then closes (`eof`) or holds the
    connection until `close()`."""

    def __init__(self, answer: bytes, eof: bool) -> None:
        self.answer, self.eof = answer, eof
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(IO_TIMEOUT)
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                piece = conn.recv(65536)
                if not piece:
                    break
                data += piece
            conn.sendall(self.answer)
            if self.eof:
                conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture
def raw_upstream() -> Iterator[Callable[[bytes, bool], RawUpstream]]:
    made: list[RawUpstream] = []

    def make(answer: bytes, eof: bool) -> RawUpstream:
        made.append(RawUpstream(answer, eof))
        return made[-1]

    yield make
    for upstream in made:
        upstream.close()


@pytest.mark.parametrize("case", params(response_cases()))
def test_response_case_live(
    case: ResponseCase,
    proxy_factory: ProxyFactory,
    raw_connection: Callable[..., RawHTTPConnection],
    raw_upstream: Callable[[bytes, bool], RawUpstream],
) -> None:
    upstream = raw_upstream(case.upstream, case.eof)
    config = {
        "server": {"access_log": False},
        "upstreams": {"b": {"servers": ["127.0.0.1:9"]}},
        "routes": [{"prefix": "/", "upstream": "b"}],
    }
    proxy = proxy_factory(config, upstream_servers=[upstream.address])
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.send(b"%s /r HTTP/1.1\r\nHost: x\r\n\r\n" % case.method.encode())
    response = conn.read_response(head_request=case.method == "HEAD")
    parsed = parse_client_response(response.raw + conn.buffer, case.method == "HEAD", conn.eof)
    assert parsed is not None
    assert response.status == case.status, response.raw[:500]
    if case.body is not None:
        assert response.body == case.body.encode("latin-1")
    assert conn.buffer == b"", conn.buffer[:300]
