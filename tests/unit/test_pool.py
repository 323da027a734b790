"""Pool bookkeeping without a loop: fake connections, a recording connector, explicit clock."""

from __future__ import annotations

from proxy.config import Address, UpstreamConfig
from proxy.exchange import BODY_NONE, PHASE_CONNECTING, PHASE_DONE, PHASE_WAIT_CONNECTION, Exchange
from proxy.upstream.pool import Cluster, ServerPool
from tests.fakes import FakeConn, FakeDownstream


def exchange(downstream: FakeDownstream) -> Exchange:
    return Exchange(downstream, b"GET", b"/", b"h", [], b"id", b"", BODY_NONE, -1)  # type: ignore[arg-type]


def make(servers: int = 1, **kw: object) -> tuple[Cluster, list[tuple[ServerPool, Exchange]]]:
    connects: list[tuple[ServerPool, Exchange]] = []
    config = UpstreamConfig(
        name="b",
        servers=tuple(Address("127.0.0.1", 9000 + i) for i in range(servers)),
        **kw,  # type: ignore[arg-type]
    )
    return Cluster(config, lambda server, ex: connects.append((server, ex))), connects


def test_connects_then_reuses_lifo() -> None:
    cluster, connects = make()
    down = FakeDownstream()
    first = exchange(down)
    cluster.dispatch(first, now=0.0)
    assert first.phase == PHASE_CONNECTING and first.deadline == 2.0
    server = connects[0][0]
    a, b = FakeConn("a"), FakeConn("b")
    server.open = 2
    cluster.release(server, a, now=1.0)
    cluster.release(server, b, now=2.0)
    nxt = exchange(down)
    cluster.dispatch(nxt, now=3.0)
    assert b.attached == [nxt]  # most recently used first
    assert len(connects) == 1


def test_idle_connections_expire_at_checkout_and_in_sweep() -> None:
    cluster, _connects = make(idle_timeout=10.0)
    server = cluster.servers[0]
    old, fresh = FakeConn("old"), FakeConn("fresh")
    server.open = 2
    cluster.release(server, old, now=0.0)
    cluster.sweep(now=5.0)
    assert not old.closed
    cluster.release(server, fresh, now=9.0)
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
    assert second.phase == PHASE_WAIT_CONNECTION and second.deadline == 5.0
    cluster.dispatch(fourth, now=0.0)
    assert [f.detail for f in down.failures] == ["upstream_overflow"]
    conn = FakeConn("c")
    server = cluster.servers[0]
    second.phase = PHASE_DONE  # gave up (timeout or client gone): skipped
    cluster.release(server, conn, now=1.0)
    assert conn.attached == [third]
    assert not server.idle


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
    cluster.connect_failed(bad, None, now=0.0, timeout=False)
    assert bad.ejected_until == 0.0
    cluster.connect_failed(bad, None, now=0.0, timeout=False)
    assert bad.ejected_until == 10.0
    connects.clear()
    for _ in range(3):
        cluster.dispatch(exchange(down), now=1.0)
    assert {server.address.port for server, _ in connects} == {9001}
    connects.clear()
    cluster.dispatch(exchange(down), now=11.0)
    cluster.dispatch(exchange(down), now=11.0)
    assert {server.address.port for server, _ in connects} == {9000, 9001}


def test_connect_failure_tries_next_server_then_fails_503() -> None:
    cluster, connects = make(servers=2)
    down = FakeDownstream()
    ex = exchange(down)
    cluster.dispatch(ex, now=0.0)
    first_server = connects[-1][0]
    cluster.connect_failed(first_server, ex, now=0.0, timeout=False)
    second_server = connects[-1][0]
    assert second_server is not first_server and ex.phase == PHASE_CONNECTING
    cluster.connect_failed(second_server, ex, now=0.0, timeout=False)
    assert [f.status for f in down.failures] == [503]


def test_connect_timeout_is_504_and_all_ejected_is_503() -> None:
    cluster, connects = make(max_fails=1)
    down = FakeDownstream()
    ex = exchange(down)
    cluster.dispatch(ex, now=0.0)
    cluster.connect_failed(connects[0][0], ex, now=0.0, timeout=True)
    assert [f.status for f in down.failures] == [504]
    cluster.dispatch(exchange(down), now=1.0)
    assert down.failures[-1].detail == "no_healthy_upstream"
