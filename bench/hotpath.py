"""The request path in one process, without sockets: a deterministic measure for hot-path work.

`python -m bench.hotpath [--requests N] [--shape plain|realistic] [--metrics]` feeds N keep-alive requests through
`HttpProtocol` -> `Gateway` -> `Cluster` -> `UpstreamConnection` and one pooled upstream connection,
with in-memory transports, and prints µs per request (best of 5). Wall-clock figures on a shared VM
swing by tens of percent; instruction counts do not:

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p python -m bench.hotpath --requests 0
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p python -m bench.hotpath --requests 2000

(total instructions at 2000 minus at 0, over 5 x 2000, is the cost of one request; run both with
`PYTHONPATH` set to another tree to compare commits; `callgrind_annotate` shows where it goes). The
path is the proxy's compiled code; only the kernel and uvloop's transports are left out.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from proxy.config import Address, build
from proxy.exchange import Exchange
from proxy.gateway import Gateway
from proxy.http1.framing import ResponseHeadRewriter
from proxy.http1.protocol import Http1Settings, HttpProtocol
from proxy.metrics import RequestCounts
from proxy.ratelimit.services import LimitServices
from proxy.server import WorkerState
from proxy.upstream.client import UpstreamConnection
from proxy.upstream.pool import Cluster, ServerPool

PLAIN = b"GET /api/resource HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
REALISTIC = (
    b"GET /api/resource HTTP/1.1\r\nHost: api.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36\r\n"
    b"Accept: application/json\r\nAccept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\n"
    b"Content-Type: application/json\r\n"
    b"Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEyMyJ9.abcdefghijklmnopqrstuvwxyz0123456789\r\n"
    b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
    b"X-Request-Id: 5b1f1c2e-8f5e-4b0a-9d1c-2e8f5e4b0a9d\r\nConnection: keep-alive\r\n\r\n"
)
BODY = b'{"id":1,"name":"resource","tags":["a","b"],"ok":true}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: backend_stub\r\nDate: Tue, 01 Dec 2026 21:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)
NGINX_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 21:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s" % (len(BODY), BODY)
)


class Loop:
    """The little of a loop the worker state reads here."""

    def time(self) -> float:
        return 100.0


class Transport:
    """An in-memory transport: counts writes, never pushes back."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("10.1.2.3", 5555) if name == "peername" else default


class ConnectTask:
    """Stands for the connect task of the upstream connection (already done)."""

    def cancel(self) -> bool:
        return True

    def cancelled(self) -> bool:
        return False

    def exception(self) -> None:
        return None

    def add_done_callback(self, callback: Any) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200_000, help="requests per timed round (default 200000)")
    parser.add_argument(
        "--shape",
        choices=("plain", "realistic", "limited"),
        default="plain",
        help="limited: plain on a route with a local and a global limit that never reject (the Redis sync left"
        " out: its share is learned once, before the rounds)",
    )
    parser.add_argument(
        "--response",
        choices=("stub", "nginx"),
        default="stub",
        help="the upstream's answer: backend_stub's head, or NGINX's (with its Connection: keep-alive line)",
    )
    parser.add_argument("--warmup", type=int, default=200, help="requests before the timed rounds (default 200)")
    parser.add_argument(
        "--metrics", action="store_true", help="count requests in metrics.RequestCounts (a worker does by default)"
    )
    args = parser.parse_args()
    raw: dict[str, Any] = {
        "server": {"access_log": False},
        "upstreams": {"b": {"servers": ["127.0.0.1:1"]}},
        "routes": [{"prefix": "/api/", "upstream": "b"}],
        "metrics": {"enabled": False},
    }
    if args.shape == "limited":
        raw["redis"] = {"url": "redis://127.0.0.1:1/0"}
        raw["limits"] = {"bench": {"local_rate": 1e9, "local_burst": 1_000_000, "global_limit": 10**9, "window": 86400}}
        raw["routes"][0]["limits"] = ["bench"]
    config = build(raw)
    state = WorkerState(Loop(), config)  # type: ignore[arg-type]
    limits = LimitServices(config, state)
    if args.metrics:
        state.finished.append(RequestCounts().exchange_finished)
    conns: list[UpstreamConnection] = []

    def connector(server: ServerPool, exchange: Exchange) -> UpstreamConnection:
        conn = UpstreamConnection(server.cluster, server, state, ResponseHeadRewriter(drop=(b"x-request-id",)))
        conn.pending = exchange
        conn.connect_task = ConnectTask()  # type: ignore[assignment]
        conns.append(conn)
        return conn

    cluster = Cluster(config.upstreams["b"], connector)
    state.gateway = Gateway(config, state, {"b": cluster}, limits.steps)
    # An exchange's clock (perf_counter() + state.wall_offset); the window is a day (UTC): a run across
    # midnight would have to learn again, and stops with an error.
    wall = time.time()
    for _, _, ledger in limits.ledgers:  # what a first sync would have answered: nothing spent yet
        ledger.peek(b"10.1.2.3", wall)
        batch = ledger.take_batch(wall)
        ledger.apply(batch, [0] * len(batch), None, wall)
    client = HttpProtocol(state, Http1Settings(state))
    downstream = Transport()
    client.connection_made(downstream)  # type: ignore[arg-type]
    request = REALISTIC if args.shape == "realistic" else PLAIN
    response = NGINX_RESPONSE if args.response == "nginx" else RESPONSE
    client.data_received(request)
    conn = conns[0]
    conn.connection_made(Transport())  # type: ignore[arg-type]
    conn.connect_done(ConnectTask())  # type: ignore[arg-type]
    conn.data_received(response)
    feed_client, feed_upstream = client.data_received, conn.data_received
    for _ in range(args.warmup):
        feed_client(request)
        feed_upstream(response)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(args.requests):
            feed_client(request)
            feed_upstream(response)
        if args.requests:
            best = min(best, (time.perf_counter() - started) / args.requests * 1e6)
    served = 1 + args.warmup + 5 * args.requests
    if downstream.writes != served or len(conns) != 1 or conn.server.address != Address("127.0.0.1", 1):
        print(f"the path did not run as expected: {downstream.writes} answers for {served} requests", file=sys.stderr)
        return 1
    if args.requests:
        print(f"{args.shape}: {best:.3f} µs/request (best of 5 x {args.requests})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
