"""A proxy worker inside the test process, for tests that plug in what no config can: test-only pipeline
steps, finished hooks, a downstream of their own. Real sockets, a real uvloop loop, the real gateway, pools
and upstream client, against the real backend_stub; the client side is plain asyncio streams (the test's
side of the wire, not the proxy's).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

from devstack.rawhttp import RawResponse, parse_response
from proxy.auth.services import AuthServices
from proxy.config import build
from proxy.exchange import Exchange
from proxy.gateway import Gateway, StepFactory, auth_steps
from proxy.http1.protocol import Http1Settings, HttpProtocol
from proxy.ratelimit.services import LimitServices
from proxy.server import WorkerState
from proxy.upstream.client import make_connector
from proxy.upstream.pool import Cluster

T = TypeVar("T")

IO_TIMEOUT = 5.0


def run(test: Callable[[], Coroutine[Any, Any, T]], timeout: float = 30.0) -> T:
    """Run `test()` on a fresh uvloop loop, bounded by `timeout`."""
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(test(), timeout))
    finally:
        loop.close()


class Worker:
    """One worker's request path serving on 127.0.0.1 (a free port), with the given steps and hooks; without
    `steps`, the routes' steps from the config, as the worker builds them (`auth`: the auth services, booted
    on entry like a worker's; `limits`: the rate-limit services, their Redis sync started), which `around` may
    wrap with test-only steps."""

    def __init__(
        self,
        config: dict[str, Any],
        backend: str,
        steps: StepFactory | None = None,
        *,
        around: Callable[[StepFactory], StepFactory] | None = None,
    ) -> None:
        data = copy.deepcopy(config)
        data.setdefault("server", {})["listen"] = "127.0.0.1:0"
        for upstream in data["upstreams"].values():
            upstream.setdefault("servers", [backend])
        self.config = build(data)
        self.steps = steps
        self.around = around  # wraps the config's steps (test-only steps before or after them)
        self.finished: list[Exchange] = []
        self.port = 0
        self.state: WorkerState | None = None
        self.auth: AuthServices | None = None
        self.limits: LimitServices | None = None
        self.clusters: dict[str, Cluster] = {}
        self._server: asyncio.AbstractServer | None = None
        self._clients: list[Client] = []

    async def __aenter__(self) -> Worker:
        loop = asyncio.get_running_loop()
        state = self.state = WorkerState(loop, self.config)
        connector = make_connector(state)
        self.clusters = {name: Cluster(up, connector) for name, up in self.config.upstreams.items()}
        steps = self.steps
        if steps is None:
            auth = self.auth = AuthServices(self.config, state)
            limits = self.limits = LimitServices(self.config, state)
            steps = auth_steps(auth.authorities, auth.realm, limits.steps)
            if self.around is not None:
                steps = self.around(steps)
            state.tick_subscribers.append(auth.tick)
            state.tick_subscribers.append(limits.tick)
            await auth.boot()
            await limits.boot()
        state.gateway = Gateway(self.config, state, self.clusters, steps)
        state.finished.append(self.finished.append)
        for cluster in self.clusters.values():
            state.tick_subscribers.append(cluster.sweep)
        settings = Http1Settings(state)
        self._server = await loop.create_server(lambda: HttpProtocol(state, settings), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        state.start()
        return self

    async def client(self) -> Client:
        """A client connection to this worker, aborted at the end if the test did not close it."""
        client = await Client.connect(self.port)
        self._clients.append(client)
        return client

    async def __aexit__(self, *exc: object) -> None:
        assert self.state is not None and self._server is not None
        for client in self._clients:
            client.abort()
        self._server.close()
        await self.state.drain(2.0)
        for cluster in self.clusters.values():
            cluster.close_idle()
        if self.auth is not None:
            self.auth.close()
        if self.limits is not None:
            await self.limits.close()
        self.state.stop()

    async def wait_finished(self, count: int, timeout: float = IO_TIMEOUT) -> list[Exchange]:
        """Wait until `count` exchanges have finished (the hook ran); returns them in order."""
        await until(lambda: len(self.finished) >= count, timeout, f"{count} finished exchanges")
        return self.finished


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` on the loop until it holds; AssertionError naming `what` after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class Client:
    """A raw HTTP/1.1 client connection (the test's side)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = b""

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self, timeout: float = IO_TIMEOUT) -> RawResponse:
        """The next complete response."""
        return await asyncio.wait_for(self._next(), timeout)

    async def _next(self) -> RawResponse:
        while True:
            parsed = parse_response(self.buffer) if self.buffer else None
            if parsed is not None:
                response, used = parsed
                self.buffer = self.buffer[used:]
                return response
            data = await self.reader.read(65536)
            if not data:
                raise AssertionError(f"connection closed; unparsed: {self.buffer[:200]!r}")
            self.buffer += data

    async def nothing_for(self, seconds: float) -> None:
        """Assert that no byte arrives for `seconds`."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected bytes: {data!r}")

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        if not self.writer.transport.is_closing():
            self.writer.transport.abort()


def request(target: str, *headers: tuple[str, str], method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: test", *(f"{n}: {v}" for n, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
