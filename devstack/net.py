"""Ports, readiness polling and tiny blocking clients (stdlib only).

Deadlines are absolute `time.monotonic()` values, so one budget can span several waits.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from devstack.process import Process

__all__ = [
    "StackError",
    "external_redis_url",
    "free_port",
    "http_get",
    "http_post_json",
    "http_request",
    "redis_ping",
    "split_url",
    "wait_http_ok",
    "wait_redis",
]


class StackError(RuntimeError):
    """A component failed to start, died, or did not become ready in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def split_url(url: str) -> tuple[str, int, str]:
    """(host, port, path-with-query) of an http:// URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected an http://host:port/... URL, got {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, parts.port or 80, path


def http_request(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, lower-cased headers, body)."""
    host, port, path = split_url(url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def http_get(url: str, *, timeout: float = 5.0, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """GET `url`: (status, body)."""
    status, _, data = http_request("GET", url, headers=headers, timeout=timeout)
    return status, data


def http_post_json(url: str, payload: Any, *, timeout: float = 5.0) -> tuple[int, Any]:
    """POST a JSON body and decode a JSON answer: (status, value)."""
    body = json.dumps(payload).encode()
    status, _, data = http_request(
        "POST", url, body=body, headers={"Content-Type": "application/json"}, timeout=timeout
    )
    return status, json.loads(data) if data else None


def _died(process: Process | None) -> None:
    if process is not None and (status := process.exit_status()) is not None:
        raise StackError(
            f"{process.name} (pid {process.pid}) exited with status {status} before it was ready; "
            f"log {process.log_path}:\n{process.log_tail()}"
        )


def wait_http_ok(url: str, deadline: float, *, process: Process | None = None, status: int = 200) -> None:
    """Poll `url` until it answers `status`; fail fast if `process` exits; StackError at `deadline`."""
    delay = 0.02
    last = "no attempt"
    while True:
        _died(process)
        remaining = deadline - time.monotonic()
        try:
            got, _ = http_get(url, timeout=max(0.05, min(1.0, remaining)))
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if got == status:
                return
            last = f"HTTP {got}"
        if time.monotonic() + delay >= deadline:
            _died(process)
            where = f"; log {process.log_path}:\n{process.log_tail()}" if process is not None else ""
            raise StackError(f"{url} did not answer {status} in time (last: {last}){where}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def redis_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if a RESP server at host:port answers PING with +PONG."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = sock.recv(64)
                if not chunk:
                    break
                data += chunk
            return data == b"+PONG\r\n"
    except OSError:
        return False


def wait_redis(host: str, port: int, deadline: float, *, process: Process | None = None) -> None:
    """Poll with PING until the server answers (a server still loading answers -LOADING)."""
    delay = 0.02
    while not redis_ping(host, port, timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
        _died(process)
        if time.monotonic() + delay >= deadline:
            where = f"; log {process.log_path}:\n{process.log_tail()}" if process is not None else ""
            raise StackError(f"redis at {host}:{port} did not answer PING in time{where}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def external_redis_url(environ: Mapping[str, str] | None = None) -> str | None:
    """`REDIS_URL` from the environment: use that server and start none."""
    env = os.environ if environ is None else environ
    return env.get("REDIS_URL") or None
