"""systemd Type=notify: READY=1 once every worker serves, RELOADING=1/READY=1 around a reload, STOPPING=1."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import ProxyFactory, Service

from .helpers import config, readyz, write_config


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()


def receive(sock: socket.socket, timeout: float) -> str:
    sock.settimeout(timeout)
    return sock.recv(4096).decode()


def receive_until(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        try:
            message = receive(sock, max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            break
        seen.append(message)
        if wanted in message.split("\n"):
            return seen
    raise AssertionError(f"no {wanted!r} from the supervisor within {timeout}s; got {seen}")


def test_ready_reloading_stopping(
    proxy_factory: ProxyFactory, backend_stub: Service, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    proxy = proxy_factory(config(), workers=2, env={"NOTIFY_SOCKET": path})
    ready = receive_until(sock, "READY=1", timeout=15)
    assert ready[-1].startswith("READY=1")
    assert readyz(proxy) == 200  # READY=1 is only sent once every worker serves

    write_config(proxy, config(via="1.1 notify-gen2"))
    proxy.send_signal(signal.SIGHUP)
    reload_messages = receive_until(sock, "READY=1", timeout=15)
    assert any(m.startswith("RELOADING=1") for m in reload_messages), reload_messages

    proxy.send_signal(signal.SIGTERM)
    receive_until(sock, "STOPPING=1", timeout=15)
    assert proxy.wait(20) == 0
