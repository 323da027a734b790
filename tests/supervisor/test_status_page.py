"""The status page on the admin listener: /stats.json, and the page itself in a real headless Chromium."""

from __future__ import annotations

import contextlib
import html.parser
import os
import shutil
import signal
import subprocess
from pathlib import Path

import orjson
import pytest

from devstack import ProxyFactory, ProxyService, Service, http_get
from tests.supervisor.helpers import config, get, slot_workers, wait_until

REQUESTS = 25


def chromium() -> str:
    """The Chromium binary (Debian's `chromium` package, which .ci/run installs)."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("chromium is not installed: apt-get install chromium (.ci/run does)")


def stats(proxy: ProxyService) -> dict[str, object]:
    status, body = http_get(proxy.admin_url + "/stats.json", timeout=5.0)
    assert status == 200, body
    data: dict[str, object] = orjson.loads(body)
    return data


def route_requests(proxy: ProxyService, route: str) -> int:
    routes = stats(proxy)["routes"]
    assert isinstance(routes, list)
    return sum(int(r["requests"]) for r in routes if r["route"] == route)


class Rows(html.parser.HTMLParser):
    """The text of every table row with a data-key, by table id: {table: {key: [cell texts]}}."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict[str, list[str]]] = {}
        self.loaded = False
        self._table = ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "body" and attr.get("data-loaded") == "yes":
            self.loaded = True
        if tag == "table":
            self._table = attr.get("id") or ""
            self.tables.setdefault(self._table, {})
        elif tag == "tr" and attr.get("data-key") is not None:
            self._row = []
            self.tables[self._table][str(attr["data-key"])] = self._row
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def render(url: str, profile: Path) -> Rows:
    """The page's DOM after its scripts ran, as headless Chromium dumps it (its whole process group is
    killed afterwards, also on a timeout: Chromium starts helper processes)."""
    argv = [
        chromium(),
        "--headless",
        "--no-sandbox",  # tests may run as root (CI containers)
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        url,
    ]
    browser = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = browser.communicate(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(browser.pid, signal.SIGKILL)
        browser.wait()
    assert browser.returncode == 0, err[-2000:]
    rows = Rows()
    rows.feed(out)
    return rows


def test_status_page_shows_the_requests_just_sent(
    proxy_factory: ProxyFactory, backend_stub: Service, tmp_path: Path
) -> None:
    data = config()
    data["routes"] = [{"prefix": "/api/", "upstream": "backend", "name": "api"}]
    data["metrics"] = {"interval": "100ms"}
    proxy = proxy_factory(data, workers=2)
    for _ in range(REQUESTS):
        status, _, body = get(proxy)
        assert status == 200, body
    for _ in range(3):
        status, _, _ = get(proxy, "/elsewhere")
        assert status == 404
    # Each worker writes its counts on its own tick: the 404s may reach the files after the last 200s.
    wait_until(
        lambda: route_requests(proxy, "api") == REQUESTS and route_requests(proxy, "") == 3,
        10.0,
        f"{REQUESTS} requests and 3 without a route in /stats.json",
        proxy,
    )

    report = stats(proxy)
    workers = report["workers"]
    assert isinstance(workers, list)
    assert sorted(int(w["pid"]) for w in workers) == sorted(slot_workers(proxy).values())
    assert all(w["generation"] == 1 and w["ready"] for w in workers)
    (api,) = [r for r in report["routes"] if r["route"] == "api"]  # type: ignore[union-attr]
    assert api["status_classes"] == {"2xx": REQUESTS} and api["rps"] > 0
    assert 0 < api["p50_ms"] <= api["p99_ms"]
    (none,) = [r for r in report["routes"] if r["route"] == ""]  # type: ignore[union-attr]
    assert none["status_classes"] == {"4xx": 3}
    (server,) = report["upstreams"]  # type: ignore[misc]
    assert server["server"] == backend_stub.address and server["ejected"] == 0 and server["open"] >= 1

    rows = render(proxy.admin_url + "/", tmp_path / "chromium")
    assert rows.loaded, "the page loaded /stats.json"
    route = rows.tables["routes"]["api"]
    assert route[4] == str(REQUESTS) and route[5] == str(REQUESTS), route  # requests, 2xx
    assert float(route[1]) > 0, route  # req/s over the last minute
    assert rows.tables["routes"]["(no route)"][7] == "3"  # 4xx
    upstream = rows.tables["upstreams"][f"backend {backend_stub.address}"]
    assert upstream[2] == "up" and int(upstream[3]) >= 1, upstream
    assert set(rows.tables["workers"]) == {str(pid) for pid in slot_workers(proxy).values()}
    assert all(cells[4] == "serving" for cells in rows.tables["workers"].values())
