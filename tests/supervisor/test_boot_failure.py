"""Boot failures stop the supervisor with a clear message and a distinct exit code, never a restart loop."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import ProxyFactory, ProxyService, Service
from tests.supervisor.helpers import config, log_matches, shadow_env, worker_starts

EXIT_BOOT_FAILURE = 3
EXIT_BIND_FAILURE = 4


@pytest.fixture
def occupied_port() -> Iterator[int]:
    """A port held by a listening socket WITHOUT SO_REUSEPORT (so nobody else can bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("which", ["listen", "admin"])
def test_port_in_use_exits_4_with_a_clear_message(
    proxy_factory: ProxyFactory, backend_stub: Service, occupied_port: int, which: str
) -> None:
    port_arg = {"listen_port": occupied_port} if which == "listen" else {"admin_port": occupied_port}
    proxy = proxy_factory(config(), workers=2, wait_ready=False, **port_arg)
    status = proxy.wait(15.0)
    log = proxy.read_log()
    assert status == EXIT_BIND_FAILURE, log
    lines = [line for line in log.splitlines() if "cannot listen" in line]
    assert len(lines) == 1, log
    assert "Address already in use" in lines[0], log
    assert f"127.0.0.1:{occupied_port}" in lines[0], f"the message should name the address it could not bind:\n{log}"
    assert worker_starts(proxy) == [], "no worker is started without listeners"
    assert proxy.process.group_pids() == []


def _fails_to_boot(proxy_factory: ProxyFactory, tmp_path: Path, uvloop_source: str) -> tuple[ProxyService, str]:
    """Start a proxy whose workers import `uvloop_source` as uvloop; check that it stops with exit 3 after
    one boot failure, without a restart loop. Returns the proxy and the reason the supervisor logged."""
    shadow = tmp_path / "shadow"
    env = shadow_env(shadow)
    (shadow / "uvloop.py").write_text(uvloop_source)
    proxy = proxy_factory(config(), workers=2, wait_ready=False, env=env)
    status = proxy.wait(15.0)
    log = proxy.read_log()
    assert status == EXIT_BOOT_FAILURE, log
    failed = log_matches(proxy, r"worker (\d+) \(slot \d\) failed to boot \(exit code 3\): (.*); stopping")
    assert len(failed) == 1, log
    starts = worker_starts(proxy)
    assert 1 <= len(starts) <= 2 and all(s.generation == 1 for s in starts), f"no restart loop:\n{log}"
    assert "restarting in" not in log and "ready: listening" not in log
    assert "supervisor exiting with code 3" in log
    assert proxy.process.group_pids() == []
    return proxy, failed[0][2]


def test_worker_boot_failure_stops_the_supervisor(
    proxy_factory: ProxyFactory, backend_stub: Service, tmp_path: Path
) -> None:
    """A dependency only workers import (uvloop) is broken: each worker fails at boot; exit 3, no loop."""
    _, reason = _fails_to_boot(
        proxy_factory, tmp_path, 'raise ImportError("uvloop is broken in this environment (test)")\n'
    )
    assert "ImportError: uvloop is broken in this environment (test)" in reason


def test_boot_error_whose_text_contains_r_is_not_taken_for_ready(
    proxy_factory: ProxyFactory, backend_stub: Service, tmp_path: Path
) -> None:
    """The status pipe is framed: a boot error's reason is data, whatever letters it holds. (Read by
    substring, "RuntimeError: Redis ..." contains `R`, the old "ready" message, and the supervisor
    restarted the "crashed" worker forever.)"""
    proxy, reason = _fails_to_boot(proxy_factory, tmp_path, 'raise RuntimeError("Redis is unreachable")\n')
    assert reason == "RuntimeError: Redis is unreachable"
    assert not log_matches(proxy, r"worker \d+ \(slot \d\) ready"), (
        f"a boot error was read as ready:\n{proxy.read_log()}"
    )
