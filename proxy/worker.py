"""Worker process boot: uvloop, the slot's listening socket, the pipeline, then serve until drained.

Theory of operation: the supervisor forks a worker with its slot socket and the write end of a
status pipe. The worker builds its state, starts serving, and writes `R` (ready) to the pipe,
then `.` once per second as a heartbeat. A boot failure writes `E<reason>` and exits with
`EXIT_BOOT_ERROR` so the supervisor can stop instead of restarting in a loop. SIGTERM drains:
stop accepting (the supervisor keeps the socket and its queue open), let in-flight exchanges
finish with `Connection: close`, close idle connections, exit when none is left or at
`drain_timeout`. SIGINT is ignored: the supervisor decides when workers stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import traceback

from proxy.accesslog import AccessLog
from proxy.config import Config
from proxy.gateway import Gateway
from proxy.http1.protocol import Http1Settings, HttpProtocol
from proxy.server import WorkerState
from proxy.upstream.client import make_connector
from proxy.upstream.pool import Cluster

EXIT_OK = 0
EXIT_BOOT_ERROR = 3
GC_THRESHOLD = 20_000
PR_SET_PDEATHSIG = 1

log = logging.getLogger("uvgate.worker")


class StatusPipe:
    """The worker's end of the status pipe to the supervisor; writes never block or raise."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._last_beat = 0.0

    def send(self, message: bytes) -> None:
        with contextlib.suppress(OSError):
            os.write(self.fd, message)

    def heartbeat(self, now: float) -> None:
        if now - self._last_beat >= 1.0:
            self._last_beat = now
            self.send(b".")


async def serve(config: Config, sock: socket.socket, slot: int, status: StatusPipe) -> None:
    loop = asyncio.get_running_loop()
    state = WorkerState(loop, config, worker_id=slot)
    connector = make_connector(state)
    clusters = {name: Cluster(upstream, connector) for name, upstream in config.upstreams.items()}
    state.gateway = Gateway(config, state, clusters)
    for cluster in clusters.values():
        state.tick_subscribers.append(cluster.sweep)
    access_log: AccessLog | None = None
    if config.server.access_log:
        access_log = AccessLog.open(config.server.access_log_path, slot)
        state.finished.append(access_log.exchange_finished)
        state.tick_subscribers.append(access_log.tick)
    state.tick_subscribers.append(status.heartbeat)
    settings = Http1Settings(state)
    stop = loop.create_future()

    def on_term() -> None:
        if not stop.done():
            stop.set_result(None)

    loop.add_signal_handler(signal.SIGTERM, on_term)
    server = await loop.create_server(
        lambda: HttpProtocol(state, settings), sock=sock, backlog=config.server.backlog, start_serving=True
    )
    state.start()
    # Everything allocated so far lives as long as the worker: keep it out of every GC pass, and
    # collect the young generation less often (request objects are freed by reference counting).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    status.send(b"R")
    log.debug("worker %d serving on %s", slot, config.server.listen)
    await stop
    server.close()  # stops accepting; the supervisor's copy of the socket keeps the queue alive
    drained = await state.drain(config.server.drain_timeout)
    if not drained:
        log.warning("worker %d: drain_timeout reached, closed remaining connections", slot)
    for cluster in clusters.values():
        cluster.close_idle()
    state.stop()
    if access_log is not None:
        access_log.close()


def _die_with_parent(parent: int) -> None:
    """SIGTERM (drain) this worker if the supervisor dies, instead of leaving it serving unsupervised."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run(config: Config, sock: socket.socket, slot: int, status_fd: int, parent: int) -> int:
    """Entry point in the forked child; returns the process exit code."""
    import uvloop

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _die_with_parent(parent)
    status = StatusPipe(status_fd)
    try:
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
    except Exception as exc:  # pragma: no cover - import/environment failures
        status.send(b"E" + f"event loop: {exc}".encode())
        return EXIT_BOOT_ERROR
    try:
        loop.run_until_complete(serve(config, sock, slot, status))
    except Exception as exc:
        status.send(b"E" + f"{type(exc).__name__}: {exc}".encode())
        log.error("worker %d failed: %s", slot, "".join(traceback.format_exception(exc)))
        return EXIT_BOOT_ERROR
    finally:
        loop.close()
    return EXIT_OK
