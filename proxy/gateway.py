"""The request pipeline: route -> (auth, limits: later issues) -> upstream. The only composer.

It never touches a transport: it answers through `exchange.downstream` or hands the exchange to an
upstream cluster, which does the rest.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.config import Config, RouteConfig
from proxy.errors import NotFound
from proxy.exchange import Exchange
from proxy.routing import Router
from proxy.server import WorkerState
from proxy.upstream.pool import Cluster


class Route:
    """A configured route bound to this worker's cluster."""

    __slots__ = ("cluster", "config")

    def __init__(self, config: RouteConfig, cluster: Cluster) -> None:
        self.config = config
        self.cluster = cluster


class Gateway:
    """Per-worker pipeline composing routing and upstream clusters."""

    def __init__(self, config: Config, state: WorkerState, clusters: Mapping[str, Cluster]) -> None:
        self.state = state
        self.router: Router[Route] = Router(
            [(route.host, route.prefix, Route(route, clusters[route.upstream])) for route in config.routes]
        )

    def handle(self, exchange: Exchange) -> None:
        route = self.router.match(exchange.host, exchange.target)
        if route is None:
            exchange.downstream.response_failed(exchange, NotFound("no_route"))
            return
        route.cluster.dispatch(exchange, self.state.now)
