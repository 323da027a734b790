"""Pipeline steps that may wait, step answers, the finished hook and the downstream contract, through a worker in
this process (tests/integration/inprocess.py) against the real backend_stub."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson

from devstack import Service
from proxy.config import RouteConfig
from proxy.errors import GatewayTimeout, ProxyError
from proxy.exchange import PHASE_DONE, BodyKind, Downstream, Exchange, WaitList
from proxy.gateway import WAIT, Step
from proxy.http1.framing import head_pairs
from tests.integration.inprocess import Worker, request, run, until

CONFIG: dict[str, Any] = {
    "server": {"access_log": False},
    "upstreams": {"backend": {"response_timeout": "5s"}, "dead": {"servers": ["127.0.0.1:9"]}},
    "routes": [
        {"prefix": "/echo", "upstream": "backend"},
        {"prefix": "/delay", "upstream": "backend"},
        {"prefix": "/drip", "upstream": "backend"},
        {"prefix": "/api/", "upstream": "backend"},
        {"prefix": "/dead/", "upstream": "dead"},
    ],
}


class FutureStep:
    """Test-only step: waits (parked, no task) until `future` resolves, then passes the exchange on with an
    upstream header carrying the result and a response header."""

    def __init__(self, future: asyncio.Future[str], timeout: float = 5.0) -> None:
        self.future = future
        self.timeout = timeout
        self.waits = WaitList()
        self.checks = 0
        future.add_done_callback(lambda _: self.waits.wake_all())

    def check(self, exchange: Exchange) -> ProxyError | None:
        self.checks += 1
        if not self.future.done():
            self.waits.park(exchange, self.timeout, GatewayTimeout("test_wait_timeout"))
            return WAIT
        exchange.add_request_header(b"x-step-result", self.future.result().encode())
        exchange.add_response_header(b"x-step", b"passed")
        return None


class Unauthorized(ProxyError):
    status = 401
    code = "unauthorized"


class RejectStep:
    """Test-only step: answers 401 with a header and JSON fields."""

    def check(self, exchange: Exchange) -> ProxyError | None:
        return Unauthorized(
            "invalid_token",
            headers=((b"www-authenticate", b'Bearer error="invalid_token"'),),
            fields={"error_description": "signature check failed"},
        )


class HeaderStep:
    """Test-only step: every response of the route carries a header (as rate-limit headers must)."""

    def check(self, exchange: Exchange) -> ProxyError | None:
        exchange.add_response_header(b"ratelimit", b'"default";r=9;t=1')
        return None


def steps_for(**by_prefix: Sequence[Step]) -> Any:
    def factory(route: RouteConfig) -> Sequence[Step]:
        return by_prefix.get(route.prefix.strip("/"), ())

    return factory


def test_a_step_waiting_on_a_future_suspends_the_exchange_until_it_resolves(backend_stub: Service) -> None:
    async def scenario() -> None:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        step = FutureStep(future)
        async with Worker(CONFIG, backend_stub.address, steps_for(echo=[step])) as worker:
            first, second = await worker.client(), await worker.client()
            first.send(request("/echo/1"))
            second.send(request("/echo/2"))
            await until(lambda: len(step.waits) == 2, 5.0, "both exchanges parked")
            await first.nothing_for(0.2)
            assert not worker.finished
            future.set_result("resolved")
            for client, path in ((first, "/echo/1"), (second, "/echo/2")):
                response = await client.response()
                assert response.status == 200 and response.header("x-step") == "passed"
                echoed = response.json()
                assert echoed["path"] == path and echoed["headers"]["x-step-result"] == "resolved"
            assert step.checks == 4, "each exchange re-ran the step that suspended it, once"
            done = await worker.wait_finished(2)
            assert {e.status for e in done} == {200}
            first.close()
            second.close()

    run(scenario)


def test_a_waiting_exchange_times_out_with_its_named_reason(backend_stub: Service) -> None:
    async def scenario() -> None:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        step = FutureStep(future, timeout=0.3)
        async with Worker(CONFIG, backend_stub.address, steps_for(echo=[step])) as worker:
            client = await worker.client()
            client.send(request("/echo/slow"))
            response = await client.response()
            assert response.status == 504 and response.json()["error"] == "test_wait_timeout"
            assert len(step.waits) == 0
            (done,) = await worker.wait_finished(1)
            assert (done.status, done.error, done.phase) == (504, "test_wait_timeout", PHASE_DONE)
            assert done.t_end - done.t_start >= 0.3
            future.set_result("late")  # waking nobody: the exchange is over
            client.send(request("/echo/again"))  # the connection is still usable
            assert (await client.response()).status == 200
            client.close()

    run(scenario)


def test_a_client_leaving_while_its_exchange_waits_cancels_it(backend_stub: Service) -> None:
    async def scenario() -> None:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        step = FutureStep(future)
        async with Worker(CONFIG, backend_stub.address, steps_for(echo=[step])) as worker:
            client = await worker.client()
            client.send(request("/echo/gone"))
            await until(lambda: len(step.waits) == 1, 5.0, "the exchange parked")
            client.abort()
            (done,) = await worker.wait_finished(1)
            assert (done.status, done.error) == (499, "client_closed")
            assert len(step.waits) == 0, "unparked from the wait list"
            future.set_result("after")
            await asyncio.sleep(0.05)
            assert len(worker.finished) == 1 and step.checks == 1

    run(scenario)


def test_a_step_answers_with_status_headers_and_json(backend_stub: Service) -> None:
    async def scenario() -> None:
        async with Worker(CONFIG, backend_stub.address, steps_for(api=[HeaderStep(), RejectStep()])) as worker:
            client = await worker.client()
            client.send(request("/api/x"))
            response = await client.response()
            assert response.status == 401
            assert response.header("www-authenticate") == 'Bearer error="invalid_token"'
            assert response.header("ratelimit") == '"default";r=9;t=1', "headers added by earlier steps too"
            body = orjson.loads(response.body)
            assert body == {
                "error": "invalid_token",
                "error_description": "signature check failed",
                "request_id": response.header("x-request-id"),
            }
            (done,) = await worker.wait_finished(1)
            assert (done.status, done.error, done.server) == (401, "invalid_token", None)
            client.close()

    run(scenario)


def test_response_headers_of_a_step_go_on_every_response_of_the_route(backend_stub: Service) -> None:
    async def scenario() -> None:
        factory = steps_for(api=[HeaderStep()], dead=[HeaderStep()])
        async with Worker(CONFIG, backend_stub.address, factory) as worker:
            client = await worker.client()
            client.send(request("/api/x"))
            ok = await client.response()
            client.send(request("/dead/x"))
            failed = await client.response()
            assert (ok.status, failed.status) == (200, 503)
            assert ok.header("ratelimit") == failed.header("ratelimit") == '"default";r=9;t=1'
            client.close()

    run(scenario)


def test_the_finished_hook_runs_once_per_exchange_whatever_the_outcome(backend_stub: Service) -> None:
    config = {**CONFIG, "upstreams": {**CONFIG["upstreams"], "backend": {"response_timeout": "300ms"}}}

    async def scenario() -> None:
        async with Worker(config, backend_stub.address) as worker:
            client = await worker.client()
            client.send(request("/api/ok", ("X-Request-Id", "ok")))
            assert (await client.response()).status == 200
            client.send(request("/nowhere", ("X-Request-Id", "no-route")))
            assert (await client.response()).status == 404
            client.send(request("/dead/x", ("X-Request-Id", "refused")))
            assert (await client.response()).status == 503
            client.send(request("/delay?ms=2000", ("X-Request-Id", "timeout")))
            assert (await client.response()).status == 504
            leaving = await worker.client()
            leaving.send(request("/delay?ms=2000", ("X-Request-Id", "abort")))
            await until(lambda: any(c.servers[0].open for c in worker.clusters.values()), 5.0, "upstream busy")
            await asyncio.sleep(0.05)
            leaving.abort()
            client.send(b"GET /api/x HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n")  # rejected head: an exchange too
            assert (await client.response()).status == 400
            done = await worker.wait_finished(6)
            await asyncio.sleep(0.1)
            assert len(worker.finished) == 6, [e.request_id for e in worker.finished]
            by_id = {
                e.request_id: e for e in done if e.request_id in (b"ok", b"no-route", b"refused", b"timeout", b"abort")
            }
            assert {k: (v.status, v.error) for k, v in by_id.items()} == {
                b"ok": (200, ""),
                b"no-route": (404, "no_route"),
                b"refused": (503, "upstream_connect_failed"),
                b"timeout": (504, "upstream_response_timeout"),
                b"abort": (499, "client_closed"),
            }
            (rejected,) = [e for e in done if e.request_id not in by_id]
            assert rejected.status == 400 and rejected.target == b"/api/x"
            ok = by_id[b"ok"]
            assert ok.route is not None and ok.route.name == "/api/" and ok.upstream_name == "backend"
            assert str(ok.server) == backend_stub.address
            assert 0 < ok.t_start < ok.t_upstream <= ok.t_response <= ok.t_end
            assert ok.bytes_in == len(request("/api/ok", ("X-Request-Id", "ok"))) and ok.bytes_out > 50
            assert str(by_id[b"refused"].server) == "127.0.0.1:9"
            client.close()

    run(scenario)


class StreamDownstream(Downstream):
    """A downstream object per exchange, as an HTTP/2 stream would be: it needs the response head as
    (name, value) pairs and sees every callback name its exchange."""

    def __init__(self) -> None:
        super().__init__()
        self.exchange: Exchange | None = None
        self.status = 0
        self.pairs: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.done = asyncio.get_running_loop().create_future()
        self.calls: list[str] = []

    def _mine(self, exchange: Exchange, call: str) -> None:
        assert exchange is self.exchange, f"{call} for another exchange"
        self.calls.append(call)

    def body_wanted(self, exchange: Exchange) -> None:
        self._mine(exchange, "body_wanted")

    def pause_reading(self, exchange: Exchange) -> None:
        self._mine(exchange, "pause_reading")

    def resume_reading(self, exchange: Exchange) -> None:
        self._mine(exchange, "resume_reading")

    def response_head(self, exchange: Exchange, status: int, head: bytes, body: BodyKind) -> None:
        self._mine(exchange, "response_head")
        exchange.response_started = True
        self.status, self.pairs = status, head_pairs(head)

    def response_body(self, exchange: Exchange, data: bytes) -> None:
        self._mine(exchange, "response_body")
        self.body += data

    def response_end(self, exchange: Exchange) -> None:
        self._mine(exchange, "response_end")

    def response_flush(self, exchange: Exchange) -> None:
        self._mine(exchange, "response_flush")

    def response_done(self, exchange: Exchange) -> None:
        self._mine(exchange, "response_done")
        exchange.status = self.status
        exchange.finish()
        self.done.set_result(None)

    def response_complete(self, exchange: Exchange, status: int, head: bytes, body: bytes, kind: BodyKind) -> None:
        self._mine(exchange, "response_complete")
        self.status, self.pairs = status, head_pairs(head)
        self.body += body
        exchange.status = status
        exchange.finish()
        self.done.set_result(None)

    def answer(self, exchange: Exchange, error: ProxyError) -> None:
        self._mine(exchange, "answer")
        exchange.status = error.status
        exchange.finish()
        self.done.set_result(None)

    def reset(self, exchange: Exchange) -> None:
        self._mine(exchange, "reset")
        exchange.finish()
        self.done.set_result(None)


def test_a_downstream_per_exchange_gets_the_response_head_as_pairs(backend_stub: Service) -> None:
    """The contract an HTTP/2 stream implements: the same gateway, pool and upstream client serve it."""

    async def scenario() -> None:
        async with Worker(CONFIG, backend_stub.address) as worker:
            assert worker.state is not None
            policy_lines = b"x-forwarded-for: 10.0.0.7\r\nx-forwarded-proto: https\r\n"
            streams = []
            for target in (b"/api/resource", b"/drip?bytes=3000&chunks=3&interval_ms=10"):
                down = StreamDownstream()
                exchange = Exchange(
                    worker=worker.state,
                    downstream=down,
                    method=b"GET",
                    target=target,
                    host=b"test",
                    headers=[(b"accept", b"application/json")],
                    request_id=b"stream-%d" % len(streams),
                    forward_lines=policy_lines,
                    protocol=b"HTTP/2",
                )
                down.exchange = exchange
                streams.append(down)
                worker.state.gateway.handle(exchange)
            await asyncio.wait_for(asyncio.gather(*(s.done for s in streams)), 5.0)
            whole, streamed = streams
            assert [e.error for e in worker.finished] == ["", ""], [s.calls for s in streams]
            assert whole.status == 200 and (b"content-type", b"application/json") in whole.pairs
            assert whole.calls == ["response_complete"]
            assert streamed.status == 200 and len(streamed.body) == 3000
            assert streamed.calls[0] == "response_head" and streamed.calls[-1] == "response_done"
            assert all(name == name.lower() and b"\r" not in value for name, value in streamed.pairs)
            assert (b"transfer-encoding", b"chunked") not in streamed.pairs, "hop-by-hop lines are gone"

    run(scenario)
