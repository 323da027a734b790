"""The request pipeline: route -> steps (auth, then limits) -> request body buffering -> upstream. The only composer.

Theory of operation: `handle` runs an exchange whose turn has come. The router picks its route; the
route's steps run in order, each deciding synchronously in the common case: pass (`None`, maybe after
adding upstream or response headers to the exchange), answer (a `ProxyError`, with its status, extra
headers and JSON fields), or wait (`WAIT`, after parking the exchange on what it waits for, with its
own deadline and error; see `exchange.WaitList`). A woken exchange comes back through `resume`, which
re-runs the step that suspended it: no task, no closure per request. When every step passed, a request
body that is still arriving is buffered (up to `server.body_buffer_size`, within the worker's
`server.body_buffer_memory`) before an upstream connection is taken, so slow senders hold memory,
not upstream connections; then the route's cluster takes the exchange. The gateway never touches a
transport: answers go through the exchange's lifecycle to its downstream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from proxy.auth.step import Authority, AuthStep
from proxy.config import Config, RouteConfig
from proxy.errors import NotFound, ProxyError
from proxy.exchange import BODY_CHUNKED, WAIT, Exchange
from proxy.routing import Router
from proxy.server import Pipeline, WorkerState
from proxy.upstream.pool import Cluster

__all__ = ["WAIT", "Gateway", "Route", "Step", "StepFactory", "auth_steps", "no_steps"]


class Step(Protocol):
    """One decision of a route's pipeline (auth, a rate limit)."""

    def check(self, exchange: Exchange) -> ProxyError | None:
        """None to pass `exchange` on, an error to answer it with, or `WAIT` once it is parked (the step is
        run again when the exchange wakes)."""


StepFactory = Callable[[RouteConfig], Sequence[Step]]


def no_steps(route: RouteConfig) -> Sequence[Step]:
    """No step on any route."""
    return ()


def auth_steps(authorities: Mapping[str, Authority], realm: str, limits: StepFactory = no_steps) -> StepFactory:
    """The steps of each route from its config: its `auth` (the worker's authority of that kind, with
    the route's required scopes) first, so that rate limits, next (`limits`: the worker's limit steps
    of a route), count the verified subject."""

    def build(route: RouteConfig) -> Sequence[Step]:
        steps: list[Step] = []
        if route.auth != "none":
            steps.append(AuthStep(authorities[route.auth], route.required_scope, realm))
        steps.extend(limits(route))
        return steps

    return build


class Route:
    """A configured route bound to this worker's cluster and steps."""

    __slots__ = ("cluster", "config", "name", "steps", "upstream")

    def __init__(self, config: RouteConfig, cluster: Cluster, steps: Sequence[Step]) -> None:
        self.config = config
        self.name = config.name
        self.upstream = config.upstream
        self.cluster = cluster
        self.steps: tuple[Step, ...] = tuple(steps)

    def __repr__(self) -> str:
        return f"<Route {self.name} -> {self.upstream} steps={len(self.steps)}>"


class Gateway(Pipeline):
    """Per-worker pipeline composing routing, steps, body buffering and upstream clusters."""

    def __init__(
        self,
        config: Config,
        state: WorkerState,
        clusters: Mapping[str, Cluster],
        steps: StepFactory = no_steps,
    ) -> None:
        self.state = state
        self.router: Router[Route] = Router(
            [(r.host, r.prefix, Route(r, clusters[r.upstream], steps(r))) for r in config.routes]
        )
        self.buffer_size = config.server.body_buffer_size
        self.buffer_memory = config.server.body_buffer_memory

    def handle(self, exchange: Exchange) -> None:
        exchange.start()
        route = self.router.match(exchange.host, exchange.target)
        if route is None:
            exchange.fail(NotFound("no_route"))
            return
        exchange.route = route
        if route.steps:
            exchange.stepped()
            self._run_steps(exchange, route, 0)
        else:
            self._proceed(exchange, route)

    def resume(self, exchange: Exchange) -> None:
        route = exchange.route
        assert route is not None, "only a routed exchange is suspended"
        self._run_steps(exchange, route, exchange.step)

    def forward(self, exchange: Exchange) -> None:
        route = exchange.route
        assert route is not None, "only a routed exchange buffers its body"
        route.cluster.dispatch(exchange, self.state.now)

    def _run_steps(self, exchange: Exchange, route: Route, first: int) -> None:
        steps = route.steps
        index = first
        while index < len(steps):
            verdict = steps[index].check(exchange)
            if verdict is not None:
                if verdict is WAIT:
                    exchange.step = index
                else:
                    exchange.fail(verdict)
                return
            index += 1
        self._proceed(exchange, route)

    def _proceed(self, exchange: Exchange, route: Route) -> None:
        """Every step passed: buffer the request body if it is still arriving, else go upstream."""
        if exchange.body_done:
            route.cluster.dispatch(exchange, self.state.now)
            return
        if self.buffer_size:
            size = self.buffer_size
            need = size if exchange.body_kind == BODY_CHUNKED else min(exchange.content_length, size)
            state = self.state
            if exchange.pending_bytes < need and state.body_reserved + need <= self.buffer_memory:
                exchange.await_body(need)
                return
            # Buffer memory exhausted: this body streams as it arrives (as with buffering off).
        route.cluster.dispatch(exchange, self.state.now)
