"""systemd socket activation: the supervisor serves on the listener it inherits as fd 3 (LISTEN_FDS)."""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path

from devstack import RawHTTPConnection, Service, free_port, http_get, raw_request
from devstack.process import Process
from devstack.tomlwriter import dump
from tests.helpers import backend_requests, wait_backend_requests

from .helpers import config, listening_addresses

# What systemd does before starting the service: bind and listen, put the socket at fd 3, set
# LISTEN_PID to the service's pid and LISTEN_FDS to the count, then exec the service.
WRAPPER = """
import os, socket, sys
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", 0))
sock.listen(128)
print("activated port", sock.getsockname()[1], flush=True)
if sock.fileno() != 3:
    os.dup2(sock.fileno(), 3)
os.set_inheritable(3, True)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.executable, [sys.executable, "-m", "proxy", "--config", sys.argv[1]])
"""


def wait_for(predicate: object, timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()  # type: ignore[operator]
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_inherited_listener_is_served_by_every_worker(tmp_path: Path, backend_stub: Service) -> None:
    admin_port = free_port()
    data = config()
    data["server"].update({"listen": "127.0.0.1:9", "admin_listen": f"127.0.0.1:{admin_port}", "workers": 2})
    data["upstreams"]["backend"]["servers"] = [backend_stub.address]
    config_path = tmp_path / "proxy.toml"
    dump(data, config_path)
    log_path = tmp_path / "proxy.log"
    process = Process("proxy", [sys.executable, "-c", WRAPPER, str(config_path)], log_path=log_path, kill_mode="mixed")
    try:

        def port() -> int | None:
            found = re.search(r"activated port (\d+)", process.read_log())
            return int(found.group(1)) if found else None

        listen_port = int(wait_for(port, 15, "the wrapper's listener"))  # type: ignore[arg-type]
        wait_for(
            lambda: (
                http_get(f"http://127.0.0.1:{admin_port}/readyz", timeout=1.0)[0] == 200
                if "ready" in process.read_log()
                else None
            ),
            20,
            "/readyz 200",
        )
        log = process.read_log()
        assert "socket activation: 1 listener(s) from systemd" in log, log
        for _ in range(20):
            response = raw_request("127.0.0.1", listen_port, "GET", "/api/resource")
            assert response.status == 200, response
        # A stop leaves systemd's listener listening (systemd queues what comes meanwhile for the next
        # start), unlike the supervisor's own listeners, which stop listening at once.
        with RawHTTPConnection("127.0.0.1", listen_port, timeout=10.0) as conn:
            before = backend_requests(backend_stub)
            conn.request("GET", "/delay?ms=1500")
            wait_backend_requests(backend_stub, before, 1)
            process.send_signal(signal.SIGTERM)
            wait_for(lambda: "stopping: the listeners are systemd's" in process.read_log(), 10, "the stop")
            assert listening_addresses(listen_port) == {("127.0.0.1", listen_port)}
            assert conn.read_response().status == 200
        assert process.wait(20) == 0, process.read_log()
    finally:
        process.stop(10)
