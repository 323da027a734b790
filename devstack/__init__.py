"""devstack: the one launcher for local stacks (make run, make bench, integration tests).

Starts a Redis-protocol server, backend_stub, auth_stub and the proxy on free ports, waits until
each is ready, and stops them by PID. See `Stack`.
"""

from __future__ import annotations

from devstack.binaries import find_redis_server
from devstack.config import ConfigSource, load_config_source, render_proxy_config
from devstack.net import (
    StackError,
    external_redis_url,
    free_port,
    http_get,
    http_post_json,
    http_request,
    redis_ping,
    wait_http_ok,
    wait_redis,
)
from devstack.process import KillMode, Process
from devstack.rawhttp import RawHTTPConnection, RawResponse, raw_request
from devstack.stack import PROJECT_ROOT, ProxyFactory, ProxyService, RedisServer, Service, Stack

__all__ = [
    "PROJECT_ROOT",
    "ConfigSource",
    "KillMode",
    "Process",
    "ProxyFactory",
    "ProxyService",
    "RawHTTPConnection",
    "RawResponse",
    "RedisServer",
    "Service",
    "Stack",
    "StackError",
    "external_redis_url",
    "find_redis_server",
    "free_port",
    "http_get",
    "http_post_json",
    "http_request",
    "load_config_source",
    "raw_request",
    "redis_ping",
    "render_proxy_config",
    "wait_http_ok",
    "wait_redis",
]
