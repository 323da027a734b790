"""How the Redis sync reads its URL (no server: the clients connect lazily)."""

from __future__ import annotations

import asyncio

from proxy.config import RedisConfig
from proxy.exchange import WaitList
from proxy.ratelimit.step import SyncHealth
from proxy.ratelimit.sync import RedisSync, make_client


def test_a_sentinel_url_names_every_sentinel_the_service_the_db_and_the_password() -> None:
    client = make_client(RedisConfig(url="redis+sentinel://:s3cret@10.0.0.1:26379,[::1]:26380/mymaster/2"))
    pool = client.connection_pool
    assert (pool.service_name, pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (
        "mymaster",
        2,
        "s3cret",
    )
    sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
    assert [(s["host"], s["port"]) for s in sentinels] == [("10.0.0.1", 26379), ("::1", 26380)]


def test_standalone_and_cluster_clients_take_the_timeout_as_their_socket_budget() -> None:
    client = make_client(RedisConfig(url="redis://127.0.0.1:6390/3", timeout=0.2))
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["port"], kwargs["db"], kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (
        6390,
        3,
        0.2,
        0.2,
    )
    assert type(make_client(RedisConfig(url="redis://127.0.0.1:7000/0", cluster=True))).__name__ == "RedisCluster"


def test_logs_name_the_hosts_never_the_credentials() -> None:
    loop = asyncio.new_event_loop()
    try:
        sync = RedisSync(
            RedisConfig(url="redis+sentinel://user:pw@h1:26379,h2:26379/mymaster/0"),
            loop,
            SyncHealth(closed=False),
            WaitList(),
        )
        assert sync._where() == "redis+sentinel://h1:26379,h2:26379"
    finally:
        loop.close()
