"""Admin listener served by the supervisor's select loop: /healthz, /readyz.

Theory of operation: the supervisor has no event loop, so this is a tiny non-blocking HTTP/1.0
responder driven by `selectors`: accept, read one request head (bounded size and time), answer,
close. It lives in the supervisor because readiness is the supervisor's knowledge (every slot
served by a ready worker, not draining).
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Callable

import orjson

from proxy.http1.framing import STATUS_LINES

MAX_REQUEST = 8192
CONN_TIMEOUT = 5.0
MAX_CONNECTIONS = 64  # admin clients at once; more are refused so the supervisor keeps its descriptors

Handler = Callable[[str, str], tuple[int, bytes, bytes]]  # (method, path) -> (status, content type, body)


def json_response(status: int, payload: object) -> tuple[int, bytes, bytes]:
    return status, b"application/json", orjson.dumps(payload)


class AdminServer:
    """Non-blocking responder registered in the supervisor's selector."""

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector, handler: Handler) -> None:
        self.sock = sock
        self.selector = selector
        self.handler = handler
        self.conns: dict[socket.socket, tuple[bytearray, float]] = {}
        self.resume_at = 0.0  # accepting paused (out of descriptors) until then
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, self._accept)

    def _accept(self, sock: socket.socket) -> None:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionError):
            return
        except OSError:  # EMFILE/ENFILE and the like: never fatal; stop accepting for a second
            self.selector.unregister(sock)
            self.resume_at = time.monotonic() + 1.0
            return
        if len(self.conns) >= MAX_CONNECTIONS:
            conn.close()
            return
        conn.setblocking(False)
        self.conns[conn] = (bytearray(), time.monotonic())
        self.selector.register(conn, selectors.EVENT_READ, self._read)

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        buf, _ = self.conns[conn]
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_REQUEST:
                self._reply(conn, (400, b"application/json", b'{"error":"request too large"}'))
            return
        line = bytes(buf[: buf.find(b"\r\n")]).decode("latin-1")
        parts = line.split()
        if len(parts) != 3:
            self._reply(conn, (400, b"application/json", b'{"error":"bad request"}'))
            return
        method, target, _ = parts
        try:
            response = self.handler(method, target.split("?", 1)[0])
        except Exception as exc:  # the supervisor must survive a bad handler
            response = json_response(500, {"error": str(exc)})
        self._reply(conn, response)

    def _reply(self, conn: socket.socket, response: tuple[int, bytes, bytes]) -> None:
        status, ctype, body = response
        head = b"%s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (
            STATUS_LINES[status],
            ctype,
            len(body),
        )
        try:
            conn.setblocking(True)
            conn.settimeout(1.0)
            conn.sendall(head + body)
        except OSError:
            pass
        self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        self.conns.pop(conn, None)
        try:
            self.selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def expire(self) -> None:
        """Close connections that did not send a request in time."""
        now = time.monotonic()
        if self.resume_at and now >= self.resume_at:
            self.resume_at = 0.0
            self.selector.register(self.sock, selectors.EVENT_READ, self._accept)
        for conn, (_, started) in list(self.conns.items()):
            if now - started > CONN_TIMEOUT:
                self._close(conn)

    def close(self) -> None:
        for conn in list(self.conns):
            self._close(conn)
        if not self.resume_at:
            try:
                self.selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass
        self.sock.close()
