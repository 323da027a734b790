"""An in-process proxy for framing tests: client bytes in, what the upstream and the client receive out.

Theory of operation: one worker's real data plane (HttpProtocol, Gateway, Cluster, UpstreamConnection)
runs without a loop. The client side is an `HttpProtocol` on a `MockTransport`; every upstream
connection the pool opens is connected at once to an in-memory link whose far end, `UpstreamPeer`,
parses what the proxy sent (httptools: the parser that accepted the client's bytes must read the
re-serialized request the same way) and, in request mode, answers each complete request with a small
numbered response. `settle()` plays the event loop: connects, delivers the bytes each side wrote and
reports closes, until nothing moves. The outcome of a run is plain data (`RequestRun`, `ResponseRun`):
what reached the upstream, what the client received, and any exception that escaped a protocol
callback (in uvloop: "Fatal error on transport", a finding).

The checks of the framing invariants (`check_request_run`, `check_response_run`) compare the outcome
with a reference parse of the same bytes (`parse_requests`, `parse_response`: plain httptools, no
proxy policy) and are shared by the property tests, the oracle, the corpus test and the fuzzers.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import httptools

from devstack.rawhttp import RawResponse
from devstack.rawhttp import parse_response as parse_raw_response
from proxy.config import Config, build
from proxy.exchange import Exchange
from proxy.gateway import Gateway
from proxy.http1.framing import LAST_CHUNK, ResponseHeadRewriter, chunk
from proxy.http1.protocol import Http1Settings, HttpProtocol
from proxy.server import WorkerState
from proxy.upstream.client import UpstreamConnection
from proxy.upstream.pool import Cluster, ServerPool
from tests.fakes import FakeConnectTask, MockLoop, MockTransport
from tests.framing.known_defects import known

# The settings of every framing run, in-process and live (tests/integration/test_corpus_live.py):
# small limits, so that generated inputs reach them.
SERVER_SETTINGS: dict[str, Any] = {
    "max_header_bytes": 4096,
    "max_header_count": 40,
    "max_body_bytes": 65536,
    "access_log": False,
}
MAX_HEADER_BYTES = 4096
MAX_BODY_BYTES = 65536
REQUEST_ID_HEADER = b"x-request-id"

_FRAMING = (b"content-length", b"transfer-encoding")  # re-made by the proxy: a whole or a streamed body
_ID = re.compile(rb"[0-9a-f]{12}-[0-9a-f]+")


def proxy_config(server: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "server": {**SERVER_SETTINGS, **(server or {})},
        "upstreams": {"b": {"servers": ["127.0.0.1:1"]}},
        "routes": [{"prefix": "/", "upstream": "b"}],
    }


_CONFIG: Config = build(proxy_config())


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`data` cut at the given offsets (out-of-range and repeated offsets ignored); never an empty piece."""
    points = sorted({cut for cut in cuts if 0 < cut < len(data)})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    if start < len(data):
        pieces.append(data[start:])
    return pieces


# ---------------------------------------------------------------------------------------------- reference parsers


@dataclass
class Message:
    """One HTTP message as a parser saw it (a request, or a response when `status` is set)."""

    method: bytes = b""
    target: bytes = b""
    version: str = ""
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False
    upgrade: bool = False
    head_done: bool = False  # (trailer fields come after it: not headers)
    keep_alive: bool = True  # llhttp's verdict at the end of the head

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name]


class _Collector:
    """httptools callbacks collecting messages."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.parser: Any = None

    def on_message_begin(self) -> None:
        self.messages.append(Message())

    def on_url(self, url: bytes) -> None:
        self.messages[-1].target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        message = self.messages[-1]
        if not message.head_done:
            message.headers.append((name, value))

    def on_headers_complete(self) -> None:
        message = self.messages[-1]
        message.head_done = True
        message.keep_alive = self.parser.should_keep_alive()
        message.version = self.parser.get_http_version()
        if isinstance(self.parser, httptools.HttpRequestParser):
            message.method = self.parser.get_method()
        else:
            message.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body += body

    def on_message_complete(self) -> None:
        self.messages[-1].complete = True


def parse_requests(data: bytes) -> tuple[list[Message], str | None]:
    """Every request llhttp reads in `data` (the last maybe incomplete), and its error if it stopped on one."""
    collector = _Collector()
    parser = httptools.HttpRequestParser(collector)
    collector.parser = parser
    while data:
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            collector.messages[-1].upgrade = True
            data = data[int(exc.args[0]) :]
            continue
        except httptools.HttpParserError as exc:
            return collector.messages, f"{type(exc).__name__}: {exc}"
        break
    return collector.messages, None


def parse_upstream_response(data: bytes, head_request: bool, eof: bool) -> tuple[list[Message], str | None]:
    """The responses llhttp reads in `data` (1xx included), for a HEAD request or not; `eof` ends a close-
    delimited body. A HEAD response ends with its head: bytes after it are reported as one more message."""
    if head_request:
        return _parse_head_responses(data)
    collector = _Collector()
    parser = httptools.HttpResponseParser(collector)
    collector.parser = parser
    error = None
    try:
        parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
        error = f"{type(exc).__name__}: {exc}"
    last = collector.messages[-1] if collector.messages else None
    if eof and error is None and last is not None and last.head_done and not last.complete and _until_close(last):
        last.complete = True  # (httptools has no call for the end of the stream)
    return collector.messages, error


def _parse_head_responses(data: bytes) -> tuple[list[Message], str | None]:
    """Responses to HEAD: llhttp cannot be told, so each head is parsed alone and ends its message."""
    messages: list[Message] = []
    while True:
        data = data.lstrip(b"\r\n")  # line breaks between responses, which llhttp skips
        end = data.find(b"\r\n\r\n")
        collector = _Collector()
        collector.parser = httptools.HttpResponseParser(collector)
        try:
            collector.parser.feed_data(data if end < 0 else data[: end + 4])
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            return messages + collector.messages, f"{type(exc).__name__}: {exc}"
        messages += collector.messages
        if end < 0 or not collector.messages:
            return messages, None
        collector.messages[-1].complete = True
        data = data[end + 4 :]
        if collector.messages[-1].status >= 200:
            if data:
                messages.append(Message(body=data))
            return messages, None
        if data and not collector.messages[-1].keep_alive:
            # llhttp, reading the whole stream with one parser, ends the connection with an HTTP/1.0 1xx
            # that does not ask to keep it: what follows is an error to it (and a 502 from the proxy).
            return messages, "HttpParserError: Data after `Connection: close`"


def _until_close(message: Message) -> bool:
    """A response delimited by the close of its connection (RFC 9112 6.3, item 8)."""
    if message.status < 200 or message.status in (204, 304) or message.header(b"content-length"):
        return False
    codings = b",".join(message.header(b"transfer-encoding")).split(b",")
    return codings[-1].strip().lower() != b"chunked"


# ---------------------------------------------------------------------------------------------- the upstream side


class Link:
    """The proxy's socket to one upstream server: what it wrote, whether it closed it, and its reading state."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True
        self.lost = False  # connection_lost was delivered

    def write(self, data: bytes) -> None:
        assert not self.closed, "write to a closed upstream connection"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


@dataclass
class Forwarded:
    """One request as the upstream read it from the proxy."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name]


class UpstreamPeer:
    """The server end of one upstream connection: parses what the proxy sends; answers if told to."""

    def __init__(self, proxy: InProcessProxy, conn: UpstreamConnection) -> None:
        self.proxy = proxy
        self.conn = conn
        self.link = Link()
        self.collector = _Collector()
        self.parser = httptools.HttpRequestParser(self.collector)
        self.collector.parser = self.parser
        self.seen = 0
        self.done = 0  # messages already taken
        self.start = 0  # offset of the current message in `link.written`
        self.error: str | None = None

    def pump(self) -> bool:
        """Deliver what the proxy wrote and its close; True if anything happened."""
        moved = False
        written = self.link.written
        if self.seen < len(written) and self.error is None:
            data = bytes(written[self.seen :])
            self.seen = len(written)
            moved = True
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                self.error = f"{type(exc).__name__}: {exc}"
        messages = self.collector.messages
        while self.done < len(messages) and messages[self.done].complete:
            message = messages[self.done]
            self.done += 1
            end = self._message_end()
            forwarded = Forwarded(
                message.method, message.target, message.headers, message.body, bytes(written[self.start : end])
            )
            self.start = end
            self.proxy.forwarded.append(forwarded)
            moved = True
            if self.proxy.auto_respond and not self.link.closed:
                for piece in self.proxy.answer_for(forwarded, len(self.proxy.forwarded)):
                    if self.link.closed:
                        break
                    self.conn.data_received(piece)
        if self.link.closed and not self.link.lost:
            self.link.lost = True
            moved = True
            self.conn.connection_lost(ConnectionAbortedError() if self.link.aborted else None)
        return moved

    def _message_end(self) -> int:
        # Each forwarded request is answered before the next is sent on this connection: it ends the bytes.
        return len(self.link.written)


# ---------------------------------------------------------------------------------------------- the proxy


class InProcessProxy:
    """One worker's data plane with in-memory sockets (see the module docstring)."""

    def __init__(self, config: Config | None = None, auto_respond: bool = True) -> None:
        self.config = config or _CONFIG
        self.state = WorkerState(MockLoop(), self.config)  # type: ignore[arg-type]
        self.cluster = Cluster(self.config.upstreams["b"], self._connector)
        self.state.gateway = Gateway(self.config, self.state, {"b": self.cluster})
        self.settings = Http1Settings(self.state)
        self.rewriter = ResponseHeadRewriter(drop=(REQUEST_ID_HEADER,))
        self.auto_respond = auto_respond
        self.conns: list[UpstreamConnection] = []
        self.peers: dict[int, UpstreamPeer] = {}
        self.forwarded: list[Forwarded] = []
        self.finished: list[Exchange] = []
        self.state.finished.append(self.finished.append)

    def _connector(self, server: ServerPool, exchange: Exchange) -> UpstreamConnection:
        conn = UpstreamConnection(server.cluster, server, self.state, self.rewriter)
        conn.pending = exchange
        conn.connect_task = cast(Any, FakeConnectTask())
        self.conns.append(conn)
        return conn

    def client(self) -> tuple[HttpProtocol, MockTransport]:
        protocol = HttpProtocol(self.state, self.settings)
        transport = MockTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        return protocol, transport

    @staticmethod
    def answer_for(request: Forwarded, number: int) -> list[bytes]:
        """What the upstream answers in request mode, in reads: a body that names the request it answers;
        every third one chunked and in two reads, so that the proxy streams it."""
        body = b"r" + request.target[-40:]
        if request.method == b"HEAD":
            return [b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body)]
        if number % 3 == 2:
            return [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nr\r\n", chunk(body[1:]) + LAST_CHUNK]
        return [b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)]

    def settle(self) -> None:
        """Play the event loop until nothing moves: connects, upstream bytes, closes."""
        for _ in range(100_000):
            moved = False
            for conn in list(self.conns):
                peer = self.peers.get(id(conn))
                if peer is None:
                    task = cast(FakeConnectTask | None, conn.connect_task)
                    if task is None:
                        continue
                    if task.cancel_called:
                        conn.connect_done(cast(Any, task))
                        self.conns.remove(conn)
                        moved = True
                        continue
                    peer = self.peers[id(conn)] = UpstreamPeer(self, conn)
                    conn.connection_made(peer.link)  # type: ignore[arg-type]
                    conn.connect_done(cast(Any, task))
                    moved = True
                if peer.pump():
                    moved = True
            if not moved:
                return
        raise AssertionError("the in-process proxy never settles")

    def peer(self, index: int = 0) -> UpstreamPeer:
        return self.peers[id(self.conns[index])]


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class RequestRun:
    """What became of a client byte stream: the requests forwarded, the client's answer bytes, the close."""

    data: bytes
    forwarded: list[Forwarded]
    output: bytes
    closed: bool
    exception: str | None
    upstream_errors: list[str]
    exchanges: list[Exchange]

    def responses(self) -> tuple[list[RawResponse], bytes]:
        """The client's final responses (HEAD ones without a body; `100 Continue` skipped), and any bytes
        that parse as none. Response i answers request i of the stream."""
        methods = [message.method for message in parse_requests(self.data)[0]]
        out: list[RawResponse] = []
        data = self.output
        while data:
            head_request = len(out) < len(methods) and methods[len(out)] == b"HEAD"
            try:
                parsed = parse_client_response(data, head_request, self.closed)
            except ValueError:
                break
            if parsed is None:
                break
            response, consumed = parsed
            if (
                head_request
                and data[consumed:]
                and is_proxy_answer(response)
                and response.header("connection") == "close"
            ):
                # The proxy's own rejection of a head it did not accept whole (its method is then not trusted,
                # so the answer keeps its body); the connection ends after it either way.
                whole = parse_client_response(data, False, self.closed)
                if whole is not None and whole[1] == len(data):
                    response, consumed = whole
            data = data[consumed:]
            if response.status >= 200:
                out.append(response)
        return out, data

    def summary(self) -> tuple[object, ...]:
        """Everything observable, request ids masked: equal for every way of splitting the same bytes."""
        responses, rest = self.responses()
        return (
            [(f.method, f.target, _mask(f.headers), f.body) for f in self.forwarded],
            # (an answer of the proxy's own by its status: which check of a broken head speaks first, and so
            # its error code, can depend on where a read ends)
            [(r.status, b"" if is_proxy_answer(r) else _ID.sub(b"ID", r.raw)) for r in responses],
            rest,
            self.closed,
            self.exception,
            self.upstream_errors,
        )


def mask_ids(data: bytes) -> bytes:
    """`data` with the proxy's request ids replaced (they differ from run to run)."""
    return _ID.sub(b"ID", data)


def _pairs(response: RawResponse) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in response.headers]


def _mask(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name, _ID.sub(b"ID", value)) for name, value in headers]


def is_proxy_answer(response: RawResponse) -> bool:
    """An answer the proxy made itself (JSON error), not the upstream's numbered one."""
    return response.header("content-type") == "application/json"


def parse_client_response(data: bytes, head_request: bool, eof: bool) -> tuple[RawResponse, int] | None:
    """One response the client received (ValueError if malformed). The proxy's own answers to HEAD carry
    a body while the known defect "head-own-answer-has-body" stands: then one is read with it."""
    parsed = parse_raw_response(data, head_request=head_request, eof=eof)
    if parsed is not None and head_request and is_proxy_answer(parsed[0]) and known("head-own-answer-has-body"):
        return parse_raw_response(data, head_request=False, eof=eof)
    return parsed


@contextmanager
def _quiet() -> Iterator[None]:
    """Upstream failures are logged (rate-limited per server): every run here makes fresh ones."""
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(level)


def run_requests(data: bytes, cuts: Sequence[int] = (), config: Config | None = None) -> RequestRun:
    """Feed `data` (cut into reads at `cuts`) to a fresh client connection of a fresh in-process proxy."""
    proxy = InProcessProxy(config)
    protocol, transport = proxy.client()
    exception = None
    with _quiet():
        try:
            for piece in split(data, cuts):
                protocol.data_received(piece)
                proxy.settle()
        except Exception as exc:  # a finding: reported, with its type, by the checks
            exception = f"{type(exc).__name__}: {exc}"[:500]
    errors = [peer.error for peer in proxy.peers.values() if peer.error is not None]
    return RequestRun(data, proxy.forwarded, transport.take(), transport.closing, exception, errors, proxy.finished)


@dataclass
class ResponseRun:
    """What became of an upstream response: what the client received, whether the proxy answered itself."""

    method: bytes
    output: bytes
    closed: bool
    exception: str | None
    upstream_closed: bool
    aborted: bool
    exchange: Exchange | None

    def summary(self) -> tuple[object, ...]:
        """What the client got, request ids masked: the same for every way of splitting the upstream's
        bytes, except how a failure shows (a 502, or a reset once part of the response was forwarded)."""
        try:
            parsed = parse_client_response(self.output, self.method == b"HEAD", self.closed)
        except ValueError:
            parsed = None
        if parsed is not None and not self.aborted and not (is_proxy_answer(parsed[0]) and parsed[0].status == 502):
            response = parsed[0]
            headers = [pair for pair in _mask(_pairs(response)) if pair[0].lower() not in _FRAMING]
            return ("answered", response.status, headers, response.body, self.exception)
        if self.aborted or parsed is not None:
            return ("failed", self.exception)
        return ("pending", self.exception)


def run_response(
    upstream: bytes,
    cuts: Sequence[int] = (),
    *,
    method: bytes = b"GET",
    eof: bool = True,
    http10: bool = False,
    config: Config | None = None,
) -> ResponseRun:
    """A client sends one `method` request; the upstream answers `upstream` (cut at `cuts`), then closes
    its connection when `eof`."""
    proxy = InProcessProxy(config, auto_respond=False)
    protocol, transport = proxy.client()
    version = b"HTTP/1.0" if http10 else b"HTTP/1.1"
    exception = None
    with _quiet():
        try:
            protocol.data_received(b"%s /r %s\r\nHost: h\r\n\r\n" % (method, version))
            proxy.settle()
            peer = proxy.peer()
            for piece in split(upstream, cuts):
                if peer.link.closed:
                    break  # the proxy gave up on the response: a real socket delivers nothing more
                peer.conn.data_received(piece)
                proxy.settle()
            if eof and not peer.link.closed:
                peer.link.closed = True  # the server closes
                proxy.settle()
        except Exception as exc:  # a finding: reported, with its type, by the checks
            exception = f"{type(exc).__name__}: {exc}"[:500]
    exchange = proxy.finished[0] if proxy.finished else None
    upstream_closed = bool(proxy.peers) and proxy.peer().link.closed
    return ResponseRun(
        method, transport.take(), transport.closing, exception, upstream_closed, transport.aborted, exchange
    )
