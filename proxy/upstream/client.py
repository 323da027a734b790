"""Upstream HTTP/1.1 client connection: sends one exchange at a time, streams the response back.

Theory of operation: the pool attaches an exchange; `attach` writes the request head and any body
already buffered in one write, then `send_body`/`end_body` stream the rest. The response is framed
by httptools' C parser, registered without `on_header`, so no per-header Python object is made: at
`on_headers_complete` the raw head is sliced out of the bytes received and rewritten in one regex
pass (framing.py). Body pieces go straight to the downstream, which queues them; one flush per
upstream read makes one downstream write. When the response is complete the connection goes back to
its pool (if both sides allow keep-alive and the request body was fully sent) before the downstream
is told, so a pipelined next request can reuse it at once. While an exchange is connecting or
waiting on this connection it is parked here: `unpark` (its timeout, or its client gone) cancels the
connect or drops the connection. Flow control: downstream pause_writing -> `pause_response` (stop
reading upstream, stop the response clock); upstream pause_writing -> the downstream stops reading
the request body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

import httptools

from proxy.errors import BadGateway, ProxyError
from proxy.exchange import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, BODY_UNTIL_CLOSE, NEVER, Exchange
from proxy.http1.framing import LAST_CHUNK, ResponseHeadRewriter, chunk
from proxy.native import find as _find
from proxy.native import header_block as _header_block
from proxy.upstream.pool import PooledConnection

if TYPE_CHECKING:
    from proxy.server import WorkerState
    from proxy.upstream.pool import Cluster, Connector, ServerPool

_BODY_METHODS: Final = frozenset({b"POST", b"PUT", b"PATCH"})
# (Final: compiled code keeps the function in a C static, where an imported name costs a dict lookup per call.)
find: Final[Callable[[bytes, bytes, int], int]] = _find
header_block: Final[Callable[[list[tuple[bytes, bytes]]], bytes]] = _header_block


def request_head(exchange: Exchange) -> bytes:
    """The upstream request head; hop-by-hop headers were dropped when parsing."""
    kind = exchange.body_kind
    if kind == BODY_LENGTH:
        end = b"content-length: %d\r\n\r\n" % exchange.content_length
    elif kind == BODY_CHUNKED:
        end = b"transfer-encoding: chunked\r\n\r\n"
    elif exchange.method in _BODY_METHODS:
        end = b"content-length: 0\r\n\r\n"
    else:
        end = b"\r\n"
    # (printf-style bytes of bytes operands: one allocation in compiled code)
    return b"%s %s HTTP/1.1\r\nhost: %s\r\n%s%s%s" % (
        exchange.method,
        exchange.target,
        exchange.host,
        header_block(exchange.headers),
        exchange.forward_lines,
        end,
    )


def _connect_failure(task: asyncio.Task[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]) -> str:
    """Why a connect task failed, for the log."""
    if task.cancelled():
        return "connect timeout"
    error = task.exception()
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, OSError) and error.strerror:
        return f"connect failed: {error.strerror.lower()}"
    return f"connect failed: {error!r}"


class _Unsolicited(Exception):
    """Bytes of another response followed a complete one in the same read."""


class UpstreamConnection(PooledConnection, asyncio.Protocol):
    """One keep-alive connection to one upstream server."""

    __slots__ = (
        "body_kind",
        "cancel_timed_out",
        "closed",
        "cluster",
        "complete",
        "connect_task",
        "delivered",
        "exchange",
        "feed",
        "got_bytes",
        "head",
        "head_buf",
        "head_done",
        "head_start",
        "keep_alive",
        "keeps_alive",
        "max_head",
        "parser",
        "parts",
        "pending",
        "reading_paused",
        "requests",
        "reset_parser",
        "rewriter",
        "server",
        "slot_held",
        "state",
        "status",
        "status_of",
        "timeout",
        "transport",
        "write",
        "write_paused",
    )

    def __init__(
        self, cluster: Cluster, server: ServerPool, state: WorkerState, rewriter: ResponseHeadRewriter
    ) -> None:
        # Global state
        self.rewriter = rewriter
        self.cluster = cluster
        self.server = server
        self.state = state
        self.timeout = cluster.config.response_timeout
        # An upstream head (with informational responses before it) may take a few reads, not forever.
        self.max_head = 4 * state.config.server.max_header_bytes + 65536
        # Per-connection state
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # Bound methods kept: a call through them skips the method lookup on every response.
        self.feed: Callable[[bytes], None] = self.parser.feed_data
        self.status_of: Callable[[], int] = self.parser.get_status_code
        self.keeps_alive: Callable[[], bool] = self.parser.should_keep_alive
        self.write: Callable[[bytes], None] = _not_connected
        self.connect_task: asyncio.Task[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]] | None = None
        self.pending: Exchange | None = None  # waiting for the connect to finish
        self.cancel_timed_out = False  # why the connect was cancelled: timeout (a failure) or client gone
        self.slot_held = True  # counted in server.open; released exactly once by `_drop_slot`
        self.closed = False
        self.reading_paused = False
        self.write_paused = False  # our write buffer is above the high-water mark (kept across exchanges)
        self.idle_since = 0.0  # when it last went back to its pool (set here: the pool reads it)
        self.requests = 0
        # Per-exchange state
        self.exchange: Exchange | None = None
        self.head_buf = b""
        self.head_start = 0
        self.head = b""  # cleaned response head, until delivered downstream
        self.parts: list[bytes] = []  # body read before the head was delivered
        self.status = 0
        self.delivered = False
        self.head_done = False
        self.complete = False
        self.got_bytes = False
        self.keep_alive = True
        self.reset_parser = False
        self.body_kind = BODY_NONE

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.closed and self.exchange is None

    # ------------------------------------------------------------------ transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Connected; the connect task's done-callback attaches the pending exchange."""
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=self.state.config.server.write_buffer_limit)
        self.write = self.transport.write

    def connect_done(self, task: asyncio.Task[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]) -> None:
        """Done-callback of the connect task: attach the pending exchange or report the failure."""
        self.connect_task = None
        exchange, self.pending = self.pending, None
        if exchange is not None:
            exchange.detach(self)
        now = self.state.now
        if task.cancelled() or task.exception() is not None:
            self.closed = True
            self._drop_slot()
            if task.cancelled() and not self.cancel_timed_out:
                return  # the client left: not the server's fault
            reason = _connect_failure(task)
            self.cluster.connect_failed(self.server, exchange, now, timeout=task.cancelled(), reason=reason)
            return
        self.cluster.connected(self.server)
        if self.closed:  # lost right after connecting
            self._drop_slot()
            if exchange is not None:
                self.cluster.report(self.server, "closed right after connect", now)
                exchange.fail(BadGateway("upstream_closed"))
            return
        if exchange is not None:
            self.attach(exchange)
        else:
            self.idle_since = now
            self.cluster.release(self.server, self)  # its exchange is gone: the connection is still good

    def unpark(self, exchange: Exchange, timed_out: bool) -> None:
        """`exchange` gives up on this connection: its connect is cancelled, or the connection dropped."""
        if self.pending is exchange:
            self.pending = None
            if self.connect_task is not None:
                self.cancel_timed_out = timed_out
                if timed_out or self.transport is None:
                    self.connect_task.cancel()
                # else: already connected, the done-callback pools it
        elif self.exchange is exchange:
            if timed_out:
                self.cluster.report(self.server, "response timeout", self.state.now)
            self.exchange = None
            self.close(abort=True)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes on an idle connection: the server broke framing
            self.close()
            return
        self.got_bytes = True
        exchange.touch(self.state.now + self.timeout)
        if not self.head_done:
            self.head_buf = self.head_buf + data if self.head_buf else data
        try:
            self.feed(data)
        except httptools.HttpParserCallbackError as exc:
            error = exc.__context__
            if isinstance(error, _Unsolicited) and self.complete:
                self.keep_alive = False  # what followed the response is garbage: never reuse
            else:
                self._fail(error if isinstance(error, ProxyError) else BadGateway("invalid_upstream_response"))
                return
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            if not self.complete:
                self._fail(BadGateway("invalid_upstream_response"))
                return
            self.keep_alive = False
        if not self.head_done and len(self.head_buf) > self.max_head:
            self._fail(BadGateway("upstream_head_too_large"))  # (a whole response in one read is fine)
            return
        downstream = exchange.downstream
        if self.complete:
            if self.delivered:
                downstream.response_flush(exchange)
                self._release(exchange)
                downstream.response_done(exchange)
            else:  # the whole response came in this read (the common case): one call writes and finishes it
                self._deliver_whole(exchange, release=True)
        elif self.delivered:
            downstream.response_flush(exchange)
        elif self.head_done:
            self.delivered = True
            exchange.responding()
            downstream.response_head(exchange, self.status, self.head, self.body_kind)
            for part in self.parts:
                downstream.response_body(exchange, part)
            downstream.response_flush(exchange)
            self.parts = []
            self.head = b""

    def _deliver_whole(self, exchange: Exchange, release: bool) -> None:
        """The complete response, never delivered in pieces: one downstream call, which also finishes it.

        With `release`, the connection goes back to the pool first, where a waiting exchange may take it
        at once: nothing of this connection's state is touched after that.
        """
        parts = self.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        head, status, kind = self.head, self.status, self.body_kind
        self.parts = []
        self.head = b""
        self.delivered = True
        if release:
            self._release(exchange)
        exchange.downstream.response_complete(exchange, status, head, body, kind)

    def connection_lost(self, exc: Exception | None) -> None:
        """Closed by either side; finishes an until-close body, retries or fails the exchange."""
        self.closed = True
        now = self.state.now
        exchange = self.exchange
        self.exchange = None
        if self.pending is not None or self.connect_task is not None:
            return  # lost before the connect task finished: connect_done does the bookkeeping
        self._drop_slot()
        if exchange is None:
            return
        exchange.detach(self)
        downstream = exchange.downstream
        if self.head_done and self.body_kind == BODY_UNTIL_CLOSE and exc is None:
            self.complete = True  # a clean close ends a close-delimited body; a reset truncates it
            if self.delivered:
                downstream.response_end(exchange)
                downstream.response_flush(exchange)
                downstream.response_done(exchange)
            else:
                self._deliver_whole(exchange, release=False)
        elif not self.got_bytes and self.requests > 1 and exchange.replayable:
            self.cluster.dispatch_fresh(exchange, now)
        else:
            self.cluster.report(self.server, "connection closed before the response was complete", now)
            exchange.fail(BadGateway("upstream_closed"))

    def pause_writing(self) -> None:
        """Upstream socket buffer full: stop reading the request body downstream."""
        self.write_paused = True
        exchange = self.exchange
        if exchange is not None:
            exchange.downstream.pause_reading(exchange)

    def resume_writing(self) -> None:
        """Upstream socket buffer drained: read the request body again."""
        self.write_paused = False
        exchange = self.exchange
        if exchange is not None:
            exchange.downstream.resume_reading(exchange)

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            raise _Unsolicited()

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        status = self.status_of()
        buf = self.head_buf
        start = self.head_start
        while buf[start] == 13 or buf[start] == 10:  # line breaks llhttp skipped between responses
            start += 1
        self.head_start = start
        end = find(buf, b"\r\n\r\n", start)
        if status < 200:
            if status == 101:
                raise BadGateway("unexpected_upgrade")
            if status != 100:
                informational = buf[self.head_start : end].lower()
                if informational.find(b"\r\ncontent-length") >= 0 or informational.find(b"\r\ntransfer-encoding") >= 0:
                    # A 1xx response ends at its head (RFC 9112 6.3), but llhttp (for any 1xx but 100) would
                    # read a body for it, which is really a malformed next response.
                    raise BadGateway("invalid_informational_response")
            self.head_start = end + 4  # informational response: dropped (Expect is never forwarded)
            return
        head = buf[self.head_start : end] if self.head_start else buf[:end]
        self.head_buf = b""
        self.head_done = True
        self.status = status
        kind, self.head = self.rewriter.inspect(head, status, exchange.method == b"HEAD")
        self.body_kind = kind
        if kind == BODY_NONE and exchange.method == b"HEAD":
            # llhttp cannot be told that a HEAD response has no body: finish here, new parser later.
            self.keep_alive = self.keeps_alive()
            self.reset_parser = True
            self.complete = True

    def on_body(self, body: bytes) -> None:
        if self.complete:  # bytes after a HEAD response: never forwarded, and the connection is not reused
            self.keep_alive = False
        elif self.delivered:
            exchange = self.exchange
            assert exchange is not None
            exchange.downstream.response_body(exchange, body)
        else:
            self.parts.append(body)

    def on_message_complete(self) -> None:
        if not self.head_done or self.complete:
            return  # end of an informational response, or a HEAD response finished early
        self.complete = True
        self.keep_alive = self.keeps_alive()
        if self.delivered:
            exchange = self.exchange
            assert exchange is not None
            exchange.downstream.response_end(exchange)

    # ------------------------------------------------------------------ requests

    def attach(self, exchange: Exchange) -> None:
        """Send `exchange` on this (idle, connected) connection."""
        assert self.transport is not None
        self.exchange = exchange
        self.requests += 1
        self.head_buf = b""
        self.head_start = 0
        self.head_done = self.complete = self.got_bytes = self.delivered = False
        # The response clock starts once the request is all sent: while the client is still sending its body,
        # its own body clocks say how long that may take (a slow client is not a slow upstream).
        exchange.sent(self, self.server.address, self.state.now + self.timeout if exchange.body_done else NEVER)
        downstream = exchange.downstream
        if downstream.write_paused:  # the client is behind already (pipelining): do not read for it
            self.pause_response()
        if not exchange.body_done:
            downstream.body_wanted(exchange)  # before the write, which may pause the body again
        head = request_head(exchange)
        body = exchange.take_body()
        chunked = exchange.body_kind == BODY_CHUNKED
        if body or (chunked and exchange.body_done):
            parts = [head]
            if body:
                for piece in body:
                    parts.append(chunk(piece) if chunked else piece)
            if exchange.body_done and chunked:
                parts.append(LAST_CHUNK)
            head = b"".join(parts)
        self.write(head)
        if self.write_paused and not exchange.body_done:
            downstream.pause_reading(exchange)  # still above the mark from before: uvloop will not say so again

    def send_body(self, data: bytes) -> None:
        """A piece of request body (decoded); re-chunked when the request is chunked."""
        exchange = self.exchange
        if exchange is None or self.transport is None or self.closed:
            return
        self.transport.write(chunk(data) if exchange.body_kind == BODY_CHUNKED else data)

    def end_body(self) -> None:
        """The request body is complete: the response clock starts (unless the client holds it)."""
        exchange = self.exchange
        if exchange is None or self.transport is None or self.closed:
            return
        if exchange.body_kind == BODY_CHUNKED:
            self.transport.write(LAST_CHUNK)
        if not self.reading_paused:
            exchange.release_hold(self.state.now + self.timeout)

    def pause_response(self) -> None:
        """The downstream cannot take more response: stop reading upstream (and stop the response clock)."""
        if self.transport is not None and not self.closed and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        if self.exchange is not None:
            self.exchange.hold()

    def resume_response(self) -> None:
        if self.transport is not None and not self.closed and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        exchange = self.exchange
        if exchange is not None and exchange.body_done:
            exchange.release_hold(self.state.now + self.timeout)

    def close(self, abort: bool = False) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    # ------------------------------------------------------------------ internals

    def _drop_slot(self) -> None:
        """Give back this connection's place in `server.open` (once, whichever path ends it)."""
        if self.slot_held:
            self.slot_held = False
            self.cluster.discard(self.server, self, self.state.now)

    def _release(self, exchange: Exchange) -> None:
        """The exchange is over on this connection: back to the pool (first, so that a pipelined next
        request can take it at once) or closed."""
        self.exchange = None
        exchange.detach(self)
        if self.reset_parser:
            self.parser = httptools.HttpResponseParser(self)
            self.feed = self.parser.feed_data
            self.status_of = self.parser.get_status_code
            self.keeps_alive = self.parser.should_keep_alive
            self.reset_parser = False
        if self.reading_paused and not self.closed:  # never pool a connection that is not being read
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        if self.keep_alive and exchange.body_done and not self.closed:
            self.idle_since = self.state.now
            self.cluster.release(self.server, self)
        else:
            self.close()

    def _fail(self, error: ProxyError) -> None:
        exchange = self.exchange
        self.exchange = None
        self.close(abort=True)
        self.cluster.report(self.server, f"invalid response ({error.detail})", self.state.now)
        if exchange is not None:
            exchange.detach(self)
            exchange.fail(error)

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("busy" if self.exchange else "idle")
        return f"<UpstreamConnection {self.server.address} {state} requests={self.requests}>"


def _not_connected(data: bytes) -> None:
    raise RuntimeError("write before connection_made")


def make_connector(state: WorkerState) -> Connector:
    """The pool's connector: opens a connection for `exchange` in a task; `connect_done` finishes it."""
    loop = state.loop
    rewriter = ResponseHeadRewriter(drop=(state.config.server.request_id_header.encode(),))

    def connect(server: ServerPool, exchange: Exchange) -> PooledConnection:
        conn = UpstreamConnection(server.cluster, server, state, rewriter)
        conn.pending = exchange
        address = server.address
        task = loop.create_task(loop.create_connection(lambda: conn, address.host, address.port))
        conn.connect_task = task
        task.add_done_callback(conn.connect_done)
        return conn

    return connect
