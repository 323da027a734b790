"""HTTP/1.1 downstream: httptools callbacks -> `Exchange` -> gateway; upstream response -> client.

Theory of operation: bytes are fed to the parser; a complete request head becomes an `Exchange`
(headers sorted and forwarding lines computed by the protocol-neutral functions of forwarding.py)
appended to `queue`. Exchanges are handed to the gateway only after the parser returns (`_pump`), one
at a time: the first in line becomes `active`, and the next one goes when the active one is finished,
so responses leave in request order and nothing the parser rejects later in the same bytes ever
reaches an upstream. While exchanges wait behind the active one reading is paused; bytes already
read are parsed at most `max_pipelined` requests ahead (the rest waits unparsed in `backlog`).
`reading` is the exchange whose body the parser is reading: pieces go to its upstream connection, or
are kept on the exchange (bounded; reading pauses) until one is attached. The upstream client calls
the `Downstream` methods; response bytes are queued in `out` and written once per upstream read.
Deadlines (head, body gaps and total, idle, send) are checked by `check`, called from the worker
tick, which also asks the active exchange to enforce its own (exchange.py). Any framing error answers
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
    HeadersTooLarge,
    NotImplementedByProxy,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    VersionNotSupported,
)
from proxy.exchange import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    NEVER,
    PHASE_BUFFERING,
    PHASE_DONE,
    PHASE_QUEUED,
    BodyKind,
    Downstream,
    Exchange,
)
from proxy.forwarding import ForwardPolicy, HeadScan, upstream_headers, valid_host
from proxy.http1.framing import LAST_CHUNK, chunk, error_response, request_framing
from proxy.native import find as _find

if TYPE_CHECKING:
    from proxy.server import WorkerState

# Why reading is paused (a bit each); reading resumes when none is left.
_PAUSE_PIPELINE: Final = 1
_PAUSE_BODY_BUFFER: Final = 2
_PAUSE_UPSTREAM: Final = 4
_PAUSE_CLIENT_BEHIND: Final = 8  # the client does not read our answers: read no new requests from it

# The shortest head of a request that keeps its connection open ("GET / HTTP/1.1" CRLF "Host:" CRLF CRLF:
# 25 bytes; an HTTP/1.0 one must ask for keep-alive): a read of at most this many bytes per free pipeline
# place cannot overfill the pipeline by more than one request (a last, connection-closing one).
_MIN_HEAD: Final = 25

# Framing bytes allowed per chunk when many chunks share a read: a size line with a short extension and the
# CRLF after the data (see HttpProtocol._chunk_framing).
_CHUNK_LINE: Final = 128

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_CHUNKED_LINE: Final = b"\r\ntransfer-encoding: chunked"
_CLOSE_LINE: Final = b"\r\nconnection: close"
_KEEP_ALIVE_LINE: Final = b"\r\nconnection: keep-alive"
_HTTP11: Final = b"HTTP/1.1"
_HTTP10: Final = b"HTTP/1.0"
# (Final: compiled code keeps the function in a C static, where an imported name costs a dict lookup per call.)
find: Final[Callable[[bytes, bytes, int], int]] = _find


class Http1Settings:
    """Per-worker constants derived from the config once, shared by all HTTP/1 connections."""

    __slots__ = (
        "abort_on_half_close",
        "body_timeout",
        "body_total_timeout",
        "drain_idle_grace",
        "header_timeout",
        "keepalive_timeout",
        "lingering_timeout",
        "max_body",
        "max_header_bytes",
        "max_header_count",
        "max_pipelined",
        "pending_limit",
        "policy",
        "request_id_line",
        "request_ids",
        "send_timeout",
        "via_line",
        "write_limit",
    )

    def __init__(self, state: WorkerState) -> None:
        self.request_ids = state.request_ids
        s = state.config.server
        self.max_header_bytes = s.max_header_bytes
        self.max_header_count = s.max_header_count
        self.max_body = s.max_body_bytes
        self.max_pipelined = s.max_pipelined
        self.header_timeout = s.header_timeout
        self.keepalive_timeout = s.keepalive_timeout
        self.body_timeout = s.body_timeout
        self.body_total_timeout = s.body_total_timeout
        self.send_timeout = s.send_timeout
        self.drain_idle_grace = s.drain_idle_grace
        self.lingering_timeout = s.lingering_timeout
        self.write_limit = s.write_buffer_limit
        # Request body kept before an upstream takes it: reading pauses beyond this.
        self.pending_limit = max(s.write_buffer_limit, s.body_buffer_size)
        self.abort_on_half_close = s.half_close == "abort"
        self.policy = ForwardPolicy(s.request_id_header, s.via, state.config.auth.identity_headers())
        self.request_id_line = b"\r\n%s: " % s.request_id_header.encode()
        self.via_line = b"\r\nvia: %s" % s.via.encode() if s.via else b""


class HttpProtocol(Downstream, asyncio.Protocol):
    """One downstream HTTP/1.x connection."""

    __slots__ = (
        "active",
        "backlog",
        "body_deadline",
        "body_received",
        "body_seen",
        "body_total_deadline",
        "chunk_headers",
        "chunk_idle",
        "client_ip",
        "closing",
        "deferred_error",
        "deferred_exchange",
        "fd",
        "feed",
        "framing_bytes",
        "head_deadline",
        "head_method",
        "head_raw",
        "header_bytes",
        "heads_begun",
        "http11",
        "idle_since",
        "in_head",
        "keeps_alive",
        "line_heads",
        "line_slice",
        "linger_deadline",
        "method_of",
        "n_headers",
        "origin",
        "out",
        "parse_failed",
        "parser",
        "paused_since",
        "peer_done",
        "pumping",
        "queue",
        "read_paused",
        "read_paused_at",
        "reading",
        "requests",
        "resp_chunked",
        "resp_keep_alive",
        "scan",
        "scheme",
        "settings",
        "shutting_down",
        "state",
        "transport",
        "url",
        "valid_host",
        "write",
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
        self.fd = -1
        self.client_ip = b""
        self.scheme = b"http"
        self.valid_host = b""  # the last Host value that passed the syntax check
        self.origin = b""  # the first forwarding lines (forwarding.py), once per connection
        self.scan = HeadScan(settings.policy.table)
        self.out: list[bytes] = []
        self.active: Exchange | None = None  # the exchange being answered
        self.queue: deque[Exchange] = deque()  # parsed, waiting for their turn (the next one first)
        self.backlog = b""  # bytes read but not parsed: the pipeline was full
        self.pumping = False
        self.reading: Exchange | None = None  # the exchange whose message the parser is in
        self.read_paused = 0
        self.read_paused_at = 0.0  # when the proxy last paused reading (the total body clock stops meanwhile)
        self.peer_done = False  # the client half-closed (half_close = "finish"): close once what it sent is answered
        self.write_paused = False
        self.paused_since = 0.0
        self.closing = False
        self.shutting_down = False
        self.linger_deadline = 0.0
        self.deferred_error: ProxyError | None = None  # answered after the exchanges parsed before it
        self.deferred_exchange: Exchange | None = None  # the request it answers, if it had a head
        self.parse_failed = False
        self.requests = 0
        self.idle_since = state.now
        self.in_head = False
        self.head_raw = 0
        self.heads_begun = 0  # request heads the parser started on this connection
        # The slice being fed when it began at a message boundary, and the `heads_begun` its first head
        # would make (-1 otherwise): that head's request line is at its start (see `_version_11`).
        self.line_slice = b""
        self.line_heads = -1
        self.head_deadline = 0.0
        self.body_deadline = NEVER
        self.body_total_deadline = NEVER
        self.body_received = 0
        self.chunk_headers = 0  # chunk headers parsed on this connection
        self.body_seen = 0  # request body bytes parsed on this connection
        self.chunk_idle = False  # after a chunk header that no data followed yet (the last chunk's trailers)
        self.framing_bytes = 0  # chunked-body framing bytes read since the last chunk header (see _chunk_framing)
        self.resp_chunked = False
        self.resp_keep_alive = True
        self.http11 = True  # the version of the last request parsed (a response uses its own request's)
        self.head_method = b""  # the method of the last head llhttp accepted whole
        # Per-request state (reset in on_message_begin)
        self.url = b""
        self.n_headers = 0
        self.header_bytes = 0

    # ------------------------------------------------------------------ transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Accepted: remember the peer and the scheme, set buffer limits, start the header clock."""
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=self.settings.write_limit)
        self.write = self.transport.write
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]).encode() if peer else b"unknown"
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = b"https"
        self.origin = self.settings.policy.origin(self.client_ip, self.scheme)
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        self.idle_since = self.state.now
        self.shutting_down = self.state.draining
        self.state.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closing or self.parse_failed:
            return  # lingering close, or the stream is beyond repair: discard
        if len(data) <= (self.settings.max_pipelined - len(self.queue)) * _MIN_HEAD:
            self._feed(data)  # (the usual read: too short to overfill the pipeline; see _parse)
        else:
            self._parse(data)
        active = self.active
        if (active is not None and (active.phase == PHASE_QUEUED or active.phase == PHASE_BUFFERING)) or self.backlog:
            self._pump()

    def eof_received(self) -> bool | None:
        """Client half-closed. With `server.half_close = "abort"` (like NGINX) the exchanges in flight are
        given up (499); with "finish" they are answered, then the connection closes."""
        if (self.active is None and not self.queue) or self.settings.abort_on_half_close:
            self.closing = True  # uvloop closes the transport; dispatch nothing more before connection_lost
            return None  # close: connection_lost gives up whatever is in flight
        self._no_more_requests()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        """Gone: give up every exchange of the connection, whatever its phase."""
        self.closing = True
        self.state.connections.discard(self)
        active = self.active
        self.active = None
        self.reading = None
        queued = list(self.queue)
        self.queue.clear()
        self.backlog = b""
        if active is not None:
            active.cancel()
        for exchange in queued:
            exchange.cancel()
        if self.deferred_exchange is not None:
            self.deferred_exchange.cancel()
            self.deferred_exchange = None

    def pause_writing(self) -> None:
        """Client is slow: stop reading the upstream response until it catches up, and (between request
        bodies) stop reading its next requests: answers the proxy makes itself must not pile up either."""
        self.write_paused = True
        self.paused_since = self.state.now
        if self.reading is None:
            self._pause(_PAUSE_CLIENT_BEHIND)
        exchange = self.active
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.pause_response()

    def resume_writing(self) -> None:
        """Client caught up: read the upstream response (and its requests) again."""
        self.write_paused = False
        self._resume(_PAUSE_CLIENT_BEHIND)
        if self.backlog:
            self._pump()
        exchange = self.active
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.resume_response()

    # ------------------------------------------------------------------ feeding the parser

    def _parse(self, data: bytes) -> None:
        """Feed `data`, in slices when it could hold more request heads than the pipeline has room for:
        at a message boundary with the pipeline full, what is left waits unparsed in `backlog`."""
        limit = self.settings.max_pipelined
        while True:
            room = limit - len(self.queue)
            if room <= 0 and not self.in_head and self.reading is None:
                self.backlog = data
                self._pause(_PAUSE_PIPELINE)
                return
            size = len(data)
            if size <= room * _MIN_HEAD:
                self._feed(data)
                return
            cut = self._next_cut(data)
            if cut >= size:
                self._feed(data)
                return
            if not self._feed(data[:cut]):
                return
            data = data[cut:]

    def _next_cut(self, data: bytes) -> int:
        """Where the message being parsed ends in `data` at the earliest: the rest of a Content-Length
        body, else just past the next CRLF CRLF (every head, and every chunked body, ends with one).
        Cutting early is harmless: the parser takes a stream, and the next slice follows."""
        reading = self.reading
        if reading is not None and reading.body_kind == BODY_LENGTH and not self.in_head:
            rest = reading.content_length - self.body_received
            if rest > 0:
                return rest
        end = data.find(b"\r\n\r\n")
        return len(data) if end < 0 else end + 4

    def _feed(self, data: bytes) -> bool:
        """Feed one slice; False once the connection is answered for good (framing error, closing)."""
        if self.in_head:
            self.head_raw += len(data)
        reading = self.reading
        chunked = reading is not None and reading.body_kind == BODY_CHUNKED
        body_before = self.body_seen
        chunks_before = self.chunk_headers
        requests_before = self.requests
        heads_before = self.heads_begun
        self._slice_start(data)
        try:
            while True:
                try:
                    self.feed(data)
                except httptools.HttpParserCallbackError as exc:
                    error = exc.__context__
                    if isinstance(error, _StopParsing):
                        return False
                    if not isinstance(error, ProxyError):
                        raise
                    self._protocol_error(error)
                    return False
                except httptools.HttpParserUpgrade as exc:
                    # An Upgrade request (without a body: see on_headers_complete) is answered as plain HTTP,
                    # Upgrade being hop-by-hop; what follows it is the next request.
                    offset = int(exc.args[0])
                    if offset >= len(data) or self.closing or self.parse_failed:
                        break
                    data = data[offset:]
                    self._slice_start(data)
                    continue
                except httptools.HttpParserInvalidMethodError:
                    self._protocol_error(NotImplementedByProxy("method_not_implemented"))
                    return False
                except httptools.HttpParserError as exc:
                    reason = str(exc)
                    if reason == "Invalid HTTP version":
                        self._protocol_error(VersionNotSupported())
                    else:
                        self._protocol_error(BadRequest(reason or "malformed_request"))
                    return False
                break
        finally:
            self.line_slice = b""  # (the read is not kept past its feed, whatever ends it)
        if self.in_head and self.heads_begun != heads_before:
            # The head in progress began inside this slice (`head_raw` was reset then): its bytes are what
            # follows the message before it, which ends at a CRLF CRLF or with body bytes of this slice;
            # never counted more than it holds, so a read with a long unfinished head gets its 431
            # whatever the reads before it.
            end = data.rfind(b"\r\n\r\n")
            self.head_raw = max(0, len(data) - (end + 4 if end >= 0 else 0) - (self.body_seen - body_before))
        if self.in_head and self.head_raw > self.settings.max_header_bytes:
            self._protocol_error(HeadersTooLarge())
        elif chunked and reading is not None:
            self._chunk_framing(
                reading,
                len(data) - (self.body_seen - body_before),
                self.chunk_headers - chunks_before,
                self.requests - requests_before,
            )
        return not (self.closing or self.parse_failed)

    def _chunk_framing(self, exchange: Exchange, overhead: int, chunks: int, later: int) -> None:
        """Bound the chunked framing of a body: chunk-size lines with their extensions (llhttp skips those
        without a callback) and trailer fields (httptools accumulates them itself), like a head. `overhead`
        is what a feed held besides body data, `chunks` the chunk headers it completed: a line read alone
        may reach `max_header_bytes`; a read with chunk headers may hold one such line and `_CHUNK_LINE`
        bytes of framing per chunk besides."""
        limit = self.settings.max_header_bytes
        if chunks:
            self.framing_bytes = 0
            over = overhead > limit + chunks * _CHUNK_LINE
        else:
            self.framing_bytes += overhead
            over = self.framing_bytes > limit
        if over:
            self.reading = exchange  # (its message may have ended in this read: the error is about it)
            # After the last chunk: trailer fields.
            error: ProxyError = (
                HeadersTooLarge("trailers_too_large") if self.chunk_idle else BadRequest("chunk_extension_too_long")
            )
            # Requests parsed after the broken body in the same feed were never valid to forward.
            for _ in range(later):
                if self.queue:
                    self.queue.pop().drop(error)
                elif self.active is not None and self.active is not exchange and self.active.phase == PHASE_QUEUED:
                    dropped, self.active = self.active, None
                    dropped.drop(error)
            self._protocol_error(error)

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        if self.closing or self.parse_failed:
            raise _StopParsing()  # answered and closing: nothing after this is read
        self.in_head = True
        self.heads_begun += 1
        self.head_method = b""
        self.head_raw = 0
        self.head_deadline = self.state.now + self.settings.header_timeout
        self.url = b""
        self.scan.reset()
        self.n_headers = 0
        self.header_bytes = 0

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
        self.scan.add(name, value)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_method = method = self.method_of()  # (the head parsed: its method can be trusted)
        settings = self.settings
        state = self.state
        keep_alive = self.keeps_alive()
        scan = self.scan
        if self.heads_begun == self.line_heads and self._version_11(method):
            http11 = self.http11 = True
        elif self.requests == 0 or not keep_alive or scan.connection is not None or not self.http11:
            version = self.parser.get_http_version()  # (formats a str: skipped for the usual 1.1 keep-alive request)
            http11 = version == "1.1"
            if not http11 and version != "1.0":
                raise VersionNotSupported()
            self.http11 = http11
        else:
            http11 = True  # after a 1.1 request, a keep-alive one without a Connection header: 1.1 again
        if method == b"CONNECT":
            raise NotImplementedByProxy("connect_not_supported")
        kind, length = request_framing(scan.te, scan.length, http11, settings.max_body)
        if scan.upgrade and kind != BODY_NONE:
            # llhttp would take the body for the upgraded protocol's bytes; we never upgrade.
            raise BadRequest("upgrade_with_body")
        target = self.url
        host = scan.host
        if host is None and http11:
            raise BadRequest("missing_host")  # RFC 9112 3.2, absolute-form included
        if target[:1] != b"/":
            target, host = _non_origin_target(method, target, host)
        elif host is not None and host != self.valid_host:
            if not valid_host(host):
                raise BadRequest("invalid_host")
            self.valid_host = host  # the usual client sends the same Host on every request
        # (`native.find`: bytes.find parses its arguments from a tuple, bytes.__contains__ tries an int first)
        if find(target, b"/.", 0) >= 0 or find(target, b"%2", 0) >= 0:
            _check_dot_segments(target)
        if host is None:
            host = b""  # HTTP/1.0 without Host
        client = self.client_ip
        headers, rid, lines = upstream_headers(
            settings.policy,
            scan,
            origin=self.origin,
            host=host,
            client=client,
            scheme=self.scheme,
            ids=settings.request_ids,
        )
        exchange = Exchange(
            worker=state,
            downstream=self,
            method=method,
            target=target,
            host=host,
            headers=headers,
            request_id=rid,
            forward_lines=lines,
            body_kind=kind,
            content_length=length,
            client=client,
            protocol=_HTTP11 if http11 else _HTTP10,
            head_bytes=len(method) + len(self.url) + self.header_bytes + 14,
            authorization=scan.authorization,
        )
        exchange.keep_alive = keep_alive
        if scan.expect is not None:
            if scan.expect.lower() != b"100-continue":
                raise ExpectationFailed()
            exchange.expect_continue = http11 and kind != BODY_NONE
        self.requests += 1
        self.reading = exchange  # until its message is complete (a later parser error then drops it)
        if kind != BODY_NONE:
            now = state.now
            self.body_received = 0
            self.body_deadline = now + settings.body_timeout
            self.body_total_deadline = now + settings.body_total_timeout
            self.framing_bytes = 0
        if self.active is None and not self.queue:
            self.active = exchange  # (QUEUED: dispatched by _pump once the parser has returned)
        else:
            self._pause(_PAUSE_PIPELINE)
            self.queue.append(exchange)

    def _slice_start(self, data: bytes) -> None:
        """`data` is about to be fed: when no message is in progress, the first head it begins has its
        request line at its start (see `_version_11`)."""
        self.line_slice = data
        self.line_heads = self.heads_begun + 1 if not self.in_head and self.reading is None else -1

    def _version_11(self, method: bytes) -> bool:
        """The request line of a head that began at the start of `line_slice` says HTTP/1.1 (False: look
        it up). llhttp accepted the line, and it starts with the method (no empty lines skipped before
        it): its bytes are the method, a space, the target, then the version."""
        data = self.line_slice
        at = len(method) + len(self.url) + 1
        return data.startswith(method) and data[at : at + 11] == b" HTTP/1.1\r\n"

    def on_body(self, body: bytes) -> None:
        exchange = self.reading
        if exchange is None:
            return
        self.chunk_idle = False
        size = len(body)
        self.body_seen += size
        self.body_received += size
        exchange.bytes_in += size
        if self.body_received > self.settings.max_body:
            raise PayloadTooLarge()
        self.body_deadline = self.state.now + self.settings.body_timeout
        upstream = exchange.upstream
        if upstream is not None:
            upstream.send_body(body)
        elif exchange.phase != PHASE_DONE:
            exchange.buffer_body(body)
            if exchange.pending_bytes > self.settings.pending_limit:
                self._pause(_PAUSE_BODY_BUFFER)
        # DONE: answered early (error, or upstream finished first): the body is read and discarded.

    def on_chunk_header(self) -> None:
        self.chunk_headers += 1
        self.chunk_idle = True

    def on_chunk_complete(self) -> None:
        self.chunk_idle = False

    def on_message_complete(self) -> None:
        self.chunk_idle = False
        exchange = self.reading
        if exchange is None:
            return
        self.reading = None
        if exchange.body_kind == BODY_NONE:
            return
        if self.write_paused:
            self._pause(_PAUSE_CLIENT_BEHIND)  # the client fell behind during the body: no new requests now
        self.body_deadline = self.body_total_deadline = NEVER
        exchange.body_done = True
        upstream = exchange.upstream
        if upstream is not None:
            upstream.end_body()

    # ------------------------------------------------------------------ the pipeline of this connection

    def _pump(self) -> None:
        """Move the connection's exchanges along: dispatch the next one when none is active, hand a
        buffered body on, parse held-back bytes when the pipeline has room, answer a deferred error
        when everything before it is answered. Re-entered (a synchronous answer finishes an exchange
        inside a dispatch), it returns at once: the outer loop carries on, so depth stays constant."""
        if self.pumping:
            return
        self.pumping = True
        try:
            while not self.closing:
                active = self.active
                if active is None:
                    if self.queue:
                        active = self.active = self.queue.popleft()
                        self.state.gateway.handle(active)
                        continue
                    if self.deferred_error is not None:
                        error, self.deferred_error = self.deferred_error, None
                        exchange, self.deferred_exchange = self.deferred_exchange, None
                        self._answer_and_close(error, exchange)
                        break
                elif active.phase == PHASE_QUEUED:
                    self.state.gateway.handle(active)
                    continue
                elif active.phase == PHASE_BUFFERING and (active.body_done or active.pending_bytes >= active.reserved):
                    active.body_ready()
                    continue
                if (
                    self.backlog
                    and len(self.queue) < self.settings.max_pipelined
                    and not self.read_paused & _PAUSE_CLIENT_BEHIND
                ):
                    data, self.backlog = self.backlog, b""
                    self._parse(data)
                    continue
                break
            if self.read_paused & _PAUSE_PIPELINE and not self.queue and not self.backlog and not self.parse_failed:
                self._resume(_PAUSE_PIPELINE)
        finally:
            self.pumping = False

    def _finish_response(self, exchange: Exchange, keep: bool) -> None:
        """The active exchange's response is written: end it and move on to the next one."""
        self.active = None
        exchange.finish()
        if not keep or self.closing or (self.peer_done and not self.queue and not self.backlog):
            self._close()
            return
        self.idle_since = self.state.now
        if self.read_paused:
            # Pauses taken for this exchange's body end with it (a remaining body is read and discarded).
            self._resume(_PAUSE_BODY_BUFFER | _PAUSE_UPSTREAM)
        if self.queue or self.backlog or self.deferred_error is not None or self.read_paused:
            self._pump()
            if self.peer_done:
                self._close_when_all_answered()  # (a method: mypyc narrowed `self.active` to None here)

    def _close_when_all_answered(self) -> None:
        if self.active is None and not self.queue and not self.backlog:
            self._close()

    def _no_more_requests(self) -> None:
        """Answer what was received, then close (the client half-closed)."""
        self.peer_done = True
        if not self.queue and not self.backlog and self.active is not None:
            self.active.keep_alive = False  # the last request the client sent: its answer says close

    # ------------------------------------------------------------------ Downstream (exchange.py)

    def body_wanted(self, exchange: Exchange) -> None:
        self._resume(_PAUSE_BODY_BUFFER)  # an upstream write may pause reading again right after
        if exchange.expect_continue and not exchange.body_done and self.transport is not None:
            exchange.expect_continue = False
            self.write(_CONTINUE)

    def pause_reading(self, exchange: Exchange) -> None:
        self._pause(_PAUSE_UPSTREAM)

    def resume_reading(self, exchange: Exchange) -> None:
        self._resume(_PAUSE_UPSTREAM)

    def response_head(self, exchange: Exchange, status: int, head: bytes, body: BodyKind) -> None:
        self.out.append(self._head(exchange, status, head, body, b""))

    def response_complete(self, exchange: Exchange, status: int, head: bytes, body: bytes, kind: BodyKind) -> None:
        if kind in (BODY_CHUNKED, BODY_UNTIL_CLOSE):
            head = b"%s\r\ncontent-length: %d" % (head, len(body))  # the whole body is here: no chunking needed
            kind = BODY_LENGTH
        if self.transport is not None and not self.closing:
            data = self._head(exchange, status, head, kind, body)
            exchange.bytes_out += len(data)
            self.write(data)
        if exchange is self.active:
            self._finish_response(exchange, self.resp_keep_alive)

    def _head(self, exchange: Exchange, status: int, head: bytes, body: BodyKind, data: bytes) -> bytes:
        """The response head for the client: the cleaned upstream head plus the proxy's own lines, then
        `data` (a whole body, or b"")."""
        exchange.response_started = True
        exchange.status = status
        http11 = exchange.protocol == _HTTP11
        keep = exchange.keep_alive and not self.shutting_down and not self.closing
        chunked = False
        if body in (BODY_CHUNKED, BODY_UNTIL_CLOSE):
            if http11:
                chunked = True
            else:
                keep = False  # HTTP/1.0 client: the end of the body is the end of the connection
        self.resp_chunked = chunked
        self.resp_keep_alive = keep
        settings = self.settings
        added = exchange.response_headers
        lines = b"" if added is None else b"".join([b"\r\n%s: %s" % (name, value) for name, value in added])
        framing = _CHUNKED_LINE if chunked else b""
        connection = _CLOSE_LINE if not keep else (b"" if http11 else _KEEP_ALIVE_LINE)
        # printf-style with bytes operands: compiled code copies them into one new object, no tuple.
        return b"%s%s%s%s%s%s%s\r\n\r\n%s" % (
            head,
            settings.request_id_line,
            exchange.request_id,
            settings.via_line,
            lines,
            framing,
            connection,
            data,
        )

    def response_body(self, exchange: Exchange, data: bytes) -> None:
        self.out.append(chunk(data) if self.resp_chunked else data)

    def response_end(self, exchange: Exchange) -> None:
        if self.resp_chunked:
            self.out.append(LAST_CHUNK)

    def response_flush(self, exchange: Exchange) -> None:
        out = self.out
        if out and self.transport is not None and not self.closing:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            exchange.bytes_out += len(data)
            self.write(data)

    def response_done(self, exchange: Exchange) -> None:
        if exchange is self.active:
            self._finish_response(exchange, self.resp_keep_alive)

    def answer(self, exchange: Exchange, error: ProxyError) -> None:
        if exchange is not self.active or self.transport is None or self.closing:
            exchange.status = exchange.status or error.status
            if exchange is self.active:
                self.active = None
            exchange.finish()  # (the connection is going away: nothing to write to)
            return
        keep = exchange.keep_alive and not error.close and not self.shutting_down
        if exchange.expect_continue and not exchange.body_done:
            keep = False  # the client may never send the body it was waiting to be asked for
        self.out.clear()
        exchange.status = error.status
        data = error_response(
            error.status,
            error.detail,
            exchange.request_id,
            close=not keep,
            extra=b"" if exchange.protocol == _HTTP11 or not keep else _KEEP_ALIVE_LINE,
            headers=error.headers,
            more_headers=exchange.response_headers,
            fields=error.fields,
            head_only=exchange.method == b"HEAD",
        )
        exchange.bytes_out += len(data)
        self.write(data)
        self._finish_response(exchange, keep)

    def reset(self, exchange: Exchange) -> None:
        if exchange is self.active:
            self.active = None
        exchange.finish()
        self.abort()  # a response is half-sent: the client must see the failure

    # ------------------------------------------------------------------ errors, timeouts, closing

    def _protocol_error(self, error: ProxyError) -> None:
        """The request stream is broken: stop parsing; answer what came before it, then the error; close.

        Exchanges parsed before the broken request are valid and keep their place in line; the error
        answer follows the last of them. The request the error is about (a head that parsed, then a
        body or a late header check that did not) never reaches an upstream, unless it is the active
        exchange, whose body was streaming: it is failed (reset, if its response already started).
        """
        if self.closing:
            return  # already answered and closing: lingering reads and discards whatever comes
        self.parse_failed = True
        self.in_head = False
        self.backlog = b""
        self._pause(_PAUSE_PIPELINE)
        broken = self.reading
        self.reading = None
        if broken is not None and broken.phase == PHASE_DONE:
            broken = None  # answered before its body broke (an early answer): its answer is out already
        active = self.active
        if broken is not None and broken is active:
            active.keep_alive = False
            active.fail(error)
            return
        if broken is not None:
            self.queue.remove(broken)  # never dispatched
        if active is None and not self.queue:
            self._answer_and_close(error, broken)
        else:
            self.deferred_error = error
            self.deferred_exchange = broken

    def _answer_and_close(self, error: ProxyError, exchange: Exchange | None = None) -> None:
        """Answer a broken request stream and close; `exchange` is the request it is about, if its head
        parsed (else one is made, so that every answer ends an exchange)."""
        if self.transport is None or self.transport.is_closing() or self.closing:
            if exchange is not None:
                exchange.cancel()
            return
        # A request whose head parsed gets HEAD semantics; of a head that did not parse, the method is not to
        # be trusted (and the connection closes after the answer either way).
        head_only = (exchange.method if exchange is not None else self.head_method) == b"HEAD"
        if exchange is None:
            exchange = self._unparsed_exchange()
        self.out.clear()
        data = error_response(error.status, error.detail, exchange.request_id, close=True, head_only=head_only)
        self.write(data)
        exchange.status = error.status
        exchange.error = error.detail
        exchange.bytes_out += len(data)
        exchange.finish()
        self._close()

    def _unparsed_exchange(self) -> Exchange:
        """An exchange for a request whose head did not parse (what is known of it), for the hooks."""
        return Exchange(
            worker=self.state,
            downstream=self,
            method=self.head_method or (self.method_of() if self.url else b""),
            target=self.url,
            host=b"",
            headers=[],
            request_id=self.state.request_ids.next(),
            forward_lines=b"",
            client=self.client_ip,
            protocol=_HTTP11 if self.http11 else _HTTP10,
            head_bytes=self.head_raw,
        )

    def _close(self) -> None:
        """Close after what is written; linger (reading and discarding) so the client sees our answer."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.closing = True
        self.active = None
        self.reading = None
        self.backlog = b""
        for exchange in self.queue:
            exchange.cancel()  # (never dispatched: a close answered what came before them)
        self.queue.clear()
        self._resume(_PAUSE_PIPELINE | _PAUSE_BODY_BUFFER | _PAUSE_UPSTREAM | _PAUSE_CLIENT_BEHIND)
        self.linger_deadline = self.state.now + self.settings.lingering_timeout
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.closing = True  # connection_lost comes later: dispatch nothing more meanwhile
            self.transport.abort()

    def shutdown(self) -> None:
        """Graceful stop (drain): answer what is in flight with `Connection: close`, take nothing new;
        an idle connection is closed after `drain_idle_grace` (by `check`)."""
        self.shutting_down = True

    def watched_fd(self) -> int:
        if self.read_paused and (self.active is not None or self.queue) and not self.closing:
            return self.fd
        return -1

    def peer_closed(self, reset: bool) -> None:
        if reset or self.settings.abort_on_half_close:
            self.abort()  # connection_lost gives up the exchanges in flight (499)
        else:
            self._no_more_requests()

    def check(self, now: float) -> None:
        """Enforce deadlines; called by the worker tick.

        Stamps and deadlines are taken from the coarse clock (`state.now`, up to one tick old), so they
        are compared with `now` less one tick: a timeout never fires early, and at most two ticks late
        (the stamp's age plus the tick's period).
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
            if self.reading is not None:
                if now > self.body_deadline:
                    self._protocol_error(RequestTimeout("body_timeout"))
                    return
                if now > self.body_total_deadline:
                    self._protocol_error(RequestTimeout("body_total_timeout"))
                    return
        exchange = self.active
        if exchange is not None:
            exchange.expire(now)
        elif not self.in_head and not self.queue:
            if self.shutting_down:
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

    # ------------------------------------------------------------------ read pausing

    def _pause(self, reason: int) -> None:
        if not self.read_paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
            self.read_paused_at = self.state.now
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
            if self.reading is not None and self.reading.body_kind != BODY_NONE:
                self.body_deadline = now + self.settings.body_timeout
                if self.body_total_deadline != NEVER:
                    self.body_total_deadline += now - self.read_paused_at

    def __repr__(self) -> str:
        return f"<HttpProtocol {self.client_ip.decode()} requests={self.requests} active={self.active}>"


def _not_connected(data: bytes) -> None:
    raise RuntimeError("write before connection_made")


class _StopParsing(Exception):
    """Raised from a parser callback to stop parsing bytes that will never be answered."""


def _non_origin_target(method: bytes, target: bytes, host: bytes | None) -> tuple[bytes, bytes | None]:
    """Absolute-form (`http://h/p`) -> origin-form, its authority replacing Host (RFC 9112 3.2.2);
    `*` kept for OPTIONS; others rejected."""
    lower = target[:8].lower()
    if lower.startswith((b"http://", b"https://")):
        rest = target[target.index(b"//") + 2 :]
        end = len(rest)
        for stop in (b"/", b"?", b"#"):
            found = rest.find(stop)
            if 0 <= found < end:
                end = found
        authority, path = rest[:end], rest[end:]
        if not authority or b"@" in authority or not valid_host(authority):
            raise BadRequest("invalid_target")
        if not path.startswith(b"/"):
            path = b"/" + path
        return path, authority
    if target == b"*" and method == b"OPTIONS":
        if host is not None and not valid_host(host):
            raise BadRequest("invalid_host")
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
