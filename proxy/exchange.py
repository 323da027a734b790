r"""The exchange lifecycle: one request, from its parsed head to its end, as an explicit state machine.

Theory of operation. A downstream protocol (HTTP/1.1 today, HTTP/2 later) parses a request head into an
`Exchange` and, when its turn comes, hands it to the gateway. From then on the exchange moves through
the phases below; every change of phase is a method of this module (the only writer of `phase`), is
checked against the transition table, and sets the phase's deadline:

  QUEUED --start--> STEPS --(steps pass)--> [BUFFERING] --> WAIT_CONNECTION | CONNECTING | WAIT_RESPONSE
                      ^  \--suspend--> SUSPENDED --wake--/                     |            |
                      \___________________________________/                    v            v
                                                           WAIT_RESPONSE --responding--> RESPONDING
  any phase --finish--> DONE (the finished hooks run, exactly once)

In a waiting phase the exchange is *parked* on the object it waits for (a step's `WaitList`, a
cluster's queue, an upstream connection), which implements `Parking`. What a phase's timeout answers
is in `_TIMEOUTS` (a suspended exchange carries its own), and a timeout or a client that goes away
unparks the exchange from whatever holds it: `expire` and `cancel` are the only two ways out of a
waiting phase that the exchange does not choose itself. Deadlines are enforced by the downstream's
periodic check (one worker tick, no timer per request), against the worker's coarse clock.

Timings (`t_*`) are `time.perf_counter()` stamps, microsecond resolution: the head parsed, the request
head written upstream, the response head received, the end. `worker.finished` hooks (access log,
metrics) read them, with the route, upstream, status, error and byte counts, once the exchange ends.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter as _perf_counter
from typing import TYPE_CHECKING, Final, Protocol

from mypy_extensions import mypyc_attr

from proxy.errors import GatewayTimeout, IllegalTransition, ProxyError, ServiceUnavailable, Suspended

if TYPE_CHECKING:
    from proxy.config import Address
    from proxy.gateway import Route
    from proxy.server import WorkerState


# Phases. Plain `Final` ints rather than an enum: compiled code inlines them and compares machine integers.
Phase = int
PHASE_QUEUED: Final = 0  # parsed; waiting for its turn on its connection (HTTP/1.1 pipelining)
PHASE_STEPS: Final = 1  # in the gateway: route, then the route's steps (auth, limits), decided synchronously
PHASE_SUSPENDED: Final = 2  # a step parked it until something it waits for arrives (JWKS refresh, Redis sync)
PHASE_BUFFERING: Final = 3  # reading the request body before an upstream connection is taken
PHASE_WAIT_CONNECTION: Final = 4  # queued for a pooled connection
PHASE_CONNECTING: Final = 5  # a new upstream connection is being opened for it
PHASE_WAIT_RESPONSE: Final = 6  # request head sent, no response head yet
PHASE_RESPONDING: Final = 7  # response head forwarded, body streaming
PHASE_DONE: Final = 8  # ended: response written, answered by the proxy, or given up
PHASE_COUNT: Final = 9
PHASE_NAMES: Final = (
    "QUEUED",
    "STEPS",
    "SUSPENDED",
    "BUFFERING",
    "WAIT_CONNECTION",
    "CONNECTING",
    "WAIT_RESPONSE",
    "RESPONDING",
    "DONE",
)

_UPSTREAM: Final = (1 << PHASE_WAIT_CONNECTION) | (1 << PHASE_CONNECTING) | (1 << PHASE_WAIT_RESPONSE)
_END: Final = 1 << PHASE_DONE
# Allowed next phases of each phase, as bit masks (index = phase).
TRANSITIONS: Final = (
    (1 << PHASE_STEPS) | _END,  # QUEUED
    (1 << PHASE_SUSPENDED) | (1 << PHASE_BUFFERING) | _UPSTREAM | _END,  # STEPS
    (1 << PHASE_STEPS) | _END,  # SUSPENDED
    _UPSTREAM | _END,  # BUFFERING
    (1 << PHASE_CONNECTING) | (1 << PHASE_WAIT_RESPONSE) | _END,  # WAIT_CONNECTION
    (1 << PHASE_CONNECTING) | (1 << PHASE_WAIT_RESPONSE) | _END,  # CONNECTING (retried on another server)
    (1 << PHASE_RESPONDING) | _UPSTREAM | _END,  # WAIT_RESPONSE (a dead pooled connection: sent again)
    _END,  # RESPONDING
    0,  # DONE
)
# What a timeout in each phase answers; None: the phase has no deadline of its own (QUEUED waits for
# its connection's turn, STEPS never outlives a call, BUFFERING is bounded by the downstream's request
# body clocks, a SUSPENDED exchange carries the error its step gave).
_TIMEOUTS: Final[tuple[ProxyError | None, ...]] = (
    None,
    None,
    None,
    None,
    ServiceUnavailable("upstream_pending_timeout"),
    GatewayTimeout("upstream_connect_timeout"),
    GatewayTimeout("upstream_response_timeout"),
    GatewayTimeout("upstream_response_timeout"),  # the longest gap between response reads; resets the client
    None,
)
assert len(PHASE_NAMES) == len(TRANSITIONS) == len(_TIMEOUTS) == PHASE_COUNT, "every phase needs every table"
# The same tables as lists: compiled code indexes a list in place, where it would rebuild a Final tuple
# of ints as a Python tuple on every variable index.
_NEXT: Final[list[int]] = list(TRANSITIONS)
_TIMEOUT_ERRORS: Final[list[ProxyError | None]] = list(_TIMEOUTS)

NEVER: Final = float("inf")
# The clock of the timings, held in a Final: compiled code reads it without a module dictionary lookup.
perf_counter: Final[Callable[[], float]] = _perf_counter

WAIT: Final = Suspended()
"""What a pipeline step returns once it parked its exchange (`WaitList.park`): not an answer; the gateway
leaves the exchange until it wakes (`gateway.WAIT` is this object)."""

# How a message body is framed.
BodyKind = int
BODY_NONE: Final = 0
BODY_LENGTH: Final = 1  # Content-Length
BODY_CHUNKED: Final = 2  # Transfer-Encoding: chunked
BODY_UNTIL_CLOSE: Final = 3  # response only: read until the connection closes

_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def timeout_error(phase: Phase) -> ProxyError | None:
    """What a timeout in `phase` answers (None: no deadline of its own; see `_TIMEOUTS`)."""
    return _TIMEOUT_ERRORS[phase]


class Parking(Protocol):
    """Whatever a waiting exchange is parked on: a step's wait list, a cluster queue, an upstream connection."""

    def unpark(self, exchange: Exchange, timed_out: bool) -> None:
        """Stop holding or waiting for `exchange`: it timed out (`timed_out`) or its client went away."""


# Upstream and Downstream are classes, not Protocols: the implementations subclass them, so compiled
# callers reach a method through mypyc's vtable (a few instructions) instead of a Python-level method call
# (about 300 per call, several per request). Interpreted subclasses (test doubles) are allowed.
@mypyc_attr(allow_interpreted_subclasses=True)
class Upstream:
    """The upstream connection carrying an exchange (WAIT_RESPONSE, RESPONDING), as its downstream sees it.
    It is also the exchange's `Parking` while it waits for the response."""

    def send_body(self, data: bytes) -> None:
        """A piece of request body."""
        raise NotImplementedError

    def end_body(self) -> None:
        """The request body is complete."""
        raise NotImplementedError

    def pause_response(self) -> None:
        """The client cannot take more response now: stop reading it upstream."""
        raise NotImplementedError

    def resume_response(self) -> None:
        """The client caught up."""
        raise NotImplementedError

    def unpark(self, exchange: Exchange, timed_out: bool) -> None:
        """Stop waiting for `exchange`'s response: it timed out (`timed_out`) or its client went away."""
        raise NotImplementedError


@mypyc_attr(allow_interpreted_subclasses=True)
class Downstream:
    """The client side of an exchange (an HTTP/1.1 connection, an HTTP/2 stream): what the gateway, the
    pool and the upstream client call back on. Every call names its exchange."""

    def __init__(self) -> None:
        self.write_paused = False  # the client is not keeping up: upstream reading must stay paused

    def body_wanted(self, exchange: Exchange) -> None:
        """The proxy takes the request body now (an upstream took the exchange, or the body is buffered
        first): let it flow, and send `100 Continue` if the client waits for it."""
        raise NotImplementedError

    def pause_reading(self, exchange: Exchange) -> None:
        """Upstream cannot take more request body for now."""
        raise NotImplementedError

    def resume_reading(self, exchange: Exchange) -> None:
        """Upstream can take request body again."""
        raise NotImplementedError

    def response_head(self, exchange: Exchange, status: int, head: bytes, body: BodyKind) -> None:
        """The upstream response head, hop-by-hop lines removed (`head`: HTTP/1.1 status line and header
        lines without the final CRLF CRLF; `framing.head_pairs` gives it as (name, value) pairs)."""
        raise NotImplementedError

    def response_body(self, exchange: Exchange, data: bytes) -> None:
        """A piece of the decoded response body."""
        raise NotImplementedError

    def response_end(self, exchange: Exchange) -> None:
        """The response body is complete."""
        raise NotImplementedError

    def response_flush(self, exchange: Exchange) -> None:
        """Write out what the calls above queued (once per upstream read)."""
        raise NotImplementedError

    def response_done(self, exchange: Exchange) -> None:
        """The upstream side is over (its connection released): finish the exchange."""
        raise NotImplementedError

    def response_complete(self, exchange: Exchange, status: int, head: bytes, body: bytes, kind: BodyKind) -> None:
        """A whole response read at once (the common small one): head, body, end and finish in one call.
        `kind` is the upstream framing; a chunked or until-close body may be sent with a Content-Length."""
        raise NotImplementedError

    def answer(self, exchange: Exchange, error: ProxyError) -> None:
        """Answer with a response the proxy makes (error or step answer), then finish the exchange."""
        raise NotImplementedError

    def reset(self, exchange: Exchange) -> None:
        """The response started and cannot be completed: cut the client off (HTTP/2: reset the stream),
        then finish the exchange."""
        raise NotImplementedError


class Exchange:
    """One request: its head, its body state, where it is in its lifecycle, and what it measured."""

    __slots__ = (
        "attempts",
        "authorization",
        "body_done",
        "body_kind",
        "bytes_in",
        "bytes_out",
        "client",
        "content_length",
        "deadline",
        "downstream",
        "error",
        "expect_continue",
        "forward_lines",
        "headers",
        "host",
        "keep_alive",
        "method",
        "parked",
        "pending_body",
        "pending_bytes",
        "phase",
        "pool_wait",
        "prompt",
        "protocol",
        "request_id",
        "reserved",
        "response_headers",
        "response_started",
        "retried",
        "route",
        "server",
        "status",
        "step",
        "subject",
        "t_end",
        "t_queued",
        "t_response",
        "t_start",
        "t_upstream",
        "target",
        "upstream",
        "wait_error",
        "worker",
    )

    def __init__(
        self,
        *,
        worker: WorkerState,
        downstream: Downstream,
        method: bytes,
        target: bytes,
        host: bytes,
        headers: list[tuple[bytes, bytes]],
        request_id: bytes,
        forward_lines: bytes,
        body_kind: BodyKind = BODY_NONE,
        content_length: int = -1,
        client: bytes = b"",
        protocol: bytes = b"HTTP/1.1",
        head_bytes: int = 0,
        authorization: bytes | None = None,
    ) -> None:
        self.worker = worker
        self.downstream = downstream
        # The request as it goes upstream.
        self.method = method
        self.target = target
        self.host = host
        self.headers = headers  # end-to-end request headers to forward, as received
        self.request_id = request_id
        self.forward_lines = forward_lines  # pre-encoded header lines added by the proxy (forwarding.py)
        self.body_kind = body_kind
        self.content_length = content_length
        self.client = client
        self.protocol = protocol
        self.authorization = authorization  # the Authorization value (also among `headers`), for auth steps
        # Who the request is for, as rate limits count it: the client address, or the verified identity
        # (the configured subject claim) once an auth step passed it.
        self.subject = client
        self.keep_alive = True  # the client allows reusing its connection after this exchange
        self.expect_continue = False
        # Request body received before an upstream connection took it.
        self.body_done = body_kind == BODY_NONE
        self.pending_body: list[bytes] | None = None
        self.pending_bytes = 0
        self.reserved = 0  # body buffer memory reserved for it while BUFFERING
        # Lifecycle.
        self.phase: Phase = PHASE_QUEUED
        self.deadline = NEVER
        self.parked: Parking | None = None
        self.wait_error: ProxyError | None = None  # what a SUSPENDED exchange answers when its wait times out
        self.route: Route | None = None
        self.step = 0  # index of the step that suspended it (re-run on wake)
        # Sent upstream without a step, a wait or a connect: `t_upstream` is then `t_start` (what lies
        # between is the proxy's own few microseconds, not worth a clock read on the hot path).
        self.prompt = True
        self.upstream: Upstream | None = None  # the connection carrying it (WAIT_RESPONSE, RESPONDING)
        self.server: Address | None = None  # the upstream server that took it
        self.attempts = 0  # upstream connects opened for it
        self.retried = False
        # Response.
        self.response_started = False
        self.response_headers: list[tuple[bytes, bytes]] | None = None  # added by steps to whatever answers
        self.status = 0  # status sent to the client (499: the client went away first)
        self.error = ""  # why the proxy answered or gave up (an error code), "" when the upstream answered
        # Measurements.
        self.bytes_in = head_bytes  # request head and decoded body bytes received
        self.bytes_out = 0  # response bytes written to the client
        self.t_start = perf_counter()
        self.t_upstream = 0.0
        self.t_response = 0.0
        self.t_end = 0.0
        self.t_queued = 0.0  # when it last queued for a pooled connection (WAIT_CONNECTION), else 0
        self.pool_wait = 0.0  # seconds spent in WAIT_CONNECTION until a connection took it

    # ------------------------------------------------------------------ transitions

    def _enter(self, phase: Phase, deadline: float) -> None:
        old = self.phase
        if not (_NEXT[old] >> phase) & 1:
            raise IllegalTransition(f"{self!r}: {PHASE_NAMES[old]} -> {PHASE_NAMES[phase]}")
        if old == PHASE_BUFFERING and self.reserved:
            self.worker.body_reserved -= self.reserved
            self.reserved = 0
        self.phase = phase
        self.deadline = deadline

    def start(self) -> None:
        """Its turn has come: the gateway runs it (QUEUED -> STEPS)."""
        self._enter(PHASE_STEPS, NEVER)

    def suspend(self, parking: Parking, timeout: float, error: ProxyError) -> None:
        """A step waits for something (STEPS -> SUSPENDED): parked on `parking` until `wake`, or answered
        `error` after `timeout` seconds. The step that called this returns `gateway.WAIT`."""
        self._enter(PHASE_SUSPENDED, self.worker.now + timeout)
        self.prompt = False
        self.parked = parking
        self.wait_error = error

    def wake(self) -> None:
        """What it waited for arrived (SUSPENDED -> STEPS): the gateway re-runs the step that suspended it."""
        self._enter(PHASE_STEPS, NEVER)
        self.parked = None
        self.wait_error = None
        self.worker.gateway.resume(self)

    def await_body(self, reserve: int) -> None:
        """Read the request body (up to `reserve` bytes, held against the worker's body buffer memory)
        before taking an upstream connection (STEPS -> BUFFERING); `body_ready` ends the wait."""
        self._enter(PHASE_BUFFERING, NEVER)
        self.prompt = False
        self.reserved = reserve
        self.worker.body_reserved += reserve
        self.downstream.body_wanted(self)

    def body_ready(self) -> None:
        """The downstream has buffered what BUFFERING waited for: go upstream."""
        if self.phase == PHASE_BUFFERING:
            self.worker.gateway.forward(self)

    def wait_connection(self, cluster: Parking, deadline: float) -> None:
        """Queued for a pooled connection of `cluster` until `deadline`."""
        self._enter(PHASE_WAIT_CONNECTION, deadline)
        self.prompt = False
        self.parked = cluster
        self.t_queued = perf_counter()

    def connecting(self, conn: Parking, server: Address, deadline: float) -> None:
        """A new upstream connection `conn` to `server` is opened for it; connect timeout at `deadline`."""
        if self.phase == PHASE_WAIT_CONNECTION:
            self.pool_wait += perf_counter() - self.t_queued
        self._enter(PHASE_CONNECTING, deadline)
        self.prompt = False
        self.parked = conn
        self.server = server
        self.attempts += 1

    def sent(self, conn: Upstream, server: Address, deadline: float) -> None:
        """The request head went upstream on `conn`; no response head by `deadline` is a timeout."""
        if self.phase == PHASE_WAIT_CONNECTION:
            self.pool_wait += perf_counter() - self.t_queued
        self._enter(PHASE_WAIT_RESPONSE, deadline)
        self.parked = conn
        self.upstream = conn
        self.server = server
        self.t_upstream = self.t_start if self.prompt else perf_counter()

    def responding(self) -> None:
        """The response head was forwarded; the body streams (WAIT_RESPONSE -> RESPONDING)."""
        self._enter(PHASE_RESPONDING, self.deadline)
        self.t_response = perf_counter()

    def touch(self, deadline: float) -> None:
        """Upstream progress: the response clock restarts (unless held: the client is the slow one)."""
        if self.deadline != NEVER:
            self.deadline = deadline

    def hold(self) -> None:
        """The client stopped reading: the upstream response clock stops until `release_hold`."""
        self.deadline = NEVER

    def release_hold(self, deadline: float) -> None:
        self.deadline = deadline

    def detach(self, parking: Parking) -> None:
        """`parking` no longer holds the exchange (an upstream connection released or lost it)."""
        if self.parked is parking:
            self.parked = None
        if self.upstream is parking:
            self.upstream = None

    def finish(self) -> None:
        """The exchange ended on the client side: its response written, answered, reset, or its client
        gone. Runs the worker's finished hooks. Exactly once: a second call is a bug (IllegalTransition)."""
        self._enter(PHASE_DONE, NEVER)
        if self.parked is not None:
            self._release(False)
        if self.pending_body is not None:
            self.drop_body()
        self.t_end = perf_counter()
        if self.t_response == 0.0 and self.t_upstream != 0.0 and not self.error:
            self.t_response = self.t_end  # the response came whole: head and end at once
        for hook in self.worker.finished:
            hook(self)

    # ------------------------------------------------------------------ ways out

    def fail(self, error: ProxyError, timed_out: bool = False) -> None:
        """End with `error`: release what the exchange holds or waits for, then answer it (or reset the
        client if the response already started). A no-op once the exchange is over."""
        if self.phase == PHASE_DONE:
            return
        self._release(timed_out)
        self.error = error.detail
        if self.response_started:
            self.downstream.reset(self)
        else:
            self.downstream.answer(self, error)

    def expire(self, now: float) -> None:
        """Enforce the phase's deadline (the downstream's periodic check calls this)."""
        if now <= self.deadline:
            return
        phase = self.phase
        error = self.wait_error if phase == PHASE_SUSPENDED else _TIMEOUT_ERRORS[phase]
        if error is not None:
            self.fail(error, timed_out=True)

    def drop(self, error: ProxyError) -> None:
        """End without a response of its own: the request broke the connection's framing, and the error
        answer the connection writes after the exchanges before it covers this one too."""
        if self.phase == PHASE_DONE:
            return
        self._release(False)
        self.status = error.status
        self.error = error.detail
        self.finish()

    def cancel(self) -> None:
        """The client went away: release everything and end without an answer (status 499)."""
        if self.phase == PHASE_DONE:
            return
        self._release(False)
        if not self.response_started:
            self.status = 499  # nginx's "client closed request"
        if not self.error:
            self.error = "client_closed"
        self.finish()

    def _release(self, timed_out: bool) -> None:
        parked = self.parked
        self.parked = None
        self.upstream = None
        if parked is not None:
            parked.unpark(self, timed_out)

    # ------------------------------------------------------------------ request body held in the proxy

    def buffer_body(self, data: bytes) -> None:
        """Keep a piece of request body until an upstream connection takes it."""
        if self.pending_body is None:
            self.pending_body = [data]
        else:
            self.pending_body.append(data)
        self.pending_bytes += len(data)

    def take_body(self) -> list[bytes] | None:
        """The buffered request body, handed to the upstream connection."""
        body = self.pending_body
        self.pending_body = None
        self.pending_bytes = 0
        return body

    def drop_body(self) -> None:
        self.pending_body = None
        self.pending_bytes = 0

    # ------------------------------------------------------------------ headers steps add or remove

    def stepped(self) -> None:
        """The gateway runs the route's steps (they may take time: `t_upstream` is read from the clock)."""
        self.prompt = False

    def add_request_header(self, name: bytes, value: bytes) -> None:
        """A header for the upstream request (e.g. a verified claim)."""
        self.headers.append((name, value))

    def add_request_lines(self, lines: bytes) -> None:
        """Upstream request headers the proxy vouches for, pre-encoded once (e.g. the verified claims of a
        token): header lines, each ending CRLF, sent with the proxy's own forwarding lines."""
        self.forward_lines += lines

    def remove_request_headers(self, names: frozenset[bytes]) -> None:
        """Drop the client's copies of headers the proxy vouches for (`names` lower-cased)."""
        self.headers = [pair for pair in self.headers if pair[0].lower() not in names]

    def add_response_header(self, name: bytes, value: bytes) -> None:
        """A header for whatever response the client gets (rate-limit headers go on every response)."""
        if self.response_headers is None:
            self.response_headers = [(name, value)]
        else:
            self.response_headers.append((name, value))

    # ------------------------------------------------------------------ queries

    @property
    def replayable(self) -> bool:
        """Safe to send again on a fresh connection: idempotent and without a body."""
        return self.method in _IDEMPOTENT and self.body_kind == BODY_NONE and not self.retried

    @property
    def upstream_name(self) -> str:
        """The upstream (cluster) name of its route, "" before routing or without a route."""
        route = self.route
        return route.upstream if route is not None else ""

    def __repr__(self) -> str:
        phase = PHASE_NAMES[self.phase]
        return f"<Exchange {self.method.decode()} {self.target[:60]!r} {phase} id={self.request_id.decode()}>"


class WaitList:
    """Exchanges parked on one event (a JWKS refresh, a Redis sync), for a step that may wait.

    `park` suspends an exchange with its own timeout and error; `wake_all` resumes every exchange still
    waiting, in arrival order; a timeout or a client that goes away takes the exchange out (`unpark`).
    """

    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        self._waiting: dict[Exchange, None] = {}

    def park(self, exchange: Exchange, timeout: float, error: ProxyError) -> None:
        exchange.suspend(self, timeout, error)
        self._waiting[exchange] = None

    def unpark(self, exchange: Exchange, timed_out: bool) -> None:
        self._waiting.pop(exchange, None)

    def wake_all(self) -> None:
        waiting = list(self._waiting)
        self._waiting.clear()
        for exchange in waiting:
            if exchange.phase == PHASE_SUSPENDED and exchange.parked is self:
                exchange.wake()

    def __len__(self) -> int:
        return len(self._waiting)
