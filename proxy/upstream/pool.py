"""Per-worker keep-alive pools: one `ServerPool` per upstream server, grouped in a `Cluster`.

Theory of operation: a cluster picks servers round robin, skipping ejected ones. A server hands
out its most recently used idle connection (LIFO keeps few sockets warm); when it has none and is
below `max_connections` it asks the injected connector to open one for the exchange. When every
server is at its limit the exchange waits in a bounded FIFO (`max_pending`); a released
connection goes to the first live waiter before it goes idle. The downstream's periodic timeout
check answers 503 for waiters past `pending_timeout` and `sweep` closes idle connections past
`idle_timeout`. `max_fails` consecutive connect failures eject a server for `fail_cooldown`.
This module does bookkeeping only; connections are opened by `connector` and talk back through
`release`, `discard` and `connect_failed`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from proxy.config import Address, UpstreamConfig
from proxy.errors import GatewayTimeout, ServiceUnavailable
from proxy.exchange import PHASE_CONNECTING, PHASE_DONE, PHASE_WAIT_CONNECTION, Exchange

if TYPE_CHECKING:
    from collections.abc import Iterator


class PooledConnection(Protocol):
    """What the pool needs from a connection."""

    idle_since: float

    @property
    def usable(self) -> bool:
        """Open and ready for a new request."""

    def attach(self, exchange: Exchange) -> None:
        """Start sending `exchange` on this connection."""

    def close(self) -> None:
        """Close the connection (it reports back through `discard`)."""


Connector = Callable[["ServerPool", Exchange], None]


class ServerPool:
    """Connections of this worker to one upstream server."""

    __slots__ = ("address", "cluster", "ejected_until", "fails", "idle", "open")

    def __init__(self, cluster: Cluster, address: Address) -> None:
        self.cluster = cluster
        self.address = address
        self.idle: deque[PooledConnection] = deque()  # right end = most recently used
        self.open = 0  # connecting + busy + idle
        self.fails = 0  # consecutive connect failures
        self.ejected_until = 0.0

    def checkout(self, now: float) -> PooledConnection | None:
        """The most recently used live idle connection, or None."""
        idle = self.idle
        limit = self.cluster.config.idle_timeout
        while idle:
            conn = idle.pop()
            if conn.usable and now - conn.idle_since < limit:
                return conn
            conn.close()
        return None

    def __repr__(self) -> str:
        return f"<ServerPool {self.address} open={self.open} idle={len(self.idle)} fails={self.fails}>"


class Cluster:
    """The servers of one named upstream, as seen by one worker."""

    __slots__ = ("_rr", "config", "connector", "name", "servers", "waiters")

    def __init__(self, config: UpstreamConfig, connector: Connector) -> None:
        self.config = config
        self.name = config.name
        self.connector = connector
        self.servers = [ServerPool(self, address) for address in config.servers]
        self.waiters: deque[Exchange] = deque()
        self._rr = 0

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, exchange: Exchange, now: float) -> None:
        """Give `exchange` a connection now, open one, queue it, or fail it with 503."""
        servers = self.servers
        count = len(servers)
        if count == 1:  # the common case: no rotation
            server = servers[0]
            if server.ejected_until <= now:
                idle = server.idle
                if idle:
                    top = idle.pop()
                    if top.usable and now - top.idle_since < self.config.idle_timeout:
                        top.attach(exchange)
                        return
                    top.close()
                if self._try_server(server, exchange, now):
                    return
        else:
            for server in self._rotation(now):
                if self._try_server(server, exchange, now):
                    return
        if not any(server.ejected_until <= now for server in servers):
            exchange.downstream.response_failed(exchange, ServiceUnavailable("no_healthy_upstream"))
            return
        if len(self.waiters) >= self.config.max_pending:
            exchange.downstream.response_failed(exchange, ServiceUnavailable("upstream_overflow"))
            return
        exchange.phase = PHASE_WAIT_CONNECTION
        exchange.deadline = now + self.config.pending_timeout
        exchange.waiting_on = self
        self.waiters.append(exchange)

    def dispatch_fresh(self, exchange: Exchange, now: float) -> None:
        """Send again on a new connection (a reused one died before answering)."""
        exchange.retried = True
        for server in self._rotation(now):
            if server.open < self.config.max_connections:
                self._connect(server, exchange, now)
                return
        self.dispatch(exchange, now)

    def _try_server(self, server: ServerPool, exchange: Exchange, now: float) -> bool:
        """Give `exchange` an idle connection of `server`, or open one if the server is below its limit."""
        conn = server.checkout(now)
        if conn is not None:
            conn.attach(exchange)
            return True
        if server.open < self.config.max_connections:
            self._connect(server, exchange, now)
            return True
        return False

    def _rotation(self, now: float) -> Iterator[ServerPool]:
        count = len(self.servers)
        for _ in range(count):
            server = self.servers[self._rr % count]
            self._rr += 1
            if server.ejected_until <= now:
                yield server

    def _connect(self, server: ServerPool, exchange: Exchange, now: float) -> None:
        server.open += 1
        exchange.attempts += 1
        exchange.phase = PHASE_CONNECTING
        exchange.deadline = now + self.config.connect_timeout
        self.connector(server, exchange)

    # ------------------------------------------------------------------ connection lifecycle

    def release(self, server: ServerPool, conn: PooledConnection, now: float) -> None:
        """A connection finished a response and can be reused."""
        while self.waiters:
            waiter = self.waiters.popleft()
            waiter.waiting_on = None
            if waiter.phase == PHASE_WAIT_CONNECTION:
                conn.attach(waiter)
                return
        conn.idle_since = now
        server.idle.append(conn)

    def discard(self, server: ServerPool, conn: PooledConnection | None, now: float) -> None:
        """A connection closed (or a connect attempt ended without one); its slot is free again."""
        server.open -= 1
        if conn is not None:
            try:
                server.idle.remove(conn)
            except ValueError:
                pass
        self._serve_waiter(now)

    def connected(self, server: ServerPool) -> None:
        server.fails = 0
        server.ejected_until = 0.0

    def connect_failed(self, server: ServerPool, exchange: Exchange | None, now: float, timeout: bool) -> None:
        """A connect attempt failed (its slot is already given back through `discard`): count it, maybe
        eject the server, and move the exchange on to another server (each server tried once)."""
        server.fails += 1
        if server.fails >= self.config.max_fails:
            server.ejected_until = now + self.config.fail_cooldown
            server.fails = 0
        if exchange is not None and exchange.phase == PHASE_CONNECTING:
            if timeout:
                exchange.downstream.response_failed(exchange, GatewayTimeout("upstream_connect_timeout"))
            else:
                self._retry_connect(server, exchange, now)
        self._serve_waiter(now)

    def _retry_connect(self, failed: ServerPool, exchange: Exchange, now: float) -> None:
        if exchange.attempts >= len(self.servers):
            exchange.downstream.response_failed(exchange, ServiceUnavailable("upstream_connect_failed"))
            return
        for server in self._rotation(now):
            if server is not failed and self._try_server(server, exchange, now):
                return
        exchange.downstream.response_failed(exchange, ServiceUnavailable("upstream_connect_failed"))

    def _serve_waiter(self, now: float) -> None:
        while self.waiters:
            waiter = self.waiters[0]
            if waiter.phase != PHASE_WAIT_CONNECTION:
                self.waiters.popleft()
                waiter.waiting_on = None
                continue
            self.waiters.popleft()
            waiter.waiting_on = None
            for server in self._rotation(now):
                if self._try_server(server, waiter, now):
                    return
            self.waiters.appendleft(waiter)  # still no room anywhere: it keeps its place
            waiter.waiting_on = self
            return

    def cancel_waiter(self, exchange: Exchange) -> None:
        """The exchange left the queue (timeout or client gone): it no longer counts against max_pending."""
        exchange.phase = PHASE_DONE
        exchange.waiting_on = None
        try:
            self.waiters.remove(exchange)
        except ValueError:
            pass

    # ------------------------------------------------------------------ housekeeping

    def sweep(self, now: float) -> None:
        """Close idle connections past `idle_timeout`; oldest are at the left end."""
        limit = self.config.idle_timeout
        for server in self.servers:
            idle = server.idle
            while idle and (now - idle[0].idle_since >= limit or not idle[0].usable):
                idle.popleft().close()

    def close_idle(self) -> None:
        for server in self.servers:
            while server.idle:
                server.idle.pop().close()

    def __repr__(self) -> str:
        return f"<Cluster {self.name} servers={self.servers} waiters={len(self.waiters)}>"
