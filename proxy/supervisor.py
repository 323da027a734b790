"""Pre-fork supervisor: owns the listening sockets, forks, reaps, restarts, reloads and drains workers.

Theory of operation: one SO_REUSEPORT listening socket per worker slot is bound here and never
closed while the service runs, so connections queued on a slot wait for its next worker instead
of being reset. At startup the address is probed without SO_REUSEPORT (`probe_listen`): a second
instance on the address of a running one exits 4 instead of joining its SO_REUSEPORT group. Slot 0
listens from then on; every other slot socket is bound here but put into listening state by its
first worker (uvloop's `create_server` calls listen): only then does it join the kernel's
SO_REUSEPORT group and get connections, so a socket added for a reload that then fails never held
any. Workers are forked (the supervisor runs no threads and no event loop, so fork is safe) and
report through a status pipe in framed messages (`proxy.ipc`: ready, heartbeat, boot error or
fatal error with its reason), decoded incrementally per worker; a corrupt stream gets the worker
killed. Signal handlers only enqueue; the main loop (a `selectors` loop that also serves the admin
listener) dispatches `handle_<signal>`:
- SIGCHLD: reap, reading the worker's last messages first. A worker that dies before it reported
  ready, or exits 3 (`worker.EXIT_BOOT_ERROR`), failed to boot: the supervisor stops (exit 3) with
  its reason instead of a crash loop. One of the current generation that dies after ready (exit
  70 `worker.EXIT_CRASH` for an error, or a signal) crashed: it is replaced on its slot with
  exponential backoff.
- SIGHUP: re-read the config. Invalid: log and keep serving. Valid: fork a new generation on the
  same slot sockets; when every new worker is ready, SIGTERM (drain) the old ones. If a new worker
  fails to boot, the new generation is killed and the old one keeps serving.
- SIGTERM/SIGINT: SIGTERM every worker (they drain), then stop listening (shutdown(SHUT_RD) of
  every slot socket, which acts for the workers too): new connections are refused at once while
  in-flight requests finish (a reload, unlike a stop, keeps every queue for the next generation).
  Wait up to drain_timeout + grace, SIGKILL what is left, exit 0. Socket-activated listeners are
  systemd's and keep listening: what connects meanwhile waits for the next start.
- SIGUSR1: relayed to every worker, which reopens its access log file (logrotate's postrotate).
A worker silent for `heartbeat_timeout` is killed and replaced. Metrics: the supervisor owns the
prometheus-client multiprocess directory (`proxy.metricsio`), made before the first fork of a
generation with metrics on (at start, or by the reload that turns them on) and passed to workers in
their config; a reaped worker's files are folded into the archive; the admin listener serves
`/metrics`, `/stats.json` and the status page (`proxy.status`) from it. Until metrics are on,
proxy.metricsio and prometheus-client are not imported, so the workers forked meanwhile do not carry
them (a worker is a fork: whatever the supervisor imported is in its memory too).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from proxy import __version__, compiled, ipc, worker
from proxy import config as config_mod
from proxy.admin import AdminServer, json_response
from proxy.config import Address, Config
from proxy.errors import ConfigError
from proxy.status import StatsHistory, status_page

if TYPE_CHECKING:
    from proxy.metricsio import MetricsDirectory

log = logging.getLogger("uvgate.supervisor")

EXIT_OK = 0
EXIT_BOOT_FAILURE = 3
EXIT_BIND_FAILURE = 4
BOOT_TIMEOUT = 30.0
KILL_GRACE = 5.0
STABLE_AFTER = 10.0  # a worker alive this long resets its slot's backoff
STATUS_READ_SIZE = 65536  # a pipe's capacity: one read takes all that is there


@dataclass(eq=False)
class Worker:
    pid: int
    slot: int
    generation: int
    pipe: int  # read end of the status pipe
    started: float
    ready: bool = False
    stopping: bool = False
    last_beat: float = 0.0
    error: str = ""
    stop_deadline: float = 0.0  # a stopping worker still alive then gets SIGKILL
    decoder: ipc.Decoder = field(default_factory=ipc.Decoder)  # the status pipe's frames


@dataclass
class Slot:
    index: int
    sock: socket.socket
    crashes: int = 0
    respawn_at: float = 0.0
    pending_respawn: bool = False
    restarts: int = 0  # workers of this slot replaced after a crash or a missed heartbeat


@dataclass
class Reload:
    generation: int
    config: Config
    workers: list[Worker] = field(default_factory=list)
    started: float = 0.0


def bind_listener(address: Address, backlog: int, *, reuse_port: bool = True, listen: bool = True) -> socket.socket:
    """A bound socket, listening unless told otherwise; with `reuse_port`, one of several SO_REUSEPORT
    sockets on the same address (the kernel spreads connections over those that listen)."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address.host, address.port))
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


def probe_listen(address: Address) -> None:
    """Raise OSError ("cannot listen on ADDRESS: Address already in use") if a socket listens on `address`.

    The slot sockets use SO_REUSEPORT, and a second uvgate's SO_REUSEPORT sockets would join the
    first one's group and take part of its traffic instead of failing to bind. So the address is
    bound once without SO_REUSEPORT first: that fails if anything listens on it (another uvgate
    included), and, with SO_REUSEADDR, not for what an instance that stopped leaves behind (TIME_WAIT,
    connections its workers still drain). Residual race: two instances starting together can both
    pass the probe before either listens. The caller makes slot 0 listen right after its probe, so
    the window is the few microseconds between the two calls.
    """
    bind_listener(address, 1, reuse_port=False, listen=False).close()


SD_LISTEN_FDS_START = 3


def systemd_listen_fds(env: dict[str, str], pid: int) -> list[int]:
    """Listening sockets passed by systemd socket activation (LISTEN_PID/LISTEN_FDS), or []."""
    if env.get("LISTEN_PID") != str(pid):
        return []
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(0, count)))


def sd_notify(notify_socket: str | None, message: str) -> None:
    """Tell systemd (Type=notify) about state changes; a no-op outside systemd."""
    if not notify_socket:
        return
    address = "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)


class Supervisor:
    """The master process."""

    def __init__(
        self,
        config: Config,
        config_path: str,
        *,
        workers_override: int | None = None,
        notify_socket: str | None = None,
        listen_fds: list[int] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.workers_override = workers_override
        self.notify_socket = notify_socket
        self.inherited = [socket.socket(fileno=fd) for fd in listen_fds or []]
        for sock in self.inherited:
            sock.setblocking(False)
        self.generation = 1
        self.slots: list[Slot] = []
        self.workers: dict[int, Worker] = {}
        self.reload: Reload | None = None
        self.signals: deque[int] = deque()
        self.selector = selectors.DefaultSelector()
        self.admin: AdminServer | None = None
        self.draining = False
        self.exit_code: int | None = None
        self.ready_once = False
        self.listen = config.server.listen
        self._wake_r = -1
        self._wake_w = -1
        self.started = time.time()
        self.metrics_dir: MetricsDirectory | None = None
        self.stats = StatsHistory()

    # ------------------------------------------------------------------ setup

    def bind(self) -> None:
        server = self.config.server
        if self.inherited:
            # systemd socket activation: the listeners are systemd's; slots share them round robin.
            sock = self.inherited[0]
            host, port = sock.getsockname()[:2]
            self.listen = Address(host, port)
            log.info("socket activation: %d listener(s) from systemd, server.listen is not used", len(self.inherited))
            count = max(server.workers, len(self.inherited))
            if count > server.workers:
                log.warning("socket activation: %d listeners, so %d workers (one per listener)", count, count)
                self.workers_override = count
                self.config = replace(self.config, server=replace(server, workers=count))
            self.slots = [Slot(index, self.inherited[index % len(self.inherited)]) for index in range(count)]
        else:
            if server.listen.port != 0:
                probe_listen(server.listen)
            # Slot 0 listens at once, so that from here on another instance's probe sees this one:
            # connections made before worker 0 serves wait in its queue (the other slots listen when
            # their workers start, see the top).
            first = bind_listener(server.listen, server.backlog)
            self.listen = Address(server.listen.host, first.getsockname()[1])
            self.slots = [Slot(0, first)]
            for index in range(1, server.workers):
                self.slots.append(Slot(index, bind_listener(self.listen, server.backlog, listen=False)))
        admin_sock = bind_listener(server.admin_listen, 64, reuse_port=False)
        self.admin = AdminServer(admin_sock, self.selector, self._admin)
        self.admin_address = Address(server.admin_listen.host, admin_sock.getsockname()[1])
        self.config = config_mod.with_listen(self.config, self.listen)

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wakeup)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        """Signal handler: no work, no logging; just queue the signal."""
        self.signals.append(signum)

    def _drain_wakeup(self, fd: int) -> None:
        try:
            while os.read(fd, 512):
                pass
        except BlockingIOError:
            pass

    # ------------------------------------------------------------------ workers

    def spawn(self, slot: Slot, config: Config, generation: int) -> Worker:
        read_fd, write_fd = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # child
            code = EXIT_BOOT_FAILURE
            try:
                os.close(read_fd)
                self._child_cleanup(slot)
                code = worker.run(config, slot.sock, slot.index, write_fd, parent)
            except BaseException as exc:  # never return into the supervisor's stack (cleanup failed, or a bad fd)
                with contextlib.suppress(OSError):
                    os.write(write_fd, ipc.boot_error(f"{type(exc).__name__}: {exc}"))
            finally:
                os._exit(code)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        now = time.monotonic()
        worker_ = Worker(pid=pid, slot=slot.index, generation=generation, pipe=read_fd, started=now, last_beat=now)
        self.workers[pid] = worker_
        self.selector.register(read_fd, selectors.EVENT_READ, lambda fd, w=worker_: self._read_status(w))
        log.info("worker %d (slot %d, generation %d) started", pid, slot.index, generation)
        return worker_

    def _child_cleanup(self, slot: Slot) -> None:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until the worker's loop handles it
        for other in self.slots:
            if other.sock is not slot.sock:  # (socket-activated slots may share one listener)
                other.sock.close()
        if self.admin is not None:
            for conn in list(self.admin.conns):
                conn.close()
            self.admin.sock.close()
        for w in self.workers.values():
            try:
                os.close(w.pipe)
            except OSError:
                pass
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self.selector.close()

    def _read_status(self, worker_: Worker) -> bool:
        """Read a worker's status pipe once and act on the messages completed; False once nothing more
        is there now (the pipe is empty, or closed at end of stream or on a corrupt one)."""
        try:
            data = os.read(worker_.pipe, STATUS_READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._close_pipe(worker_)
            return False
        worker_.last_beat = time.monotonic()
        try:
            messages = worker_.decoder.feed(data)
        except ipc.FrameError as exc:
            log.error("worker %d (slot %d): corrupt status pipe (%s); killing it", worker_.pid, worker_.slot, exc)
            self._close_pipe(worker_)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker_.pid, signal.SIGKILL)
            messages = exc.messages
        for message in messages:
            self._on_message(worker_, message)
        return worker_.pipe >= 0

    def _on_message(self, worker_: Worker, message: ipc.Message) -> None:
        if message.kind in (ipc.Kind.BOOT_ERROR, ipc.Kind.FATAL):
            worker_.error = message.text.strip()
        elif message.kind == ipc.Kind.READY and not worker_.ready:
            worker_.ready = True
            log.info("worker %d (slot %d) ready", worker_.pid, worker_.slot)
            self._on_ready(worker_)
        # HEARTBEAT: reading it refreshed last_beat. Kinds this supervisor does not know: ignored.

    def _close_pipe(self, worker_: Worker) -> None:
        if worker_.pipe >= 0:
            try:
                self.selector.unregister(worker_.pipe)
            except (KeyError, ValueError):
                pass
            os.close(worker_.pipe)
            worker_.pipe = -1

    def _on_ready(self, worker_: Worker) -> None:
        if self.draining:
            # Its socket may not have been listening yet when the stop began (shutdown cannot act on
            # it then), and listens now: take it out again. The worker has its SIGTERM already.
            self._stop_listening()
            return
        reload = self.reload
        if reload is not None and worker_.generation == reload.generation:
            if all(w.ready for w in reload.workers):
                self._commit_reload(reload)
            return
        if not self.ready_once and self._all_ready():
            self.ready_once = True
            log.info(
                "uvgate %s (%s) ready: listening on http://%s, admin on http://%s",
                __version__,
                "mypyc-compiled" if compiled() else "pure Python",
                self.listen,
                self.admin_address,
            )
            sd_notify(self.notify_socket, "READY=1\nSTATUS=serving")

    def _all_ready(self) -> bool:
        ready_slots = {w.slot for w in self.workers.values() if w.generation == self.generation and w.ready}
        return len(ready_slots) == len(self.slots)

    def stop_worker(self, worker_: Worker, sig: int = signal.SIGTERM) -> None:
        if not worker_.stopping:
            worker_.stop_deadline = time.monotonic() + self.config.server.drain_timeout + KILL_GRACE
        worker_.stopping = True
        try:
            os.kill(worker_.pid, sig)
        except ProcessLookupError:
            pass

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker_ = self.workers.pop(pid, None)
            if worker_ is None:
                continue  # not ours (we may be PID 1): reaped quietly
            while worker_.pipe >= 0 and self._read_status(worker_):
                pass  # its last messages (the reason it exited) up to the end of the stream
            self._close_pipe(worker_)
            if self.metrics_dir is not None:
                self.metrics_dir.process_dead(pid)
            self._worker_exited(worker_, status)

    def _worker_exited(self, worker_: Worker, status: int) -> None:
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            how = f"killed by {signal.Signals(sig).name}" + (" (out of memory?)" if sig == signal.SIGKILL else "")
        else:
            how = f"exit code {code}"
        if worker_.stopping:
            log.info("worker %d (slot %d) stopped: %s", worker_.pid, worker_.slot, how)
            return
        reason = f": {worker_.error}" if worker_.error else ""
        reload = self.reload
        if reload is not None and worker_.generation == reload.generation:
            log.error("reload aborted: new worker %d failed to boot (%s)%s", worker_.pid, how, reason)
            self._abort_reload(reload)
            return
        if self.draining:
            return
        if not worker_.ready or code == worker.EXIT_BOOT_ERROR:
            log.error("worker %d (slot %d) failed to boot (%s)%s; stopping", worker_.pid, worker_.slot, how, reason)
            self.exit_code = EXIT_BOOT_FAILURE
            self.begin_shutdown()
            return
        if worker_.slot >= len(self.slots):
            log.info("worker %d of removed slot %d exited (%s)", worker_.pid, worker_.slot, how)
            return
        slot = self.slots[worker_.slot]
        now = time.monotonic()
        if now - worker_.started > STABLE_AFTER:
            slot.crashes = 0
        delay = 0.0 if slot.crashes == 0 else min(self.config.server.restart_backoff_max, 0.1 * 2 ** (slot.crashes - 1))
        slot.crashes += 1
        slot.restarts += 1
        log.error("worker %d (slot %d) died (%s)%s; restarting in %.1fs", worker_.pid, worker_.slot, how, reason, delay)
        slot.pending_respawn = True
        slot.respawn_at = now + delay

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.pending_respawn and now >= slot.respawn_at and not self.draining:
                slot.pending_respawn = False
                self.spawn(slot, self.config, self.generation)

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        limit = self.config.server.heartbeat_timeout
        for w in list(self.workers.values()):
            if w.stopping:
                if w.stop_deadline and now > w.stop_deadline:
                    log.warning("worker %d did not finish draining in time; killing it", w.pid)
                    w.stop_deadline = 0.0
                    try:
                        os.kill(w.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                continue
            if not w.ready and now - w.started > BOOT_TIMEOUT:
                w.error = w.error or f"not ready after {BOOT_TIMEOUT:.0f}s"
                os.kill(w.pid, signal.SIGKILL)
            elif w.ready and now - w.last_beat > limit:
                log.error("worker %d (slot %d) silent for %.0fs; killing it", w.pid, w.slot, now - w.last_beat)
                os.kill(w.pid, signal.SIGKILL)

    # ------------------------------------------------------------------ signals

    def handle_sigchld(self) -> None:
        self.reap()

    def handle_sigterm(self) -> None:
        log.info("SIGTERM: draining")
        self.begin_shutdown()

    def handle_sigint(self) -> None:
        log.info("SIGINT: draining")
        self.begin_shutdown()

    def handle_sigusr1(self) -> None:
        log.info("SIGUSR1: workers reopen their access log")
        for w in list(self.workers.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGUSR1)

    def handle_sighup(self) -> None:
        if self.draining:
            return
        if self.reload is not None:
            log.warning("SIGHUP ignored: a reload is already in progress")
            return
        try:
            new = config_mod.load(self.config_path, workers=self.workers_override)
        except ConfigError as exc:
            log.error("reload rejected, keeping the running configuration:\n%s", exc)
            return
        if new.server.listen not in (self.listen, self.config.server.listen) and new.server.listen.port != 0:
            log.warning("reload: server.listen changes need a restart; keeping %s", self.listen)
        if new.server.admin_listen != self.config.server.admin_listen:
            log.warning("reload: server.admin_listen changes need a restart; keeping %s", self.admin_address)
        if self.metrics_dir is None and new.metrics.enabled:
            try:
                self.metrics_dir = self._metrics_directory(new)
            except OSError as exc:
                log.error(
                    "reload rejected, keeping the running configuration: metrics.directory: cannot create %s (%s)",
                    exc.filename,
                    exc.strerror or exc,
                )
                return
        elif self.metrics_dir is not None and new.metrics.directory not in ("", self.metrics_dir.path):
            log.warning("reload: metrics.directory changes need a restart; keeping %s", self.metrics_dir.path)
        if self.metrics_dir is not None:
            new = config_mod.with_metrics_directory(new, self.metrics_dir.path)
        new = config_mod.with_listen(new, self.listen)
        sd_notify(self.notify_socket, "RELOADING=1")
        self._resize_slots(new.server.workers)
        reload = Reload(generation=self.generation + 1, config=new, started=time.monotonic())
        self.reload = reload
        log.info("SIGHUP: starting generation %d", reload.generation)
        for slot in self.slots[: new.server.workers]:
            reload.workers.append(self.spawn(slot, new, reload.generation))

    def _resize_slots(self, count: int) -> None:
        while len(self.slots) < count:
            index = len(self.slots)
            if self.inherited:
                sock = self.inherited[index % len(self.inherited)]
            else:
                sock = bind_listener(self.listen, self.config.server.backlog, listen=False)  # (see the top)
            self.slots.append(Slot(index, sock))

    def _close_slot_sockets(self, slots: list[Slot]) -> None:
        """Close the listeners of removed slots, unless systemd owns them (or another slot uses them)."""
        keep = {id(slot.sock) for slot in self.slots}
        for slot in slots:
            if id(slot.sock) not in keep and slot.sock not in self.inherited:
                slot.sock.close()

    def _commit_reload(self, reload: Reload) -> None:
        old = [
            w
            for w in self.workers.values()
            if (w.generation != reload.generation or w.slot >= reload.config.server.workers) and not w.stopping
        ]
        self.config = reload.config
        self.generation = reload.generation
        self.reload = None
        for w in old:
            self.stop_worker(w)
        for slot in self.slots:
            slot.pending_respawn = False
        surplus = self.slots[self.config.server.workers :]
        if surplus:
            # Fewer workers than before: their sockets' queues would be dropped on close, so they are
            # closed only now, after the new generation serves every remaining slot.
            del self.slots[self.config.server.workers :]
            self._close_slot_sockets(surplus)
        log.info("generation %d serving; draining %d old workers", self.generation, len(old))
        sd_notify(self.notify_socket, "READY=1\nSTATUS=serving")

    def _abort_reload(self, reload: Reload) -> None:
        self.reload = None
        for w in reload.workers:
            if w.pid in self.workers:
                self.stop_worker(w, signal.SIGKILL)
        added = self.slots[self.config.server.workers :]
        del self.slots[self.config.server.workers :]
        self._close_slot_sockets(added)  # added for the new generation: nothing ever served them
        sd_notify(self.notify_socket, "READY=1\nSTATUS=serving (reload failed)")

    # ------------------------------------------------------------------ shutdown

    def begin_shutdown(self) -> None:
        """Stop: drain every worker and stop listening (a reload does neither: see handle_sighup)."""
        if self.draining:
            return
        self.draining = True
        self.shutdown_deadline = time.monotonic() + self.config.server.drain_timeout + KILL_GRACE
        sd_notify(self.notify_socket, "STOPPING=1")
        for w in list(self.workers.values()):
            self.stop_worker(w)
        self._stop_listening()
        if self.inherited:
            log.info("stopping: the listeners are systemd's; new connections wait there for the next start")
        else:
            log.info("stopping: no longer listening on %s, new connections are refused", self.listen)

    def _stop_listening(self) -> None:
        """Take every slot socket out of listening state, for the workers too: a new connection is
        refused at once (a load balancer retries elsewhere) instead of waiting in a queue that no
        worker serves any more, to be reset at exit.

        shutdown(SHUT_RD) acts on the socket, not on this process's descriptor, so it stops listening
        for every process holding it (closing our descriptor would not); connections already accepted
        are not touched, those still queued are reset, and a later listen() cannot revive it. A
        socket that is not listening yet (its worker still booting) is not affected: `_on_ready` calls
        this again. uvloop in a worker logs nothing and does not crash, but polls the dead socket in a
        busy loop until the worker closes its server, which it does on its SIGTERM: so workers are
        signalled first. Socket-activated listeners are systemd's, which keeps listening after we
        exit and starts us again for what waits there: they are left alone."""
        for sock in {id(slot.sock): slot.sock for slot in self.slots}.values():
            if sock not in self.inherited:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)

    # ------------------------------------------------------------------ admin

    def _admin(self, method: str, path: str) -> tuple[int, bytes, bytes]:
        if method not in ("GET", "HEAD"):
            return json_response(405, {"error": "method not allowed"})
        if path == "/healthz":
            return json_response(200, {"status": "alive"})
        if path == "/readyz":
            ready = not self.draining and self._all_ready()
            workers = sum(1 for w in self.workers.values() if w.ready and not w.stopping)
            body = {"ready": ready, "draining": self.draining, "workers": workers, "generation": self.generation}
            return json_response(200 if ready else 503, body)
        if path in ("/metrics", "/stats.json") and (self.metrics_dir is None or not self.config.metrics.enabled):
            return json_response(404, {"error": "metrics are off ([metrics] enabled = false)"})
        if path == "/metrics" and self.metrics_dir is not None:
            return 200, b"text/plain; version=0.0.4; charset=utf-8", self.metrics_dir.exposition()
        if path == "/stats.json" and self.metrics_dir is not None:
            return json_response(200, self._stats())
        if path in ("/", "/index.html"):
            return 200, b"text/html; charset=utf-8", status_page()
        return json_response(404, {"error": "not found"})

    def _stats(self) -> dict[str, object]:
        """The /stats.json document: the workers as the supervisor knows them, the rest from the metrics."""
        assert self.metrics_dir is not None
        now = time.monotonic()
        workers: list[dict[str, object]] = [
            {
                "pid": w.pid,
                "slot": w.slot,
                "generation": w.generation,
                "uptime": round(now - w.started, 1),
                "ready": w.ready,
                "stopping": w.stopping,
                "restarts": self.slots[w.slot].restarts if w.slot < len(self.slots) else 0,
            }
            for w in sorted(self.workers.values(), key=lambda w: (w.slot, w.generation))
        ]
        return self.stats.report(
            now,
            self.metrics_dir.totals(),
            workers=workers,
            generation=self.generation,
            uptime=time.time() - self.started,
            draining=self.draining,
            restarts=self._restarts(),
        )

    def _metrics_directory(self, config: Config) -> MetricsDirectory:
        """`config`'s metrics directory, made (stale files removed); OSError if it cannot be. The first call
        imports proxy.metricsio and prometheus-client: only once metrics are on."""
        from proxy.metricsio import MetricsDirectory, SupervisorCollector

        return MetricsDirectory(config.metrics.directory, SupervisorCollector(self._restarts, compiled()))

    def _restarts(self) -> int:
        """Workers replaced after a crash or a missed heartbeat, since start (uvgate_worker_restarts_total)."""
        return sum(slot.restarts for slot in self.slots)

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        """Bind, start workers, serve until stopped; returns the exit code."""
        try:
            self.bind()
        except OSError as exc:
            log.error("%s; stopping", exc.strerror or exc)
            return EXIT_BIND_FAILURE
        if self.config.metrics.enabled:
            try:
                self.metrics_dir = self._metrics_directory(self.config)
            except OSError as exc:
                log.error("metrics.directory: cannot create %s (%s); stopping", exc.filename, exc.strerror or exc)
                self._close()
                return EXIT_BOOT_FAILURE
            self.config = config_mod.with_metrics_directory(self.config, self.metrics_dir.path)
        self.stats.add(time.monotonic(), {})
        self._install_signals()
        for slot in self.slots:
            self.spawn(slot, self.config, self.generation)
        try:
            while True:
                self._loop_once()
                if self.draining and not self.workers:
                    break
                if self.draining and time.monotonic() > self.shutdown_deadline:
                    for w in list(self.workers.values()):
                        log.warning("worker %d did not stop in time; killing it", w.pid)
                        self.stop_worker(w, signal.SIGKILL)
                    self.shutdown_deadline = float("inf")
        finally:
            self._close()
        code = self.exit_code if self.exit_code is not None else EXIT_OK
        log.info("supervisor exiting with code %d", code)
        return code

    def _loop_once(self) -> None:
        try:
            events = self.selector.select(timeout=0.2)
        except InterruptedError:
            events = []
        for key, _ in events:
            callback = key.data
            callback(key.fileobj)
        while self.signals:
            sig = self.signals.popleft()
            getattr(self, f"handle_{signal.Signals(sig).name.lower()}")()
        self.reap()
        self._respawn_due()
        self._check_heartbeats()
        if self.admin is not None:
            self.admin.expire()
        if self.metrics_dir is not None and self.stats.due(time.monotonic()):
            self.stats.add(time.monotonic(), self.metrics_dir.totals())

    def _close(self) -> None:
        if self.admin is not None:
            self.admin.close()
        for sock in {id(slot.sock): slot.sock for slot in self.slots}.values():
            sock.close()
        for sock in self.inherited:
            sock.close()
        for w in self.workers.values():
            self._close_pipe(w)
        if self.metrics_dir is not None:
            self.metrics_dir.close()
            self.metrics_dir = None
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError as exc:
                    if exc.errno != errno.EBADF:
                        raise
