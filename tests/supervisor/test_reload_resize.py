"""Reloads that change the number of workers: the slots follow, no extra worker survives, nothing breaks."""

from __future__ import annotations

import os
import signal

from devstack import ProxyFactory, Service

from .helpers import children, config, readyz, wait_for_log, wait_until, worker_starts, write_config


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
