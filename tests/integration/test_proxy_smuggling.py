"""Request smuggling through the HTTP/1.1 data plane, over real sockets against a real proxy and backend_stub.

Every ambiguous or malformed framing must be answered 400 by the proxy, which then closes the
connection (the client reads the answer, then EOF), and the backend must never see the request
hidden behind it. The backend's `/stats` request counter is read directly before and after each
attempt; the backend counts a request when it is complete, and the `/stats` request itself counts
once, so a delta of exactly 1 means nothing reached the backend through the proxy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from devstack import ProxyFactory, ProxyService, RawHTTPConnection, Service
from tests.helpers import IO_TIMEOUT, assert_closed_after_response, assert_json_error, backend_requests

SMUGGLED = b"GET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


def _config() -> dict[str, Any]:
    return {
        "server": {},
        "upstreams": {"backend": {"servers": ["127.0.0.1:9"]}},
        "routes": [{"prefix": "/", "upstream": "backend"}],
    }


SMUGGLING_CASES: dict[str, bytes] = {
    # CL.TE: a front end honouring Content-Length forwards everything, a back end honouring chunked
    # ends the body at 0\r\n\r\n and runs the smuggled request.
    "cl_then_te": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n%s"
        % (5 + len(SMUGGLED), SMUGGLED)
    ),
    # TE.CL: the reverse.
    "te_then_cl": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    ),
    "two_different_content_lengths": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: %d\r\n\r\nabcd%s"
        % (4 + len(SMUGGLED), SMUGGLED)
    ),
    "non_numeric_content_length": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4x\r\n\r\nabcd" + SMUGGLED,
    "signed_content_length": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\nabcd" + SMUGGLED,
    "te_gzip_not_chunked": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabcd" + SMUGGLED,
    "te_chunked_then_gzip": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n" + SMUGGLED
    ),
    "invalid_chunk_size": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n" + SMUGGLED
    ),
    "bare_lf_in_header": b"GET /echo HTTP/1.1\r\nHost: x\nX-Foo: bar\r\n\r\n" + SMUGGLED,
    "bare_cr_in_header": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Foo: a\rb\r\n\r\n" + SMUGGLED,
    "nul_in_header_value": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Foo: a\x00b\r\n\r\n" + SMUGGLED,
    "obs_fold": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Foo: a\r\n b\r\n\r\n" + SMUGGLED,
    "space_before_colon": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
}


@pytest.mark.parametrize("payload", list(SMUGGLING_CASES.values()), ids=list(SMUGGLING_CASES))
def test_smuggling_attempt_answered_400_and_closed(
    backend_stub: Service,
    proxy_factory: ProxyFactory,
    raw_connection: Callable[..., RawHTTPConnection],
    payload: bytes,
) -> None:
    proxy: ProxyService = proxy_factory(_config())
    before = backend_requests(backend_stub)
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.send(payload)
    response = conn.read_response()
    assert_json_error(response, 400)
    assert response.header("connection") == "close"
    assert_closed_after_response(conn)
    # Only the second /stats request itself: neither the request nor the smuggled one reached the backend.
    assert backend_requests(backend_stub) - before == 1


def test_valid_requests_then_smuggling_attempt_on_same_connection(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Callable[..., RawHTTPConnection]
) -> None:
    """Complete requests pipelined in front of a broken one get their real answers, in order; then the 400.

    proxy/http1/protocol.py `_protocol_error`: "answer what came before it, then the error; close".
    """
    proxy = proxy_factory(_config())
    before = backend_requests(backend_stub)
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    valid = b"".join(b"GET /echo/valid-%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(3))
    conn.send(valid + SMUGGLING_CASES["cl_then_te"])
    for i in range(3):
        response = conn.read_response()
        assert response.status == 200, f"valid request {i} was not answered normally: {response.raw[:300]!r}"
        assert response.json()["path"] == f"/echo/valid-{i}"
    assert_json_error(conn.read_response(), 400)
    assert_closed_after_response(conn)
    # The three valid requests and the second /stats; nothing else.
    assert backend_requests(backend_stub) - before == 4


def test_smuggling_attempt_behind_a_streaming_response(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Callable[..., RawHTTPConnection]
) -> None:
    """A broken request arriving while the response in front is streaming: that response completes, then 400."""
    proxy = proxy_factory(_config())
    before = backend_requests(backend_stub)
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.send(b"GET /drip?bytes=3000&chunks=3&interval_ms=200 HTTP/1.1\r\nHost: x\r\n\r\n")
    deadline = time.monotonic() + IO_TIMEOUT
    while b"\r\n\r\n" not in conn.buffer:  # wait for the response head: the response is streaming
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no response head in time"
        conn.sock.settimeout(remaining)
        data = conn.sock.recv(65536)
        assert data, "connection closed before the response head"
        conn.buffer += data
    conn.send(SMUGGLING_CASES["te_then_cl"])
    streamed = conn.read_response()
    assert streamed.status == 200
    assert streamed.body == (b"0123456789abcdef" * 188)[:3000]
    assert_json_error(conn.read_response(), 400)
    assert_closed_after_response(conn)
    assert backend_requests(backend_stub) - before == 2  # /drip and the second /stats


def test_gzip_then_chunked_is_not_forwarded(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Callable[..., RawHTTPConnection]
) -> None:
    """`Transfer-Encoding: gzip, chunked` is well framed but not supported: an error status, the close, no forward."""
    proxy = proxy_factory(_config())
    before = backend_requests(backend_stub)
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" + SMUGGLED)
    response = conn.read_response()
    assert response.status in (400, 501), response.raw[:500]
    assert_json_error(response, response.status)
    assert_closed_after_response(conn)
    assert backend_requests(backend_stub) - before == 1
