"""A second uvgate on the address of a running one is refused (exit 4) instead of joining its
SO_REUSEPORT group and taking part of its traffic; a restart on the same port is not refused."""

from __future__ import annotations

import hashlib
import signal

from devstack import ProxyFactory, ProxyService, RawHTTPConnection, Service
from devstack.rawhttp import build_request
from tests.helpers import backend_stats, pattern, wait_backend_count
from tests.supervisor.helpers import (
    api_body,
    children,
    config,
    connect_refused,
    echoed_via,
    get,
    listening_addresses,
    tcp_table,
    wait_for_log,
    wait_until,
    worker_starts,
    write_config,
)

EXIT_BIND_FAILURE = 4
TCP_TIME_WAIT = "06"


def _listeners(port: int) -> int:
    """How many sockets listen on 127.0.0.1:`port` (each slot socket of a serving proxy is one)."""
    return sum(1 for e in tcp_table() if e.state == "0A" and e.local == ("127.0.0.1", port))


def _serves_everything(proxy: ProxyService, backend: Service, requests: int = 20) -> None:
    body = api_body(backend)
    for _ in range(requests):  # fresh connections: the kernel picks a listener for each
        status, _, got = get(proxy)
        assert status == 200 and got == body, (status, got)


def test_second_instance_on_the_same_port_exits_4_and_the_first_keeps_everything(
    proxy_factory: ProxyFactory, backend_stub: Service
) -> None:
    first = proxy_factory(config(via="1.1 gen1"), workers=2)
    assert _listeners(first.port) == 2
    second = proxy_factory(config(), workers=2, listen_port=first.port, wait_ready=False)
    status = second.wait(15.0)
    log = second.read_log()
    assert status == EXIT_BIND_FAILURE, log
    lines = [line for line in log.splitlines() if "cannot listen" in line]
    assert len(lines) == 1, log
    assert f"cannot listen on 127.0.0.1:{first.port}: Address already in use" in lines[0], log
    assert worker_starts(second) == [], "refused before any worker starts"
    assert second.process.group_pids() == []

    assert _listeners(first.port) == 2, "the second instance left no socket in the first one's group"
    assert first.exit_status() is None
    _serves_everything(first, backend_stub)

    # The running instance still reloads: a reload binds more sockets on the same address.
    old = children(first)
    write_config(first, config(via="1.1 gen2", workers=3))
    first.send_signal(signal.SIGHUP)
    wait_for_log(first, r"generation 2 serving")
    new = {s.pid for s in worker_starts(first) if s.generation == 2}
    assert len(new) == 3 and not new & old
    wait_until(lambda: children(first) == new, 15.0, "only generation 2 workers left", first)
    assert echoed_via(first) == "1.1 gen2"
    assert _listeners(first.port) == 3
    _serves_everything(first, backend_stub)


def test_restart_on_the_same_port_is_not_refused(proxy_factory: ProxyFactory, backend_stub: Service) -> None:
    """The probe ignores what a stopped instance leaves behind: its connections in TIME_WAIT."""
    first = proxy_factory(config(), workers=1)
    port = first.port
    for _ in range(3):  # the proxy closes first (Connection: close): TIME_WAIT on its side, local port `port`
        with RawHTTPConnection(first.host, port, timeout=5.0) as conn:
            conn.request("GET", "/api/resource", headers=[("Connection", "close")])
            assert conn.read_response().status == 200
            assert conn.closed_by_peer(5.0)
    wait_until(
        lambda: any(e.state == TCP_TIME_WAIT and e.local[1] == port for e in tcp_table()),
        5.0,
        f"a TIME_WAIT connection on port {port}",
    )
    first.send_signal(signal.SIGTERM)
    assert first.wait(15.0) == 0, first.read_log()
    assert listening_addresses(port) == set()
    assert any(e.state == TCP_TIME_WAIT and e.local[1] == port for e in tcp_table()), "TIME_WAIT outlived the stop"

    second = proxy_factory(config(), workers=2, listen_port=port)
    assert _listeners(port) == 2
    _serves_everything(second, backend_stub)


def test_a_new_instance_may_start_while_the_stopped_one_drains(
    proxy_factory: ProxyFactory, backend_stub: Service
) -> None:
    """A stopping instance no longer listens, so a new one on the same port passes the probe (the old
    one's connections still being answered do not count) and takes the new connections at once."""
    first = proxy_factory(config(drain_timeout="30s"), workers=1)
    port = first.port
    body = pattern(100_000)
    request = build_request("POST", "/echo", body=body, host=f"{first.host}:{port}")
    with RawHTTPConnection(first.host, port, timeout=15.0) as conn:
        # In flight until the test sends the rest of the body: the first instance drains until then.
        accepted = backend_stats(backend_stub)["connections_accepted"]
        conn.send(request[:-1000])
        wait_backend_count(backend_stub, "connections_accepted", accepted, 1)  # the proxy forwards it
        first.send_signal(signal.SIGTERM)
        wait_until(lambda: connect_refused(first), 5.0, "the stopping instance refusing connections", first)

        second = proxy_factory(config(), workers=2, listen_port=port)
        assert first.exit_status() is None, "the first instance is still draining"
        assert _listeners(port) == 2, "only the second instance listens"
        _serves_everything(second, backend_stub)

        conn.send(request[-1000:])
        response = conn.read_response()
        assert response.status == 200 and (response.header("connection") or "").lower() == "close", response
        assert response.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert first.wait(15.0) == 0, first.read_log()
    _serves_everything(second, backend_stub)
