"""WorkerState: tick subscribers, the poll of paused connections, and drain through per-connection shutdown."""

from __future__ import annotations

import asyncio
import socket

import uvloop

from proxy.config import build
from proxy.server import WorkerState
from tests.fakes import MINIMAL_CONFIG


class Conn:
    """A downstream connection as the worker sees it."""

    def __init__(self, state: WorkerState, fd: int = -1) -> None:
        self.state = state
        self.fd = fd
        self.checks: list[float] = []
        self.shutdowns = 0
        self.peer: list[bool] = []
        state.connections.add(self)

    def check(self, now: float) -> None:
        self.checks.append(now)

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.state.loop.call_later(0.05, self.state.connections.discard, self)

    def abort(self) -> None:
        self.state.connections.discard(self)

    def watched_fd(self) -> int:
        return self.fd

    def peer_closed(self, reset: bool) -> None:
        self.peer.append(reset)
        self.fd = -1


def test_ticks_check_connections_then_call_subscribers_in_order() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        state = WorkerState(loop, build({**MINIMAL_CONFIG, "server": {"header_timeout": "0.1s"}}))
        conn = Conn(state)
        calls: list[tuple[str, float]] = []
        state.tick_subscribers.append(lambda now: calls.append(("first", now)))
        state.tick_subscribers.append(lambda now: calls.append(("second", now)))
        state.start()
        while len(calls) < 4:
            await asyncio.sleep(0.01)
        state.stop()
        assert [name for name, _ in calls[:4]] == ["first", "second", "first", "second"]
        assert calls[0][1] == calls[1][1] == conn.checks[0], "one clock per tick, connections first"
        assert calls[2][1] > calls[0][1]

    uvloop.run(scenario())


def test_drain_shuts_every_connection_down_and_waits_for_them() -> None:
    async def scenario() -> None:
        state = WorkerState(asyncio.get_running_loop(), build(MINIMAL_CONFIG))
        conns = [Conn(state) for _ in range(3)]
        state.start()
        assert await state.drain(2.0)
        state.stop()
        assert [c.shutdowns for c in conns] == [1, 1, 1] and state.draining and not state.connections

    uvloop.run(scenario())


def test_a_peer_that_closes_or_resets_a_paused_connection_is_noticed() -> None:
    """Reading paused (pipelining, a slow upstream): the worker polls those sockets for a FIN or an RST."""

    async def scenario() -> None:
        state = WorkerState(asyncio.get_running_loop(), build({**MINIMAL_CONFIG, "server": {"header_timeout": "0.2s"}}))
        fin_ours, fin_peer = socket.socketpair()
        rst_ours, rst_peer = socket.socketpair()
        quiet_ours, quiet_peer = socket.socketpair()
        try:
            fin, rst, quiet = (
                Conn(state, fin_ours.fileno()),
                Conn(state, rst_ours.fileno()),
                Conn(state, quiet_ours.fileno()),
            )
            fin_peer.shutdown(socket.SHUT_WR)
            rst_peer.close()
            state.start()
            while not (fin.peer and rst.peer):
                await asyncio.sleep(0.01)
            state.stop()
            assert fin.peer == [False] and rst.peer == [True] and quiet.peer == []
        finally:
            for sock in (fin_ours, fin_peer, rst_ours, quiet_ours, quiet_peer):
                sock.close()

    uvloop.run(scenario())
