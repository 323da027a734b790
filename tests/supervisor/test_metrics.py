"""Metrics across real forked workers: /metrics adds up under load, survives `kill -9`, and can be off."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from devstack import ProxyFactory, ProxyService, Service, http_get
from tests.supervisor.helpers import (
    api_body,
    config,
    get,
    slot_workers,
    wait_for_log,
    wait_ready,
    wait_until,
    write_config,
)
from tests.supervisor.load import LoadGenerator

ROUTE = "/"  # the route of helpers.BASE_CONFIG (named after its prefix)
CONNECTIONS = 16  # spread over the 2 workers' sockets by the kernel: all on one has odds of 2 in 65536


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _file_requests(path: Path) -> float:
    """The requests one worker's counter file holds (read with prometheus-client's own reader)."""
    return sum(
        value
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path))
        if json.loads(key)[1] == "uvgate_requests_total"
    )


def scrape(proxy: ProxyService) -> Samples:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    status, body = http_get(proxy.admin_url + "/metrics", timeout=5.0)
    assert status == 200, body
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def requests_counted(samples: Samples, code: str = "200") -> float:
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "uvgate_requests_total" and ("route", ROUTE) in labels and ("code", code) in labels
    )


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads line")


def metrics_config(directory: Path) -> dict[str, object]:
    data = config()
    data["metrics"] = {"directory": str(directory), "interval": "100ms"}
    return data


def test_metrics_add_up_across_workers_and_survive_kill_9(
    proxy_factory: ProxyFactory, backend_stub: Service, tmp_path: Path
) -> None:
    directory = tmp_path / "metrics"
    proxy = proxy_factory(metrics_config(directory), workers=2)
    workers = slot_workers(proxy)
    assert set(workers) == {0, 1}

    seen: list[float] = []
    with LoadGenerator(
        proxy.host, proxy.port, connections=CONNECTIONS, duration=3.0, expect_body=api_body(backend_stub)
    ) as load:
        load.wait_for_successes(100)
        while load.successes < 2000 and load.failure_count == 0:
            counted = requests_counted(scrape(proxy))
            assert not seen or counted >= seen[-1], f"the total went backwards: {seen[-1]} then {counted}"
            in_flight = CONNECTIONS
            assert counted <= load.successes + in_flight, f"{counted} counted; sent: {load.successes} + {in_flight}"
            seen.append(counted)
            if len(seen) >= 10:
                break
    result = load.join()
    assert not result.failures, result.summary()
    sent = result.successes

    # Every request counted once, across both workers, after at most one fold (a scrape may come in the
    # middle of a worker's fold: the samples agree once that fold is written).
    def all_counted() -> Samples | None:
        samples = scrape(proxy)
        counts = (
            requests_counted(samples),
            samples.get(("uvgate_request_duration_seconds_count", (("route", ROUTE),))),
            samples.get(("uvgate_upstream_request_duration_seconds_count", (("upstream", "backend"),))),
        )
        assert all(count is None or count <= sent for count in counts), f"more counted than sent ({sent}): {counts}"
        return samples if counts == (sent, sent, sent) else None

    samples = wait_until(all_counted, 10.0, f"{sent} requests in /metrics", proxy)
    per_worker = {pid: _file_requests(directory / f"counter_{pid}.db") for pid in workers.values()}
    assert sum(per_worker.values()) == sent, per_worker
    assert all(count > 0 for count in per_worker.values()), f"{CONNECTIONS} connections over 2 workers: {per_worker}"
    assert samples[("uvgate_worker_restarts_total", ())] == 0
    assert ("uvgate_build_info", ()) not in samples  # it has labels
    assert any(name == "uvgate_build_info" for name, _ in samples)
    assert _threads(proxy.pid) == 1, "the supervisor stays safe to fork: no thread after serving /metrics"

    # kill -9 a worker: its counts stay (folded into the archive), never counted twice.
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    wait_for_log(proxy, rf"worker {victim} \(slot 0\) died \(killed by SIGKILL")
    wait_until(lambda: slot_workers(proxy)[0] != victim, 10.0, "a replacement on slot 0", proxy)
    wait_ready(proxy, 10.0)
    after_kill = scrape(proxy)
    assert requests_counted(after_kill) == sent, "a dead worker's requests neither vanish nor double"
    assert after_kill[("uvgate_worker_restarts_total", ())] == 1
    assert not (directory / f"counter_{victim}.db").exists(), "merged into the archive"
    assert not (directory / f"gauge_livesum_{victim}.db").exists(), "its live gauges are gone"

    more = 20
    for _ in range(more):
        status, _, body = get(proxy)
        assert status == 200, body
    wait_until(
        lambda: requests_counted(scrape(proxy)) == sent + more, 10.0, f"{sent + more} requests in /metrics", proxy
    )
    assert requests_counted(scrape(proxy)) == sent + more
    open_upstream = (
        "uvgate_upstream_connections",
        (("server", backend_stub.address), ("state", "open"), ("upstream", "backend")),
    )
    wait_until(lambda: scrape(proxy).get(open_upstream, 0) >= 1, 10.0, "the live upstream connections gauge", proxy)


def test_metrics_directory_is_made_and_removed_by_the_supervisor(
    proxy_factory: ProxyFactory, backend_stub: Service, tmp_path: Path
) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    stale = directory / "counter_999999.db"
    stale.write_bytes(b"\0" * 16)  # a previous run's file: removed at start, never counted
    proxy = proxy_factory(metrics_config(directory), workers=2)
    assert not stale.exists()
    status, _, _ = get(proxy)
    assert status == 200
    wait_until(lambda: list(directory.glob("counter_*.db")), 10.0, "a worker's counter file", proxy)
    proxy.stop()
    assert not list(directory.glob("*.db")), "the supervisor removes its files at exit"


def test_a_metrics_directory_that_cannot_be_made_stops_the_start_naming_the_key(
    proxy_factory: ProxyFactory, backend_stub: Service, tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proxy = proxy_factory(metrics_config(blocker / "metrics"), workers=2, wait_ready=False)
    assert proxy.wait(30.0) == 3
    assert f"metrics.directory: cannot create {blocker / 'metrics'}" in proxy.read_log()
    assert "worker" not in proxy.read_log(), "no worker starts"


def test_metrics_off(proxy_factory: ProxyFactory, backend_stub: Service, tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    data = metrics_config(directory)
    data["metrics"] = {"enabled": False, "directory": str(directory)}
    proxy = proxy_factory(data, workers=2)
    for _ in range(4):
        status, _, _ = get(proxy)
        assert status == 200
    status, body = http_get(proxy.admin_url + "/metrics", timeout=5.0)
    assert status == 404 and b"metrics are off" in body
    assert not list(directory.glob("*.db")), "no worker writes metrics when they are off"


def _imported(log: str, module: str) -> bool:
    """Whether a `-X importtime` log (PYTHONPROFILEIMPORTTIME) shows `module` imported, by any process."""
    lines = (line for line in log.splitlines() if line.startswith("import time:"))
    return any(line.rsplit("|", 1)[-1].strip() == module for line in lines)


def test_metrics_off_load_no_prometheus_client_until_a_reload_turns_them_on(
    proxy_factory: ProxyFactory, backend_stub: Service, tmp_path: Path
) -> None:
    directory = tmp_path / "metrics"
    data = metrics_config(directory)
    data["metrics"] = {"enabled": False, "directory": str(directory), "interval": "100ms"}
    proxy = proxy_factory(data, workers=2, env={"PYTHONPROFILEIMPORTTIME": "1"})
    for _ in range(3):
        assert get(proxy)[0] == 200
    log = proxy.read_log()
    assert _imported(log, "proxy.worker") and _imported(log, "uvloop"), "the log shows what every process imported"
    assert not _imported(log, "prometheus_client") and not _imported(log, "proxy.metricsio")
    assert not directory.exists(), "no metrics directory while metrics are off"

    data["metrics"]["enabled"] = True
    write_config(proxy, data)
    proxy.send_signal(signal.SIGHUP)
    wait_for_log(proxy, r"generation 2 serving")
    assert _imported(proxy.read_log(), "prometheus_client")
    # Until they stop, the old workers (metrics off) may still accept a connection and serve it uncounted.
    wait_for_log(proxy, r"\(slot \d\) stopped: exit code 0", count=2)
    for _ in range(4):
        assert get(proxy)[0] == 200
    wait_until(lambda: requests_counted(scrape(proxy)) == 4, 10.0, "generation 2's 4 requests in /metrics", proxy)


def test_counts_survive_a_reload_once(proxy_factory: ProxyFactory, backend_stub: Service, tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    proxy = proxy_factory(metrics_config(directory), workers=2)
    old = set(slot_workers(proxy).values())
    for _ in range(30):
        status, _, _ = get(proxy)
        assert status == 200
    wait_until(lambda: requests_counted(scrape(proxy)) == 30, 10.0, "30 requests in /metrics", proxy)

    proxy.send_signal(signal.SIGHUP)
    wait_for_log(proxy, r"generation 2 serving")
    for pid in old:  # the old generation drained: each wrote its last counts, was reaped and merged
        wait_for_log(proxy, rf"worker {pid} \(slot \d\) stopped")
    assert requests_counted(scrape(proxy)) == 30
    assert not [pid for pid in old if (directory / f"counter_{pid}.db").exists()]
    for _ in range(5):
        status, _, _ = get(proxy)
        assert status == 200
    wait_until(lambda: requests_counted(scrape(proxy)) == 35, 10.0, "35 requests in /metrics", proxy)
    assert scrape(proxy)[("uvgate_worker_restarts_total", ())] == 0, "a reload restarts no worker"


def test_totals_never_go_backwards_across_a_kill_9_under_load(
    proxy_factory: ProxyFactory, backend_stub: Service, tmp_path: Path
) -> None:
    """Scraped all along, under load, while a worker is killed and replaced: the total only grows (the dead
    worker's counts up to its last fold stay; what it counted after is lost, never taken back)."""
    proxy = proxy_factory(metrics_config(tmp_path / "metrics"), workers=2)
    victim = slot_workers(proxy)[0]
    seen: list[float] = []

    def scrape_and_check() -> None:
        counted = requests_counted(scrape(proxy))
        assert not seen or counted >= seen[-1], f"the total went backwards: {seen[-1]} then {counted}"
        seen.append(counted)

    with LoadGenerator(proxy.host, proxy.port, connections=CONNECTIONS, duration=4.0) as load:
        load.wait_for_successes(200)
        wait_until(lambda: scrape_and_check() or seen[-1] > 0, 10.0, "requests counted before the kill", proxy)
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: scrape_and_check() or slot_workers(proxy)[0] != victim, 10.0, "a replacement on slot 0", proxy
        )
        wait_ready(proxy, 10.0)
        before = seen[-1]
        wait_until(lambda: scrape_and_check() or seen[-1] > before, 10.0, "counting after the replacement", proxy)
    result = load.join()
    scrape_and_check()
    assert seen[-1] <= result.successes + len(result.failures), "never more than was sent"
    assert len(seen) >= 4
