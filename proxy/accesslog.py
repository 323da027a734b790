"""JSON access log: one orjson line per finished request, buffered, flushed by the worker tick.

Theory of operation: `record` appends an encoded line to an in-memory buffer (no syscall on the
request path); `flush` writes the buffer with one `os.write` per tick, or as soon as it holds
`FLUSH_BYTES`. What is logged is chosen so that no secret leaves: the request target without
its query string (tokens and keys travel there too) and never a header value.
"""

from __future__ import annotations

import os
import time

import orjson

FLUSH_BYTES = 64 * 1024


class AccessLog:
    """Buffered JSON-lines writer to a file descriptor."""

    __slots__ = ("_buffer", "_fd", "_size", "worker")

    def __init__(self, fd: int, worker: int) -> None:
        self._fd = fd
        self._buffer: list[bytes] = []
        self._size = 0
        self.worker = worker

    @classmethod
    def open(cls, path: str, worker: int) -> AccessLog:
        """`path` "" or "-" means standard error."""
        if path in ("", "-"):
            return cls(2, worker)
        return cls(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640), worker)

    def record(
        self,
        *,
        method: bytes,
        target: bytes,
        status: int,
        duration: float,
        request_id: bytes,
        client: bytes,
        upstream: str,
        protocol: str,
    ) -> None:
        line = orjson.dumps(
            {
                "ts": round(time.time(), 3),
                "worker": self.worker,
                "client": client.decode("latin-1"),
                "method": method.decode("latin-1"),
                "path": target.partition(b"?")[0].decode("latin-1"),
                "protocol": protocol,
                "status": status,
                "duration_ms": round(duration * 1000, 3),
                "upstream": upstream,
                "request_id": request_id.decode("latin-1"),
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )
        self._buffer.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
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
