"""Shared helpers for the supervisor tests: configs, log parsing, admin and backend probes, bounded waits.

Everything that waits takes a timeout and fails with an AssertionError naming what it waited for
(and the proxy log tail when a proxy is involved); nothing sleeps and hopes.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from devstack import ProxyService, Service, http_get, http_request, raw_request
from devstack.stack import PROJECT_ROOT
from devstack.tomlwriter import dump

T = TypeVar("T")

# A gateway in front of backend_stub (devstack rewrites the listeners and the upstream's servers).
BASE_CONFIG: dict[str, Any] = {
    "server": {
        "workers": 2,
        "drain_timeout": "10s",
        "drain_idle_grace": "1s",
        "via": "1.1 gen1",
    },
    "upstreams": {"backend": {"servers": ["127.0.0.1:9"], "connect_timeout": "2s", "response_timeout": "10s"}},
    "routes": [{"prefix": "/", "upstream": "backend"}],
}

_STARTED = re.compile(r"worker (\d+) \(slot (\d+), generation (\d+)\) started")


def config(**server: Any) -> dict[str, Any]:
    """BASE_CONFIG with `server` keys replaced."""
    data = copy.deepcopy(BASE_CONFIG)
    data["server"].update(server)
    return data


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str, service: ProxyService | None = None) -> T:
    """Poll `predicate` until it returns something truthy (returned); AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            tail = f"\n--- proxy log tail ---\n{service.process.log_tail(60)}" if service is not None else ""
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}{tail}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def shadow_env(shadow: Path) -> dict[str, str]:
    """Environment for a proxy in which the modules written into `shadow` (created here) hide the real
    ones: fault injection into the workers, e.g. a `uvloop.py` that raises at import."""
    shadow.mkdir(exist_ok=True)
    return {"PYTHONPATH": os.pathsep.join([str(shadow), str(PROJECT_ROOT)])}


# The start of a shadow `uvloop.py` that wraps the real package: `_real` is the real uvloop, `_here` the
# shadow directory; the rest of the file defines `class Loop(_real.Loop)`, which `new_event_loop()` returns.
WRAP_REAL_UVLOOP = """
import asyncio, importlib.machinery, importlib.util, os, sys, time

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "uvloop", [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
)
_real = importlib.util.module_from_spec(_spec)
_shadow = sys.modules[__name__]
sys.modules["uvloop"] = _real  # the real package imports its submodules as uvloop.*
_spec.loader.exec_module(_real)
sys.modules["uvloop"] = _shadow


def new_event_loop():
    return Loop()
"""


def log_matches(service: ProxyService, pattern: str) -> list[re.Match[str]]:
    return list(re.finditer(pattern, service.read_log()))


def wait_for_log(service: ProxyService, pattern: str, timeout: float = 10.0, count: int = 1) -> list[re.Match[str]]:
    """Wait until `pattern` occurs at least `count` times in the proxy log; returns all matches."""

    def found() -> list[re.Match[str]] | None:
        matches = log_matches(service, pattern)
        return matches if len(matches) >= count else None

    return wait_until(found, timeout, f"{count} x {pattern!r} in the log", service)


@dataclass(frozen=True)
class WorkerStart:
    pid: int
    slot: int
    generation: int


def worker_starts(service: ProxyService) -> list[WorkerStart]:
    """Every 'worker N (slot S, generation G) started' line of the supervisor log, in order."""
    return [WorkerStart(int(m[1]), int(m[2]), int(m[3])) for m in _STARTED.finditer(service.read_log())]


def slot_workers(service: ProxyService) -> dict[int, int]:
    """slot -> pid of the newest worker started on that slot."""
    return {start.slot: start.pid for start in worker_starts(service)}


def children(service: ProxyService) -> set[int]:
    return set(service.children())


def admin(service: ProxyService, path: str) -> tuple[int, dict[str, Any]]:
    """GET an admin endpoint: (status, decoded JSON)."""
    status, body = http_get(service.admin_url + path, timeout=2.0)
    return status, json.loads(body)


def readyz(service: ProxyService) -> int:
    """The /readyz status, or 0 if the admin listener does not answer."""
    try:
        return admin(service, "/readyz")[0]
    except OSError:
        return 0


def wait_ready(service: ProxyService, timeout: float = 10.0) -> None:
    wait_until(lambda: readyz(service) == 200, timeout, "/readyz 200", service)


def get(
    service: ProxyService, target: str = "/api/resource", timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """One request through the proxy on a fresh connection: (status, lower-cased headers, body)."""
    response = raw_request(service.host, service.port, "GET", target, timeout=timeout)
    return response.status, {k.lower(): v for k, v in response.headers}, response.body


def connect_refused(service: ProxyService) -> bool:
    """True if a new connection to the proxy is refused; one the kernel accepts is closed again. A
    connection reset while it is made (it raced with the listener being shut) is not a refusal: False,
    and a `wait_until` asks again."""
    try:
        socket.create_connection((service.host, service.port), timeout=2.0).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False
    return False


def echoed_via(service: ProxyService) -> str | None:
    """The `via` request header the backend saw for a request through the proxy."""
    status, _, body = get(service, "/echo")
    assert status == 200, (status, body)
    headers: dict[str, str] = json.loads(body)["headers"]
    return headers.get("via")


def write_config(service: ProxyService, data: dict[str, Any] | str) -> None:
    """Rewrite the proxy's config file in place (same path), keeping devstack's listeners and upstreams."""
    if isinstance(data, str):
        service.config_path.write_text(data, encoding="utf-8")
        return
    rendered = copy.deepcopy(data)
    rendered["server"]["listen"] = service.config["server"]["listen"]
    rendered["server"]["admin_listen"] = service.config["server"]["admin_listen"]
    if "workers" in service.config["server"]:
        rendered["server"].setdefault("workers", service.config["server"]["workers"])
    for name, upstream in rendered["upstreams"].items():
        upstream["servers"] = service.config["upstreams"][name]["servers"]
    dump(rendered, service.config_path)


def api_body(backend: Service) -> bytes:
    """backend_stub's fixed /api/resource body (what the proxy must return verbatim)."""
    status, _, body = http_request("GET", backend.url + "/api/resource", timeout=2.0)
    assert status == 200
    return body


# ---------------------------------------------------------------------------------------------- /proc/net/tcp

_TCP_LISTEN = "0A"
_TCP_ESTABLISHED = "01"


@dataclass(frozen=True)
class TcpEntry:
    local: tuple[str, int]
    remote: tuple[str, int]
    state: str  # hex state code of /proc/net/tcp: 0A LISTEN, 01 ESTABLISHED
    inode: int


def _address(text: str) -> tuple[str, int]:
    hex_ip, hex_port = text.split(":")
    raw = bytes.fromhex(hex_ip)
    # The kernel prints the address as host-order 32-bit words.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(words) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, words), int(hex_port, 16)


def tcp_table() -> list[TcpEntry]:
    """Every TCP socket of this network namespace (IPv4 and IPv6)."""
    entries: list[TcpEntry] = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name, encoding="ascii") as fh:
                lines = fh.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            entries.append(TcpEntry(_address(fields[1]), _address(fields[2]), fields[3], int(fields[9])))
    return entries


def listening_addresses(port: int) -> set[tuple[str, int]]:
    """Local addresses of the sockets listening on `port`."""
    return {e.local for e in tcp_table() if e.state == _TCP_LISTEN and e.local[1] == port}


def socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def client_ports(pid: int, server_port: int) -> set[int]:
    """Client-side ports of the established connections to `server_port` that process `pid` holds."""
    inodes = socket_inodes(pid)
    return {
        e.remote[1]
        for e in tcp_table()
        if e.inode in inodes and e.state == _TCP_ESTABLISHED and e.local[1] == server_port
    }
