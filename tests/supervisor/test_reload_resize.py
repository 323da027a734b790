"""Reloads that change the number of workers: the slots follow, no extra worker survives, nothing breaks."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from devstack import ProxyFactory, RawHTTPConnection, Service

from .helpers import (
    children,
    config,
    log_matches,
    readyz,
    shadow_env,
    wait_for_log,
    wait_until,
    worker_starts,
    write_config,
)


def test_reload_to_fewer_then_more_workers(proxy_factory: ProxyFactory, backend_stub: Service) -> None:
    proxy = proxy_factory(config(workers=2), workers=None)  # no --workers: the file decides
    assert len(children(proxy)) == 2

    write_config(proxy, config(workers=1))
    proxy.send_signal(signal.SIGHUP)
    wait_for_log(proxy, r"generation 2 serving")
    gen2 = {s.pid for s in worker_starts(proxy) if s.generation == 2}
    assert len(gen2) == 1, worker_starts(proxy)
    wait_until(lambda: children(proxy) == gen2, 15.0, "only the one generation-2 worker left", proxy)
    assert readyz(proxy) == 200

    # The remaining worker crashes: it is replaced and the supervisor lives on.
    (only,) = gen2
    os.kill(only, signal.SIGKILL)
    wait_until(lambda: len(children(proxy) - gen2) == 1, 15.0, "a replacement worker", proxy)
    wait_until(lambda: readyz(proxy) == 200, 15.0, "/readyz 200 again", proxy)
    assert proxy.running

    write_config(proxy, config(workers=3))
    proxy.send_signal(signal.SIGHUP)
    wait_for_log(proxy, r"generation 3 serving")
    gen3 = {s.pid for s in worker_starts(proxy) if s.generation == 3}
    assert len(gen3) == 3
    wait_until(lambda: children(proxy) == gen3, 15.0, "the three generation-3 workers", proxy)
    assert readyz(proxy) == 200


def test_failed_reload_to_more_workers_strands_no_connection(
    proxy_factory: ProxyFactory, backend_stub: Service, tmp_path: Path
) -> None:
    """A reload adds a slot, its worker fails to boot, the slot's socket is closed again. Connections
    made meanwhile must all reach the old worker: a socket only joins the SO_REUSEPORT group when a
    worker listens on it, so none can be queued on the added socket and reset when it closes."""
    shadow = tmp_path / "shadow"
    env = shadow_env(shadow)
    proxy = proxy_factory(config(workers=1), workers=None, env=env)
    (old,) = children(proxy)

    # From now on a new worker cannot import uvloop: the next generation fails at boot.
    (shadow / "uvloop.py").write_text('raise ImportError("uvloop is broken for the next generation (test)")\n')
    write_config(proxy, config(workers=2))
    opened: list[RawHTTPConnection] = []
    try:
        proxy.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20.0
        while not log_matches(proxy, r"reload aborted"):
            assert time.monotonic() < deadline, f"the reload was not aborted:\n{proxy.read_log()}"
            for _ in range(10):  # connect while the added socket exists (connect only: nothing is sent yet)
                opened.append(RawHTTPConnection(proxy.host, proxy.port, timeout=10.0))
        assert len(opened) >= 10
        for conn in opened:
            conn.request("GET", "/api/resource")
        statuses = [conn.read_response().status for conn in opened]
    finally:
        for conn in opened:
            conn.close()
    assert statuses == [200] * len(opened), statuses
    assert children(proxy) == {old}
    assert readyz(proxy) == 200
