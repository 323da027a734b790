"""The protocol-neutral request in flight, shared by the downstream protocols and the upstream client.

Theory of operation: a downstream protocol (HTTP/1.1 today, HTTP/2 later) parses a request head
into an `Exchange` and hands it to the gateway. The gateway routes it and asks an upstream cluster
for a connection; the upstream client then streams the request body out and the response back to
`exchange.downstream`, which implements `Downstream`. `phase` and `deadline` say what the exchange
is waiting for and until when; the downstream connection's periodic timeout check enforces it, so
no timer object is created per request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from proxy.errors import ProxyError
    from proxy.upstream.client import UpstreamConnection
    from proxy.upstream.pool import Cluster


# Phases: what the exchange is waiting for; the deadline means something different in each.
# Plain `Final` ints rather than an enum: compiled code inlines them and compares machine integers
# (an enum member is a module-global lookup plus an attribute lookup on every use).
Phase = int
PHASE_ROUTING: Final = 0  # in the gateway
PHASE_WAIT_CONNECTION: Final = 1  # queued for a pooled connection: pending_timeout -> 503
PHASE_CONNECTING: Final = 2  # a new upstream connection is being opened: connect_timeout -> 504
PHASE_WAIT_RESPONSE: Final = 3  # request sent, no complete response yet: response_timeout -> 504
PHASE_DONE: Final = 4  # response finished or failed; nothing pending upstream
PHASE_NAMES: Final = ("ROUTING", "WAIT_CONNECTION", "CONNECTING", "WAIT_RESPONSE", "DONE")

# How a message body is framed.
BodyKind = int
BODY_NONE: Final = 0
BODY_LENGTH: Final = 1  # Content-Length
BODY_CHUNKED: Final = 2  # Transfer-Encoding: chunked
BODY_UNTIL_CLOSE: Final = 3  # response only: read until the connection closes


class Downstream(Protocol):
    """What the upstream client calls back on; implemented by each downstream protocol."""

    write_paused: bool  # the client is not keeping up: upstream reading must stay paused

    def response_head(self, exchange: Exchange, status: int, head: bytes, body: BodyKind) -> None:
        """The upstream response head, hop-by-hop lines removed (`head` excludes the final CRLF CRLF)."""

    def response_complete(self, exchange: Exchange, status: int, head: bytes, body: bytes, kind: BodyKind) -> None:
        """A whole response read at once (the common small one): head, complete body, end, flush, and
        the exchange is done upstream (no `exchange_upstream_done` follows).

        `kind` is the upstream framing; a chunked or until-close body may be sent with a Content-Length.
        """

    def response_body(self, data: bytes) -> None:
        """A piece of the decoded response body."""

    def response_end(self) -> None:
        """The response body is complete."""

    def response_flush(self) -> None:
        """Write out what the calls above queued (once per upstream read)."""

    def response_failed(self, exchange: Exchange, error: ProxyError) -> None:
        """The upstream side failed; answer with `error` or abort if the response already started."""

    def upstream_ready(self, exchange: Exchange) -> None:
        """The request head is sent; body may flow now (send `100 Continue` if the client waits for it)."""

    def pause_reading(self) -> None:
        """Upstream cannot take more request body for now."""

    def resume_reading(self) -> None:
        """Upstream can take request body again."""

    def exchange_upstream_done(self, exchange: Exchange) -> None:
        """The upstream connection is released; the exchange is finished on the upstream side."""


class Exchange:
    """One request: its head, its body state, and where it is in the pipeline."""

    __slots__ = (
        "attempts",
        "body_done",
        "body_kind",
        "content_length",
        "deadline",
        "downstream",
        "expect_continue",
        "forward_lines",
        "headers",
        "host",
        "keep_alive",
        "method",
        "pending_body",
        "pending_bytes",
        "phase",
        "request_id",
        "response_started",
        "retried",
        "server",
        "started",
        "status",
        "target",
        "upstream",
        "waiting_on",
    )

    def __init__(
        self,
        downstream: Downstream,
        method: bytes,
        target: bytes,
        host: bytes,
        headers: list[tuple[bytes, bytes]],
        request_id: bytes,
        forward_lines: bytes,
        body_kind: BodyKind,
        content_length: int,
    ) -> None:
        self.downstream = downstream
        self.method = method
        self.target = target
        self.host = host
        self.headers = headers  # end-to-end request headers to forward, original case
        self.request_id = request_id
        self.forward_lines = forward_lines  # pre-encoded header lines added by the proxy (X-Forwarded-*, ...)
        self.body_kind = body_kind
        self.content_length = content_length
        self.body_done = body_kind == BODY_NONE
        self.pending_body: list[bytes] | None = None  # body received before an upstream was attached
        self.pending_bytes = 0
        self.expect_continue = False
        self.keep_alive = True  # the client allows reusing its connection after this exchange
        self.phase: Phase = PHASE_ROUTING
        self.deadline = 0.0
        self.upstream: UpstreamConnection | None = None
        self.response_started = False
        self.retried = False
        self.attempts = 0  # upstream connect attempts
        self.waiting_on: Cluster | None = None  # the cluster whose queue holds this exchange
        self.status = 0  # response status sent to the client
        self.server: object = None  # address of the upstream server that took the request
        self.started = 0.0  # loop time the head was parsed (set when something measures latency)

    @property
    def replayable(self) -> bool:
        """Safe to send again on a fresh connection: idempotent and without a body."""
        return self.method in _IDEMPOTENT and self.body_kind == BODY_NONE and not self.retried

    def __repr__(self) -> str:
        phase = PHASE_NAMES[self.phase]
        return f"<Exchange {self.method.decode()} {self.target[:60]!r} {phase} id={self.request_id.decode()}>"


_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
