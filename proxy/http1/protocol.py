"""HTTP/1.1 downstream: httptools callbacks -> `Exchange` -> gateway; upstream response -> client.

Theory of operation: the parser is fed every read. A complete request head becomes an `Exchange`;
the first one in flight is `active` and is handed to the gateway at once, later ones (pipelining)
wait in `queue` with reading paused, and are dispatched in order as responses finish, so
responses leave in request order. `reading` is the exchange whose body the parser is reading:
pieces go to its upstream connection, or are buffered (bounded, reading paused) until one is
attached. The upstream client calls the `Downstream` methods; response bytes are queued in `out`
and written once per upstream read. Deadlines (head, body, idle, send, and the active exchange's
upstream phase) are checked by `check`, called from the worker tick. Any framing error answers
400 (or the error's own status) and closes: the connection cannot be trusted after it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

import httptools

from proxy.errors import (
    BadRequest,
    ExpectationFailed,
    GatewayTimeout,
    HeadersTooLarge,
    NotImplementedByProxy,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    ServiceUnavailable,
    VersionNotSupported,
)
from proxy.exchange import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    PHASE_CONNECTING,
    PHASE_DONE,
    PHASE_ROUTING,
    PHASE_WAIT_CONNECTION,
    PHASE_WAIT_RESPONSE,
    BodyKind,
    Exchange,
)
from proxy.http1.framing import (
    LAST_CHUNK,
    chunk,
    connection_tokens,
    error_response,
    valid_request_id,
)

if TYPE_CHECKING:
    from proxy.server import WorkerState

# Request headers the proxy handles itself instead of forwarding as they are.
_HOST: Final = 1
_LENGTH: Final = 2
_TE: Final = 3
_CONNECTION: Final = 4
_HOP: Final = 5
_EXPECT: Final = 6
_XFF: Final = 7
_DROP: Final = 8
_REQUEST_ID: Final = 9
_UPGRADE: Final = 10
_BASE_SPECIAL: Final = {
    b"host": _HOST,
    b"content-length": _LENGTH,
    b"transfer-encoding": _TE,
    b"connection": _CONNECTION,
    b"keep-alive": _HOP,
    b"proxy-connection": _HOP,
    b"te": _HOP,
    b"trailer": _HOP,
    b"upgrade": _UPGRADE,
    b"proxy-authorization": _HOP,
    b"expect": _EXPECT,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _DROP,
    b"x-forwarded-host": _DROP,
}

# Why reading is paused (a bit each); reading resumes when none is left.
_PAUSE_PIPELINE: Final = 1
_PAUSE_BODY_BUFFER: Final = 2
_PAUSE_UPSTREAM: Final = 4
_PAUSE_CLIENT_BEHIND: Final = 8  # the client does not read our answers: read no new requests from it

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_CHUNKED_LINE: Final = b"\r\ntransfer-encoding: chunked"
_CLOSE_LINE: Final = b"\r\nconnection: close"
_KEEP_ALIVE_LINE: Final = b"\r\nconnection: keep-alive"
_NEVER: Final = float("inf")


class Http1Settings:
    """Per-worker constants derived from the config once, shared by all HTTP/1 connections."""

    __slots__ = (
        "body_timeout",
        "dispatch",
        "drain_idle_grace",
        "header_timeout",
        "keepalive_timeout",
        "lingering_timeout",
        "max_body",
        "max_header_bytes",
        "max_header_count",
        "max_pipelined",
        "request_id_line",
        "send_timeout",
        "special",
        "static_lines",
        "via_line",
        "write_limit",
    )

    def __init__(self, state: WorkerState) -> None:
        assert state.gateway is not None, "the gateway is built before the protocols"
        self.dispatch: Callable[[Exchange], None] = state.gateway.handle  # bound once: no lookup per request
        s = state.config.server
        self.max_header_bytes = s.max_header_bytes
        self.max_header_count = s.max_header_count
        self.max_body = s.max_body_bytes
        self.max_pipelined = s.max_pipelined
        self.header_timeout = s.header_timeout
        self.keepalive_timeout = s.keepalive_timeout
        self.body_timeout = s.body_timeout
        self.send_timeout = s.send_timeout
        self.drain_idle_grace = s.drain_idle_grace
        self.lingering_timeout = s.lingering_timeout
        self.write_limit = s.write_buffer_limit
        rid = s.request_id_header.encode()
        self.special = dict(_BASE_SPECIAL)
        self.special[rid] = _REQUEST_ID
        self.request_id_line = b"%s: " % rid
        self.via_line = b"\r\nvia: %s" % s.via.encode() if s.via else b""
        self.static_lines = b"x-forwarded-proto: http\r\n" + (b"via: %s\r\n" % s.via.encode() if s.via else b"")


class HttpProtocol(asyncio.Protocol):
    """One downstream HTTP/1.x connection."""

    __slots__ = (
        "active",
        "body_deadline",
        "body_received",
        "chunk_idle",
        "client_ip",
        "closing",
        "deferred_error",
        "feed",
        "h_connection",
        "h_expect",
        "h_host",
        "h_length",
        "h_request_id",
        "h_te",
        "h_upgrade",
        "h_xff",
        "head_deadline",
        "head_raw",
        "header_bytes",
        "headers",
        "http11",
        "idle_since",
        "in_head",
        "keeps_alive",
        "linger_deadline",
        "method_of",
        "n_headers",
        "out",
        "parse_failed",
        "parser",
        "paused_since",
        "queue",
        "read_paused",
        "reading",
        "requests",
        "resp_chunked",
        "resp_keep_alive",
        "settings",
        "state",
        "trailer_raw",
        "transport",
        "url",
        "write",
        "write_paused",
        "xff_line",
    )

    def __init__(self, state: WorkerState, settings: Http1Settings) -> None:
        # Global state
        self.state = state
        self.settings = settings
        # Per-connection state
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        # Bound methods kept: a call through them skips the method lookup on every request.
        self.feed: Callable[[bytes], None] = self.parser.feed_data
        self.keeps_alive: Callable[[], bool] = self.parser.should_keep_alive
        self.method_of: Callable[[], bytes] = self.parser.get_method
        self.write: Callable[[bytes], None] = _not_connected
        self.client_ip = b""
        self.xff_line = b""
        self.out: list[bytes] = []
        self.active: Exchange | None = None  # the exchange being answered
        self.queue: deque[Exchange] = deque()  # pipelined exchanges waiting for `active`
        self.reading: Exchange | None = None  # the exchange whose body is being parsed
        self.read_paused = 0
        self.write_paused = False
        self.paused_since = 0.0
        self.closing = False
        self.linger_deadline = 0.0
        self.deferred_error: ProxyError | None = None  # answered after the exchanges parsed before it
        self.parse_failed = False
        self.requests = 0
        self.idle_since = state.now
        self.in_head = False
        self.head_raw = 0
        self.head_deadline = 0.0
        self.body_deadline = _NEVER
        self.body_received = 0
        self.chunk_idle = False  # inside a chunk header that no data followed yet (the last chunk's trailers)
        self.trailer_raw = 0
        self.resp_chunked = False
        self.resp_keep_alive = True
        # Per-request state (reset in on_message_begin)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.n_headers = 0
        self.header_bytes = 0
        self.http11 = True
        self.h_host: bytes | None = None
        self.h_length: bytes | None = None
        self.h_te: bytes | None = None
        self.h_connection: bytes | None = None
        self.h_expect: bytes | None = None
        self.h_xff: bytes | None = None
        self.h_request_id: bytes | None = None
        self.h_upgrade = False

    # ------------------------------------------------------------------ transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Accepted: remember the peer, set buffer limits, start the header clock."""
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=self.settings.write_limit)
        self.write = self.transport.write
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]).encode() if peer else b"unknown"
        self.xff_line = b"x-forwarded-for: %s\r\n" % self.client_ip
        self.idle_since = self.state.now
        self.state.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closing or self.parse_failed:
            return  # lingering close, or the stream is beyond repair: discard
        if self.in_head:
            self.head_raw += len(data)
        was_idle = self.chunk_idle
        while True:
            try:
                self.feed(data)
            except httptools.HttpParserCallbackError as exc:
                error = exc.__context__
                if isinstance(error, _StopParsing):
                    return
                if not isinstance(error, ProxyError):
                    raise
                self._protocol_error(error)
                return
            except httptools.HttpParserUpgrade as exc:
                # An Upgrade request (without a body: see on_headers_complete) was answered as plain
                # HTTP, Upgrade being hop-by-hop; what follows it is the next request.
                offset = int(exc.args[0])
                if offset >= len(data) or self.closing or self.parse_failed:
                    return
                data = data[offset:]
                continue
            except httptools.HttpParserError as exc:
                self._protocol_error(BadRequest(str(exc) or "malformed_request"))
                return
            break
        if self.in_head and self.head_raw > self.settings.max_header_bytes:
            self._protocol_error(HeadersTooLarge())
        elif was_idle and self.chunk_idle:
            # A whole read after a chunk header without any chunk data: that was the last chunk and these
            # are trailer fields, which httptools accumulates itself. Bound them like a head.
            self.trailer_raw += len(data)
            if self.trailer_raw > self.settings.max_header_bytes:
                self._protocol_error(HeadersTooLarge("trailers_too_large"))

    def eof_received(self) -> bool | None:
        """Client half-closed: finish what is in flight, then close (returning True keeps our side open)."""
        if self.active is None and not self.queue:
            return None
        self.resp_keep_alive = False
        for exchange in self.queue:
            exchange.keep_alive = False
        if self.active is not None:
            self.active.keep_alive = False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        """Gone: give up the exchange in flight, whatever phase it is in."""
        self.closing = True
        self.state.connections.discard(self)
        exchange = self.active
        self.active = None
        self.queue.clear()
        if exchange is not None:
            self._abandon_upstream(exchange)
            if self.state.access_log is not None:
                exchange.status = exchange.status or 499  # nginx's "client closed request"
                self._log(exchange)

    def pause_writing(self) -> None:
        """Client is slow: stop reading the upstream response until it catches up, and (between request
        bodies) stop reading its next requests: answers the proxy makes itself must not pile up either."""
        self.write_paused = True
        self.paused_since = self.state.now
        if self.reading is None:
            self._pause(_PAUSE_CLIENT_BEHIND)
        exchange = self.active
        if exchange is not None and exchange.upstream is not None and exchange.phase == PHASE_WAIT_RESPONSE:
            exchange.upstream.pause_response()

    def resume_writing(self) -> None:
        """Client caught up: read the upstream response (and its requests) again."""
        self.write_paused = False
        self._resume(_PAUSE_CLIENT_BEHIND)
        exchange = self.active
        if exchange is not None and exchange.upstream is not None and exchange.phase == PHASE_WAIT_RESPONSE:
            exchange.upstream.resume_response()

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        if self.closing or self.parse_failed:
            raise _StopParsing()  # answered and closing: nothing after this is read
        self.in_head = True
        self.head_raw = 0
        self.head_deadline = self.state.now + self.settings.header_timeout
        self.url = b""
        self.headers = []
        self.n_headers = 0
        self.header_bytes = 0
        self.h_host = self.h_length = self.h_te = self.h_connection = None
        self.h_expect = self.h_xff = self.h_request_id = None
        self.h_upgrade = False

    def on_url(self, url: bytes) -> None:
        self.url = self.url + url if self.url else url
        if len(self.url) > self.settings.max_header_bytes:
            raise HeadersTooLarge("uri_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # a chunked body's trailer fields: never forwarded, never taken for headers
        self.header_bytes += len(name) + len(value) + 4
        self.n_headers += 1
        if self.n_headers > self.settings.max_header_count or self.header_bytes > self.settings.max_header_bytes:
            raise HeadersTooLarge()
        kind = self.settings.special.get(name.lower())
        if kind is None:
            self.headers.append((name, value))
        elif kind == _HOST:
            if self.h_host is not None:
                raise BadRequest("duplicate_host")
            self.h_host = value
        elif kind == _LENGTH:
            self.h_length = value
        elif kind == _TE:
            self.h_te = value if self.h_te is None else self.h_te + b", " + value
        elif kind == _CONNECTION:
            self.h_connection = value if self.h_connection is None else self.h_connection + b"," + value
        elif kind == _XFF:
            self.h_xff = value if self.h_xff is None else self.h_xff + b", " + value
        elif kind == _REQUEST_ID:
            if self.h_request_id is None:
                self.h_request_id = value
        elif kind == _EXPECT:
            self.h_expect = value
        elif kind == _UPGRADE:
            self.h_upgrade = True
        # _HOP and _DROP: not forwarded

    def on_headers_complete(self) -> None:
        self.in_head = False
        settings = self.settings
        state = self.state
        keep_alive = self.keeps_alive()
        if self.requests == 0 or not keep_alive or self.h_connection is not None:
            version = self.parser.get_http_version()  # (formats a str: skipped for the usual 1.1 keep-alive request)
            http11 = version == "1.1"
            if not http11 and version != "1.0":
                raise VersionNotSupported()
            self.http11 = http11
        else:
            http11 = self.http11  # 1.1 keep-alive without a Connection header: same as before on this connection
        method = self.method_of()
        if method == b"CONNECT":
            raise NotImplementedByProxy("connect_not_supported")
        # Framing: llhttp already rejected CL+TE, duplicate or malformed Content-Length and bad TE lists.
        length = -1
        if self.h_te is not None:
            if not http11:
                raise BadRequest("transfer_encoding_in_http10")
            codings = self.h_te.lower()
            if codings.rsplit(b",", 1)[-1].strip() != b"chunked":
                raise BadRequest("invalid_transfer_encoding")  # the body length cannot be known
            if codings.strip() != b"chunked":
                raise NotImplementedByProxy("unsupported_transfer_encoding")
            kind = BODY_CHUNKED
        elif self.h_length is not None:
            length = int(self.h_length)
            if length > settings.max_body:
                raise PayloadTooLarge()
            kind = BODY_LENGTH if length else BODY_NONE
        else:
            kind = BODY_NONE
        if self.h_upgrade and kind != BODY_NONE:
            # llhttp would take the body for the upgraded protocol's bytes; we never upgrade.
            raise BadRequest("upgrade_with_body")
        target = self.url
        host = self.h_host
        if target[:1] != b"/":
            target, host = _non_origin_target(method, target, host)
        # `find`, not `in`: bytes.__contains__ first tries the operand as an int and clears a TypeError.
        if target.find(b"/.") >= 0 or target.find(b"%2") >= 0:
            _check_dot_segments(target)
        if host is None:
            if http11:
                raise BadRequest("missing_host")
            host = b""
        headers = self.headers
        if self.h_connection is not None:
            nominated = connection_tokens(self.h_connection) - {b"close", b"keep-alive"}
            if nominated:
                headers = [h for h in headers if h[0].lower() not in nominated]
        rid = self.h_request_id
        if rid is None or not valid_request_id(rid):
            rid = state.next_request_id()
        xff = self.xff_line if self.h_xff is None else b"x-forwarded-for: %s, %s\r\n" % (self.h_xff, self.client_ip)
        forward = b"".join(
            (xff, settings.static_lines, b"x-forwarded-host: ", host, b"\r\n", settings.request_id_line, rid, b"\r\n")
        )
        exchange = Exchange(self, method, target, host, headers, rid, forward, kind, length)
        exchange.keep_alive = keep_alive
        if state.access_log is not None:
            exchange.started = state.loop.time()
        if self.h_expect is not None:
            if self.h_expect.strip().lower() != b"100-continue":
                raise ExpectationFailed()
            exchange.expect_continue = http11 and kind != BODY_NONE
        self.requests += 1
        if kind != BODY_NONE:
            self.reading = exchange
            self.body_received = 0
            self.body_deadline = state.now + settings.body_timeout
        if self.active is None:
            self.active = exchange
            settings.dispatch(exchange)
        else:
            self.queue.append(exchange)
            self._pause(_PAUSE_PIPELINE)
            if len(self.queue) > settings.max_pipelined:
                raise BadRequest("too_many_pipelined_requests")

    def on_body(self, body: bytes) -> None:
        exchange = self.reading
        if exchange is None:
            return
        self.chunk_idle = False
        self.body_received += len(body)
        if self.body_received > self.settings.max_body:
            raise PayloadTooLarge()
        self.body_deadline = self.state.now + self.settings.body_timeout
        phase = exchange.phase
        if phase == PHASE_WAIT_RESPONSE:
            exchange.upstream.send_body(body)  # type: ignore[union-attr]
        elif phase != PHASE_DONE:
            if exchange.pending_body is None:
                exchange.pending_body = [body]
            else:
                exchange.pending_body.append(body)
            exchange.pending_bytes += len(body)
            if exchange.pending_bytes > self.settings.write_limit:
                self._pause(_PAUSE_BODY_BUFFER)
        # DONE: answered early (error, or upstream finished first): the body is read and discarded.

    def on_chunk_header(self) -> None:
        self.chunk_idle = True
        self.trailer_raw = 0

    def on_chunk_complete(self) -> None:
        self.chunk_idle = False

    def on_message_complete(self) -> None:
        self.chunk_idle = False
        exchange = self.reading
        if exchange is None:
            return
        self.reading = None
        if self.write_paused:
            self._pause(_PAUSE_CLIENT_BEHIND)  # the client fell behind during the body: no new requests now
        self.body_deadline = _NEVER
        exchange.body_done = True
        if exchange.phase == PHASE_WAIT_RESPONSE:
            exchange.upstream.end_body()  # type: ignore[union-attr]

    # ------------------------------------------------------------------ Downstream (called by upstream)

    def upstream_ready(self, exchange: Exchange) -> None:
        self._resume(_PAUSE_BODY_BUFFER)  # an upstream write may pause reading again right after
        if exchange.expect_continue and not exchange.body_done and self.transport is not None:
            exchange.expect_continue = False
            self.transport.write(_CONTINUE)

    def pause_reading(self) -> None:
        self._pause(_PAUSE_UPSTREAM)

    def resume_reading(self) -> None:
        self._resume(_PAUSE_UPSTREAM)

    def response_head(self, exchange: Exchange, status: int, head: bytes, body: BodyKind) -> None:
        self.out.append(self._head(exchange, status, head, body))

    def response_complete(self, exchange: Exchange, status: int, head: bytes, body: bytes, kind: BodyKind) -> None:
        if kind in (BODY_CHUNKED, BODY_UNTIL_CLOSE):
            head = b"%s\r\ncontent-length: %d" % (head, len(body))  # the whole body is here: no chunking needed
            kind = BODY_LENGTH
        if self.transport is not None:
            self.write(b"".join((self._head(exchange, status, head, kind), body)))
        if exchange is self.active:
            self._finish_response(exchange, self.resp_keep_alive)

    def _head(self, exchange: Exchange, status: int, head: bytes, body: BodyKind) -> bytes:
        """The response head for the client: the cleaned upstream head plus the proxy's own lines."""
        exchange.response_started = True
        exchange.status = status
        keep = exchange.keep_alive and not self.state.draining and not self.closing
        chunked = False
        if body in (BODY_CHUNKED, BODY_UNTIL_CLOSE):
            if self.http11:
                chunked = True
            else:
                keep = False  # HTTP/1.0 client: the end of the body is the end of the connection
        self.resp_chunked = chunked
        self.resp_keep_alive = keep
        settings = self.settings
        return b"".join(
            (
                head,
                b"\r\n",
                settings.request_id_line,
                exchange.request_id,
                settings.via_line,
                _CHUNKED_LINE if chunked else b"",
                _CLOSE_LINE if not keep else (b"" if self.http11 else _KEEP_ALIVE_LINE),
                b"\r\n\r\n",
            )
        )

    def response_body(self, data: bytes) -> None:
        self.out.append(chunk(data) if self.resp_chunked else data)

    def response_end(self) -> None:
        if self.resp_chunked:
            self.out.append(LAST_CHUNK)

    def response_flush(self) -> None:
        out = self.out
        if out and self.transport is not None:
            self.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def exchange_upstream_done(self, exchange: Exchange) -> None:
        if exchange is self.active:
            self._finish_response(exchange, self.resp_keep_alive)

    def response_failed(self, exchange: Exchange, error: ProxyError) -> None:
        if exchange is not self.active or (exchange.phase == PHASE_DONE and exchange.response_started):
            return
        self._abandon_upstream(exchange, timed_out=isinstance(error, GatewayTimeout))
        exchange.phase = PHASE_DONE
        if exchange.response_started or self.transport is None or self.closing:
            self.abort()  # a response is half-sent: the client must see the failure
            return
        keep = exchange.keep_alive and not error.close and not self.state.draining
        if exchange.expect_continue and not exchange.body_done:
            keep = False  # the client may never send the body it was waiting to be asked for
        self.out.clear()
        exchange.status = error.status
        extra = b"" if self.http11 or not keep else _KEEP_ALIVE_LINE
        self.transport.write(
            error_response(error.status, error.detail, exchange.request_id, close=not keep, extra=extra)
        )
        self._finish_response(exchange, keep)

    # ------------------------------------------------------------------ pipeline

    def _finish_response(self, exchange: Exchange, keep: bool) -> None:
        self.active = None
        exchange.phase = PHASE_DONE
        if exchange.pending_body:
            exchange.pending_body = None
            exchange.pending_bytes = 0
        if self.state.access_log is not None:
            self._log(exchange)
        if not keep or self.closing:
            self._close()
            return
        self.idle_since = self.state.now
        if self.read_paused:
            # Pauses taken for this exchange's body end with it (a remaining body is read and discarded).
            self._resume(_PAUSE_BODY_BUFFER | _PAUSE_UPSTREAM)
        if self.queue:
            nxt = self.queue.popleft()
            self.active = nxt
            if not self.queue:
                self._resume(_PAUSE_PIPELINE)
            self.settings.dispatch(nxt)
        elif self.deferred_error is not None:
            self._answer_and_close(self.deferred_error)
        elif self.read_paused:
            self._resume(_PAUSE_PIPELINE)

    def _log(self, exchange: Exchange) -> None:
        assert self.state.access_log is not None
        self.state.access_log.record(
            method=exchange.method,
            target=exchange.target,
            status=exchange.status,
            duration=self.state.loop.time() - exchange.started,
            request_id=exchange.request_id,
            client=self.client_ip,
            upstream=str(exchange.server or ""),
            protocol="HTTP/1.1" if self.http11 else "HTTP/1.0",
        )

    def _abandon_upstream(self, exchange: Exchange, timed_out: bool = False) -> None:
        """Detach `exchange` from whatever upstream resource it holds or waits for."""
        phase = exchange.phase
        upstream = exchange.upstream
        if phase == PHASE_WAIT_CONNECTION:
            if exchange.waiting_on is not None:
                exchange.waiting_on.cancel_waiter(exchange)
            exchange.phase = PHASE_DONE
        elif phase == PHASE_CONNECTING:
            exchange.phase = PHASE_DONE
            if upstream is not None:
                upstream.cancel_connect(timed_out)
        elif phase == PHASE_WAIT_RESPONSE and upstream is not None:
            upstream.abort_exchange()
        exchange.upstream = None

    # ------------------------------------------------------------------ errors, timeouts, closing

    def _protocol_error(self, error: ProxyError) -> None:
        """The request stream is broken: stop parsing; answer what came before it, then the error; close.

        Exchanges parsed before the broken request are valid and keep their place in line; the error
        answer follows the last of them. If the broken part is the body of the exchange being
        answered, that exchange is failed (or aborted, if its response already started).
        """
        if self.closing:
            return  # already answered and closing: lingering reads and discards whatever comes
        self.parse_failed = True
        self.in_head = False
        self._pause(_PAUSE_PIPELINE)
        reading = self.reading
        self.reading = None
        active = self.active
        if reading is not None and reading in self.queue:
            self.queue.remove(reading)  # its body is broken: never dispatched
        if active is None:
            self._answer_and_close(error)
        elif reading is active:
            active.keep_alive = False
            self.response_failed(active, error)
        else:
            self.deferred_error = error

    def _answer_and_close(self, error: ProxyError) -> None:
        if self.transport is None or self.transport.is_closing() or self.closing:
            return
        self.out.clear()
        self.transport.write(error_response(error.status, error.detail, self.state.next_request_id(), close=True))
        self._close()

    def _close(self) -> None:
        """Close after what is written; linger (reading and discarding) so the client sees our answer."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.closing = True
        self.active = None
        self.queue.clear()
        self.reading = None
        self._resume(_PAUSE_PIPELINE | _PAUSE_BODY_BUFFER | _PAUSE_UPSTREAM | _PAUSE_CLIENT_BEHIND)
        self.linger_deadline = self.state.now + self.settings.lingering_timeout
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def check(self, now: float) -> None:
        """Enforce deadlines; called by the worker tick.

        Stamps and deadlines are taken from the coarse clock (`state.now`, up to one tick old), so
        they are compared with `now` less one tick: a timeout never fires early, at most a tick late.
        """
        now -= self.state.tick_interval
        transport = self.transport
        if transport is None:
            return
        if self.closing:
            if now > self.linger_deadline:
                transport.abort()  # lingered long enough, or the client never reads what is left
            return
        settings = self.settings
        if self.write_paused and now - self.paused_since > settings.send_timeout:
            self.abort()  # the client reads nothing of what we send
            return
        # While the proxy itself holds reading paused, the client cannot be late with its bytes.
        if not self.read_paused and not self.parse_failed:
            if self.in_head and now > self.head_deadline:
                self._protocol_error(RequestTimeout("header_timeout"))
                return
            if self.reading is not None and now > self.body_deadline:
                self._protocol_error(RequestTimeout("body_timeout"))
                return
        exchange = self.active
        if exchange is not None:
            if now > exchange.deadline and exchange.phase != PHASE_DONE and exchange.phase != PHASE_ROUTING:
                self._upstream_timeout(exchange)
        elif not self.in_head and not self.queue:
            if self.state.draining:
                limit = settings.drain_idle_grace
            elif self.requests:
                limit = settings.keepalive_timeout
            else:
                limit = settings.header_timeout
            if now - self.idle_since > limit:
                if transport.get_write_buffer_size():
                    transport.abort()  # idle, yet the client left our last bytes unread
                else:
                    transport.close()

    def _upstream_timeout(self, exchange: Exchange) -> None:
        phase = exchange.phase
        if phase == PHASE_WAIT_CONNECTION:
            error: ProxyError = ServiceUnavailable("upstream_pending_timeout")
        elif phase == PHASE_CONNECTING:
            error = GatewayTimeout("upstream_connect_timeout")
        else:
            error = GatewayTimeout("upstream_response_timeout")
        self.response_failed(exchange, error)

    # ------------------------------------------------------------------ read pausing

    def _pause(self, reason: int) -> None:
        if not self.read_paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self.read_paused |= reason

    def _resume(self, reasons: int) -> None:
        if not self.read_paused:
            return
        self.read_paused &= ~reasons
        if not self.read_paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
            # The client's clocks restart now: it could not send while we were not reading.
            now = self.state.now
            if self.in_head:
                self.head_deadline = now + self.settings.header_timeout
            if self.reading is not None:
                self.body_deadline = now + self.settings.body_timeout

    def __repr__(self) -> str:
        return f"<HttpProtocol {self.client_ip.decode()} requests={self.requests} active={self.active}>"


def _not_connected(data: bytes) -> None:
    raise RuntimeError("write before connection_made")


class _StopParsing(Exception):
    """Raised from a parser callback to stop parsing bytes that will never be answered."""


def _non_origin_target(method: bytes, target: bytes, host: bytes | None) -> tuple[bytes, bytes | None]:
    """Absolute-form (`http://h/p`) -> origin-form with its authority as host; `*` kept; others rejected."""
    lower = target[:8].lower()
    if lower.startswith((b"http://", b"https://")):
        rest = target[target.index(b"//") + 2 :]
        end = len(rest)
        for stop in (b"/", b"?", b"#"):
            found = rest.find(stop)
            if 0 <= found < end:
                end = found
        authority, path = rest[:end], rest[end:]
        if not authority or b"@" in authority:
            raise BadRequest("invalid_target")
        if not path.startswith(b"/"):
            path = b"/" + path
        return path, authority
    if target == b"*" and method == b"OPTIONS":
        return target, host
    if method == b"CONNECT":
        raise NotImplementedByProxy("connect_not_supported")
    raise BadRequest("invalid_target")


_DOT_SEGMENTS: Final = frozenset({b".", b"..", b"%2e", b"%2e%2e", b".%2e", b"%2e."})


def _check_dot_segments(target: bytes) -> None:
    """Reject `.`/`..` path segments (also percent-encoded): a prefix route must mean what it says."""
    path = target.partition(b"?")[0]
    for segment in path.lower().split(b"/"):
        if segment in _DOT_SEGMENTS:
            raise BadRequest("dot_segment_in_path")
