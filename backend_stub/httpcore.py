"""A small HTTP/1.1 server core on raw asyncio Protocols and httptools, shared by both stubs.

Theory of operation
-------------------
One ``HttpConnection`` serves one TCP connection and is also the httptools parser's callback
target. Parsing runs ahead of answering: when a request head is complete the ``App`` picks a
``Handler`` for it, body bytes go straight to that handler, and the finished request joins a
FIFO. Only the request at the head of the FIFO (``_active``) may write, so pipelined requests
are answered in order. A handler answers at once (``send``/``send_raw``) or later (a timer, or
``stream``), and finishing one response starts the next queued one from a loop, not by
recursion. Reading pauses while the FIFO is full or while the transport asked us to stop
writing, so a peer that pipelines without reading cannot grow our buffers. ``stream`` pulls body
pieces from an iterator only while the transport is writable and continues from
``resume_writing``. A malformed head is answered with 400 after the earlier responses, then the
connection closes. ``ServerState`` is the per-worker object: the Date line (rebuilt once per
second by a timer), counters, live connections and the drain on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, Protocol, cast

import httptools
import orjson

log = logging.getLogger("backend_stub")

JSON: Final = b"application/json"
OCTET_STREAM: Final = b"application/octet-stream"
CHUNK_SIZE: Final = 64 * 1024  # largest body piece handed to the transport at once
MAX_PIPELINE: Final = 32  # parsed but unanswered requests before reading pauses
MAX_HEAD_SIZE: Final = 64 * 1024  # request line plus headers, answered with 431 beyond

_REASONS: Final = {status.value: status.phrase.encode() for status in HTTPStatus}
STATUS_LINES: Final = {code: b"HTTP/1.1 %d %s\r\n" % (code, _REASONS.get(code, b"Unknown")) for code in range(100, 600)}
_CLOSE_LINE: Final = b"Connection: close\r\n"
_KEEP_ALIVE_LINE: Final = b"Connection: keep-alive\r\n"  # only HTTP/1.0 peers need to be told
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

Headers = Iterable[tuple[bytes, bytes]]


def has_body(status: int) -> bool:
    """Whether a response with this status carries a body (and a Content-Length)."""
    return status >= 200 and status != 204 and status != 304


def _date_line() -> bytes:
    return b"Date: %s\r\n" % email.utils.formatdate(usegmt=True).encode()


class HttpError(Exception):
    """Raised by a handler before it writes anything: answered as ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _HeadTooLarge(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Sleep:
    """Yielded by a ``stream`` producer: wait this long before pulling the next piece."""

    seconds: float


BodyPiece = bytes | memoryview
Producer = Iterator[BodyPiece | Sleep]


class Request:
    """One request head, as parsed. The body is never stored here; it goes to ``handler``."""

    __slots__ = ("handler", "head_only", "headers", "http_version", "keep_alive", "method", "path", "query", "target")

    def __init__(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], http_version: str, keep_alive: bool
    ) -> None:
        self.method = method
        self.target = target
        path, _, self.query = target.partition(b"?")
        if not path.startswith(b"/"):  # absolute-form ("http://host/p") or "*"
            with contextlib.suppress(httptools.HttpParserInvalidURLError):
                path = httptools.parse_url(target).path or b"/"
        self.path = path
        self.headers = headers
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.head_only = method == b"HEAD"
        self.handler: Handler = DISCARD

    def header(self, name: bytes) -> bytes | None:
        """First value of a header, by case-insensitive name."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class Handler(Protocol):
    """Serves one request: consumes its body, then writes exactly one response."""

    def on_body(self, data: bytes) -> None:
        """Called with each piece of the request body, already de-chunked."""

    def respond(self, request: Request, conn: HttpConnection) -> None:
        """Called once the whole request is read and it is this request's turn to answer.

        Must end, now or later, with ``conn.send``/``send_json``/``send_raw``, ``start`` followed by
        ``end`` (or ``stream``), or ``conn.abort``. May raise ``HttpError`` before writing anything.
        """


class App(Protocol):
    """Maps request heads to handlers."""

    def dispatch(self, request: Request) -> Handler:
        """Pick the handler for a request whose head is complete, before any body byte."""


class Endpoint:
    """A stateless handler that ignores the request body and answers with ``fn(request, conn)``."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[[Request, HttpConnection], None]) -> None:
        self._fn = fn

    def on_body(self, data: bytes) -> None:
        pass

    def respond(self, request: Request, conn: HttpConnection) -> None:
        self._fn(request, conn)


DISCARD: Final = Endpoint(lambda request, conn: conn.send_json(500, {"error": "no handler"}, close=True))


class BufferedHandler:
    """Collects a request body of at most ``limit`` bytes, then calls ``fn(request, body, conn)``."""

    __slots__ = ("_fn", "_limit", "_parts", "_size")

    def __init__(self, fn: Callable[[Request, bytes, HttpConnection], None], limit: int = 1 << 20) -> None:
        self._fn = fn
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = limit

    def on_body(self, data: bytes) -> None:
        self._size += len(data)
        if self._size <= self._limit:
            self._parts.append(data)

    def respond(self, request: Request, conn: HttpConnection) -> None:
        if self._size > self._limit:
            conn.send_json(413, {"error": "request body too large"}, close=True)
        else:
            self._fn(request, b"".join(self._parts), conn)


class ServerState:
    """Per-worker state shared by every connection: Date line, counters, live connections, drain."""

    __slots__ = (
        "_all_closed",
        "_date_timer",
        "connections",
        "connections_accepted",
        "date_line",
        "draining",
        "keep_alive_timeout",
        "loop",
        "requests",
        "server_line",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, *, server_name: str, keep_alive_timeout: float = 0.0) -> None:
        self.loop = loop
        self.server_line = b"Server: %s\r\n" % server_name.encode()
        self.date_line = _date_line()
        self.keep_alive_timeout = keep_alive_timeout  # idle seconds before closing; 0 keeps connections forever
        self.connections: set[HttpConnection] = set()
        self.connections_accepted = 0
        self.requests = 0
        self.draining = False
        self._date_timer: asyncio.TimerHandle | None = None
        self._all_closed: asyncio.Future[None] | None = None

    def start(self) -> None:
        """Refresh the Date line just after every wall-clock second from now on."""
        self.date_line = _date_line()
        self._date_timer = self.loop.call_later(1.001 - time.time() % 1.0, self.start)

    def forget(self, conn: HttpConnection) -> None:
        """Called by a connection when it is lost."""
        self.connections.discard(conn)
        waiter = self._all_closed
        if waiter is not None and not self.connections and not waiter.done():
            waiter.set_result(None)

    async def drain(self, timeout: float) -> None:
        """Stop keep-alive, close idle connections, give busy ones ``timeout`` seconds, abort the rest."""
        self.draining = True
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            self._all_closed = self.loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed, timeout)
        for conn in list(self.connections):
            conn.abort()
        if self._date_timer is not None:
            self._date_timer.cancel()
        await asyncio.sleep(0)  # let connection_lost callbacks run before the loop closes


def encode_head(
    state: ServerState, status: int, content_type: bytes, headers: Headers, framing: bytes, connection: bytes
) -> list[bytes]:
    """The pieces of a response head, ending with the blank line; join them (with the body) once."""
    parts = [
        STATUS_LINES[status],
        state.server_line,
        state.date_line,
        connection,
        b"Content-Type: ",
        content_type,
        b"\r\n",
    ]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (framing, b"\r\n")
    return parts


def connection_line(request: Request, keep_alive: bool) -> bytes:
    """The Connection header a response to ``request`` needs (none for HTTP/1.1 keep-alive)."""
    if not keep_alive:
        return _CLOSE_LINE
    return _KEEP_ALIVE_LINE if request.http_version == "1.0" else b""


class PreEncoded:
    """A fixed response, pre-encoded in full for each connection variant (and HEAD).

    The bytes are rebuilt only when the worker's Date line changes, so answering costs one
    identity check, one list index and one ``transport.write``. It is a ready-made ``Handler``.
    """

    __slots__ = ("_body", "_content_type", "_date_line", "_headers", "_state", "_status", "_variants")

    def __init__(
        self, state: ServerState, status: int, body: bytes, *, content_type: bytes = JSON, headers: Headers = ()
    ) -> None:
        if not has_body(status):
            raise ValueError("PreEncoded needs a status with a body")
        self._state = state
        self._status = status
        self._body = body
        self._content_type = content_type
        self._headers = tuple(headers)
        self._date_line = b""
        self._variants: list[bytes] = []

    def _rebuild(self) -> None:
        state = self._state
        framing = b"Content-Length: %d\r\n" % len(self._body)
        heads = [
            b"".join(encode_head(state, self._status, self._content_type, self._headers, framing, connection))
            for connection in (b"", _KEEP_ALIVE_LINE, _CLOSE_LINE)
        ]
        self._variants = [head + self._body for head in heads] + heads
        self._date_line = state.date_line

    def encoded(self, request: Request) -> bytes:
        """The complete response bytes for ``request`` (keep-alive 1.1 / 1.0 / close; HEAD)."""
        if self._state.date_line is not self._date_line:
            self._rebuild()
        index = (1 if request.http_version == "1.0" else 0) if request.keep_alive else 2
        if request.head_only:
            index += 3
        return self._variants[index]

    def on_body(self, data: bytes) -> None:
        pass

    def respond(self, request: Request, conn: HttpConnection) -> None:
        conn.send_raw(self.encoded(request), request.keep_alive)


# Body framing of the response in progress.
_NO_BODY: Final = 0  # HEAD, 1xx/204/304
_LENGTH: Final = 1  # Content-Length
_CHUNKED: Final = 2  # Transfer-Encoding: chunked
_UNTIL_CLOSE: Final = 3  # HTTP/1.0 peer, length unknown: closing the connection ends the body


class HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 server connection: parser callbacks in, ordered responses out.

    The public methods below are the response API handlers use; each acts on the request whose
    turn it is.
    """

    __slots__ = (
        "_active",
        "_app",
        "_closing",
        "_current",
        "_error_status",
        "_handler",
        "_head_size",
        "_headers",
        "_idle_timer",
        "_keep_alive",
        "_mode",
        "_no_more_requests",
        "_on_done",
        "_parser",
        "_producer",
        "_queue",
        "_read_paused",
        "_running",
        "_started",
        "_state",
        "_timer",
        "_transport",
        "_url",
        "_write_paused",
    )

    _transport: asyncio.Transport  # bound in connection_made, before any other callback

    def __init__(self, state: ServerState, app: App) -> None:
        # Global state
        self._state = state
        self._app = app
        # Per-connection state
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[Request] = deque()  # complete requests waiting for their turn
        self._active: Request | None = None  # the request whose response is being written
        self._running = False  # inside _run_queue (finishing a response must not recurse)
        self._closing = False
        self._read_paused = False
        self._write_paused = False
        self._no_more_requests = False  # after a parse error or an upgrade request
        self._error_status = 0  # answered once every earlier request is answered
        self._idle_timer: asyncio.TimerHandle | None = None
        # Per-request state (the request being parsed)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._current: Request | None = None
        self._handler: Handler = DISCARD
        # Per-response state (the active request)
        self._started = False
        self._mode = _NO_BODY
        self._keep_alive = True
        self._timer: asyncio.TimerHandle | None = None
        self._producer: Producer | None = None
        self._on_done: Callable[[], None] = self.end

    # -- transport callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Register with the worker and start the idle timer, if any."""
        self._transport = cast(asyncio.Transport, transport)
        state = self._state
        state.connections.add(self)
        state.connections_accepted += 1
        if state.draining:
            self._close()
        else:
            self._arm_idle_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop queued work and timers; a pending response is abandoned."""
        self._closing = True
        self._queue.clear()
        self._active = None
        self._producer = None
        self._cancel_timer()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._state.forget(self)

    def data_received(self, data: bytes) -> None:
        """Parse as much as possible, then answer whatever is complete."""
        if self._closing or self._no_more_requests:
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # We never switch protocols: answer the request, then close (what follows is not HTTP/1).
            if self._queue:
                self._queue[-1].keep_alive = False
            self._stop_reading()
        except httptools.HttpParserError:
            self._error_status = self._error_status or 400
            self._stop_reading()
        self._run_queue()

    def pause_writing(self) -> None:
        """The transport buffer went above its high-water mark: stop producing and reading."""
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        """The transport buffer drained below its low-water mark: continue a paused stream."""
        self._write_paused = False
        self._update_reading()
        if self._producer is not None and self._timer is None:
            self._guarded(self._pump)

    # -- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > MAX_HEAD_SIZE:
            self._error_status = 431
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD_SIZE:
            self._error_status = 431
            raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        parser = self._parser
        method = parser.get_method()
        request = Request(
            method,
            self._url,
            self._headers,
            parser.get_http_version(),
            parser.should_keep_alive() and not self._state.draining,
        )
        if method != b"GET" and method != b"HEAD" and self._active is None and not self._queue:
            expect = request.header(b"expect")
            if expect is not None and expect.lower() == b"100-continue" and request.http_version == "1.1":
                self._transport.write(_CONTINUE)
        try:
            handler = self._app.dispatch(request)
        except Exception:
            log.exception("dispatch failed for %r", request.target)
            self._error_status = 500
            raise
        request.handler = handler
        self._handler = handler
        self._current = request

    def on_body(self, body: bytes) -> None:
        self._handler.on_body(body)

    def on_message_complete(self) -> None:
        request = self._current
        if request is None:
            return
        self._current = None
        self._handler = DISCARD
        self._state.requests += 1
        self._queue.append(request)
        if len(self._queue) >= MAX_PIPELINE:
            self._update_reading()

    # -- response API --------------------------------------------------------------------------

    def send_raw(self, data: bytes, keep_alive: bool) -> None:
        """Write a complete pre-encoded response (head and body) in one write and finish it."""
        self._transport.write(data)
        self._finish(keep_alive)

    def send(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: bytes = JSON,
        headers: Headers = (),
        close: bool = False,
    ) -> None:
        """Write a complete response in one write: Content-Length framing, no body for HEAD.

        1xx, 204 and 304 get neither body nor Content-Length; a 1xx also closes the connection,
        since an informational response cannot end an exchange.
        """
        request = self._require_active()
        keep_alive = request.keep_alive and not close and status >= 200
        if has_body(status):
            framing = b"Content-Length: %d\r\n" % len(body)
        else:
            framing = b""
            body = b""
        parts = encode_head(self._state, status, content_type, headers, framing, connection_line(request, keep_alive))
        if body and not request.head_only:
            parts.append(body)
        self._transport.write(b"".join(parts))
        self._finish(keep_alive)

    def send_json(self, status: int, obj: object, *, headers: Headers = (), close: bool = False) -> None:
        """``send`` with an orjson-encoded body."""
        self.send(status, orjson.dumps(obj), headers=headers, close=close)

    def start(
        self,
        status: int,
        *,
        content_type: bytes = OCTET_STREAM,
        headers: Headers = (),
        content_length: int | None = None,
        chunked: bool = False,
        close: bool = False,
    ) -> None:
        """Write a response head; the body follows with ``write``/``stream``, then ``end``.

        ``chunked`` asks for Transfer-Encoding: chunked. HTTP/1.0 peers cannot take it and get
        Content-Length when ``content_length`` is known, else a body ended by closing.
        """
        request = self._require_active()
        keep_alive = request.keep_alive and not close and status >= 200
        if not has_body(status):
            mode, framing = _NO_BODY, b""
        elif chunked and request.http_version != "1.0":
            mode, framing = _CHUNKED, b"Transfer-Encoding: chunked\r\n"
        elif content_length is not None:
            mode, framing = _LENGTH, b"Content-Length: %d\r\n" % content_length
        else:
            mode, framing, keep_alive = _UNTIL_CLOSE, b"", False
        self._mode = _NO_BODY if request.head_only else mode
        self._keep_alive = keep_alive
        self._started = True
        head = encode_head(self._state, status, content_type, headers, framing, connection_line(request, keep_alive))
        self._transport.write(b"".join(head))

    def write(self, data: BodyPiece) -> None:
        """Write one piece of the body (one chunk when chunked; dropped for HEAD)."""
        mode = self._mode
        if mode == _NO_BODY or not data or self._transport.is_closing():
            return
        if mode == _CHUNKED:
            self._transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self._transport.write(data)

    def end(self) -> None:
        """Finish the response begun with ``start``."""
        if self._mode == _CHUNKED and not self._transport.is_closing():
            self._transport.write(b"0\r\n\r\n")
        self._finish(self._keep_alive)

    def stream(self, producer: Producer, on_done: Callable[[], None] | None = None) -> None:
        """Write the body from ``producer`` while the transport is writable, then ``on_done()``.

        ``on_done`` defaults to ``end``. A ``Sleep`` item waits before the next pull; any
        ``pause_writing`` stops pulling until ``resume_writing``. HEAD pulls nothing.
        """
        self._on_done = on_done or self.end
        if self._mode == _NO_BODY:
            self._on_done()
            return
        self._producer = producer
        self._pump()

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` after ``delay`` seconds, unless the connection is lost first.

        One timer per connection: it belongs to the response in progress.
        """
        self._cancel_timer()
        self._timer = self._state.loop.call_later(delay, self._fire, callback)

    def abort(self, *, flush: bool = False) -> None:
        """Drop the connection without finishing the response.

        With ``flush``, first wait until what was written has left our transport buffer, so the
        peer receives it and then sees the connection end.
        """
        if flush and not self._closing and self._transport.get_write_buffer_size():
            self.call_later(0.005, self._abort_flushed)
            return
        self._closing = True
        self._producer = None
        self._active = None
        self._cancel_timer()
        self._transport.abort()

    def shutdown(self) -> None:
        """Worker drain: close now if idle, else close once the response in progress is done."""
        if self._closing:
            return
        if self._active is None and not self._queue and self._current is None:
            self._close()
            return
        for request in self._queue:
            request.keep_alive = False
        for pending in (self._active, self._current):
            if pending is not None:
                pending.keep_alive = False

    @property
    def server(self) -> ServerState:
        """The per-worker state."""
        return self._state

    # -- internals -----------------------------------------------------------------------------

    def _require_active(self) -> Request:
        request = self._active
        if request is None:
            raise RuntimeError("no response in progress on this connection")
        return request

    def _run_queue(self) -> None:
        if self._running:
            return
        self._running = True
        try:
            queue = self._queue
            while self._active is None and not self._closing:
                if queue:
                    request = queue.popleft()
                    self._active = request
                    self._started = False
                    self._mode = _NO_BODY
                    try:
                        request.handler.respond(request, self)
                    except Exception as exc:
                        self._handler_failed(request, exc)
                elif self._error_status:
                    self._send_error(self._error_status)
                else:
                    break
        finally:
            self._running = False
        if self._read_paused:
            self._update_reading()
        if self._state.keep_alive_timeout:
            self._arm_idle_timer()

    def _finish(self, keep_alive: bool) -> None:
        self._active = None
        self._producer = None
        self._cancel_timer()
        if not keep_alive or self._state.draining:
            self._close()
        elif not self._running:
            self._run_queue()

    def _pump(self) -> None:
        transport = self._transport
        while self._producer is not None and not self._write_paused and not transport.is_closing():
            item = next(self._producer, None)
            if item is None:
                self._producer = None
                self._on_done()
                return
            if isinstance(item, Sleep):
                self._timer = self._state.loop.call_later(item.seconds, self._fire, self._pump)
                return
            self.write(item)

    def _fire(self, callback: Callable[[], None]) -> None:
        self._timer = None
        if not self._closing:
            self._guarded(callback)

    def _guarded(self, fn: Callable[[], None]) -> None:
        """Run handler code outside ``respond`` (timers, resumed streams) with failure handling."""
        request = self._active
        try:
            fn()
        except Exception as exc:
            self._handler_failed(request, exc)

    def _handler_failed(self, request: Request | None, exc: Exception) -> None:
        """A 4xx/500 answer when the handler wrote nothing yet, else drop the connection."""
        unanswered = request is not None and self._active is request and not self._started
        if isinstance(exc, HttpError):
            if unanswered:
                self.send_json(exc.status, {"error": exc.message})
            else:
                self.abort()
            return
        log.error("handler failed", exc_info=exc)
        if unanswered:
            self.send_json(500, {"error": "internal error"}, close=True)
        elif not self._closing:
            self.abort()

    def _abort_flushed(self) -> None:
        self.abort(flush=True)

    def _send_error(self, status: int) -> None:
        body = orjson.dumps({"error": _REASONS.get(status, b"error").decode().lower()})
        head = encode_head(self._state, status, JSON, (), b"Content-Length: %d\r\n" % len(body), _CLOSE_LINE)
        head.append(body)
        self._transport.write(b"".join(head))
        self._close()

    def _close(self) -> None:
        self._closing = True
        self._transport.close()

    def _stop_reading(self) -> None:
        self._no_more_requests = True
        self._update_reading()

    def _update_reading(self) -> None:
        pause = self._write_paused or self._no_more_requests or len(self._queue) >= MAX_PIPELINE
        if pause != self._read_paused and not self._transport.is_closing():
            self._read_paused = pause
            if pause:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()

    def _arm_idle_timer(self) -> None:
        timeout = self._state.keep_alive_timeout
        if (
            timeout > 0
            and self._idle_timer is None
            and self._active is None
            and self._current is None
            and not self._queue
            and not self._closing
        ):
            self._idle_timer = self._state.loop.call_later(timeout, self._close)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
