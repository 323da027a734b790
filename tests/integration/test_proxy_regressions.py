"""Regression tests for data-plane bugs found in review, against a real proxy process over loopback sockets.

Each test names the bug it guards (numbering of the review) and fails on the code before the fix.
Upstreams are backend_stub or a `ScriptedUpstream`: a loopback listener whose connections are served
by a test-written script, one thread per connection, on blocking sockets with timeouts. Where a test
must know what the proxy has consumed it reads the kernel's socket queues from /proc/net/tcp instead
of sleeping. Every wait has a deadline; every socket, thread and process is closed by a fixture or a
`finally`. Bugs 6 and 16 (and more cases of the others) are in tests/protocol/test_http1_regressions.py.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from devstack import ProxyFactory, ProxyService, RawHTTPConnection, RawResponse, Service, free_port
from devstack.rawhttp import parse_response
from tests.helpers import CLOSE_TIMEOUT, IO_TIMEOUT, backend_requests, wait_backend_requests

Connect = Callable[..., RawHTTPConnection]
Handler = Callable[[socket.socket, int], None]


# ---------------------------------------------------------------------------------------------- helpers


def _config(
    server: dict[str, Any] | None = None,
    upstream: dict[str, Any] | None = None,
    routes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "server": {"access_log": False, **(server or {})},
        "upstreams": {"backend": {"servers": ["127.0.0.1:9"], **(upstream or {})}},
        "routes": routes or [{"prefix": "/", "upstream": "backend"}],
    }


def _read_head(conn: socket.socket, buf: bytes = b"") -> tuple[bytes | None, bytes]:
    """(request head without the final CRLF CRLF, bytes after it); (None, buf) when the peer closed."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None, buf
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _client(proxy: ProxyService, *, slow: bool = False) -> socket.socket:
    """A blocking client socket with a timeout. `slow`: a small receive window and small segments, so
    that the proxy's kernel buffer toward it stays small (tens of KiB instead of megabytes)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if slow:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1024)
        sock.settimeout(IO_TIMEOUT)
        sock.connect((proxy.host, proxy.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _recv(sock: socket.socket, size: int, deadline: float) -> bytes:
    """One recv before `deadline` (TimeoutError after it); b"" on EOF or reset."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("deadline passed")
    sock.settimeout(remaining)
    try:
        return sock.recv(size)
    except ConnectionResetError:
        return b""


def _abort(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0): the peer sees connection_lost, not a half-close."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@dataclass(frozen=True)
class _TcpSocket:
    local_port: int
    remote_port: int
    state: int  # 1 ESTABLISHED, 2 SYN_SENT, ...
    tx_queue: int  # sent but not yet acknowledged (on loopback: not yet in the peer's receive queue)
    rx_queue: int  # received but not yet read by the application


ESTABLISHED, SYN_SENT = 1, 2


def _tcp_sockets() -> list[_TcpSocket]:
    """IPv4 TCP sockets of this network namespace (every address here is 127.0.0.1)."""
    out = []
    with open("/proc/net/tcp") as fh:
        next(fh)
        for line in fh:
            fields = line.split()
            tx, rx = fields[4].split(":")
            out.append(
                _TcpSocket(
                    int(fields[1].rsplit(":", 1)[1], 16),
                    int(fields[2].rsplit(":", 1)[1], 16),
                    int(fields[3], 16),
                    int(tx, 16),
                    int(rx, 16),
                )
            )
    return out


def _find(local_port: int, remote_port: int) -> _TcpSocket | None:
    return next((s for s in _tcp_sockets() if s.local_port == local_port and s.remote_port == remote_port), None)


def _all_read_by_proxy(upstream_port: int, proxy_port: int) -> bool:
    """Every byte the upstream wrote on this connection has been read by the proxy process."""
    sockets = _tcp_sockets()
    up = next(s for s in sockets if s.local_port == upstream_port and s.remote_port == proxy_port)
    proxy_side = next(s for s in sockets if s.local_port == proxy_port and s.remote_port == upstream_port)
    return up.tx_queue == 0 and proxy_side.rx_queue == 0


def _worker_pid(proxy: ProxyService) -> int:
    (pid,) = proxy.children()
    return pid


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _read_responses(sock: socket.socket, count: int, deadline: float) -> tuple[list[RawResponse], bytes]:
    """Read until `count` complete responses arrived (AssertionError on EOF first); also the bytes read."""
    data = b""
    while len(responses := _parse_all(data)) < count:
        piece = _recv(sock, 65536, deadline)
        assert piece, f"closed after {data[:600]!r}"
        data += piece
    return responses, data


def _parse_all(data: bytes) -> list[RawResponse]:
    out = []
    while data:
        parsed = parse_response(data)
        if parsed is None:
            break
        response, consumed = parsed
        out.append(response)
        data = data[consumed:]
    return out


class ScriptedUpstream:
    """A loopback upstream served by a script: `handler(conn, n)` runs in its own thread for the n-th
    accepted connection (blocking socket, IO timeout). `close()` shuts every socket down and joins
    every thread; exceptions other than OSError raised by a handler are kept in `errors`.
    """

    def __init__(self, handler: Handler, *, backlog: int = 64) -> None:
        self.handler = handler
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.accepted = 0
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor: threading.Thread | None = None

    def start(self) -> ScriptedUpstream:
        self._acceptor = threading.Thread(target=self._accept_loop, name="scripted-upstream", daemon=True)
        self._acceptor.start()
        return self

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(2 * IO_TIMEOUT)
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
                thread = threading.Thread(target=self._serve, args=(conn, self.accepted), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, n: int) -> None:
        try:
            self.handler(conn, n)
        except OSError:
            pass  # the proxy closed the connection, a timeout, or close()
        except BaseException as exc:
            self.errors.append(exc)

    def close(self) -> None:
        self.stopping.set()
        if self._acceptor is not None:
            self._acceptor.join(IO_TIMEOUT)
        self.sock.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        deadline = time.monotonic() + IO_TIMEOUT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in threads), "a scripted upstream thread did not stop"


@pytest.fixture
def scripted_upstream() -> Iterator[Callable[..., ScriptedUpstream]]:
    """`scripted_upstream(handler, backlog=64, start=True) -> ScriptedUpstream`, closed after the test."""
    made: list[ScriptedUpstream] = []

    def make(handler: Handler, *, backlog: int = 64, start: bool = True) -> ScriptedUpstream:
        upstream = ScriptedUpstream(handler, backlog=backlog)
        made.append(upstream)
        return upstream.start() if start else upstream

    yield make
    for upstream in made:
        upstream.close()
    for upstream in made:
        assert not upstream.errors, upstream.errors


class _Sender:
    """Sends `head`, `body_size` bytes of body and `tail` on a dup of `sock` from a thread, recording progress."""

    def __init__(self, sock: socket.socket, head: bytes, body_size: int, tail: bytes = b"") -> None:
        self.sock = sock.dup()
        self.sock.settimeout(0.1)  # both objects share the file description: both use timeouts
        self.head, self.body_size, self.tail = head, body_size, tail
        self.total = len(head) + body_size + len(tail)
        self.sent = 0
        self.last_progress = time.monotonic()
        self.error: OSError | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sender", daemon=True)
        self.thread.start()

    def _send(self, data: bytes | memoryview) -> bool:
        view = memoryview(data)
        while view:
            if self.stopping.is_set():
                return False
            try:
                n = self.sock.send(view)
            except TimeoutError:
                continue
            except OSError as exc:
                self.error = exc
                return False
            view = view[n:]
            self.sent += n
            self.last_progress = time.monotonic()
        return True

    def _run(self) -> None:
        if not self._send(self.head):
            return
        block = bytes(65536)
        left = self.body_size
        while left:
            piece = block[: min(left, len(block))]
            if not self._send(piece):
                return
            left -= len(piece)
        self._send(self.tail)

    def stalled_for(self) -> float:
        return time.monotonic() - self.last_progress

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(IO_TIMEOUT)
        self.sock.close()
        assert not self.thread.is_alive(), "the sender thread did not stop"


# ---------------------------------------------------------------------------------------------- bug 1


def test_upgrade_request_with_body_is_400_and_its_body_never_a_request(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    """Bug 1: an Upgrade request with a body: llhttp skipped the body and the proxy parsed it as the next request."""
    proxy = proxy_factory(_config(upstream={"response_timeout": "1s"}))
    before = backend_requests(backend_stub)
    smuggled = b"GET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.send(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled)
    )
    response = conn.read_response()
    assert response.status == 400, response.raw[:300]
    assert response.header("connection") == "close"
    assert conn.closed_by_peer(CLOSE_TIMEOUT) and conn.buffer == b"", conn.buffer[:300]
    assert backend_requests(backend_stub) - before == 1, "something reached the backend"


# ---------------------------------------------------------------------------------------------- bugs 2, 3


INJECTED = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nX-Injected: 1\r\n\r\nspoofed"


def test_body_sent_on_a_head_response_is_not_forwarded(
    proxy_factory: ProxyFactory, scripted_upstream: Callable[..., ScriptedUpstream], raw_connection: Connect
) -> None:
    """Bug 2: an upstream sending a body on a HEAD response: the proxy forwarded it as the next response."""

    def handler(conn: socket.socket, n: int) -> None:
        buf = b""
        while True:
            head, buf = _read_head(conn, buf)
            if head is None:
                return
            if head.startswith(b"HEAD "):  # a body on HEAD (one segment): a response to the next request
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(INJECTED), INJECTED))
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ngenuine")

    upstream = scripted_upstream(handler)
    proxy = proxy_factory(_config(), upstream_servers=[upstream.address])
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.send(b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\nGET /y HTTP/1.1\r\nHost: x\r\n\r\n")
    head_response = conn.read_response(head_request=True)
    assert head_response.status == 200
    assert head_response.header("content-length") == str(len(INJECTED))
    response = conn.read_response()
    assert response.header("x-injected") is None, response.raw
    assert (response.status, response.body) == (200, b"genuine")
    conn.request("GET", "/z")
    assert conn.read_response().body == b"genuine"
    assert conn.buffer == b""


def test_bytes_after_a_complete_upstream_response_are_dropped_with_the_connection(
    proxy_factory: ProxyFactory, scripted_upstream: Callable[..., ScriptedUpstream], raw_connection: Connect
) -> None:
    """Bug 3: a second response after a complete one in the same read was parsed into the same exchange."""

    def handler(conn: socket.socket, n: int) -> None:
        head, rest = _read_head(conn)
        if head is None:
            return
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            b"HTTP/1.1 302 Found\r\nLocation: http://evil/\r\nContent-Length: 5\r\n\r\nevil!"
        )
        head, rest = _read_head(conn, rest)
        if head is not None:  # the proxy reused the connection: the next bytes it reads are the garbage's
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nreused")

    upstream = scripted_upstream(handler)
    proxy = proxy_factory(_config(), upstream_servers=[upstream.address])
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.request("GET", "/a")
    first = conn.read_response()
    assert (first.status, first.body) == (200, b"ok"), first.raw
    assert first.header("location") is None
    conn.request("GET", "/b")
    second = conn.read_response()
    assert (second.status, second.body) == (200, b"ok"), second.raw
    assert conn.buffer == b""
    assert upstream.accepted == 2, "the connection that sent garbage must not be reused"


# ---------------------------------------------------------------------------------------------- bug 4


def test_connection_paused_for_a_slow_client_is_resumed_before_it_is_pooled(
    proxy_factory: ProxyFactory, scripted_upstream: Callable[..., ScriptedUpstream]
) -> None:
    """Bug 4: an upstream connection paused for a slow client on the response's last read was pooled paused."""
    piece, last = 8192, 60_000
    client_port: list[int] = []
    body_sent = [0]
    filled = threading.Event()

    def handler(conn: socket.socket, n: int) -> None:
        head, rest = _read_head(conn)
        if head is None:
            return
        if n == 1:
            proxy_port = conn.getpeername()[1]

            def send_consumed(data: bytes) -> None:
                """Send one segment and wait until the proxy has read it."""
                conn.sendall(data)
                deadline = time.monotonic() + IO_TIMEOUT
                while not _all_read_by_proxy(upstream.port, proxy_port):
                    assert time.monotonic() < deadline, "the proxy stopped reading the response"
                    time.sleep(0.001)

            def to_client() -> int:
                """What the client's kernel holds for it, unread (the client reads nothing for now)."""
                entry = _find(proxy.port, client_port[0])
                assert entry is not None
                return entry.tx_queue

            # Chunks of `piece` bytes, one at a time, until the proxy's socket to the client is full: the
            # proxy then keeps (less than the write limit of) the last chunk in its transport buffer.
            send_consumed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            held = to_client()
            for _ in range((64 << 20) // piece):
                send_consumed(b"%x\r\n%s\r\n" % (piece, bytes(piece)))
                body_sent[0] += piece
                grace = time.monotonic() + 0.1
                while (now := to_client()) < held + piece and time.monotonic() < grace:
                    time.sleep(0.001)
                if now < held + piece and held >= 2 * piece:
                    break
                held = now
            else:
                raise AssertionError("the client's socket never filled up")
            # The last chunk and the end of the body in one read: the write crosses the limit (pause_writing).
            send_consumed(b"%x\r\n%s\r\n0\r\n\r\n" % (last, bytes(last)))
            body_sent[0] += last
            filled.set()
            head, rest = _read_head(conn, rest)  # the next client's request, on the pooled connection
            if head is None:
                return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")

    upstream = scripted_upstream(handler)
    proxy = proxy_factory(
        _config(server={"write_buffer_limit": "16KiB"}, upstream={"max_connections": 1, "response_timeout": "2s"}),
        upstream_servers=[upstream.address],
    )
    slow = _client(proxy, slow=True)
    try:
        client_port.append(slow.getsockname()[1])
        slow.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 6 * IO_TIMEOUT
        while not filled.wait(0.05):
            assert time.monotonic() < deadline and not upstream.errors, upstream.errors
        data = bytearray()
        deadline = time.monotonic() + IO_TIMEOUT
        while (parsed := parse_response(bytes(data))) is None:
            piece_read = _recv(slow, 1 << 20, deadline)
            assert piece_read, "the proxy closed the connection"
            data += piece_read
        response, _ = parsed
        assert response.status == 200 and len(response.body) == body_sent[0]
    finally:
        slow.close()

    # The next client gets the same upstream connection (max_connections = 1): it must be read (else 504).
    with RawHTTPConnection(proxy.host, proxy.port, timeout=IO_TIMEOUT) as conn:
        conn.request("GET", "/next")
        nxt = conn.read_response()
    assert (nxt.status, nxt.body) == (200, b"next"), nxt.raw[:300]


# ---------------------------------------------------------------------------------------------- bug 5


def test_pipelined_responses_to_a_write_paused_client_are_not_buffered_in_memory(
    proxy_factory: ProxyFactory, scripted_upstream: Callable[..., ScriptedUpstream]
) -> None:
    """Bug 5: a pipelined exchange started while the client was write-paused read its whole response into memory."""
    big, count, huge = 60_000, 20, 256 << 20  # each `big` response is one segment, read at once
    huge_sent = [0]

    def handler(conn: socket.socket, n: int) -> None:
        head, _ = _read_head(conn)
        if head is None:
            return
        if not head.startswith(b"GET /huge "):
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % big + bytes(big))
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % huge)
        block = bytes(1 << 20)
        for _ in range(huge // len(block)):
            if upstream.stopping.is_set():
                return
            conn.sendall(block)
            huge_sent[0] += len(block)

    upstream = scripted_upstream(handler)
    proxy = proxy_factory(_config(server={"write_buffer_limit": "16KiB"}), upstream_servers=[upstream.address])
    worker = _worker_pid(proxy)
    baseline = _rss_bytes(worker)
    limit = 64 << 20
    client = _client(proxy, slow=True)
    try:
        requests = b"".join(b"GET /big/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(count))
        client.sendall(requests + b"GET /huge HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
        # Nothing has to happen here; watch long enough for 256 MiB to go through loopback many times over.
        end = time.monotonic() + 1.5
        peak = baseline
        while time.monotonic() < end and peak - baseline < limit and huge_sent[0] < limit:
            peak = max(peak, _rss_bytes(worker))
            time.sleep(0.05)
    finally:
        client.close()
    assert huge_sent[0] < limit, f"the upstream could send {huge_sent[0] >> 20} MiB to a client that reads nothing"
    assert peak - baseline < limit, f"worker RSS grew by {(peak - baseline) >> 20} MiB"


# ---------------------------------------------------------------------------------------------- bug 7


def test_body_buffer_pause_is_cleared_when_the_exchange_is_answered_503(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    """Bug 7a: a body buffered while waiting for a connection, then 503 pending timeout: reading stayed paused (408)."""
    config = _config(
        server={"write_buffer_limit": "16KiB", "body_timeout": "2s"},
        upstream={"max_connections": 1, "pending_timeout": "500ms"},
        routes=[{"prefix": "/api/", "upstream": "free"}, {"prefix": "/", "upstream": "backend"}],
    )
    config["upstreams"]["free"] = {"servers": ["127.0.0.1:9"]}
    proxy = proxy_factory(config)
    before = backend_requests(backend_stub)
    holder = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    holder.request("GET", "/delay?ms=2000")  # holds the only connection of `backend`
    wait_backend_requests(backend_stub, before, 1)
    client = _client(proxy)
    sender = _Sender(
        client,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (1 << 20),
        1 << 20,
        b"GET /api/next HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    try:
        deadline = time.monotonic() + 2 * IO_TIMEOUT
        responses, data = _read_responses(client, 2, deadline)
    finally:
        sender.close()
        client.close()
    assert [r.status for r in responses] == [503, 200], data[:600]
    assert responses[0].json()["error"] == "upstream_pending_timeout"
    assert sender.sent == sender.total
    _abort(holder.sock)  # no need to wait for its response when the proxy stops


def test_upstream_pause_is_cleared_when_the_upstream_answers_early(
    proxy_factory: ProxyFactory, scripted_upstream: Callable[..., ScriptedUpstream]
) -> None:
    """Bug 7b: upstream stopped reading a body (client reading paused), then answered early: reading stayed paused."""
    answer = threading.Event()

    def handler(conn: socket.socket, n: int) -> None:
        head, _ = _read_head(conn)
        if head is None:
            return
        if n == 1:  # reads none of the body; answers when told
            if not answer.wait(4 * IO_TIMEOUT):
                return
            conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nnope")
            while conn.recv(65536):  # until the proxy drops the connection
                pass
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")

    upstream = scripted_upstream(handler)
    proxy = proxy_factory(
        _config(server={"write_buffer_limit": "16KiB", "body_timeout": "2s", "max_body_bytes": "256MiB"}),
        upstream_servers=[upstream.address],
    )
    body = 64 << 20  # more than every socket buffer on the way holds
    client = _client(proxy)
    sender = _Sender(
        client,
        b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % body,
        body,
        b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    try:
        deadline = time.monotonic() + 2 * IO_TIMEOUT
        # The upload stalls once the proxy stops reading (its upstream write buffer is full).
        while not (sender.sent > 1 << 20 and sender.stalled_for() > 0.3):
            assert time.monotonic() < deadline and sender.error is None, (sender.sent, sender.error)
            time.sleep(0.02)
        answer.set()
        responses, data = _read_responses(client, 2, deadline)
    finally:
        sender.close()
        client.close()
    assert [r.status for r in responses] == [413, 200], data[:600]
    assert responses[1].body == b"next"
    assert sender.sent == sender.total


# ---------------------------------------------------------------------------------------------- bug 8


def test_pipelined_requests_behind_a_slow_one_do_not_time_out(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    """Bug 8: a queued request's body and the next head got 408 while reading was paused behind a slow response."""
    proxy = proxy_factory(_config(server={"body_timeout": "1s", "header_timeout": "1s"}))
    slow = b"GET /delay?ms=2000 HTTP/1.1\r\nHost: x\r\n\r\n"
    body_case = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    head_case = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    body_case.send(slow + b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
    head_case.send(slow + b"GET /api/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /api/2 HTTP/1.1\r\n")
    # The rest of the body / head follows the first response (the proxy read nothing meanwhile).
    assert body_case.read_response().status == 200
    body_case.send(b"56789")
    echoed = body_case.read_response()
    assert echoed.status == 200, echoed.raw[:300]
    assert echoed.json()["body"] == "0123456789"
    assert head_case.read_response().status == 200
    head_case.send(b"Host: x\r\n\r\n")
    statuses = [head_case.read_response().status for _ in range(2)]
    assert statuses == [200, 200]


# ---------------------------------------------------------------------------------------------- bug 9


def test_chunked_trailers_never_become_upstream_headers(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    """Bug 9: trailers of a chunked body received before the request was sent upstream went out as headers."""
    proxy = proxy_factory(_config())
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.send(
        b"GET /delay?ms=200 HTTP/1.1\r\nHost: x\r\n\r\n"  # the POST waits behind it, trailers and all
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Internal: set-by-trailer\r\nAuthorization: Bearer smuggled\r\n\r\n"
    )
    assert conn.read_response().status == 200
    echoed = conn.read_response()
    assert echoed.status == 200
    seen = echoed.json()
    assert seen["body"] == "abc"
    assert "x-internal" not in seen["headers"] and "authorization" not in seen["headers"], seen["headers"]


# ---------------------------------------------------------------------------------------------- bug 10


def test_send_timeout_drops_an_idle_connection_whose_client_does_not_read(proxy_factory: ProxyFactory) -> None:
    """Bug 10: send_timeout was enforced only during an exchange: idle with unread answers, close() waited forever."""
    proxy = proxy_factory(
        _config(
            server={"send_timeout": "1s", "keepalive_timeout": "1s"},
            routes=[{"prefix": "/api/", "upstream": "backend"}],
        ),
        upstream_servers=[f"127.0.0.1:{free_port()}"],
    )
    client = _client(proxy, slow=True)
    try:
        port = client.getsockname()[1]
        # 2000 route misses, each answered 404 at once: more answers than the socket buffers hold.
        try:
            client.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
        except OSError:
            pass  # already dropped
        deadline = time.monotonic() + 1.0 + 4.0  # send_timeout + margin
        while (entry := _find(proxy.port, port)) is not None and entry.state == ESTABLISHED:
            assert time.monotonic() < deadline, f"the proxy kept the connection ({entry.tx_queue} bytes unsent)"
            time.sleep(0.05)
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------- bug 11


def test_until_close_body_cut_by_a_reset_is_not_completed_for_the_client(
    proxy_factory: ProxyFactory, scripted_upstream: Callable[..., ScriptedUpstream]
) -> None:
    """Bug 11: an until-close upstream body cut by a reset was ended with a 0-chunk, as if complete."""
    client_has_part = threading.Event()

    def handler(conn: socket.socket, n: int) -> None:
        head, _ = _read_head(conn)
        if head is None:
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\npartial-body-")
        if client_has_part.wait(2 * IO_TIMEOUT):
            _abort(conn)

    upstream = scripted_upstream(handler)
    proxy = proxy_factory(_config(), upstream_servers=[upstream.address])
    client = _client(proxy)
    try:
        client.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + IO_TIMEOUT
        data = b""
        while b"partial-body-" not in data:
            piece = _recv(client, 65536, deadline)
            assert piece, f"closed after {data!r}"
            data += piece
        client_has_part.set()
        # Until the proxy drops the connection (right), or the response looks complete (wrong).
        while (piece := _recv(client, 65536, deadline)) and parse_response(data + piece) is None:
            data += piece
        data += piece
    finally:
        client.close()
    assert b"\r\ntransfer-encoding: chunked\r\n" in data.lower()
    assert not data.endswith(b"\r\n0\r\n\r\n"), f"a truncated body looks complete: {data!r}"
    with pytest.raises(ValueError):
        parse_response(data, eof=True)


# ---------------------------------------------------------------------------------------------- bug 12


def test_many_upgrade_requests_in_one_write_are_all_answered(
    backend_stub: Service, proxy_factory: ProxyFactory
) -> None:
    """Bug 12: Upgrade requests re-fed the rest of the read by recursion: 3000 in one write crashed the transport."""
    proxy = proxy_factory(_config(routes=[{"prefix": "/api/", "upstream": "backend"}]))
    count = 3000
    client = _client(proxy)
    try:
        client.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n" * count)
        deadline = time.monotonic() + 2 * IO_TIMEOUT
        data = bytearray()
        while data.count(b"HTTP/1.1 404 ") < count:
            piece = _recv(client, 1 << 20, deadline)
            assert piece, f"closed after {data.count(b'HTTP/1.1 404 ')} of {count} answers"
            data += piece
    finally:
        client.close()
    assert "Fatal error" not in proxy.read_log()


# ---------------------------------------------------------------------------------------------- bug 13


def test_sync_answer_with_keep_alive_off_then_more_bytes_is_clean(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    """Bug 13: a 404 with Connection: close, then pipelined bytes: "Cannot call write() after write_eof()"."""
    proxy = proxy_factory(_config(routes=[{"prefix": "/api/", "upstream": "backend"}]))
    before = backend_requests(backend_stub)
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.send(b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /api/x HTTP/1.1\r\nHost: x\r\n\r\n")
    response = conn.read_response()
    assert response.status == 404 and response.header("connection") == "close"
    assert conn.closed_by_peer(CLOSE_TIMEOUT) and conn.buffer == b"", conn.buffer[:300]
    # One worker: once it answers another request, whatever the first one logged is in the log.
    with RawHTTPConnection(proxy.host, proxy.port, timeout=IO_TIMEOUT) as other:
        other.request("GET", "/nope")
        assert other.read_response().status == 404
    log = proxy.read_log()
    assert "write_eof" not in log and "Fatal error" not in log, log[-2000:]
    assert backend_requests(backend_stub) - before == 1


# ---------------------------------------------------------------------------------------------- bug 14


def test_client_leaving_during_connect_does_not_eject_the_server(
    proxy_factory: ProxyFactory, scripted_upstream: Callable[..., ScriptedUpstream]
) -> None:
    """Bug 14: a client gone while its upstream connect was in progress counted as a connect failure (ejection)."""

    def handler(conn: socket.socket, n: int) -> None:
        buf = b""
        while True:
            head, buf = _read_head(conn, buf)
            if head is None:
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    # A listener with a full accept queue (backlog 0, one connection queued) drops SYNs: connects hang.
    upstream = scripted_upstream(handler, backlog=0, start=False)
    filler = socket.create_connection(("127.0.0.1", upstream.port), timeout=IO_TIMEOUT)
    try:
        proxy = proxy_factory(
            _config(upstream={"max_fails": 2, "fail_cooldown": "60s", "connect_timeout": "30s"}),
            upstream_servers=[upstream.address],
        )

        def connecting() -> int:
            return sum(1 for s in _tcp_sockets() if s.remote_port == upstream.port and s.state == SYN_SENT)

        for _ in range(2):
            client = _client(proxy)
            try:
                client.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
                deadline = time.monotonic() + IO_TIMEOUT
                while connecting() == 0:  # the proxy is connecting for this client
                    assert time.monotonic() < deadline, "the proxy never started connecting"
                    time.sleep(0.01)
            finally:
                _abort(client)
            deadline = time.monotonic() + IO_TIMEOUT
            while connecting():  # the proxy gave the connect up
                assert time.monotonic() < deadline, "the proxy kept connecting for a client that left"
                time.sleep(0.01)
    finally:
        filler.close()
    upstream.start()  # accepts (and drops) the queued filler, then serves
    with RawHTTPConnection(proxy.host, proxy.port, timeout=IO_TIMEOUT) as conn:
        conn.request("GET", "/x")
        response = conn.read_response()
    assert (response.status, response.body) == (200, b"ok"), response.raw[:300]


# ---------------------------------------------------------------------------------------------- bug 15


def test_abandoned_waiters_do_not_count_against_max_pending(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    """Bug 15: waiters gone (pending timeout) stayed in the queue: a new request got 503 upstream_overflow."""
    proxy = proxy_factory(_config(upstream={"max_connections": 1, "max_pending": 2, "pending_timeout": "1s"}))
    before = backend_requests(backend_stub)
    holder = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    holder.request("GET", "/delay?ms=1600")  # holds the only connection
    wait_backend_requests(backend_stub, before, 1)
    waiters = [raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT) for _ in range(2)]
    for waiter in waiters:
        waiter.request("GET", "/api/w")
    for waiter in waiters:
        response = waiter.read_response()
        assert response.status == 503 and response.json()["error"] == "upstream_pending_timeout"
    late = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    late.request("GET", "/api/late")  # before the holder's response: it waits, then gets the connection
    response = late.read_response()
    assert response.status == 200, response.raw[:300]
    assert holder.read_response().status == 200


# ---------------------------------------------------------------------------------------------- bug 17


def test_deferred_400_is_not_replaced_by_a_408(
    backend_stub: Service, proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    """Bug 17: a malformed request behind a slow one: the deferred 400 became 408 once header_timeout passed."""
    proxy = proxy_factory(_config(server={"header_timeout": "500ms"}))
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.send(b"GET /delay?ms=1200 HTTP/1.1\r\nHost: x\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert conn.read_response().status == 200
    error = conn.read_response()
    assert error.status == 400, error.raw[:300]
    assert conn.closed_by_peer(CLOSE_TIMEOUT)


# ---------------------------------------------------------------------------------------------- bug 18


def test_http10_keep_alive_client_gets_keep_alive_on_error_responses(
    proxy_factory: ProxyFactory, raw_connection: Connect
) -> None:
    """Bug 18: proxy-made error responses to an HTTP/1.0 keep-alive client lacked `Connection: keep-alive`."""
    proxy = proxy_factory(_config(), upstream_servers=[f"127.0.0.1:{free_port()}"])
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    for _ in range(2):
        conn.send(b"GET /x HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        response = conn.read_response()
        assert response.status == 503, response.raw[:300]
        assert (response.header("connection") or "").lower() == "keep-alive", response.raw[:300]


# ---------------------------------------------------------------------------------------------- request targets, TE


def _echo_head(seen: list[bytes]) -> Handler:
    """Answers every request (bodies are not expected) with its head as the body."""

    def handler(conn: socket.socket, n: int) -> None:
        buf = b""
        while True:
            head, buf = _read_head(conn, buf)
            if head is None:
                return
            seen.append(head)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(head), head))

    return handler


def test_dot_segments_in_the_path_are_400(
    proxy_factory: ProxyFactory, scripted_upstream: Callable[..., ScriptedUpstream], raw_connection: Connect
) -> None:
    """`/api/../admin` (also `%2e%2e`) matched the `/api/` route while it means `/admin` upstream: 400."""
    seen: list[bytes] = []
    upstream = scripted_upstream(_echo_head(seen))
    proxy = proxy_factory(
        _config(routes=[{"prefix": "/api/", "upstream": "backend"}]), upstream_servers=[upstream.address]
    )
    for target in ("/api/../admin", "/api/%2e%2e/admin", "/api/%2E%2E/admin"):
        conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
        conn.request("GET", target)
        response = conn.read_response()
        assert response.status == 400, (target, response.raw[:300])
    assert seen == []


def test_absolute_form_target_with_a_query_and_no_path(
    proxy_factory: ProxyFactory, scripted_upstream: Callable[..., ScriptedUpstream], raw_connection: Connect
) -> None:
    """`GET http://h?x` was forwarded with host `h?x` and path `/`: the host is `h`, the path `/?x`."""
    seen: list[bytes] = []
    upstream = scripted_upstream(_echo_head(seen))
    proxy = proxy_factory(_config(), upstream_servers=[upstream.address])
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.send(b"GET http://h?x HTTP/1.1\r\nHost: h\r\n\r\n")
    response = conn.read_response()
    assert response.status == 200, response.raw[:300]
    lines = response.body.split(b"\r\n")
    assert lines[0] == b"GET /?x HTTP/1.1"
    assert b"host: h" in [line.lower() for line in lines[1:]]


def test_two_transfer_encoding_headers_gzip_then_chunked_are_501(
    proxy_factory: ProxyFactory, scripted_upstream: Callable[..., ScriptedUpstream], raw_connection: Connect
) -> None:
    """`Transfer-Encoding: gzip` then `Transfer-Encoding: chunked`: only the last was seen, forwarded as chunked."""
    seen: list[bytes] = []
    upstream = scripted_upstream(_echo_head(seen))
    proxy = proxy_factory(_config(), upstream_servers=[upstream.address])
    conn = raw_connection(proxy.host, proxy.port, timeout=IO_TIMEOUT)
    conn.send(
        b"POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    )
    response = conn.read_response()
    assert response.status == 501, response.raw[:300]
    assert conn.closed_by_peer(CLOSE_TIMEOUT)
    assert seen == []
