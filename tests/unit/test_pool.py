"""Pool bookkeeping without a loop: fake connections, a recording connector, explicit clock."""

from __future__ import annotations

import logging

import pytest

from proxy.config import Address, UpstreamConfig
from proxy.exchange import PHASE_CONNECTING, PHASE_DONE, PHASE_WAIT_CONNECTION, PHASE_WAIT_RESPONSE, Exchange
from proxy.upstream.pool import LOG_INTERVAL, Cluster, ServerPool
from tests.fakes import FakeConn, FakeDownstream, make_exchange, worker_state

Connects = list[tuple[ServerPool, Exchange]]


def make(servers: int = 1, **kw: object) -> tuple[Cluster, Connects]:
    connects: Connects = []
    config = UpstreamConfig(
        name="b",
        servers=tuple(Address("127.0.0.1", 9000 + i) for i in range(servers)),
        **kw,  # type: ignore[arg-type]
    )

    def connector(server: ServerPool, exchange: Exchange) -> FakeConn:
        connects.append((server, exchange))
        return FakeConn(f"connecting to {server.address}", server.address)

    return Cluster(config, connector), connects


def exchange(down: FakeDownstream) -> Exchange:
    return make_exchange(down)


def release(cluster: Cluster, server: ServerPool, conn: FakeConn, now: float) -> None:
    """Give `conn` back as a connection does: its idle clock set first."""
    conn.idle_since = now
    cluster.release(server, conn)


def test_connects_then_reuses_lifo() -> None:
    cluster, connects = make()
    down = FakeDownstream()
    first = exchange(down)
    cluster.dispatch(first, now=0.0)
    assert first.phase == PHASE_CONNECTING and first.deadline == 2.0
    assert first.server == Address("127.0.0.1", 9000)
    server = connects[0][0]
    a, b = FakeConn("a"), FakeConn("b")
    server.open = 2
    release(cluster, server, a, now=1.0)
    release(cluster, server, b, now=2.0)
    nxt = exchange(down)
    cluster.dispatch(nxt, now=3.0)
    assert b.attached == [nxt] and nxt.phase == PHASE_WAIT_RESPONSE  # most recently used first
    assert len(connects) == 1


def test_idle_connections_expire_at_checkout_and_in_sweep() -> None:
    cluster, _connects = make(idle_timeout=10.0)
    server = cluster.servers[0]
    old, fresh = FakeConn("old"), FakeConn("fresh")
    server.open = 2
    release(cluster, server, old, now=0.0)
    cluster.sweep(now=5.0)
    assert not old.closed
    release(cluster, server, fresh, now=9.0)
    cluster.sweep(now=10.5)
    assert old.closed and not fresh.closed
    stale = FakeConn("stale")
    server.idle.append(stale)
    stale.idle_since = 0.0
    ex = exchange(FakeDownstream())
    cluster.dispatch(ex, now=12.0)
    assert stale.closed and fresh.attached == [ex]


def test_limit_queues_waiters_fifo_and_release_hands_over() -> None:
    cluster, _connects = make(max_connections=1, max_pending=2, pending_timeout=5.0)
    down = FakeDownstream()
    first, second, third, fourth = (exchange(down) for _ in range(4))
    cluster.dispatch(first, now=0.0)
    cluster.dispatch(second, now=0.0)
    cluster.dispatch(third, now=0.0)
    assert second.phase == PHASE_WAIT_CONNECTION and second.deadline == 5.0 and second.parked is cluster
    cluster.dispatch(fourth, now=0.0)
    assert [f.detail for f in down.failures] == ["upstream_overflow"] and fourth.phase == PHASE_DONE
    conn = FakeConn("c")
    server = cluster.servers[0]
    second.cancel()  # its client went away: it leaves the queue at once
    assert list(cluster.waiters) == [third]
    release(cluster, server, conn, now=1.0)
    assert conn.attached == [third]
    assert not server.idle


def test_a_waiter_past_its_deadline_is_answered_503_and_leaves_the_queue() -> None:
    cluster, _connects = make(max_connections=1, pending_timeout=5.0)
    down = FakeDownstream()
    first, second = exchange(down), exchange(down)
    cluster.dispatch(first, now=0.0)
    cluster.dispatch(second, now=0.0)
    second.expire(4.9)
    assert second.phase == PHASE_WAIT_CONNECTION
    second.expire(5.1)
    assert [f.detail for f in down.failures] == ["upstream_pending_timeout"] and down.failures[0].status == 503
    assert second.phase == PHASE_DONE and not cluster.waiters


def test_discard_frees_a_slot_for_a_waiter() -> None:
    cluster, connects = make(max_connections=1)
    down = FakeDownstream()
    first, second = exchange(down), exchange(down)
    cluster.dispatch(first, now=0.0)
    cluster.dispatch(second, now=0.0)
    server = cluster.servers[0]
    cluster.discard(server, None, now=1.0)
    assert [ex for _, ex in connects] == [first, second]
    assert second.phase == PHASE_CONNECTING and server.open == 1


def test_round_robin_and_ejection_after_consecutive_failures() -> None:
    cluster, connects = make(servers=2, max_fails=2, fail_cooldown=10.0)
    down = FakeDownstream()
    for _ in range(4):
        cluster.dispatch(exchange(down), now=0.0)
    ports = [server.address.port for server, _ in connects]
    assert ports == [9000, 9001, 9000, 9001]
    bad = cluster.servers[0]
    cluster.connect_failed(bad, None, now=0.0, timeout=False, reason="connection refused")
    assert bad.ejected_until == 0.0
    cluster.connect_failed(bad, None, now=0.0, timeout=False, reason="connection refused")
    assert bad.ejected_until == 10.0
    connects.clear()
    for _ in range(3):
        cluster.dispatch(exchange(down), now=1.0)
    assert {server.address.port for server, _ in connects} == {9001}
    connects.clear()
    cluster.dispatch(exchange(down), now=11.0)
    cluster.dispatch(exchange(down), now=11.0)
    assert {server.address.port for server, _ in connects} == {9000, 9001}


def test_the_last_healthy_server_is_never_ejected() -> None:
    """Like NGINX: an upstream never has all its servers marked down; a server that is back is used at once
    (it used to answer `no_healthy_upstream` for the whole cooldown after the only server came back)."""
    single, connects = make(max_fails=1, fail_cooldown=30.0)
    down = FakeDownstream()
    for _ in range(5):
        single.connect_failed(single.servers[0], None, now=0.0, timeout=False, reason="connection refused")
    assert single.servers[0].ejected_until == 0.0
    ex = exchange(down)
    single.dispatch(ex, now=1.0)
    assert ex.phase == PHASE_CONNECTING and connects[-1][0] is single.servers[0] and not down.failures

    pair, connects = make(servers=2, max_fails=1, fail_cooldown=30.0)
    a, b = pair.servers
    pair.connect_failed(a, None, now=0.0, timeout=False, reason="connection refused")
    assert a.ejected_until == 30.0
    pair.connect_failed(b, None, now=0.0, timeout=False, reason="connection refused")
    assert b.ejected_until == 0.0, "b is the last healthy server"
    ex = exchange(down)
    pair.dispatch(ex, now=1.0)
    assert connects[-1][0] is b and ex.phase == PHASE_CONNECTING


def test_connect_failure_tries_next_server_then_fails_503() -> None:
    cluster, connects = make(servers=2)
    down = FakeDownstream()
    ex = exchange(down)
    cluster.dispatch(ex, now=0.0)
    first_server = connects[-1][0]
    cluster.connect_failed(first_server, ex, now=0.0, timeout=False, reason="connection refused")
    second_server = connects[-1][0]
    assert second_server is not first_server and ex.phase == PHASE_CONNECTING
    cluster.connect_failed(second_server, ex, now=0.0, timeout=False, reason="connection refused")
    assert [(f.status, f.detail) for f in down.failures] == [(503, "upstream_connect_failed")]


def test_connect_timeout_is_504() -> None:
    cluster, connects = make()
    down = FakeDownstream()
    ex = exchange(down)
    cluster.dispatch(ex, now=0.0)
    cluster.connect_failed(connects[0][0], ex, now=0.0, timeout=True, reason="connect timeout")
    assert [(f.status, f.detail) for f in down.failures] == [(504, "upstream_connect_timeout")]


def test_failures_are_logged_once_per_interval_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    cluster, _ = make()
    server = cluster.servers[0]
    caplog.set_level(logging.WARNING, logger="uvgate.upstream")
    for second in range(5):
        cluster.report(server, "connection refused", now=float(second))
    cluster.report(server, "response timeout", now=5.0)
    cluster.report(server, "connection refused", now=LOG_INTERVAL + 0.5)
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "upstream b server 127.0.0.1:9000: connection refused",
        "upstream b server 127.0.0.1:9000: response timeout",
        "upstream b server 127.0.0.1:9000: connection refused (4 more since the last report)",
    ]


def test_a_waiter_that_is_not_waiting_any_more_is_skipped() -> None:
    """release/discard hand connections only to exchanges still in WAIT_CONNECTION."""
    cluster, _ = make(max_connections=1)
    down = FakeDownstream()
    first, second = exchange(down), exchange(down)
    cluster.dispatch(first, now=0.0)
    cluster.dispatch(second, now=0.0)
    worker = worker_state()
    stray = make_exchange(down, worker)  # queued by mistake: never waited here
    cluster.waiters.appendleft(stray)
    conn = FakeConn("c")
    release(cluster, cluster.servers[0], conn, now=1.0)
    assert conn.attached == [second]
