"""Test doubles shared by the protocol and unit tests (no loop, no sockets)."""

from __future__ import annotations

from typing import Any

from proxy.config import Address, Config, build
from proxy.errors import ProxyError
from proxy.exchange import BODY_NONE, BodyKind, Downstream, Exchange
from proxy.server import Pipeline, WorkerState
from proxy.upstream.pool import PooledConnection

MINIMAL_CONFIG: dict[str, Any] = {
    "upstreams": {"b": {"servers": ["127.0.0.1:1"]}},
    "routes": [{"prefix": "/", "upstream": "b"}],
}


class MockTransport:
    """Downstream transport: records writes; `write` after close is a test failure."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.read_paused = False
        self.closing = False
        self.aborted = False
        self.eof_written = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        self.buffer += data

    def writelines(self, chunks: list[bytes]) -> None:
        for data in chunks:
            self.write(data)

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        self.read_paused = False

    def paused(self) -> bool:
        """Reading is paused (a method: mypy would keep an asserted attribute narrowed)."""
        return self.read_paused

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True
        self.closing = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("10.1.2.3", 5555) if name == "peername" else default

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


class MockLoop:
    def __init__(self) -> None:
        self.now = 100.0

    def time(self) -> float:
        return self.now


def worker_state(config: Config | None = None) -> WorkerState:
    """A WorkerState on a MockLoop (clock 100.0), for `config` or a minimal one."""
    return WorkerState(MockLoop(), config or build(MINIMAL_CONFIG))  # type: ignore[arg-type]


class RecordingGateway(Pipeline):
    """Starts and records every exchange handed to it, like a gateway whose upstream never answers."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    def handle(self, exchange: Exchange) -> None:
        exchange.start()
        self.exchanges.append(exchange)

    def resume(self, exchange: Exchange) -> None:
        raise AssertionError("nothing suspends here")

    def forward(self, exchange: Exchange) -> None:
        raise AssertionError("nothing buffers here")


class FakeDownstream(Downstream):
    """Records what the proxy answered; finishes exchanges like a real downstream."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[ProxyError] = []

    def answer(self, exchange: Exchange, error: ProxyError) -> None:
        self.failures.append(error)
        exchange.status = error.status
        exchange.finish()

    def reset(self, exchange: Exchange) -> None:
        exchange.finish()

    def body_wanted(self, exchange: Exchange) -> None:
        pass


def make_exchange(
    downstream: Any,
    worker: WorkerState | None = None,
    *,
    method: bytes = b"GET",
    target: bytes = b"/",
    body_kind: BodyKind = BODY_NONE,
    content_length: int = -1,
    start: bool = True,
) -> Exchange:
    """An exchange as a downstream would make it (started, i.e. handed to the gateway, unless told)."""
    exchange = Exchange(
        worker=worker or worker_state(),
        downstream=downstream,
        method=method,
        target=target,
        host=b"h",
        headers=[],
        request_id=b"id",
        forward_lines=b"",
        body_kind=body_kind,
        content_length=content_length,
    )
    if start:
        exchange.start()
    return exchange


class FakeConn(PooledConnection):
    """A pooled upstream connection that takes exchanges and never answers."""

    def __init__(self, name: str, address: Address | None = None) -> None:
        super().__init__()
        self.name = name
        self.address = address or Address("127.0.0.1", 9999)
        self.attached: list[Exchange] = []
        self.unparked: list[tuple[Exchange, bool]] = []
        self.closed = False

    @property
    def usable(self) -> bool:
        return not self.closed

    def attach(self, exchange: Exchange) -> None:
        exchange.sent(self, self.address, exchange.worker.now + 30.0)
        self.attached.append(exchange)

    def send_body(self, data: bytes) -> None:
        pass

    def end_body(self) -> None:
        pass

    def pause_response(self) -> None:
        pass

    def resume_response(self) -> None:
        pass

    def unpark(self, exchange: Exchange, timed_out: bool) -> None:
        self.unparked.append((exchange, timed_out))

    def close(self) -> None:
        self.closed = True


class FakeConnectTask:
    """Stands in for the connect task: done when `connect_done` is called by the test."""

    def __init__(self) -> None:
        self.cancel_called = False

    def cancel(self) -> bool:
        self.cancel_called = True
        return True

    def cancelled(self) -> bool:
        return self.cancel_called

    def exception(self) -> BaseException | None:
        return None

    def add_done_callback(self, callback: Any) -> None:
        pass
