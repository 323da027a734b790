"""Per-worker keep-alive pools: one `ServerPool` per upstream server, grouped in a `Cluster`.

Theory of operation: a cluster picks servers round robin, skipping ejected ones. A server hands out
its most recently used idle connection (LIFO keeps few sockets warm); when it has none and is below
`max_connections` it asks the injected connector to open one for the exchange. When every server is
at its limit the exchange waits in a bounded FIFO (`max_pending`), parked on the cluster (a timeout
or a client that goes away takes it out through `unpark`); a released connection goes to the first
live waiter before it goes idle. `sweep` (a worker tick subscriber) closes idle connections past
`idle_timeout`. `max_fails` consecutive connect failures eject a server for `fail_cooldown`, except
the last healthy one: like NGINX, an upstream never has all its servers marked down, so a server that
comes back is used at once. Failures are logged, at most once per server, reason and `LOG_INTERVAL`.
This module does bookkeeping only; connections are opened by `connector` and talk back through
`release`, `discard`, `connected` and `connect_failed`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from mypy_extensions import mypyc_attr

from proxy.config import Address, UpstreamConfig
from proxy.errors import GatewayTimeout, ServiceUnavailable
from proxy.exchange import PHASE_CONNECTING, PHASE_WAIT_CONNECTION, Exchange, Upstream

if TYPE_CHECKING:
    from collections.abc import Iterator

log = logging.getLogger("uvgate.upstream")

LOG_INTERVAL: Final = 10.0  # seconds between two log lines about one server and one reason


@mypyc_attr(allow_interpreted_subclasses=True)
class PooledConnection(Upstream):
    """What the pool needs from a connection (a class, for the reason given above `exchange.Upstream`)."""

    def __init__(self) -> None:
        self.idle_since = 0.0  # when it last went idle: set by the connection itself before `Cluster.release`

    @property
    def usable(self) -> bool:
        """Open and ready for a new request."""
        raise NotImplementedError

    def attach(self, exchange: Exchange) -> None:
        """Start sending `exchange` on this connection."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the connection (it reports back through `discard`)."""
        raise NotImplementedError


Connector = Callable[["ServerPool", Exchange], PooledConnection]
"""Opens a connection to a server for an exchange; it calls `connect_failed` or attaches the exchange."""


class ServerPool:
    """Connections of this worker to one upstream server."""

    __slots__ = ("address", "cluster", "connect_errors", "ejected_until", "fails", "idle", "logged", "open")

    def __init__(self, cluster: Cluster, address: Address) -> None:
        self.cluster = cluster
        self.address = address
        self.idle: list[PooledConnection] = []  # right end = most recently used (a list: its methods compile natively)
        self.open = 0  # connecting + busy + idle
        self.fails = 0  # consecutive connect failures
        self.connect_errors = 0  # every connect failure since the worker started (metrics read it)
        self.ejected_until = 0.0
        self.logged: dict[str, tuple[float, int]] = {}  # reason -> (last logged at, failures not logged since)

    def checkout(self, now: float) -> PooledConnection | None:
        """The most recently used live idle connection, or None."""
        idle = self.idle
        limit = self.cluster.idle_timeout
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

    __slots__ = ("_rr", "config", "connector", "idle_timeout", "name", "servers", "waiters")

    def __init__(self, config: UpstreamConfig, connector: Connector) -> None:
        self.config = config
        self.name = config.name
        self.idle_timeout = config.idle_timeout  # read per request: a native attribute, not the config's
        self.connector = connector
        self.servers = [ServerPool(self, address) for address in config.servers]
        self.waiters: deque[Exchange] = deque()
        self._rr = 0

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, exchange: Exchange, now: float) -> None:
        """Give `exchange` a connection now, open one, queue it, or answer it 503."""
        servers = self.servers
        if len(servers) == 1:  # the common case: no rotation, and the idle stack's top is usually good
            server = servers[0]
            idle = server.idle
            if idle:
                top = idle.pop()
                if top.usable and now - top.idle_since < self.idle_timeout:
                    top.attach(exchange)
                    return
                top.close()
            if server.ejected_until <= now and self._try_server(server, exchange, now):
                return
        else:
            for server in self._rotation(now):
                if self._try_server(server, exchange, now):
                    return
        if len(self.waiters) >= self.config.max_pending:
            exchange.fail(ServiceUnavailable("upstream_overflow"))
            return
        exchange.wait_connection(self, now + self.config.pending_timeout)
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
        conn = self.connector(server, exchange)
        exchange.connecting(conn, server.address, now + self.config.connect_timeout)

    # ------------------------------------------------------------------ parking (exchange.py)

    def unpark(self, exchange: Exchange, timed_out: bool) -> None:
        """A waiter left the queue (timeout or client gone): it no longer counts against max_pending."""
        try:
            self.waiters.remove(exchange)
        except ValueError:
            pass

    # ------------------------------------------------------------------ connection lifecycle

    def release(self, server: ServerPool, conn: PooledConnection) -> None:
        """A connection finished a response and can be reused (it set its `idle_since`): the first waiter
        takes it, else it idles."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter.phase == PHASE_WAIT_CONNECTION:
                conn.attach(waiter)
                return
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

    def connect_failed(
        self, server: ServerPool, exchange: Exchange | None, now: float, *, timeout: bool, reason: str
    ) -> None:
        """A connect attempt failed (its slot is already given back through `discard`): count it, maybe
        eject the server, and move the exchange on to another server (each server tried once)."""
        self.report(server, reason, now)
        server.connect_errors += 1
        server.fails += 1
        if server.fails >= self.config.max_fails:
            server.fails = 0
            if self._others_healthy(server, now):
                server.ejected_until = now + self.config.fail_cooldown
                log.warning(
                    "upstream %s: server %s ejected for %.0fs after %d failed connects",
                    self.name,
                    server.address,
                    self.config.fail_cooldown,
                    self.config.max_fails,
                )
        if exchange is not None and exchange.phase == PHASE_CONNECTING:
            if timeout:
                exchange.fail(GatewayTimeout("upstream_connect_timeout"))
            else:
                self._retry_connect(server, exchange, now)
        self._serve_waiter(now)

    def _others_healthy(self, server: ServerPool, now: float) -> bool:
        return any(other is not server and other.ejected_until <= now for other in self.servers)

    def _retry_connect(self, failed: ServerPool, exchange: Exchange, now: float) -> None:
        if exchange.attempts < len(self.servers):
            for server in self._rotation(now):
                if server is not failed and self._try_server(server, exchange, now):
                    return
        exchange.fail(ServiceUnavailable("upstream_connect_failed"))

    def _serve_waiter(self, now: float) -> None:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter.phase != PHASE_WAIT_CONNECTION:
                continue
            for server in self._rotation(now):
                if self._try_server(server, waiter, now):
                    return
            waiters.appendleft(waiter)  # still no room anywhere: it keeps its place
            return

    # ------------------------------------------------------------------ failures

    def report(self, server: ServerPool, reason: str, now: float) -> None:
        """Log an upstream failure: the first of a kind at once, then one line per `LOG_INTERVAL` with the
        count of those not logged."""
        last, quiet = server.logged.get(reason, (-LOG_INTERVAL, 0))
        if now - last < LOG_INTERVAL:
            server.logged[reason] = (last, quiet + 1)
            return
        server.logged[reason] = (now, 0)
        more = f" ({quiet} more since the last report)" if quiet else ""
        log.warning("upstream %s server %s: %s%s", self.name, server.address, reason, more)

    # ------------------------------------------------------------------ housekeeping

    def sweep(self, now: float) -> None:
        """Close idle connections past `idle_timeout` (a tick subscriber); oldest are at the left end."""
        limit = self.idle_timeout
        for server in self.servers:
            idle = server.idle
            stale = 0
            while stale < len(idle) and (now - idle[stale].idle_since >= limit or not idle[stale].usable):
                stale += 1
            if stale:
                gone = idle[:stale]
                del idle[:stale]
                for conn in gone:
                    conn.close()

    def close_idle(self) -> None:
        for server in self.servers:
            while server.idle:
                server.idle.pop().close()

    def __repr__(self) -> str:
        return f"<Cluster {self.name} servers={self.servers} waiters={len(self.waiters)}>"
