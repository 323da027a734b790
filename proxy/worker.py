"""Worker process boot: uvloop, the slot's listening socket, the pipeline, then serve until drained.

Theory of operation: the supervisor forks a worker with its slot socket and the write end of a
status pipe. The worker builds its state, starts serving, and reports through `StatusPipe`, in
framed messages (`proxy.ipc`): ready once it serves, then a heartbeat about once a second. An
error before ready is a boot failure: the worker sends its reason and exits `EXIT_BOOT_ERROR` (3),
so the supervisor stops instead of restarting it in a loop. An error after ready is a crash: it
sends the reason and exits `EXIT_CRASH` (70, EX_SOFTWARE), and the supervisor replaces it with
backoff. SIGTERM drains: stop accepting (on a reload the supervisor keeps the socket and its
queue for the next worker; on a stop it takes the socket out of listening state), let in-flight
exchanges finish with `Connection: close`, close idle connections, exit 0 when none is left or at
`drain_timeout`. SIGINT is ignored: the supervisor decides when workers stop. SIGUSR1 (relayed by
the supervisor) reopens the access log file. With metrics on, finished exchanges are counted
(`proxy.metrics`) and folded on the tick into this worker's files in the supervisor's metrics
directory (`proxy.metricsio`), written a last time after the drain.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import socket
import traceback
from typing import TYPE_CHECKING

from proxy import ipc
from proxy.accesslog import AccessLog
from proxy.auth.services import AuthServices
from proxy.config import Config
from proxy.gateway import Gateway, auth_steps
from proxy.http1.protocol import Http1Settings, HttpProtocol
from proxy.metrics import RequestCounts
from proxy.ratelimit.services import LimitServices
from proxy.server import WorkerState
from proxy.upstream.client import make_connector
from proxy.upstream.pool import Cluster

if TYPE_CHECKING:
    from proxy.metricsio import WorkerMetrics

EXIT_OK = 0
EXIT_BOOT_ERROR = 3  # failed before reporting ready
EXIT_CRASH = 70  # EX_SOFTWARE: an error ended the worker after it reported ready
GC_THRESHOLD = 20_000
PR_SET_PDEATHSIG = 1

log = logging.getLogger("uvgate.worker")


class StatusPipe:
    """The worker's end of the status pipe (framed: `proxy.ipc`); sends never block or raise.

    Each frame fits in one atomic pipe write, so a send delivers a whole message or, when the pipe
    is full (a supervisor that stopped reading) or gone, nothing.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._last_beat = 0.0
        self.serving = False  # ready() was called: from then on, an error is a crash, not a boot failure

    def _send(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
        except OSError:
            pass

    def ready(self) -> None:
        """The worker serves its slot."""
        self.serving = True
        self._send(ipc.ready())

    def heartbeat(self, now: float) -> None:
        """Called on every tick; sends at most one heartbeat a second."""
        if now - self._last_beat >= 1.0:
            self._last_beat = now
            self._send(ipc.heartbeat())

    def boot_error(self, reason: str) -> None:
        """Why the worker could not start (it exits EXIT_BOOT_ERROR next)."""
        self._send(ipc.boot_error(reason))

    def fatal(self, reason: str) -> None:
        """The error that ends a worker after ready (it exits EXIT_CRASH next)."""
        self._send(ipc.fatal(reason))


async def serve(config: Config, sock: socket.socket, slot: int, status: StatusPipe) -> None:
    loop = asyncio.get_running_loop()
    state = WorkerState(loop, config, worker_id=slot)
    connector = make_connector(state)
    clusters = {name: Cluster(upstream, connector) for name, upstream in config.upstreams.items()}
    auth = AuthServices(config, state)
    limits = LimitServices(config, state)
    state.gateway = Gateway(config, state, clusters, auth_steps(auth.authorities, auth.realm, limits.steps))
    for cluster in clusters.values():
        state.tick_subscribers.append(cluster.sweep)
    state.tick_subscribers.append(auth.tick)
    state.tick_subscribers.append(limits.tick)
    await auth.boot()  # the JWKS before ready (auth.jwt.jwks_boot says what a failure does)
    await limits.boot()  # the first Redis connection before ready (a failure: served per redis.failure_mode)
    access_log: AccessLog | None = None
    if config.server.access_log:
        access_log = AccessLog.open(config.server.access_log_path, slot)
        state.finished.append(access_log.exchange_finished)
        state.tick_subscribers.append(access_log.tick)
    state.tick_subscribers.append(status.heartbeat)
    metrics = _start_metrics(config, state, clusters, auth, limits)
    settings = Http1Settings(state)
    stop = loop.create_future()

    def on_term() -> None:
        if not stop.done():
            stop.set_result(None)

    loop.add_signal_handler(signal.SIGTERM, on_term)
    if access_log is not None:
        loop.add_signal_handler(signal.SIGUSR1, access_log.reopen)
    server = await loop.create_server(
        lambda: HttpProtocol(state, settings), sock=sock, backlog=config.server.backlog, start_serving=True
    )
    state.start()
    # Everything allocated so far lives as long as the worker: keep it out of every GC pass, and
    # collect the young generation less often (request objects are freed by reference counting).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    status.ready()
    log.debug("worker %d serving on %s", slot, config.server.listen)
    await stop
    server.close()  # stop accepting at once (a reload: the supervisor keeps the queue for the next worker)
    drained = await state.drain(config.server.drain_timeout)
    if not drained:
        log.warning("worker %d: drain_timeout reached, closed remaining connections", slot)
    for cluster in clusters.values():
        cluster.close_idle()
    auth.close()
    await limits.close()
    state.stop()
    if access_log is not None:
        access_log.close()
    if metrics is not None:
        metrics.close()


def _start_metrics(
    config: Config, state: WorkerState, clusters: dict[str, Cluster], auth: AuthServices, limits: LimitServices
) -> WorkerMetrics | None:
    """Count finished exchanges and fold the counts into this worker's metrics files on the tick, when
    metrics are on and the supervisor gave their directory."""
    if not config.metrics.enabled or not config.metrics.directory:
        return None
    from proxy.metricsio import WorkerMetrics  # prometheus-client: already imported before the fork

    counts = RequestCounts()
    caches = {kind: authority.cache for kind, authority in auth.authorities.items()}
    metrics = WorkerMetrics(config.metrics, counts, state, clusters, caches, os.getpid(), limits)
    state.finished.append(counts.exchange_finished)
    state.tick_subscribers.append(metrics.tick)
    return metrics


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
    """Entry point in the forked child; returns the process exit code (raises only if `status_fd` is bad)."""
    status = StatusPipe(status_fd)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until the loop handles it (access log reopen)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _die_with_parent(parent)
        import uvloop  # here, not at the top: only workers need it, and failing to import it is a boot error

        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(serve(config, sock, slot, status))
        finally:
            loop.close()
    except BaseException as exc:  # the child must end here, never unwind into the supervisor's code
        reason = f"{type(exc).__name__}: {exc}"
        if status.serving:
            log.error("worker %d (slot %d) crashed after ready:\n%s", os.getpid(), slot, _trace(exc))
            status.fatal(reason)
            return EXIT_CRASH
        log.error("worker %d (slot %d) could not start:\n%s", os.getpid(), slot, _trace(exc))
        status.boot_error(reason)
        return EXIT_BOOT_ERROR
    return EXIT_OK


def _trace(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()
