"""SIGTERM drains: the request in flight completes (with Connection: close), then everything exits 0.

Also the admin listener: /healthz, /readyz (200 serving, 503 draining), loopback by default.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from devstack import ProxyFactory, RawHTTPConnection, Service, free_port, http_get
from devstack.procfs import cpu_seconds, pid_alive
from proxy.config import ServerConfig, load
from tests.helpers import backend_requests, wait_backend_requests
from tests.supervisor.helpers import (
    WRAP_REAL_UVLOOP,
    admin,
    api_body,
    children,
    config,
    connect_refused,
    listening_addresses,
    shadow_env,
    wait_for_log,
    wait_until,
)
from tests.supervisor.load import LoadGenerator

DELAY_MS = 2000


def _start_delayed(conn: RawHTTPConnection, backend: Service) -> float:
    """Send GET /delay?ms=DELAY_MS and wait until backend_stub holds it; returns when it was sent."""
    before = backend_requests(backend)
    sent = time.monotonic()
    conn.request("GET", f"/delay?ms={DELAY_MS}")
    wait_backend_requests(backend, before, 1)
    return sent


def _read_delayed(conn: RawHTTPConnection, backend: Service, sent: float) -> None:
    """Read the answer to `_start_delayed`: the backend's, after the delay, closing the connection."""
    response = conn.read_response(timeout=10.0)
    elapsed = time.monotonic() - sent
    assert response.status == 200, response
    assert response.body == api_body(backend)
    assert (response.header("connection") or "").lower() == "close", response.headers
    assert elapsed >= DELAY_MS / 1000 * 0.9, f"answered after {elapsed:.2f}s: not the delayed response?"


def test_sigterm_completes_the_request_in_flight_then_exits_0(
    proxy_factory: ProxyFactory, backend_stub: Service
) -> None:
    proxy = proxy_factory(config(drain_timeout="10s"), workers=2)
    workers = children(proxy)
    assert len(workers) == 2
    with RawHTTPConnection(proxy.host, proxy.port, timeout=10.0) as conn:
        sent = _start_delayed(conn, backend_stub)
        proxy.send_signal(signal.SIGTERM)
        wait_for_log(proxy, r"SIGTERM: draining")
        assert proxy.exit_status() is None, "the supervisor waits for the request in flight"
        _read_delayed(conn, backend_stub, sent)
        assert conn.closed_by_peer(5.0), "the draining worker closes the connection after the response"
    assert proxy.wait(15.0) == 0, proxy.read_log()
    log = proxy.read_log()
    assert "supervisor exiting with code 0" in log
    for pid in workers:
        assert f"worker {pid} (slot" in log and not pid_alive(pid)
    assert "drain_timeout reached" not in log and "did not stop in time" not in log
    assert proxy.process.group_pids() == [], "no worker process remains"


def test_sigterm_refuses_new_connections_while_the_request_in_flight_completes(
    proxy_factory: ProxyFactory, backend_stub: Service
) -> None:
    """On a stop the slot sockets stop listening at once: a new connection is refused (a load balancer
    retries elsewhere) instead of waiting in a queue no worker serves any more, to be reset when the
    supervisor exits. The request in flight still completes."""
    proxy = proxy_factory(config(drain_timeout="10s"), workers=2)
    workers = children(proxy)
    assert not connect_refused(proxy)
    with RawHTTPConnection(proxy.host, proxy.port, timeout=10.0) as conn:
        sent = _start_delayed(conn, backend_stub)
        proxy.send_signal(signal.SIGTERM)
        wait_for_log(proxy, r"SIGTERM: draining")
        wait_until(lambda: connect_refused(proxy), 1.5, "a new connection refused", proxy)
        assert proxy.exit_status() is None, "refused during the drain, not because the supervisor is gone"
        for _ in range(10):  # every new connection, whichever slot socket the kernel would have picked
            assert connect_refused(proxy)

        # The workers' listening sockets were shut down under them: they neither fail nor spin on them.
        before = cpu_seconds(workers)
        time.sleep(0.5)  # a measurement window, not a wait for a condition
        assert cpu_seconds(workers) - before < 0.2, "draining workers busy while waiting for one response"

        _read_delayed(conn, backend_stub, sent)
    assert proxy.wait(15.0) == 0, proxy.read_log()
    log = proxy.read_log()
    assert " ERROR " not in log and "Traceback" not in log, log
    assert proxy.process.group_pids() == []


# uvloop whose create_server waits for a file `go` next to it (after writing `booting.<pid>`), and whose
# worker lingers after its drain until a file `exit` exists: a stop can begin while workers boot, and the
# supervisor stays up after they listened.
SLOW_BOOT_UVLOOP = (
    WRAP_REAL_UVLOOP
    + """

class Loop(_real.Loop):
    async def create_server(self, *args, **kwargs):
        open(os.path.join(_here, f"booting.{os.getpid()}"), "w").close()
        while not os.path.exists(os.path.join(_here, "go")):
            await asyncio.sleep(0.01)
        return await super().create_server(*args, **kwargs)

    def run_until_complete(self, future):
        result = super().run_until_complete(future)
        while not os.path.exists(os.path.join(_here, "exit")):
            time.sleep(0.01)
        return result
"""
)


def test_a_stop_while_workers_boot_refuses_connections_once_they_listen(
    proxy_factory: ProxyFactory, backend_stub: Service, tmp_path: Path
) -> None:
    """Only a listening socket can be shut down: a slot whose worker was still booting when the stop
    began starts listening afterwards, and the supervisor shuts it down then (when the worker reports
    ready), so connections are refused instead of queuing until the supervisor exits."""
    shadow = tmp_path / "shadow"
    env = shadow_env(shadow)
    (shadow / "uvloop.py").write_text(SLOW_BOOT_UVLOOP)
    proxy = proxy_factory(config(), workers=2, wait_ready=False, env=env)
    wait_until(lambda: len(list(shadow.glob("booting.*"))) == 2, 15.0, "both workers creating their server", proxy)
    proxy.send_signal(signal.SIGTERM)
    wait_for_log(proxy, r"stopping: no longer listening")
    (shadow / "go").touch()
    wait_for_log(proxy, r"worker \d+ \(slot 0\) ready")
    wait_for_log(proxy, r"worker \d+ \(slot 1\) ready")
    wait_until(lambda: connect_refused(proxy), 1.5, "a new connection refused", proxy)
    for _ in range(10):
        assert connect_refused(proxy)
    assert proxy.exit_status() is None, "the workers linger: the supervisor still holds the sockets"
    (shadow / "exit").touch()
    assert proxy.wait(15.0) == 0, proxy.read_log()


def test_sigterm_under_load_ends_connections_cleanly(proxy_factory: ProxyFactory, backend_stub: Service) -> None:
    """Keep-alive clients see Connection: close on their last response, never a reset, while the proxy drains."""
    proxy = proxy_factory(config(), workers=2)
    load = LoadGenerator(proxy.host, proxy.port, connections=4, duration=3.0, expect_body=api_body(backend_stub))
    with load:
        load.wait_for_successes(200)
        stopped_at = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(15.0) == 0, proxy.read_log()
        load.stop()
    result = load.join()
    before_stop = [f for f in result.failures if f.at < stopped_at]
    assert before_stop == [], result.summary()
    # Clients that reconnect after Connection: close are refused (the supervisor stops listening when the
    # stop begins); one that connected just before lands in an accept queue nobody serves any more and is
    # reset (at send or receive). That is inherent to stopping. What must not happen is a keep-alive
    # connection that a draining worker was serving being dropped under a request.
    never_served = {"connect", "send", "reset", "eof"}
    dropped = [f for f in result.failures if f.request_on_conn > 0 or f.kind not in never_served]
    assert dropped == [], result.summary()
    assert result.server_closes > 0, result.summary()


def test_admin_healthz_and_readyz_while_serving_and_draining(
    proxy_factory: ProxyFactory, backend_stub: Service
) -> None:
    proxy = proxy_factory(config(drain_timeout="10s"), workers=2)
    assert admin(proxy, "/healthz") == (200, {"status": "alive"})
    status, body = admin(proxy, "/readyz")
    assert status == 200 and body["ready"] is True and body["draining"] is False and body["workers"] == 2, body
    assert admin(proxy, "/nope")[0] == 404

    with RawHTTPConnection(proxy.host, proxy.port, timeout=10.0) as conn:
        _start_delayed(conn, backend_stub)
        proxy.send_signal(signal.SIGTERM)

        def draining() -> tuple[int, dict[str, object]] | None:
            answer = admin(proxy, "/readyz")
            return answer if answer[0] == 503 else None

        status, body = wait_until(draining, 1.5, "/readyz 503 while draining", proxy)
        assert body["ready"] is False and body["draining"] is True, body
        assert proxy.exit_status() is None, "still draining the request in flight"
        assert admin(proxy, "/healthz")[0] == 200, "alive while draining"
        response = conn.read_response(timeout=10.0)
        assert response.status == 200, response
    assert proxy.wait(15.0) == 0, proxy.read_log()


def test_admin_listener_is_loopback_by_default(
    proxy_factory: ProxyFactory, backend_stub: Service, tmp_path: Path
) -> None:
    # Not configured at all: 127.0.0.1.
    assert ServerConfig().admin_listen.host == "127.0.0.1"
    bare = tmp_path / "bare.toml"
    bare.write_text('[upstreams.b]\nservers = ["127.0.0.1:1"]\n[[routes]]\nprefix = "/"\nupstream = "b"\n')
    assert load(str(bare), env={}).server.admin_listen.host == "127.0.0.1"

    # Configured with a port only (UVGATE_ADMIN_LISTEN=":PORT"): the running supervisor binds loopback only.
    port = free_port()
    proxy = proxy_factory(config(), workers=1, admin_port=port, env={"UVGATE_ADMIN_LISTEN": f":{port}"})
    assert http_get(proxy.admin_url + "/healthz")[0] == 200
    assert listening_addresses(port) == {("127.0.0.1", port)}
    other = _non_loopback_ipv4()
    if other is not None:
        with socket.socket() as sock:
            sock.settimeout(2.0)
            assert sock.connect_ex((other, port)) != 0, f"admin reachable on {other}:{port}"


def _non_loopback_ipv4() -> str | None:
    """A non-loopback IPv4 address of this host, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: only selects a route
        except OSError:
            return None
        address: str = sock.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address
