"""backend_stub endpoints.

Routing is a prefix test for the hot ``/api/*`` path, then one dict lookup. Fixed answers are
``PreEncoded`` handlers shared by every request of the worker; only ``/echo`` allocates a
handler per request, because it hashes the body as it arrives. Query strings are parsed with
urllib, and only by the endpoints that take parameters (never on ``/api/*``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from typing import Final
from urllib.parse import parse_qs, parse_qsl

from backend_stub.httpcore import (
    CHUNK_SIZE,
    OCTET_STREAM,
    BodyPiece,
    Endpoint,
    Handler,
    HttpConnection,
    HttpError,
    PreEncoded,
    Request,
    ServerState,
    Sleep,
)

API_BODY: Final = b'{"id":1,"name":"resource","tags":["a","b"],"ok":true}'
HEALTH_BODY: Final = b'{"status":"ok"}'
NOT_FOUND_BODY: Final = b'{"error":"not found"}'
HOP_HEADERS: Final = (
    (b"Connection", b"keep-alive, X-Hop-Custom"),
    (b"X-Hop-Custom", b"secret"),
    (b"Keep-Alive", b"timeout=5"),
    (b"Proxy-Connection", b"keep-alive"),
    (b"Upgrade", b"foo/1"),
    (b"X-End-To-End", b"yes"),
)
ECHO_BODY_LIMIT: Final = 1 << 20  # /echo returns the body text up to this size, only its hash beyond

PATTERN: Final = b"0123456789abcdef"
# 64 KiB plus one period: a CHUNK_SIZE slice exists at every phase, so any offset is served without copying.
_PATTERN_BUFFER: Final = memoryview(PATTERN * (CHUNK_SIZE // len(PATTERN) + 1))

_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FRAMING_HEADERS: Final = frozenset({"content-length", "transfer-encoding"})


def pattern_chunks(offset: int, length: int) -> Iterator[BodyPiece]:
    """``length`` bytes of the pattern starting at byte ``offset``, in pieces of at most 64 KiB."""
    end = offset + length
    while offset < end:
        size = min(CHUNK_SIZE, end - offset)
        phase = offset % len(PATTERN)
        yield _PATTERN_BUFFER[phase : phase + size]
        offset += size


def drip_chunks(length: int, pieces: int, interval: float) -> Iterator[BodyPiece | Sleep]:
    """``length`` pattern bytes in ``pieces`` near-equal pieces with ``interval`` seconds between them."""
    offset = 0
    for index in range(pieces):
        if index:
            yield Sleep(interval)
        size = length * (index + 1) // pieces - offset
        yield from pattern_chunks(offset, size)
        offset += size


def _query(request: Request) -> dict[str, list[str]]:
    return parse_qs(request.query.decode("latin-1"), keep_blank_values=True)


def _int_param(query: dict[str, list[str]], name: str, default: int | None = None, minimum: int = 0) -> int:
    values = query.get(name)
    if not values:
        if default is None:
            raise HttpError(400, f"missing query parameter {name!r}")
        return default
    try:
        value = int(values[-1])
    except ValueError:
        raise HttpError(400, f"query parameter {name!r} must be an integer") from None
    if value < minimum:
        raise HttpError(400, f"query parameter {name!r} must be >= {minimum}")
    return value


def _flag(query: dict[str, list[str]], name: str) -> bool:
    values = query.get(name)
    return values is not None and values[-1].lower() in ("1", "true", "yes", "on")


class EchoHandler:
    """``/echo``: hashes the body as it arrives and keeps it only up to ``ECHO_BODY_LIMIT``."""

    __slots__ = ("_kept", "_length", "_sha")

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._length = 0
        self._kept: bytearray | None = bytearray()

    def on_body(self, data: bytes) -> None:
        self._sha.update(data)
        self._length += len(data)
        if self._kept is not None:
            if self._length > ECHO_BODY_LIMIT:
                self._kept = None
            else:
                self._kept += data

    def respond(self, request: Request, conn: HttpConnection) -> None:
        headers: dict[str, str] = {}
        raw_headers: list[list[str]] = []
        for raw_name, raw_value in request.headers:
            name = raw_name.decode("latin-1")
            value = raw_value.decode("latin-1")
            raw_headers.append([name, value])
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        codings = headers.get("transfer-encoding", "").lower().split(",")
        kept = self._kept
        conn.send_json(
            200,
            {
                "method": request.method.decode("latin-1"),
                "path": request.target.decode("latin-1"),
                "http_version": request.http_version,
                "headers": headers,
                "raw_headers": raw_headers,
                "chunked": codings[-1].strip() == "chunked",
                "body_length": self._length,
                "body_sha256": self._sha.hexdigest(),
                "body": kept.decode("utf-8", errors="replace") if kept is not None else None,
            },
        )


class BackendApp:
    """The backend stub's routes; one instance per worker."""

    __slots__ = ("_api", "_not_found", "_routes", "_state", "_status")

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._api = PreEncoded(state, 200, API_BODY)
        self._not_found = PreEncoded(state, 404, NOT_FOUND_BODY)
        self._status = Endpoint(self._status_code)
        self._routes: dict[bytes, Handler] = {
            b"/health": PreEncoded(state, 200, HEALTH_BODY),
            b"/hop": PreEncoded(state, 200, b'{"ok":true}', headers=HOP_HEADERS),
            b"/stats": Endpoint(self._stats),
            b"/sized": Endpoint(self._sized),
            b"/delay": Endpoint(self._delay),
            b"/abort": Endpoint(lambda request, conn: conn.abort()),
            b"/reset-mid-body": Endpoint(self._reset_mid_body),
            b"/drip": Endpoint(self._drip),
            b"/close": Endpoint(lambda request, conn: conn.send(200, API_BODY, close=True)),
            b"/headers": Endpoint(self._headers),
        }

    def dispatch(self, request: Request) -> Handler:
        path = request.path
        if path.startswith(b"/api/"):
            return self._api
        handler = self._routes.get(path)
        if handler is not None:
            return handler
        if path == b"/echo" or path.startswith(b"/echo/"):
            return EchoHandler()
        if path.startswith(b"/status/"):
            return self._status
        return self._not_found

    def _stats(self, request: Request, conn: HttpConnection) -> None:
        state = self._state
        conn.send_json(
            200, {"connections_accepted": state.connections_accepted, "requests": state.requests, "pid": os.getpid()}
        )

    def _status_code(self, request: Request, conn: HttpConnection) -> None:
        raw = request.path[len(b"/status/") :]
        status = int(raw) if raw.isdigit() and len(raw) == 3 else 0
        if not 100 <= status <= 599:
            raise HttpError(400, "status must be 100..599")
        conn.send_json(status, {"status": status})

    def _sized(self, request: Request, conn: HttpConnection) -> None:
        query = _query(request)
        length = _int_param(query, "bytes")
        conn.start(200, content_type=OCTET_STREAM, content_length=length, chunked=_flag(query, "chunked"))
        conn.stream(pattern_chunks(0, length))

    def _delay(self, request: Request, conn: HttpConnection) -> None:
        delay_ms = _int_param(_query(request), "ms", default=0)
        api = self._api
        conn.call_later(delay_ms / 1000, lambda: api.respond(request, conn))

    def _reset_mid_body(self, request: Request, conn: HttpConnection) -> None:
        length = _int_param(_query(request), "bytes")
        conn.start(200, content_type=OCTET_STREAM, content_length=length)
        conn.stream(pattern_chunks(0, length // 2), on_done=lambda: conn.abort(flush=True))

    def _drip(self, request: Request, conn: HttpConnection) -> None:
        query = _query(request)
        length = _int_param(query, "bytes", default=1024)
        pieces = _int_param(query, "chunks", default=8, minimum=1)
        interval_ms = _int_param(query, "interval_ms", default=100)
        conn.start(200, content_type=OCTET_STREAM, content_length=length, chunked=True)
        conn.stream(drip_chunks(length, pieces, interval_ms / 1000))

    def _headers(self, request: Request, conn: HttpConnection) -> None:
        headers: list[tuple[bytes, bytes]] = []
        for name, value in parse_qsl(request.query.decode("latin-1"), keep_blank_values=True):
            if not _TOKEN.fullmatch(name) or name.lower() in _FRAMING_HEADERS:
                raise HttpError(400, f"invalid response header name {name!r}")
            if any(ch in value for ch in "\r\n\0"):
                raise HttpError(400, f"invalid value for response header {name!r}")
            headers.append((name.encode(), value.encode()))
        conn.send(200, b'{"ok":true}', headers=headers)
