"""JSON access log: one orjson line per finished exchange, buffered, flushed by the worker tick.

Theory of operation: `exchange_finished` (a worker `finished` hook, called once per exchange whatever
its outcome) appends an encoded line to an in-memory buffer (no syscall on the request path); `tick`
writes the buffer with one `os.write` per worker tick, or as soon as it holds `FLUSH_BYTES`. Each line
carries the route, the upstream name and address, the verified subject on auth routes, the status and
the proxy's error code when it answered itself (or gave up: 499 `client_closed`), bytes in and out,
and timings with microsecond resolution. `reopen` (the worker's SIGUSR1 handler, which the supervisor
relays: logrotate's `postrotate`) writes what is buffered to the old file and opens the path again,
so lines go to the new file from then on. What is logged is chosen so that no secret leaves: the
request target without its query string (tokens and keys travel there too) and never a header value.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from proxy.config import Address
    from proxy.exchange import Exchange

FLUSH_BYTES = 64 * 1024

log = logging.getLogger("uvgate.accesslog")


def _open(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)


class AccessLog:
    """Buffered JSON-lines writer to a file descriptor."""

    __slots__ = ("_addresses", "_buffer", "_fd", "_size", "path", "worker")

    def __init__(self, fd: int, worker: int, path: str = "") -> None:
        self._fd = fd
        self._buffer: list[bytes] = []
        self._size = 0
        self._addresses: dict[Address, str] = {}  # upstream servers as logged (a few, from the config)
        self.worker = worker
        self.path = path  # the file reopened on `reopen` ("": standard error, never reopened)

    @classmethod
    def open(cls, path: str, worker: int) -> AccessLog:
        """`path` "" or "-" means standard error."""
        if path in ("", "-"):
            return cls(2, worker)
        return cls(_open(path), worker, path)

    def reopen(self) -> None:
        """Flush to the current file, then write to `path` anew (created if it was renamed away)."""
        if not self.path:
            return
        self.flush()
        try:
            fd = _open(self.path)
        except OSError as exc:
            log.error("access log: cannot reopen %s (%s); writing to the old file", self.path, exc.strerror or exc)
            return
        os.close(self._fd)
        self._fd = fd
        log.info("worker %d: access log %s reopened", self.worker, self.path)

    def exchange_finished(self, exchange: Exchange) -> None:
        """A worker `finished` hook: one line per exchange."""
        route = exchange.route
        server = exchange.server
        upstream_ms = (exchange.t_end - exchange.t_upstream) * 1000 if exchange.t_upstream else None
        address: str | None = None
        if server is not None:
            address = self._addresses.get(server)
            if address is None:
                address = self._addresses[server] = str(server)
        line = orjson.dumps(
            {
                "ts": round(time.time(), 3),
                "worker": self.worker,
                "client": exchange.client.decode("latin-1"),
                "method": exchange.method.decode("latin-1"),
                "path": exchange.target.partition(b"?")[0].decode("latin-1"),
                "protocol": exchange.protocol.decode("latin-1"),
                "status": exchange.status,
                "error": exchange.error or None,
                "route": route.name if route is not None else None,
                "upstream": exchange.upstream_name or None,
                "upstream_addr": address,
                "duration_ms": round((exchange.t_end - exchange.t_start) * 1000, 3),
                "upstream_ms": round(upstream_ms, 3) if upstream_ms is not None else None,
                "bytes_in": exchange.bytes_in,
                "bytes_out": exchange.bytes_out,
                "request_id": exchange.request_id.decode("latin-1"),
                # The verified identity (the route's subject claim) once an auth step passed; never the token.
                "subject": exchange.subject.decode("latin-1") if exchange.subject is not exchange.client else None,
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )
        self._buffer.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()

    def tick(self, now: float) -> None:
        """A worker tick subscriber: write what the last tick collected."""
        self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._size = 0
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
        except BlockingIOError:
            pass  # a full pipe on stderr: drop rather than stall the worker
        except OSError:
            pass

    def close(self) -> None:
        self.flush()
        if self._fd > 2:
            os.close(self._fd)
