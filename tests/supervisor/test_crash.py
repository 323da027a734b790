"""Worker crashes: `kill -9` of a worker under load, and repeated crashes of one slot (restart backoff)."""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from pathlib import Path

from devstack import ProxyFactory, ProxyService, Service
from devstack.procfs import pid_alive
from tests.supervisor.helpers import (
    WRAP_REAL_UVLOOP,
    api_body,
    children,
    client_ports,
    config,
    get,
    readyz,
    shadow_env,
    slot_workers,
    wait_for_log,
    wait_ready,
    wait_until,
    worker_starts,
)
from tests.supervisor.load import CONNECTION_ERRORS, LoadGenerator

CONNECTIONS = 8
EXIT_CRASH = 70  # EX_SOFTWARE: what a worker exits with when an error ends it after it reported ready

# uvloop, except that SIGUSR1 makes the worker's `run_until_complete` cancel what it runs and raise:
# an error escaping the worker's serve() after it reported ready, at the moment the test chooses.
CRASHING_UVLOOP = (
    WRAP_REAL_UVLOOP
    + """
import signal


class Loop(_real.Loop):
    def run_until_complete(self, future):
        crash = self.create_future()
        self.add_signal_handler(signal.SIGUSR1, lambda: crash.done() or crash.set_result(None))

        async def until_crash():
            task = asyncio.ensure_future(future)
            await asyncio.wait([task, crash], return_when=asyncio.FIRST_COMPLETED)
            if not crash.done():
                return task.result()
            task.cancel()
            await asyncio.wait([task])
            raise RuntimeError("Redis connection lost (test: crash after ready)")

        return super().run_until_complete(until_crash())
"""
)


def _wait_replacement(proxy: ProxyService, victim: int, slot: int = 0) -> int:
    """Wait until a worker other than `victim` was started on `slot`; its pid."""

    def replacement() -> int | None:
        pid = slot_workers(proxy).get(slot)
        return pid if pid is not None and pid != victim else None

    return wait_until(replacement, 10.0, f"a new worker on slot {slot} replacing {victim}", proxy)


def test_kill_9_worker_under_load_is_replaced(proxy_factory: ProxyFactory, backend_stub: Service) -> None:
    proxy = proxy_factory(config(), workers=2)
    workers = slot_workers(proxy)
    assert set(workers) == {0, 1} and children(proxy) == set(workers.values())
    victim, survivor = workers[0], workers[1]

    with LoadGenerator(
        proxy.host, proxy.port, connections=CONNECTIONS, duration=4.0, expect_body=api_body(backend_stub)
    ) as load:
        load.wait_for_successes(200)
        load.wait_elapsed(1.0)
        # The load connections the victim holds right now: the only ones allowed to fail.
        victim_conns = client_ports(victim, proxy.port)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        wait_for_log(proxy, rf"worker {victim} \(slot 0\) died \(killed by SIGKILL")
        replacement = _wait_replacement(proxy, victim)
        wait_for_log(proxy, rf"worker {replacement} \(slot 0\) ready")
        wait_ready(proxy, 5.0)
        ready_at = time.monotonic()
        assert not pid_alive(victim)
        assert children(proxy) == {replacement, survivor}, "slot 1 keeps its worker; slot 0 has the new one"
    result = load.join()

    summary = result.summary()
    assert result.duration >= 3.0, summary
    assert len(result.failures) <= CONNECTIONS, summary
    assert len(result.failures) <= len(victim_conns), f"victim held {sorted(victim_conns)}\n{summary}"
    for failure in result.failures:
        assert failure.at >= killed_at, f"failure before the kill: {failure}\n{summary}"
        assert failure.kind in CONNECTION_ERRORS, f"not a broken connection: {failure}\n{summary}"
        assert failure.local_port in victim_conns, (
            f"failed on a connection the killed worker did not hold {sorted(victim_conns)}: {failure}\n{summary}"
        )
    per_conn = Counter(f.conn for f in result.failures)
    assert all(n == 1 for n in per_conn.values()), f"a load connection failed more than once\n{summary}"
    assert result.successes_after(killed_at) > 0, summary
    assert result.successes_after(ready_at) > 0, f"no success after the replacement was ready\n{summary}"
    assert proxy.exit_status() is None
    assert readyz(proxy) == 200


def test_repeated_crashes_of_one_slot_are_restarted_with_backoff(
    proxy_factory: ProxyFactory, backend_stub: Service
) -> None:
    proxy = proxy_factory(config(), workers=2)
    workers = slot_workers(proxy)
    survivor = workers[1]
    victims: list[int] = []
    for _ in range(3):
        victim = slot_workers(proxy)[0]
        victims.append(victim)
        os.kill(victim, signal.SIGKILL)
        wait_for_log(proxy, rf"worker {victim} \(slot 0\) died \(killed by SIGKILL")
        replacement = _wait_replacement(proxy, victim)
        wait_for_log(proxy, rf"worker {replacement} \(slot 0\) ready")
        wait_ready(proxy, 5.0)
        assert proxy.exit_status() is None, "the supervisor must keep running"

    log = proxy.read_log()
    delays = [float(m[1]) for m in re.finditer(r"\(slot 0\) died \(killed by SIGKILL.*restarting in ([0-9.]+)s", log)]
    assert len(delays) == 3, log
    assert delays == sorted(delays) and delays[-1] > delays[0], f"restart delays should back off: {delays}"
    slot0 = [s for s in worker_starts(proxy) if s.slot == 0]
    assert [s.pid for s in slot0[:3]] == victims and len(slot0) == 4, slot0
    assert len({s.pid for s in slot0}) == 4
    assert not any(pid_alive(v) for v in victims)
    assert slot_workers(proxy)[1] == survivor and pid_alive(survivor)
    assert children(proxy) == {slot0[-1].pid, survivor}
    for _ in range(4):  # fresh connections are spread over both slots
        status, _, body = get(proxy)
        assert status == 200, body
    assert "failed to boot" not in log


def test_crash_after_ready_is_restarted_not_taken_for_a_boot_failure(
    proxy_factory: ProxyFactory, backend_stub: Service, tmp_path: Path
) -> None:
    """An error that ends a worker after it reported ready exits 70, not 3 (boot failure): the worker
    is replaced with backoff, the supervisor names the exit code and the reason, and keeps serving."""
    shadow = tmp_path / "shadow"
    env = shadow_env(shadow)
    (shadow / "uvloop.py").write_text(CRASHING_UVLOOP)
    proxy = proxy_factory(config(), workers=2, env=env)
    workers = slot_workers(proxy)
    victim, survivor = workers[0], workers[1]
    for _ in range(4):
        status, _, body = get(proxy)
        assert status == 200, body

    os.kill(victim, signal.SIGUSR1)
    died = wait_for_log(proxy, rf"worker {victim} \(slot 0\) died \(exit code (\d+)\): (.*); restarting in")
    assert died[0][1] == str(EXIT_CRASH), proxy.read_log()
    assert died[0][2] == "RuntimeError: Redis connection lost (test: crash after ready)", proxy.read_log()
    replacement = _wait_replacement(proxy, victim)
    wait_for_log(proxy, rf"worker {replacement} \(slot 0\) ready")
    wait_ready(proxy, 5.0)
    assert proxy.exit_status() is None, "a crash after ready must not stop the supervisor"
    assert not pid_alive(victim)
    assert children(proxy) == {replacement, survivor}
    for _ in range(4):  # fresh connections are spread over both slots
        status, _, body = get(proxy)
        assert status == 200, body
    assert "failed to boot" not in proxy.read_log()
