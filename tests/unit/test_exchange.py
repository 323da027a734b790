"""The exchange lifecycle as a state machine, without a loop: tables, transitions, timeouts, cancellation, hooks."""

from __future__ import annotations

import pytest

import proxy.exchange as lifecycle
from proxy.errors import GatewayTimeout, IllegalTransition, ProxyError, ServiceUnavailable
from proxy.exchange import (
    PHASE_BUFFERING,
    PHASE_CONNECTING,
    PHASE_COUNT,
    PHASE_DONE,
    PHASE_NAMES,
    PHASE_QUEUED,
    PHASE_RESPONDING,
    PHASE_STEPS,
    PHASE_SUSPENDED,
    PHASE_WAIT_CONNECTION,
    PHASE_WAIT_RESPONSE,
    TRANSITIONS,
    Exchange,
    WaitList,
    timeout_error,
)
from proxy.server import Pipeline, WorkerState
from tests.fakes import FakeConn, FakeDownstream, make_exchange, worker_state

ADDRESS = FakeConn("x").address


def phases() -> dict[str, int]:
    """Every PHASE_<name> constant of the module (the tables below must cover each)."""
    return {
        name: value
        for name, value in vars(lifecycle).items()
        if name.startswith("PHASE_") and name not in ("PHASE_COUNT", "PHASE_NAMES")
    }


def test_every_phase_is_in_every_table() -> None:
    """Adding a phase without a name, its transitions and its timeout behaviour fails here (and the
    module's own import-time check fails every test)."""
    found = phases()
    assert sorted(found.values()) == list(range(PHASE_COUNT)), found
    for name, value in found.items():
        assert PHASE_NAMES[value] == name.removeprefix("PHASE_")
    assert len(TRANSITIONS) == PHASE_COUNT
    for value in found.values():
        timeout_error(value)  # defined (None or an error) for every phase


def test_every_phase_is_reachable_and_can_end() -> None:
    reachable = {PHASE_QUEUED}
    frontier = [PHASE_QUEUED]
    while frontier:
        phase = frontier.pop()
        for nxt in range(PHASE_COUNT):
            if (TRANSITIONS[phase] >> nxt) & 1 and nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable == set(range(PHASE_COUNT))
    for phase in range(PHASE_COUNT):
        if phase != PHASE_DONE:
            assert (TRANSITIONS[phase] >> PHASE_DONE) & 1, f"{PHASE_NAMES[phase]} cannot end"
    assert TRANSITIONS[PHASE_DONE] == 0, "DONE is terminal"


def test_waiting_phases_answer_their_timeouts_and_the_others_have_none() -> None:
    errors = {phase: timeout_error(phase) for phase in range(PHASE_COUNT)}
    assert {phase for phase, error in errors.items() if error is not None} == {
        PHASE_WAIT_CONNECTION,
        PHASE_CONNECTING,
        PHASE_WAIT_RESPONSE,
        PHASE_RESPONDING,
    }
    assert isinstance(errors[PHASE_WAIT_CONNECTION], ServiceUnavailable)
    assert [errors[p].detail for p in (PHASE_CONNECTING, PHASE_WAIT_RESPONSE)] == [  # type: ignore[union-attr]
        "upstream_connect_timeout",
        "upstream_response_timeout",
    ]


def test_illegal_transitions_raise() -> None:
    down = FakeDownstream()
    queued = make_exchange(down, start=False)
    with pytest.raises(IllegalTransition, match="QUEUED -> WAIT_RESPONSE"):
        queued.sent(FakeConn("c"), ADDRESS, 1.0)
    started = make_exchange(down)
    with pytest.raises(IllegalTransition, match="STEPS -> RESPONDING"):
        started.responding()
    started.finish()
    with pytest.raises(IllegalTransition, match="DONE -> DONE"):
        started.finish()  # exactly once


def test_the_happy_path_and_its_timings() -> None:
    down = FakeDownstream()
    worker = worker_state()
    finished: list[Exchange] = []
    worker.finished.append(finished.append)
    exchange = make_exchange(down, worker)
    conn = FakeConn("c")
    exchange.connecting(conn, ADDRESS, 102.0)
    assert (exchange.phase, exchange.parked, exchange.server, exchange.attempts) == (PHASE_CONNECTING, conn, ADDRESS, 1)
    exchange.sent(conn, ADDRESS, 130.0)
    assert exchange.upstream is conn and exchange.deadline == 130.0
    exchange.responding()
    exchange.detach(conn)  # the connection released it
    assert exchange.parked is None and exchange.upstream is None
    exchange.finish()
    assert finished == [exchange] and exchange.phase == PHASE_DONE
    assert 0 < exchange.t_start <= exchange.t_upstream <= exchange.t_response <= exchange.t_end
    assert conn.unparked == []


def test_timeouts_unpark_and_answer_by_phase() -> None:
    down = FakeDownstream()
    queue, conn, connecting = FakeConn("queue"), FakeConn("busy"), FakeConn("connecting")
    waiting = make_exchange(down)
    waiting.wait_connection(queue, 105.0)
    waiting.expire(105.0)
    assert waiting.phase == PHASE_WAIT_CONNECTION, "a deadline is never early"
    waiting.expire(105.1)
    opening = make_exchange(down)
    opening.connecting(connecting, ADDRESS, 102.0)
    opening.expire(103.0)
    answering = make_exchange(down)
    answering.sent(conn, ADDRESS, 130.0)
    answering.expire(131.0)
    assert [(e.status, e.detail) for e in down.failures] == [
        (503, "upstream_pending_timeout"),
        (504, "upstream_connect_timeout"),
        (504, "upstream_response_timeout"),
    ]
    assert queue.unparked == [(waiting, True)]
    assert connecting.unparked == [(opening, True)]
    assert conn.unparked == [(answering, True)]
    assert [waiting.error, opening.error, answering.error] == [
        "upstream_pending_timeout",
        "upstream_connect_timeout",
        "upstream_response_timeout",
    ]


def test_a_held_response_clock_does_not_expire() -> None:
    down = FakeDownstream()
    exchange = make_exchange(down)
    exchange.sent(FakeConn("c"), ADDRESS, 130.0)
    exchange.hold()  # the client is the slow one
    exchange.touch(131.0)  # upstream progress does not restart a held clock
    exchange.expire(1e9)
    assert exchange.phase == PHASE_WAIT_RESPONSE
    exchange.release_hold(140.0)
    exchange.touch(150.0)
    exchange.expire(149.0)
    assert exchange.phase == PHASE_WAIT_RESPONSE
    exchange.expire(151.0)
    assert exchange.phase == PHASE_DONE


def test_a_started_response_is_reset_not_answered() -> None:
    reset: list[Exchange] = []

    class Down(FakeDownstream):
        def reset(self, exchange: Exchange) -> None:
            reset.append(exchange)
            exchange.finish()

    down = Down()
    exchange = make_exchange(down)
    exchange.sent(FakeConn("c"), ADDRESS, 130.0)
    exchange.responding()
    exchange.response_started = True
    exchange.expire(131.0)
    assert reset == [exchange] and not down.failures
    assert exchange.error == "upstream_response_timeout"


def test_cancel_releases_whatever_is_held_and_ends_with_499() -> None:
    down = FakeDownstream()
    worker = worker_state()
    finished: list[Exchange] = []
    worker.finished.append(finished.append)
    queued = make_exchange(down, worker, start=False)
    queued.cancel()
    conn = FakeConn("c")
    busy = make_exchange(down, worker)
    busy.sent(conn, ADDRESS, 130.0)
    busy.cancel()
    busy.cancel()  # a second cancel is a no-op
    assert finished == [queued, busy]
    assert [(e.status, e.error) for e in finished] == [(499, "client_closed"), (499, "client_closed")]
    assert conn.unparked == [(busy, False)]
    assert not down.failures


def test_fail_after_the_end_is_a_no_op() -> None:
    down = FakeDownstream()
    exchange = make_exchange(down)
    exchange.fail(ServiceUnavailable("first"))
    exchange.fail(ServiceUnavailable("second"))
    assert [e.detail for e in down.failures] == ["first"]


def test_suspend_and_wake_through_a_wait_list() -> None:
    resumed: list[Exchange] = []

    class Resuming(Pipeline):
        def handle(self, exchange: Exchange) -> None:
            raise AssertionError

        def resume(self, exchange: Exchange) -> None:
            resumed.append(exchange)

        def forward(self, exchange: Exchange) -> None:
            raise AssertionError

    worker = worker_state()
    worker.gateway = Resuming()
    down = FakeDownstream()
    waits = WaitList()
    first, second, gone = (make_exchange(down, worker) for _ in range(3))
    for exchange in (first, second, gone):
        waits.park(exchange, 2.0, GatewayTimeout("jwks_refresh_timeout"))
    assert first.phase == PHASE_SUSPENDED and first.deadline == worker.now + 2.0 and len(waits) == 3
    gone.cancel()  # its client left while it waited
    assert len(waits) == 2
    waits.wake_all()
    assert resumed == [first, second]
    assert first.phase == PHASE_STEPS and first.parked is None and len(waits) == 0


def test_a_suspended_exchange_answers_its_own_error_at_its_deadline() -> None:
    worker = worker_state()
    down = FakeDownstream()
    waits = WaitList()
    exchange = make_exchange(down, worker)
    waits.park(exchange, 0.5, ServiceUnavailable("redis_decision_timeout"))
    exchange.expire(worker.now + 0.4)
    assert exchange.phase == PHASE_SUSPENDED
    exchange.expire(worker.now + 0.6)
    assert [(e.status, e.detail) for e in down.failures] == [(503, "redis_decision_timeout")]
    assert len(waits) == 0


def test_buffering_reserves_body_memory_until_it_leaves_the_phase() -> None:
    worker: WorkerState = worker_state()
    down = FakeDownstream()
    exchange = make_exchange(down, worker)
    exchange.await_body(4096)
    assert exchange.phase == PHASE_BUFFERING and worker.body_reserved == 4096
    exchange.buffer_body(b"x" * 100)
    exchange.cancel()
    assert worker.body_reserved == 0 and exchange.pending_body is None


def test_steps_add_and_remove_headers() -> None:
    exchange = make_exchange(FakeDownstream())
    exchange.headers = [(b"X-Api-Key", b"forged"), (b"Accept", b"*/*")]
    exchange.remove_request_headers(frozenset({b"x-api-key"}))
    exchange.add_request_header(b"x-api-key", b"verified")
    exchange.add_response_header(b"ratelimit", b"limit=10")
    exchange.add_response_header(b"x-ratelimit-limit", b"10")
    assert exchange.headers == [(b"Accept", b"*/*"), (b"x-api-key", b"verified")]
    assert exchange.response_headers == [(b"ratelimit", b"limit=10"), (b"x-ratelimit-limit", b"10")]


def test_exchanges_are_built_with_keywords_only() -> None:
    with pytest.raises(TypeError):
        Exchange(worker_state(), FakeDownstream(), b"GET", b"/", b"h", [], b"id", b"")  # type: ignore[misc]


def test_proxy_errors_carry_headers_and_fields() -> None:
    error = ProxyError("rate_limited", headers=((b"retry-after", b"3"),), fields={"limit": "per_key"})
    assert (error.detail, error.headers, error.fields) == (
        "rate_limited",
        ((b"retry-after", b"3"),),
        {"limit": "per_key"},
    )
