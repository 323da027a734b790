"""Helpers shared by the integration and supervisor tests: bounded waits on backend_stub's counters,
and the assertions every proxy test makes about error answers and closed connections."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

from devstack import RawHTTPConnection, RawResponse, Service, http_get

IO_TIMEOUT = 5.0  # any single exchange with a local process
CLOSE_TIMEOUT = 5.0  # until the proxy closes a connection it must close

PATTERN = b"0123456789abcdef"


def pattern(length: int) -> bytes:
    """`length` bytes of a repeating pattern (a body whose corruption shows)."""
    return (PATTERN * (length // len(PATTERN) + 1))[:length]


def backend_stats(backend: Service) -> dict[str, int]:
    """backend_stub's /stats counters (the /stats request itself included)."""
    status, body = http_get(backend.url + "/stats", timeout=IO_TIMEOUT)
    assert status == 200, (status, body)
    stats: dict[str, int] = json.loads(body)
    return stats


def backend_requests(backend: Service) -> int:
    """Requests backend_stub has received, this /stats request included."""
    return backend_stats(backend)["requests"]


def wait_backend_requests(backend: Service, before: int, count: int, timeout: float = IO_TIMEOUT) -> None:
    """Wait until `count` requests besides our own /stats polls reached the backend since `before`
    (a `backend_requests()` value)."""
    wait_backend_count(backend, "requests", before, count, timeout)


def wait_backend_count(backend: Service, counter: str, before: int, count: int, timeout: float = IO_TIMEOUT) -> None:
    """Wait until backend_stub's `counter` ("requests" or "connections_accepted": each /stats poll
    adds one to both) grew by `count` besides our own polls since `before` (its value then)."""
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        polls += 1
        seen = backend_stats(backend)[counter] - before - polls
        if seen >= count:
            return
        assert time.monotonic() < deadline, f"the backend's {counter} grew by {seen} of {count} in time"
        time.sleep(0.01)


def assert_json_error(response: RawResponse, status: int, hint: str = "") -> dict[str, Any]:
    """`response` is the proxy's own JSON error with `status`: `{"error", "request_id"}`, the id echoed;
    `hint` is a word its error code must contain, where the status alone is ambiguous."""
    assert response.status == status, response.raw[:500]
    assert (response.header("content-type") or "").startswith("application/json")
    payload: dict[str, Any] = response.json()
    assert isinstance(payload["error"], str) and payload["error"]
    assert payload["request_id"] == response.header("x-request-id")
    assert hint in payload["error"], payload
    return payload


def assert_closed_after_response(conn: RawHTTPConnection) -> None:
    """The proxy closes its side after the response: EOF, and nothing else (no second response) arrives."""
    assert conn.closed_by_peer(CLOSE_TIMEOUT), "the proxy kept the connection open"
    assert conn.buffer == b"", f"unexpected bytes after the response: {conn.buffer[:300]!r}"


class LoopbackServer:
    """A TCP server on 127.0.0.1 for tests that need an upstream to misbehave in a precise way: each accepted
    connection is handed to `handle` in a thread of its own; `close()` stops accepting, waits for the
    threads (each must return once `stopping` is set or its peer closes) and closes every socket."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.connections = 0
        self.conns: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept_loop, name=type(self).__name__, daemon=True)]
        self.threads[0].start()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self.conns.append(conn)
            thread = threading.Thread(target=self.handle, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def close(self) -> None:
        self.stopping.set()
        for thread in list(self.threads):
            thread.join(IO_TIMEOUT)
        self.listener.close()
        for conn in self.conns:
            conn.close()
        assert not any(thread.is_alive() for thread in self.threads), f"{type(self).__name__} did not stop"
