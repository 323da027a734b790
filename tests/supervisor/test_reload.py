"""SIGHUP: a valid config is rolled out under load without a single failed request; an invalid one is rejected."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from devstack import ProxyFactory, ProxyService, Service
from devstack.procfs import pid_alive
from tests.supervisor.helpers import (
    admin,
    api_body,
    children,
    config,
    echoed_via,
    get,
    log_matches,
    readyz,
    slot_workers,
    wait_for_log,
    wait_until,
    worker_starts,
    write_config,
)
from tests.supervisor.load import LoadGenerator

CONNECTIONS = 8


def _reload(proxy: ProxyService, generation: int, data: dict[str, Any]) -> set[int]:
    """Write `data` over the config file, SIGHUP, wait until `generation` serves alone; its worker pids."""
    old = children(proxy)
    write_config(proxy, data)
    proxy.send_signal(signal.SIGHUP)
    wait_for_log(proxy, rf"generation {generation} serving; draining 2 old workers")
    new = {s.pid for s in worker_starts(proxy) if s.generation == generation}
    assert len(new) == 2 and not new & old, (old, new)
    wait_until(lambda: children(proxy) == new, 15.0, f"only generation {generation} workers left", proxy)
    for pid in old:  # gone from the children once reaped; its log line follows (the supervisor's next step)
        wait_for_log(proxy, rf"worker {pid} \(slot \d\) stopped: exit code 0", 5.0)
    return new


def test_sighup_under_load_drops_nothing(proxy_factory: ProxyFactory, backend_stub: Service) -> None:
    proxy = proxy_factory(config(via="1.1 gen1"), workers=2)
    initial = children(proxy)
    assert len(initial) == 2
    assert echoed_via(proxy) == "1.1 gen1"

    with LoadGenerator(
        proxy.host, proxy.port, connections=CONNECTIONS, duration=6.0, expect_body=api_body(backend_stub)
    ) as load:
        load.wait_for_successes(200)
        for generation, at in ((2, 1.0), (3, 3.0)):
            load.wait_elapsed(at)
            new = _reload(proxy, generation, config(via=f"1.1 gen{generation}"))
            assert echoed_via(proxy) == f"1.1 gen{generation}", "the new config must be in effect"
            status, headers, _ = get(proxy)
            assert status == 200 and headers.get("via") == f"1.1 gen{generation}", headers
            load.wait_for_successes(100, after=time.monotonic())
    result = load.join()

    summary = result.summary()
    assert result.duration >= 5.0, summary
    assert result.failures == [], summary
    assert result.successes > 0
    # The draining workers answered in-flight requests with Connection: close and the clients moved on.
    assert result.server_closes > 0, summary
    assert children(proxy) == new and not new & initial
    assert not any(pid_alive(pid) for pid in initial)
    status, body = admin(proxy, "/readyz")
    assert status == 200 and body["generation"] == 3, body
    assert "drain_timeout reached" not in proxy.read_log()


def _bad_value(path: tuple[str | int, ...], value: object) -> dict[str, Any]:
    data = config(via="1.1 gen2")
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


INVALID: dict[str, tuple[str | dict[str, Any], str]] = {
    "toml-syntax": ("[server\nworkers = 2\n", r"invalid TOML: .*line 1"),
    "workers-zero": (_bad_value(("server", "workers"), 0), r"server\.workers: must be at least 1"),
    "bad-duration": (
        _bad_value(("upstreams", "backend", "connect_timeout"), "soon"),
        r"upstreams\.backend\.connect_timeout: expected seconds",
    ),
    "unknown-upstream": (_bad_value(("routes", 0, "upstream"), "nowhere"), r"routes\[0\]\.upstream: no such upstream"),
    "unknown-key": (_bad_value(("server", "workerz"), 3), r"server\.workerz: unknown key"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_config_on_sighup_keeps_the_old_workers(
    proxy_factory: ProxyFactory, backend_stub: Service, case: str
) -> None:
    proxy = proxy_factory(config(via="1.1 gen1"), workers=2)
    before = slot_workers(proxy)
    good = proxy.config_path.read_text(encoding="utf-8")
    content, expected = INVALID[case]
    write_config(proxy, content)
    assert proxy.config_path.read_text(encoding="utf-8") != good
    proxy.send_signal(signal.SIGHUP)

    rejected = wait_for_log(proxy, r"reload rejected[^\n]*\n(?:[^\n]*\n)*?[^\n]*" + expected)
    assert rejected, proxy.read_log()
    if case == "toml-syntax":
        assert str(proxy.config_path) in rejected[0][0], "the message names the file"
    assert not log_matches(proxy, r"SIGHUP: starting generation"), "an invalid config must not start workers"
    assert slot_workers(proxy) == before and children(proxy) == set(before.values()), "same workers keep serving"
    assert len(worker_starts(proxy)) == 2
    for _ in range(6):  # fresh connections, spread over both workers
        status, headers, _ = get(proxy)
        assert status == 200 and headers.get("via") == "1.1 gen1", headers
    status, body = admin(proxy, "/readyz")
    assert status == 200 and body["generation"] == 1 and not body["draining"], body

    # The rejection left the supervisor able to reload: a valid config is taken on the next SIGHUP.
    _reload(proxy, 2, config(via="1.1 gen2"))
    assert echoed_via(proxy) == "1.1 gen2"
    assert readyz(proxy) == 200
