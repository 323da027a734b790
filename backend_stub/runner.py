"""Process runner for the stubs: bind, serve on uvloop until SIGTERM/SIGINT, optionally pre-fork.

Theory of operation
-------------------
Sockets are bound and listening before any worker runs, so port 0 resolves once and every
worker shares the port. With one worker the process serves by itself. With more, the parent
binds one SO_REUSEPORT socket per worker (one shared socket where the option is missing), never
creates an event loop, and forks. SIGTERM/SIGINT are blocked around ``fork`` so a child cannot
die of a signal before its loop handles it; each child asks the kernel for SIGTERM if the
parent dies (PR_SET_PDEATHSIG, else a getppid poll), serves its socket, writes one byte on a
pipe once serving, and on SIGTERM/SIGINT drains and exits 0. The parent's signal handlers only
enqueue; its loop forwards signals to the children, reaps them, prints the listening line when
every child is ready, and exits when all have exited: 0 after a requested stop, 1 if a worker
failed to start in time or exited on its own (the others are stopped then; no respawn).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import queue
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Final, NoReturn

import uvloop

from backend_stub.httpcore import App, HttpConnection, ServerState

STOP_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT})
STARTUP_TIMEOUT: Final = 30.0  # seconds for every worker to report ready
KILL_GRACE: Final = 5.0  # seconds past the drain timeout before stuck workers get SIGKILL
_PR_SET_PDEATHSIG: Final = 1

AppFactory = Callable[[ServerState], App]


@dataclass(frozen=True, slots=True)
class RunOptions:
    """What to serve and how; validated by the CLI."""

    name: str  # printed in "<name> listening on ..." and sent as the Server header
    host: str = "127.0.0.1"
    port: int = 0
    workers: int = 1
    drain_timeout: float = 3.0
    keep_alive_timeout: float = 0.0


def run(options: RunOptions, app_factory: AppFactory) -> int:
    """Serve until SIGTERM/SIGINT and return the process exit code.

    ``app_factory`` runs inside each worker, after its event loop exists.
    """
    reuse_port = options.workers > 1 and hasattr(socket, "SO_REUSEPORT")
    try:
        sockets = bind_sockets(options.host, options.port, options.workers if reuse_port else 1, reuse_port=reuse_port)
    except OSError as exc:
        print(f"{options.name}: cannot listen on {options.host}:{options.port}: {exc}", file=sys.stderr, flush=True)
        return 1
    line = f"{options.name} listening on {_url(sockets[0])}"
    if options.workers == 1:
        return _serve(sockets[0], options, app_factory, on_ready=lambda: print(line, flush=True), parent_pid=None)
    return _supervise(sockets, options, app_factory, line)


def bind_sockets(host: str, port: int, count: int, *, reuse_port: bool) -> list[socket.socket]:
    """``count`` listening sockets on one address; port 0 is resolved by the first bind."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(1024)
            sock.setblocking(False)
            address = (address[0], sock.getsockname()[1], *address[2:])
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _serve(
    sock: socket.socket,
    options: RunOptions,
    app_factory: AppFactory,
    *,
    on_ready: Callable[[], None],
    parent_pid: int | None,
) -> int:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        state = ServerState(loop, server_name=options.name, keep_alive_timeout=options.keep_alive_timeout)
        app = app_factory(state)
        server = await loop.create_server(lambda: HttpConnection(state, app), sock=sock, backlog=1024)
        stop = loop.create_future()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, _resolve, stop)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if parent_pid is not None and not _die_with_parent(parent_pid):
            _watch_parent(loop, parent_pid, stop)
        state.start()
        on_ready()
        await stop
        server.close()
        await state.drain(options.drain_timeout)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    return 0


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _die_with_parent(parent_pid: int) -> bool:
    """Ask Linux to send us SIGTERM when the parent exits; False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result: int = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return False
    if result != 0:
        return False
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def _watch_parent(loop: asyncio.AbstractEventLoop, parent_pid: int, stop: asyncio.Future[None]) -> None:
    if os.getppid() != parent_pid:
        _resolve(stop)
    elif not stop.done():
        loop.call_later(1.0, _watch_parent, loop, parent_pid, stop)


def _supervise(sockets: list[socket.socket], options: RunOptions, app_factory: AppFactory, line: str) -> int:
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()

    def enqueue(signum: int, frame: FrameType | None) -> None:
        """Signal handler: no work here, the main loop reads the queue."""
        signals.put(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, enqueue)
    ready_r, ready_w = os.pipe()
    parent_pid = os.getpid()
    children: dict[int, int] = {}
    sys.stdout.flush()
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        for slot in range(options.workers):
            pid = os.fork()
            if pid == 0:
                _child(sockets[slot % len(sockets)], sockets, options, app_factory, ready_r, ready_w, parent_pid)
            children[pid] = slot
    except OSError:
        traceback.print_exc()
        for pid in children:
            os.kill(pid, signal.SIGTERM)
    finally:
        os.close(ready_w)
        for sock in sockets:
            sock.close()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    return _watch_children(children, signals, ready_r, options, line)


def _child(
    sock: socket.socket,
    sockets: list[socket.socket],
    options: RunOptions,
    app_factory: AppFactory,
    ready_r: int,
    ready_w: int,
    parent_pid: int,
) -> NoReturn:
    code = 1
    try:
        os.close(ready_r)
        for other in sockets:
            if other is not sock:
                other.close()
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)  # still blocked; the event loop takes them over
        code = _serve(sock, options, app_factory, on_ready=lambda: _notify_ready(ready_w), parent_pid=parent_pid)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _notify_ready(ready_w: int) -> None:
    os.write(ready_w, b".")


def _watch_children(
    children: dict[int, int], signals: queue.SimpleQueue[int], ready_r: int, options: RunOptions, line: str
) -> int:
    os.set_blocking(ready_r, False)
    ready = 0
    announced = False
    failed = False
    start_deadline = time.monotonic() + STARTUP_TIMEOUT
    kill_deadline: float | None = None

    def stop(signum: int) -> None:
        nonlocal kill_deadline
        if kill_deadline is None:
            kill_deadline = time.monotonic() + options.drain_timeout + KILL_GRACE
        _signal_all(children, signum)

    while children:
        with contextlib.suppress(queue.Empty):
            stop(signals.get(timeout=0.1))
        for pid, code in _reap(children):
            if code != 0 or kill_deadline is None:
                failed = True
                print(f"{options.name}: worker {pid} exited with {code}", file=sys.stderr, flush=True)
                stop(signal.SIGTERM)
        if not announced:
            with contextlib.suppress(BlockingIOError):
                ready += len(os.read(ready_r, 64))
            if ready >= options.workers:
                announced = True
                print(line, flush=True)
            elif kill_deadline is None and time.monotonic() > start_deadline:
                failed = True
                print(f"{options.name}: workers not ready after {STARTUP_TIMEOUT}s", file=sys.stderr, flush=True)
                stop(signal.SIGTERM)
        if kill_deadline is not None and time.monotonic() > kill_deadline:
            failed = True
            _signal_all(children, signal.SIGKILL)
    os.close(ready_r)
    return 1 if failed else 0


def _reap(children: dict[int, int]) -> list[tuple[int, int]]:
    """Exited children as (pid, exit code); negative codes are signals."""
    exited: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            exited.extend((pid, 1) for pid in children)
            children.clear()
            return exited
        if pid == 0:
            return exited
        if children.pop(pid, None) is not None:
            exited.append((pid, os.waitstatus_to_exitcode(status)))


def _signal_all(children: dict[int, int], signum: int) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
