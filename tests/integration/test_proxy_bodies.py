"""Request and response bodies through a real proxy process and backend_stub, over real sockets.

Small and 10 MB bodies both ways (Content-Length and chunked), verified by SHA-256 or byte for
byte; a slow client reading a 10 MB response while the proxy worker's RSS is sampled (flow control:
the proxy must pause the upstream instead of buffering the body); a dripping upstream streamed
through as it arrives. Large responses are read with a streaming decoder below, so the test
client's own cost stays linear.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from devstack import ProxyFactory, ProxyService, RawHTTPConnection, Service
from devstack.procfs import rss_bytes
from tests.helpers import IO_TIMEOUT, pattern

BIG_TIMEOUT = 30.0
TEN_MB = 10 * 1024 * 1024

Connect = Callable[..., RawHTTPConnection]


def _config() -> dict[str, Any]:
    return {
        "server": {},
        "upstreams": {"backend": {"servers": ["127.0.0.1:9"]}},
        "routes": [{"prefix": "/", "upstream": "backend"}],
    }


def _chunked(body: bytes, size: int) -> bytes:
    parts = [b"%x\r\n%b\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


class StreamedResponse:
    """A response read incrementally from a socket: linear-time chunked decoding, arrival times recorded."""

    def __init__(self, sock: socket.socket, timeout: float, recv_size: int = 65536) -> None:
        self.sock = sock
        self.deadline = time.monotonic() + timeout
        self.recv_size = recv_size
        self.buf = bytearray()
        self.eof = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.arrivals: list[tuple[float, int]] = []  # (monotonic time, body bytes decoded so far)
        self.on_recv: Callable[[], None] | None = None

    def _fill(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"response incomplete at the deadline: {len(self.body)} body bytes")
        self.sock.settimeout(remaining)
        data = self.sock.recv(self.recv_size)
        if not data:
            self.eof = True
            raise ConnectionError(f"connection closed after {len(self.body)} body bytes")
        self.buf += data
        if self.on_recv is not None:
            self.on_recv()

    def _take(self, count: int) -> bytes:
        while len(self.buf) < count:
            self._fill()
        data = bytes(self.buf[:count])
        del self.buf[:count]
        return data

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def _body_piece(self, data: bytes) -> None:
        self.body += data
        self.arrivals.append((time.monotonic(), len(self.body)))

    def read(self) -> StreamedResponse:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[: end + 4]
        self.status = int(lines[0].split(" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while size := int(self._line().split(b";")[0], 16):
                while size:
                    if not self.buf:
                        self._fill()
                    piece = bytes(self.buf[:size])
                    del self.buf[: len(piece)]
                    size -= len(piece)
                    self._body_piece(piece)
                if self._take(2) != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
            while self._line():  # trailers
                pass
        else:
            remaining = int(self.headers["content-length"])
            while remaining:
                if not self.buf:
                    self._fill()
                piece = bytes(self.buf[:remaining])
                del self.buf[: len(piece)]
                remaining -= len(piece)
                self._body_piece(piece)
        return self


def _request_bytes(proxy: ProxyService, method: str, target: str) -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: {proxy.host}:{proxy.port}\r\n\r\n".encode("latin-1")


def _connect(proxy: ProxyService, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(IO_TIMEOUT)
    sock.connect((proxy.host, proxy.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _worker_rss(proxy: ProxyService) -> dict[int, int]:
    """RSS of every process under the proxy's supervisor (its workers)."""
    out = {}
    for pid in proxy.children():
        rss = rss_bytes(pid)
        if rss is not None:
            out[pid] = rss
    assert out, "no proxy worker process found"
    return out


# ---------------------------------------------------------------------------------------------- small bodies


def test_chunked_request_body_echoed(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    proxy = proxy_factory(_config())
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    pieces = [b"hello ", b"chunked ", b"world " * 500, b"!"]
    body = b"".join(pieces)
    framed = b"6;ext=1\r\nhello \r\n" + b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces[1:]) + b"0\r\n\r\n"
    conn.request("POST", "/echo", headers=[("Transfer-Encoding", "chunked")])
    conn.send(framed)
    echoed = conn.read_response().json()
    assert echoed["chunked"] is True
    assert echoed["body_length"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echoed["body"] == body.decode()
    # The connection is reusable after a chunked request.
    conn.request("GET", "/echo/next")
    assert conn.read_response().json()["body_length"] == 0


def test_content_length_request_body_echoed(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    proxy = proxy_factory(_config())
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    body = os.urandom(5000)
    conn.request("PUT", "/echo", body=body)
    echoed = conn.read_response().json()
    assert echoed["method"] == "PUT"
    assert echoed["chunked"] is False
    assert echoed["headers"]["content-length"] == "5000"
    assert echoed["body_length"] == 5000
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    # Body split across several sends.
    text = b"0123456789" * 300
    conn.request("POST", "/echo", headers=[("Content-Length", str(len(text)))])
    for i in range(0, len(text), 1000):
        conn.send(text[i : i + 1000])
    echoed = conn.read_response().json()
    assert echoed["body"] == text.decode()


# ---------------------------------------------------------------------------------------------- 10 MB


def test_10mb_upload_content_length_and_chunked(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    proxy = proxy_factory(_config())
    body = os.urandom(TEN_MB)
    digest = hashlib.sha256(body).hexdigest()
    conn = raw_connection(proxy.host, proxy.port, timeout=BIG_TIMEOUT)

    conn.request("POST", "/echo/upload-length", body=body)
    echoed = conn.read_response()
    assert echoed.status == 200, echoed.raw[:500]
    payload = echoed.json()
    assert (payload["chunked"], payload["body_length"], payload["body_sha256"]) == (False, TEN_MB, digest)

    conn.request("POST", "/echo/upload-chunked", headers=[("Transfer-Encoding", "chunked")])
    conn.send(_chunked(body, 256 * 1024 + 7))
    echoed = conn.read_response()
    assert echoed.status == 200, echoed.raw[:500]
    payload = echoed.json()
    assert (payload["chunked"], payload["body_length"], payload["body_sha256"]) == (True, TEN_MB, digest)


def test_10mb_download_content_length_and_chunked(backend_stub: Service, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(_config())
    expected = pattern(TEN_MB)
    with _connect(proxy) as sock:
        sock.sendall(_request_bytes(proxy, "GET", f"/sized?bytes={TEN_MB}"))
        response = StreamedResponse(sock, BIG_TIMEOUT).read()
        assert response.status == 200
        assert response.headers["content-length"] == str(TEN_MB)
        assert bytes(response.body) == expected

        sock.sendall(_request_bytes(proxy, "GET", f"/sized?bytes={TEN_MB}&chunked=1"))
        response = StreamedResponse(sock, BIG_TIMEOUT).read()
        assert response.status == 200
        assert response.headers.get("transfer-encoding") == "chunked"
        assert bytes(response.body) == expected


def test_slow_reader_is_backpressured_not_buffered(backend_stub: Service, proxy_factory: ProxyFactory) -> None:
    """A client reading 10 MB slowly: the proxy worker's RSS stays far below the body size."""
    proxy = proxy_factory(_config())
    # Warm up code paths and allocator pools with a full-speed transfer first.
    with _connect(proxy) as sock:
        sock.sendall(_request_bytes(proxy, "GET", "/sized?bytes=1048576"))
        assert len(StreamedResponse(sock, BIG_TIMEOUT).read().body) == 1048576
    baseline = _worker_rss(proxy)
    peak = dict(baseline)

    def sample() -> None:
        for pid, rss in _worker_rss(proxy).items():
            peak[pid] = max(peak.get(pid, 0), rss)

    started = time.monotonic()
    with _connect(proxy, rcvbuf=32 * 1024) as sock:
        sock.sendall(_request_bytes(proxy, "GET", f"/sized?bytes={TEN_MB}"))
        # Not reading at all for a second: an unbuffered proxy holds no more than its write buffer.
        stall_end = time.monotonic() + 1.0
        while time.monotonic() < stall_end:
            sample()
            time.sleep(0.05)
        # Then read slowly: small reads with pauses, sampling as we go.
        reads = 0

        def slow_down() -> None:
            nonlocal reads
            reads += 1
            if reads % 16 == 0:
                sample()
            time.sleep(0.002)

        response = StreamedResponse(sock, BIG_TIMEOUT, recv_size=16384)
        response.on_recv = slow_down
        response.read()
        sample()
    elapsed = time.monotonic() - started

    assert response.status == 200
    assert bytes(response.body) == pattern(TEN_MB)
    assert reads >= 200  # the response really was read slowly, in small pieces
    growth = {pid: peak[pid] - baseline.get(pid, peak[pid]) for pid in peak}
    # Measured: ~0.5 MB with flow control; ~6.7 MB when the upstream is not paused (the rest sits in kernel buffers).
    assert max(growth.values()) < 3 * 1024 * 1024, f"proxy worker RSS grew by {growth} bytes in {elapsed:.1f}s"


def test_dripping_upstream_streams_through(backend_stub: Service, proxy_factory: ProxyFactory) -> None:
    """Bytes of a slow upstream response reach the client before the upstream has finished."""
    proxy = proxy_factory(_config())
    with _connect(proxy) as sock:
        sock.sendall(_request_bytes(proxy, "GET", "/drip?bytes=4000&chunks=4&interval_ms=400"))
        response = StreamedResponse(sock, BIG_TIMEOUT).read()
    assert response.status == 200
    assert bytes(response.body) == pattern(4000)
    first_time = response.arrivals[0][0]
    last_time = response.arrivals[-1][0]
    # The upstream spends 1.2 s between its first and last piece; a buffering proxy delivers all at once.
    assert last_time - first_time >= 0.6, response.arrivals
    partial = [count for at, count in response.arrivals if at < last_time - 0.3]
    assert partial and max(partial) < 4000, response.arrivals
