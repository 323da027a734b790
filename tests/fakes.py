"""Test doubles shared by the protocol and unit tests (no loop, no sockets)."""

from __future__ import annotations

from typing import Any

from proxy.errors import ProxyError
from proxy.exchange import PHASE_DONE, PHASE_WAIT_RESPONSE, Exchange


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


class RecordingGateway:
    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    def handle(self, exchange: Exchange) -> None:
        self.exchanges.append(exchange)


class FakeDownstream:
    def __init__(self) -> None:
        self.failures: list[ProxyError] = []

    def response_failed(self, exchange: Exchange, error: ProxyError) -> None:
        exchange.phase = PHASE_DONE
        self.failures.append(error)


class FakeConn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.idle_since = 0.0
        self.attached: list[Exchange] = []
        self.closed = False

    @property
    def usable(self) -> bool:
        return not self.closed

    def attach(self, exchange: Exchange) -> None:
        exchange.phase = PHASE_WAIT_RESPONSE
        self.attached.append(exchange)

    def close(self) -> None:
        self.closed = True
