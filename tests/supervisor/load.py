"""A small wrk-like load generator for the supervisor tests (stdlib only: threads and blocking sockets).

`LoadGenerator(host, port, connections=C, duration=D)` keeps C keep-alive HTTP/1.1 connections busy
with one request at a time each (`GET /api/resource` by default) until `duration` has passed or
`stop()` is called, and counts successes and failures separately.

Semantics, as in wrk:
- a response that carried `Connection: close` (or was delimited by the end of the connection) ends
  the connection normally: the client closes its side, reconnects and continues. Not a failure.
- EOF, reset or timeout while a request is outstanding (being sent, or sent and not completely
  answered) is a failure; so is a failed connect, a malformed response, a status other than the
  expected one and, when `expect_body` is given, a different body.

Every wait is bounded: connects by `connect_timeout`, each request by `request_timeout`, and
`join()` by `duration + request_timeout` plus a margin. A failure records when it happened, on which
connection, after how many requests on that connection, its kind and a detail (the exception or
the status), so tests can say precisely what went wrong.
"""

from __future__ import annotations

import bisect
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["CONNECTION_ERRORS", "Failure", "LoadGenerator", "LoadResult", "Response"]

# Failure kinds that mean "the connection broke under a request" (as opposed to a bad answer).
CONNECTION_ERRORS = frozenset({"send", "eof", "reset"})

_MAX_HEAD = 64 * 1024
_RECV = 65536


class ProtocolError(Exception):
    """The peer sent something that is not a valid HTTP/1.1 response."""


class PeerClosed(Exception):
    """The peer closed the connection before the response was complete."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes
    close: bool  # the connection ends after this response

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(frozen=True, slots=True)
class Failure:
    at: float  # time.monotonic()
    conn: int  # index of the load connection (0 .. connections-1)
    local_port: int  # client-side port of the TCP connection (0 if it never connected)
    request_on_conn: int  # how many requests this TCP connection had completed before
    kind: str  # connect | send | eof | reset | timeout | protocol | status | body | error
    detail: str

    def __str__(self) -> str:
        return (
            f"conn {self.conn} (port {self.local_port}, after {self.request_on_conn} requests on it): "
            f"{self.kind}: {self.detail}"
        )


@dataclass
class LoadResult:
    started: float
    finished: float
    connections: int
    successes: int
    failures: list[Failure]
    success_times: list[float]  # sorted, time.monotonic() of each completed successful response
    connects: int  # TCP connections opened (successfully)
    server_closes: int  # responses that ended their connection (Connection: close)

    @property
    def duration(self) -> float:
        return self.finished - self.started

    def successes_after(self, t: float) -> int:
        """Successful responses completed after monotonic time `t`."""
        return len(self.success_times) - bisect.bisect_right(self.success_times, t)

    def successes_between(self, t0: float, t1: float) -> int:
        return bisect.bisect_right(self.success_times, t1) - bisect.bisect_right(self.success_times, t0)

    def failures_of_kind(self, kinds: frozenset[str] | set[str]) -> list[Failure]:
        return [f for f in self.failures if f.kind in kinds]

    def summary(self, limit: int = 20) -> str:
        lines = [
            f"{self.successes} ok, {len(self.failures)} failed in {self.duration:.2f}s over {self.connections} "
            f"connections ({self.connects} connects, {self.server_closes} closed by the server after "
            "Connection: close)"
        ]
        t0 = self.started
        lines += [f"  +{f.at - t0:.3f}s {f}" for f in self.failures[:limit]]
        if len(self.failures) > limit:
            lines.append(f"  ... and {len(self.failures) - limit} more")
        return "\n".join(lines)


class _Conn:
    """One blocking client connection with a receive buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.local_port: int = sock.getsockname()[1]
        self.buf = bytearray()
        self.completed = 0

    @classmethod
    def connect(cls, host: str, port: int, timeout: float) -> _Conn:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("response not complete before the request deadline")
        self.sock.settimeout(remaining)
        data = self.sock.recv(_RECV)
        if not data:
            raise PeerClosed()
        self.buf += data

    def _line(self, deadline: float) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > _MAX_HEAD:
                raise ProtocolError("line too long")
            self._fill(deadline)
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def _exactly(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            self._fill(deadline)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_response(self, deadline: float, *, head_request: bool = False) -> Response:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > _MAX_HEAD:
                raise ProtocolError("response head too large")
            self._fill(deadline)
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[: end + 4]
        status_line, *header_lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {status_line!r}")
        version, status = parts[0], int(parts[1])
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise ProtocolError(f"bad header line {line!r}")
            key = name.lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",") if t.strip()}
        close = "close" in tokens or (version == "HTTP/1.0" and "keep-alive" not in tokens)
        if 100 <= status < 200:
            raise ProtocolError(f"unexpected interim response {status}")
        if head_request or status in (204, 304):
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = self._chunked(deadline)
        elif "content-length" in headers:
            length_text = headers["content-length"]
            if not length_text.isdigit():
                raise ProtocolError(f"bad content-length {length_text!r}")
            body = self._exactly(int(length_text), deadline)
        else:  # delimited by the end of the connection
            try:
                while True:
                    self._fill(deadline)
            except PeerClosed:
                pass
            body, close = bytes(self.buf), True
            self.buf.clear()
        self.completed += 1
        return Response(status, headers, body, close)

    def _chunked(self, deadline: float) -> bytes:
        body = bytearray()
        while True:
            size_text = self._line(deadline).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_text!r}") from None
            if size == 0:
                while self._line(deadline):  # trailers up to the empty line
                    pass
                return bytes(body)
            body += self._exactly(size, deadline)
            if self._exactly(2, deadline) != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")


def encode_request(
    method: str, target: str, host: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class _Shared:
    lock: threading.Lock = field(default_factory=threading.Lock)
    successes: int = 0
    success_times: list[float] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    connects: int = 0
    server_closes: int = 0


class LoadGenerator:
    """C keep-alive connections, one request in flight each, for at most `duration` seconds."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connections: int = 8,
        duration: float = 5.0,
        path: str = "/api/resource",
        expect_status: int = 200,
        expect_body: bytes | None = None,
        request_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        reconnect_pause: float = 0.05,
    ) -> None:
        if connections < 1 or duration <= 0:
            raise ValueError("connections >= 1 and duration > 0 required")
        self.host = host
        self.port = port
        self.connections = connections
        self.duration = duration
        self.expect_status = expect_status
        self.expect_body = expect_body
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.reconnect_pause = reconnect_pause
        self.request = encode_request("GET", path, f"{host}:{port}", [("user-agent", "uvgate-supervisor-tests")])
        self._shared = _Shared()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = 0.0
        self._deadline = 0.0
        self._result: LoadResult | None = None

    # ------------------------------------------------------------------ control

    def start(self) -> LoadGenerator:
        if self._threads:
            raise RuntimeError("already started")
        self.started = time.monotonic()
        self._deadline = self.started + self.duration
        for index in range(self.connections):
            thread = threading.Thread(target=self._run, args=(index,), name=f"load-{index}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self) -> None:
        """Ask every connection to stop after its current request."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> LoadResult:
        """Wait for the end of the run (bounded) and return the result."""
        if self._result is not None:
            return self._result
        limit = timeout if timeout is not None else self.duration + self.request_timeout + self.connect_timeout + 5
        deadline = self.started + limit
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            self._stop.set()
            raise TimeoutError(f"load threads still running after {limit:.1f}s: {alive}")
        shared = self._shared
        with shared.lock:
            self._result = LoadResult(
                started=self.started,
                finished=time.monotonic(),
                connections=self.connections,
                successes=shared.successes,
                failures=sorted(shared.failures, key=lambda f: f.at),
                success_times=sorted(shared.success_times),
                connects=shared.connects,
                server_closes=shared.server_closes,
            )
        return self._result

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self.stop()
        try:
            self.join()
        except TimeoutError:
            if exc is None:
                raise

    # ------------------------------------------------------------------ progress (while running)

    @property
    def successes(self) -> int:
        with self._shared.lock:
            return self._shared.successes

    @property
    def failure_count(self) -> int:
        with self._shared.lock:
            return len(self._shared.failures)

    def successes_after(self, t: float) -> int:
        with self._shared.lock:
            times = self._shared.success_times
            return len(times) - bisect.bisect_right(times, t)

    def wait_for_successes(self, count: int, *, after: float = 0.0, timeout: float = 10.0) -> None:
        """Wait until `count` successful responses completed after `after`; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while self.successes_after(after) < count:
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"load: fewer than {count} successes after t={after:.3f} within {timeout:.1f}s "
                    f"({self.successes} ok, {self.failure_count} failed so far)"
                )
            if not any(t.is_alive() for t in self._threads):
                raise AssertionError(f"load ended with {self.successes_after(after)} of {count} successes")
            time.sleep(0.01)

    def wait_elapsed(self, seconds: float) -> None:
        """Wait until the run has been going for `seconds` (never past its end)."""
        end = min(self.started + seconds, self._deadline)
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))

    # ------------------------------------------------------------------ worker threads

    def _fail(self, index: int, conn: _Conn | None, kind: str, detail: str) -> None:
        completed, port = (conn.completed, conn.local_port) if conn is not None else (0, 0)
        failure = Failure(time.monotonic(), index, port, completed, kind, detail)
        with self._shared.lock:
            self._shared.failures.append(failure)

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._deadline

    def _run(self, index: int) -> None:
        conn: _Conn | None = None
        try:
            while self._running():
                if conn is None:
                    try:
                        conn = _Conn.connect(self.host, self.port, self.connect_timeout)
                    except OSError as exc:
                        self._fail(index, None, "connect", repr(exc))
                        self._stop.wait(self.reconnect_pause)
                        continue
                    with self._shared.lock:
                        self._shared.connects += 1
                if not self._exchange(index, conn):
                    conn.close()
                    conn = None
        except BaseException as exc:  # never let a thread die silently: record and stop this connection
            self._fail(index, conn, "error", repr(exc))
        finally:
            if conn is not None:
                conn.close()

    def _exchange(self, index: int, conn: _Conn) -> bool:
        """One request/response; False if the connection must not be used again."""
        deadline = time.monotonic() + self.request_timeout
        try:
            conn.sock.settimeout(self.request_timeout)
            conn.sock.sendall(self.request)
        except OSError as exc:
            self._fail(index, conn, "send", repr(exc))
            return False
        try:
            response = conn.read_response(deadline)
        except PeerClosed:
            what = "before any response byte" if not conn.buf else f"after {len(conn.buf)} bytes of the response"
            self._fail(index, conn, "eof", f"connection closed by the server {what}")
            return False
        except TimeoutError as exc:  # socket.timeout is TimeoutError
            self._fail(index, conn, "timeout", repr(exc))
            return False
        except OSError as exc:  # ConnectionResetError and friends
            self._fail(index, conn, "reset", repr(exc))
            return False
        except ProtocolError as exc:
            self._fail(index, conn, "protocol", str(exc))
            return False
        if response.status != self.expect_status:
            self._fail(index, conn, "status", f"{response.status} {response.body[:200]!r}")
        elif self.expect_body is not None and response.body != self.expect_body:
            self._fail(index, conn, "body", f"{len(response.body)} bytes: {response.body[:200]!r}")
        else:
            with self._shared.lock:  # the time is read under the lock: success_times stays sorted
                self._shared.successes += 1
                self._shared.success_times.append(time.monotonic())
        if response.close:
            with self._shared.lock:
                self._shared.server_closes += 1
            return False
        if conn.buf:
            self._fail(index, conn, "protocol", f"{len(conn.buf)} unexpected bytes after the response")
            return False
        return True
